"""TensorRT engines from the exported ONNX graphs: the TensorRT Python API, one code path for ``tensorrt`` and
``tensorrt_rtx``.

:func:`build_tensorrt` parses ``unet.onnx`` (and ``unet_personalize.onnx`` when the export has it) with the ONNX
parser into a strongly typed network (the precision is the ONNX graph's: export with ``--fp16`` for an fp16
engine), adds one optimization profile per ``(min, opt, max)`` shape triple (``static``: one shape, for CUDA
graphs), sets the builder's workspace limit, reads and writes a timing cache, optionally marks the engine
refittable, serializes ``unet.plan`` and writes the folder's ``dreamfuse.json`` (the ONNX manifest plus a
``tensorrt`` section). A graph exported with ``--plugins`` holds ``dreamfuse::*`` plugin nodes: the plugin library
built from ``native/trt_plugins/`` (``plugins=LIB``, ``--plugins LIB``) is loaded into TensorRT's plugin registry
before parsing, where the ONNX parser finds each node's plugin by op type, ``plugin_namespace`` and
``plugin_version``; it is copied into the plan folder (``plugins/``) and named in the manifest
(``tensorrt.plugin_libraries``, with its sha256 under ``files`` like the plans') so that ``TensorRTUNet`` and
:func:`refit_tensorrt` load that copy, once verified, before deserializing. A plan folder is a program: its plugin
libraries are native code that runs when loaded. No library and plugin nodes: a
``ValueError`` naming ``plugins`` before anything is built. Built engines are cached under a key of the model
hash, the TensorRT module and version, the compute capability, the profiles, the build options and the plugin
libraries' contents (:func:`cache_key`).

TensorRT-RTX (``pip install tensorrt-rtx-cu13``) has the same builder and ONNX parser and builds with no GPU for a
chosen compute capability (``compute_capability="8.9"``): that is how the build is tested on machines without a
GPU. Its targets are SM 7.5, 8.0, 8.6, 8.9 and 12.x (RTX and Ampere-class parts: not Hopper). Full TensorRT builds
for the GPU it runs on. Running an engine needs a GPU and the TensorRT runtime
(:class:`dreamfuse.export.runtime.TensorRTUNet`).

:func:`refit_tensorrt` swaps the weights of a refittable engine for those of another ONNX export of the same
architecture (a DreamBooth checkpoint, a LoRA fused in) without a rebuild; it deserializes the engine, so it needs
the GPU the engine is for.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import time
from pathlib import Path

from dreamfuse.engine.files import atomic_path

from .manifest import MANIFEST, file_entries, graph_files, graph_plugins, read_manifest, verify_files, write_manifest
from .plugins import load_tensorrt_plugins

MODULES = ("tensorrt", "tensorrt_rtx")
UNET_GRAPHS = ("unet", "unet_personalize")


def import_tensorrt(prefer: str | None = None):
    """The TensorRT Python module: ``prefer`` if given, else ``tensorrt``, else ``tensorrt_rtx``. ``ImportError``
    with the install commands when neither is installed."""
    names = [prefer] if prefer else list(MODULES)
    errors = []
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ImportError("tensorrt: neither TensorRT (`pip install tensorrt`, needs NVIDIA's package index) nor "
                      "TensorRT-RTX (`pip install tensorrt-rtx-cu13`) is importable (" + "; ".join(errors) + ")")


def module_name(trt) -> str:
    return trt.__name__.split(".")[0]


# --------------------------------------------------------------------------------------------- profiles
def parse_profile(text: str, scale: int = 8) -> dict:
    """``"B,H,W:B,H,W:B,H,W"`` (min, opt, max; image pixels) or one ``"B,H,W"`` (static) -> a profile dict with
    ``batch``, ``latent_height``, ``latent_width`` as ``[min, opt, max]``."""
    parts = str(text).split(":")
    if len(parts) not in (1, 3):
        raise ValueError(f"profile: expected B,H,W:B,H,W:B,H,W (min:opt:max) or B,H,W, got {text!r}")
    shapes = []
    for part in parts:
        try:
            b, h, w = (int(x) for x in part.split(","))
        except ValueError:
            raise ValueError(f"profile: {part!r} in {text!r} is not B,H,W (three integers)") from None
        if b < 1 or h < scale or w < scale or h % scale or w % scale:
            raise ValueError(f"profile: {part!r}: batch >= 1 and height/width multiples of {scale} px")
        shapes.append((b, h // scale, w // scale))
    if len(shapes) == 1:
        shapes *= 3
    for i in range(3):
        lo, opt, hi = (s[i] for s in shapes)
        if not lo <= opt <= hi:
            raise ValueError(f"profile: {text!r} needs min <= opt <= max in every field")
    return {"batch": [s[0] for s in shapes], "latent_height": [s[1] for s in shapes],
            "latent_width": [s[2] for s in shapes]}


def default_profile(manifest: dict) -> dict:
    """min and max of the ONNX export's profile, opt at batch 2 (clamped) and the model's native size (clamped)."""
    p = manifest["profile"]
    native = int(manifest["model"].get("sample_size") or p["latent_height"][0])

    def field(key, opt):
        lo, hi = p[key]
        return [lo, min(max(opt, lo), hi), hi]

    return {"batch": field("batch", 2), "latent_height": field("latent_height", native),
            "latent_width": field("latent_width", native)}


def _check_profile(profile: dict, manifest: dict, static: bool) -> None:
    exported = manifest["profile"]
    scale = int(manifest["model"].get("vae_scale_factor", 8))
    for key, unit in (("batch", 1), ("latent_height", scale), ("latent_width", scale)):
        lo, _, hi = profile[key]
        e_lo, e_hi = exported[key]
        if lo < e_lo or hi > e_hi:
            what = "rows" if key == "batch" else "px"
            raise ValueError(f"profile: {key.removeprefix('latent_')} {lo * unit}-{hi * unit} {what} leaves the ONNX "
                             f"export's range {e_lo * unit}-{e_hi * unit} {what}")
        if key != "batch" and not exported["static"] and (lo % 8 or hi % 8 or profile[key][1] % 8):
            raise ValueError(f"profile: {key.removeprefix('latent_')} must be a multiple of {8 * scale} px")
    if static and any(len(set(profile[k])) != 1 for k in ("batch", "latent_height", "latent_width")):
        raise ValueError("static: a static engine has one shape (--profile B,H,W)")


def _input_shape(name: str, shape: tuple, b: int, h: int, w: int) -> tuple:
    """The concrete shape of network input ``name`` (``-1`` for dynamic dims) at batch ``b``, latent ``h x w``."""
    out = list(shape)
    factor = int(name.rsplit("_", 1)[1]) if name.startswith(("ama_flow_", "ama_err_")) else None
    for i, d in enumerate(out):
        if d != -1:
            continue
        if i == 0:
            out[i] = b
        elif name == "sample" and i in (2, 3):
            out[i] = h if i == 2 else w
        elif factor is not None and i in (1, 2):
            out[i] = (h if i == 1 else w) // factor
        else:
            raise ValueError(f"tensorrt: input {name} has a dynamic dimension {i} dreamfuse does not know")
    return tuple(out)


# --------------------------------------------------------------------------------------------- build
class _Logger:
    """A TensorRT logger that keeps the errors (for the build's error message) and prints warnings and worse."""

    def __init__(self, trt, verbose: bool = False):
        base = trt.ILogger

        class Logger(base):
            def __init__(self):
                base.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(msg)
                if verbose or severity <= trt.ILogger.Severity.WARNING:
                    print(f"[tensorrt] {msg}")

        self.logger = Logger()


def cache_key(manifest: dict, trt, compute_capability: str, profiles: list[dict], static: bool, refit: bool,
              graph: str, plugin_libraries=()) -> str:
    """The key a built engine is cached under: model and IP-Adapter hashes, dtype, opset, dreamfuse version, the
    TensorRT module and version, the compute capability, the profiles, the build options and the contents of the
    plugin libraries the graph needs."""
    data = {"model": manifest["model"]["hash"], "ip": (manifest.get("ip_adapter") or {}).get("hash"),
            "dtype": manifest["dtype"], "opset": manifest["opset"], "dreamfuse": manifest.get("dreamfuse_version"),
            "trt": [module_name(trt), trt.__version__], "cc": compute_capability, "profiles": profiles,
            "static": static, "refit": refit, "graph": graph}
    if plugin_libraries:
        data["plugins"] = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in plugin_libraries]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def _compute_capability(trt, builder_config, requested: str | None) -> str:
    """Set the target compute capability on TensorRT-RTX (``"8.9"`` / ``"89"`` / ``"current"``); full TensorRT
    builds for the GPU present. Returns it as ``"8.9"``."""
    import torch

    has_gpu = torch.cuda.is_available()
    if not hasattr(trt, "ComputeCapability"):  # full TensorRT
        if not has_gpu:
            raise ValueError("compute_capability: full TensorRT builds for the GPU it runs on and none is available "
                             "here (TensorRT-RTX builds without one: pip install tensorrt-rtx-cu13)")
        if requested not in (None, "current"):
            raise ValueError("compute_capability: full TensorRT builds for the GPU present only")
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    if requested in (None, "current"):
        if not has_gpu:
            known = ", ".join(n[2:-1] + "." + n[-1] for n in trt.ComputeCapability.__members__ if n.startswith("SM"))
            raise ValueError(f"compute_capability: no GPU here to build for; name one (TensorRT-RTX targets {known})")
        major, minor = torch.cuda.get_device_capability()
        requested = f"{major}.{minor}"
    digits = str(requested).replace(".", "")
    member = getattr(trt.ComputeCapability, f"SM{digits}", None)
    if member is None:
        known = ", ".join(n[2:-1] + "." + n[-1] for n in trt.ComputeCapability.__members__ if n.startswith("SM"))
        raise ValueError(f"compute_capability: {requested!r} is not a TensorRT-RTX target ({known})")
    builder_config.num_compute_capabilities = 1
    builder_config.set_compute_capability(member, 0)
    return f"{digits[:-1]}.{digits[-1]}"


def build_tensorrt(onnx_dir: str | Path, out: str | Path, *, profiles: list[dict] | None = None,
                   static: bool = False, dtype: str | None = None, timing_cache: str | Path | None = None,
                   refit: bool = False, workspace_gb: float | None = None, compute_capability: str | None = None,
                   cache_dir: str | Path | None = None, module: str | None = None, graphs=UNET_GRAPHS,
                   plugins=None, verbose: bool = False, progress=None) -> dict:
    """Build TensorRT engines from an ONNX export folder into ``out``; returns the written manifest.

    Args:
        onnx_dir: a ``dreamfuse export onnx`` folder.
        out: the plan folder to write (``unet.plan``, ``unet_personalize.plan``, ``dreamfuse.json``).
        profiles: optimization profiles, each ``{"batch", "latent_height", "latent_width"}`` as ``[min, opt, max]``
            (:func:`parse_profile`); default one profile over the export's range (:func:`default_profile`). Every
            profile must lie inside the ONNX export's range.
        static: one shape (``min = opt = max``), for CUDA-graph replay by ``TensorRTUNet``.
        dtype: ``"fp16"``/``"bf16"``/``"fp32"``: checked against the ONNX graphs' dtype (the network is strongly
            typed: its precision is the graph's; export the ONNX with ``--fp16`` for an fp16 engine).
        timing_cache: a file read before the build (if present) and written after it (speeds up rebuilds); full
            TensorRT only (TensorRT-RTX has no timing cache: its calls are no-ops since 1.2, and it is skipped).
        refit: build refittable engines (:func:`refit_tensorrt` swaps the weights without a rebuild).
        workspace_gb: the builder's workspace memory limit (default: TensorRT's, the GPU's memory).
        compute_capability: TensorRT-RTX's target (``"8.9"``); needed there without a GPU.
        cache_dir: reuse an engine built earlier with the same :func:`cache_key` (copied from there), and keep new
            ones there.
        module: ``"tensorrt"`` or ``"tensorrt_rtx"`` (default: the first importable).
        graphs: which of the export's UNet graphs to build (those it has).
        plugins: the TensorRT plugin library (a path, or a list) implementing the ``dreamfuse::*`` plugin nodes of
            a ``--plugins`` export (:mod:`dreamfuse.export.plugins`); required when a graph to build has them,
            ignored otherwise.
    """
    trt = import_tensorrt(module)
    onnx_dir, out = Path(onnx_dir).expanduser(), Path(out).expanduser()
    manifest = read_manifest(onnx_dir, "onnx")
    if manifest.get("tensorrt") or manifest.get("kind") == "aoti":
        what = "TensorRT plans" if manifest.get("tensorrt") else "an AOTInductor package"
        raise ValueError(f"onnx: {str(onnx_dir)!r} holds {what}; give the ONNX export folder")
    if dtype is not None:
        from dreamfuse.engine.config import parse_dtype

        want = str(parse_dtype(dtype)).removeprefix("torch.")
        if want != manifest["dtype"]:
            raise ValueError(f"dtype: the ONNX graphs are {manifest['dtype']} and the network is strongly typed (its "
                             f"precision is the graph's); export the ONNX as {want} (`dreamfuse export onnx --dtype "
                             f"{dtype}`)")
    profiles = [dict(p) for p in (profiles or [default_profile(manifest)])]
    if static and len(profiles) != 1:
        raise ValueError("static: a static engine has exactly one profile")
    for p in profiles:
        _check_profile(p, manifest, static)
    import torch

    if refit and not torch.cuda.is_available():
        # measured with TensorRT-RTX 1.7: a refittable build compiles its kernels on the device (Myelin's CUDA check
        # fails without one); a plain build does not
        raise ValueError("refit: a refittable engine is built on its GPU; none is available here (build without "
                         "--refit, or on the GPU)")
    if workspace_gb is not None and not workspace_gb > 0:
        raise ValueError(f"workspace: must be > 0 GB, got {workspace_gb}")
    needed = {g: graph_plugins(manifest, g) for g in graphs if graph_plugins(manifest, g)}
    libraries = []
    if needed:
        if not plugins:
            graph, ops = next(iter(needed.items()))
            raise ValueError(f"plugins: {manifest['graphs'][graph]['file']} holds dreamfuse plugin nodes "
                             f"({', '.join(ops)}); give the TensorRT plugin library built from native/trt_plugins/ "
                             "with --plugins LIB (or export the ONNX without --plugins)")
        libraries = load_tensorrt_plugins(trt, plugins, sorted({op for ops in needed.values() for op in ops}))
    # the parser reads the graphs (and their external data) as the manifest describes them, or not at all
    verify_files(onnx_dir, manifest, [f for g in graphs if g in manifest["graphs"] for f in graph_files(manifest, g)],
                 "onnx")
    out.mkdir(parents=True, exist_ok=True)
    copies = _copy_plugin_libraries(libraries, out)
    say = progress or (lambda line: None)
    built = dict(manifest)
    built["graphs"] = {}
    rtx = module_name(trt) == "tensorrt_rtx"
    info = {"module": module_name(trt), "version": trt.__version__, "static": bool(static), "refit": bool(refit),
            "profiles": profiles, "build_s": {}, "timing_cache": None if timing_cache is None or rtx
            else str(timing_cache), "plugin_libraries": copies}
    for graph in graphs:
        if graph not in manifest["graphs"]:
            continue
        g = dict(manifest["graphs"][graph])
        g.pop("data_files", None)
        onnx_path = onnx_dir / g.pop("file")
        logger = _Logger(trt, verbose).logger
        builder = trt.Builder(logger)
        config = builder.create_builder_config()
        cc = _compute_capability(trt, config, compute_capability)
        info["compute_capability"] = cc
        key = cache_key(manifest, trt, cc, profiles, static, refit, graph, libraries if graph in needed else ())
        plan_name = f"{graph}.plan"
        cached = Path(cache_dir).expanduser() / key / plan_name if cache_dir else None
        t0 = time.perf_counter()
        if cached is not None and cached.is_file():
            shutil.copyfile(cached, out / plan_name)
            say(f"{graph}: cached engine {key}")
            layers = None
        else:
            flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(flag)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_path)):
                errs = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
                raise ValueError(f"onnx: TensorRT's parser rejected {onnx_path.name}: {errs}")
            layers = network.num_layers
            for p in profiles:
                prof = builder.create_optimization_profile()
                for i in range(network.num_inputs):
                    t = network.get_input(i)
                    shapes = [_input_shape(t.name, tuple(t.shape), p["batch"][j], p["latent_height"][j],
                                           p["latent_width"][j]) for j in range(3)]
                    prof.set_shape(t.name, *shapes)
                config.add_optimization_profile(prof)
            if workspace_gb is not None:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
            if refit:
                config.set_flag(trt.BuilderFlag.REFIT)
            use_cache = timing_cache is not None and not rtx  # TensorRT-RTX >= 1.2: timing-cache calls are no-ops
            if use_cache:
                cache_bytes = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
                config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
            say(f"{graph}: building ({layers} layers, {len(profiles)} profile(s), compute capability {cc}) ...")
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                _raise_build_error(logger.errors, workspace_gb)
            _write_atomic(out / plan_name, memoryview(plan))
            if use_cache:
                _write_atomic(Path(timing_cache), memoryview(config.get_timing_cache().serialize()))
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / plan_name, cached)
        g.update(plan=plan_name, profiles=profiles, cache_key=key, layers=layers,
                 plan_bytes=(out / plan_name).stat().st_size)
        built["graphs"][graph] = g
        info["build_s"][graph] = round(time.perf_counter() - t0, 1)
        say(f"{graph}: {info['build_s'][graph]} s")
    if "unet" not in built["graphs"]:
        raise ValueError(f"onnx: {str(onnx_dir)!r} has no unet.onnx to build")
    built["tensorrt"] = info
    built["files"] = file_entries(out, [*(g["plan"] for g in built["graphs"].values()), *copies])
    write_manifest(out, built)
    return built


PLUGIN_DIR = "plugins"


def _copy_plugin_libraries(libraries: list[str], out: Path) -> list[str]:
    """Copy the plugin libraries into ``out/plugins/`` (the plan folder carries what its plans need, and names
    nothing outside itself); returns their names relative to ``out``."""
    names = [f"{PLUGIN_DIR}/{Path(lib).name}" for lib in libraries]
    if len(set(names)) != len(names):
        raise ValueError(f"plugins: two libraries share a file name ({', '.join(libraries)}); rename one")
    for lib, name in zip(libraries, names):
        (out / PLUGIN_DIR).mkdir(exist_ok=True)
        if Path(lib).resolve() != (out / name).resolve():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(lib, tmp)
    return names


def _raise_build_error(errors: list[str], workspace_gb) -> None:
    text = " ".join(errors[-3:]) or "no message"
    if any(w in text.lower() for w in ("out of memory", "outofmemory", "insufficient memory", "cudaerrormemory",
                                       "failed to allocate")):
        hint = "lower --workspace" if workspace_gb is None else f"--workspace {workspace_gb} GB is too small or"
        raise MemoryError(f"tensorrt: the build ran out of GPU memory ({hint} build fewer or smaller profiles, or on a "
                          f"GPU with more memory): {text}")
    raise ValueError(f"tensorrt: the engine build failed: {text}")


def _write_atomic(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# --------------------------------------------------------------------------------------------- refit
def refit_tensorrt(plan_dir: str | Path, onnx_dir: str | Path, module: str | None = None) -> dict:
    """Refit the engines of ``plan_dir`` (built with ``refit=True``) with the weights of the ONNX export
    ``onnx_dir`` (same architecture, dtype and profile; other weights, e.g. a DreamBooth checkpoint or a LoRA fused
    in); rewrites the plans and the manifest's model hash. Needs the GPU the engines are for."""
    plan_dir, onnx_dir = Path(plan_dir).expanduser(), Path(onnx_dir).expanduser()
    manifest = read_manifest(plan_dir, "engine")
    info = manifest.get("tensorrt")
    if not info:
        raise ValueError(f"engine: {str(plan_dir)!r} holds no TensorRT plans")
    libraries = info["plugin_libraries"]
    if not info.get("refit"):
        raise ValueError(f"engine: {str(plan_dir)!r} was not built refittable (build with --refit)")
    new = read_manifest(onnx_dir, "onnx")
    if new.get("tensorrt") or new.get("kind") == "aoti":
        raise ValueError(f"onnx: {str(onnx_dir)!r} is not an ONNX export folder")
    for key in ("dtype", "opset"):
        if new[key] != manifest[key]:
            raise ValueError(f"onnx: {key} {new[key]!r} differs from the engine's {manifest[key]!r}")
    for key in ("is_xl", "in_channels", "cross_attention_dim", "text_len"):
        if new["model"].get(key) != manifest["model"].get(key):
            raise ValueError(f"onnx: the export is of another architecture ({key} {new['model'].get(key)!r} vs "
                             f"{manifest['model'].get(key)!r})")
    trt = import_tensorrt(module or info.get("module"))
    import torch

    if not torch.cuda.is_available():
        raise ValueError("engine: refitting deserializes the engine, which needs its GPU; none is available here")
    graphs = list(manifest["graphs"])
    missing = [g for g in graphs if g not in new["graphs"]]
    if missing:  # its plan would keep the old weights under the new model hash
        raise ValueError(f"onnx: {str(onnx_dir)!r} has no {missing[0]} graph, which the engine folder holds (export "
                         "the same graphs)")
    verify_files(plan_dir, manifest, [*libraries, *(manifest["graphs"][g]["plan"] for g in graphs)], "engine")
    verify_files(onnx_dir, new, [f for g in graphs for f in graph_files(new, g)], "onnx")
    # the plugin nodes' library (the folder's verified copy), before deserializing
    load_tensorrt_plugins(trt, [plan_dir / lib for lib in libraries])
    logger = _Logger(trt).logger
    runtime = trt.Runtime(logger)
    for graph in graphs:
        g = manifest["graphs"][graph]
        engine = runtime.deserialize_cuda_engine((plan_dir / g["plan"]).read_bytes())
        refitter = trt.Refitter(engine, logger)
        parser = trt.OnnxParserRefitter(refitter, logger)
        if not parser.refit_from_file(str(onnx_dir / new["graphs"][graph]["file"])):
            raise ValueError(f"onnx: refitting {graph} failed: {' '.join(logger.errors[-3:])}")
        if not refitter.refit_cuda_engine():
            raise ValueError(f"engine: refitting {graph} failed: {' '.join(logger.errors[-3:])}")
        _write_atomic(plan_dir / g["plan"], memoryview(engine.serialize()))
    manifest["model"] = new["model"]
    manifest["ip_adapter"] = new.get("ip_adapter")
    manifest["files"].update(file_entries(plan_dir, [manifest["graphs"][g]["plan"] for g in graphs]))
    write_manifest(plan_dir, manifest)
    return manifest


__all__ = ["MANIFEST", "build_tensorrt", "cache_key", "default_profile", "import_tensorrt", "parse_profile",
           "refit_tensorrt"]
