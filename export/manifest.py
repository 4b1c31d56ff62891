"""``dreamfuse.json``: what an exported folder holds and what it accepts, checked before anything runs.

Every export folder (ONNX graphs from :mod:`dreamfuse.export.onnx`, TensorRT plans from
:mod:`dreamfuse.export.tensorrt`, an AOTInductor package from :mod:`dreamfuse.export.aoti`) carries one manifest:

* ``model``: the UNet's weight hash (:func:`weights_hash`), SD or SDXL, channels, the text length and widths the
  graphs were traced with;
* ``ip_adapter``: ``null``, or the hash and token count of the IP-Adapter whose image layers are baked into the
  UNet graph (the image tokens are then a graph input);
* ``profile``: the UNet batch rows and latent height/width ranges the graphs accept (``static``: one shape);
* ``dtype``, ``opset``, the dreamfuse/torch versions, and per graph its file (ONNX graph, ``.pt2`` package) or plan,
  the ONNX graph's external-data files (``data_files``), inputs and outputs;
* ``files`` (format 2): the sha256 and size of every file the manifest names (graphs, external data, plans, plugin
  libraries, the package), written at export and checked before any of them is loaded;
* ``plugins``: ``null``, or the dreamfuse plugin nodes the graphs hold (``--plugins``: custom-domain nodes that need
  TensorRT's plugin library or onnxruntime's custom ops, :mod:`dreamfuse.export.plugins`): their domain, namespace,
  version and op types; each graph lists its own under ``graphs.<name>.plugins``;
* ``tensorrt`` (plan folders only): the module and version that built the plans, the compute capability, the
  optimization profiles, the cache key and the plugin libraries, copied into the folder;
* ``kind: "aoti"``, ``device`` and per package member its name, size and CRC-32 (``graphs.unet.members``) for an
  AOTInductor package.

An export folder is a program: a package's shared library and a plan folder's plugin libraries are native code that
runs with the user's permissions when loaded, and every graph decides the output. The checks here cannot make a
hostile folder safe (whoever writes the files can write a manifest that matches them); they make sure that what is
loaded is exactly what the export wrote and that the manifest reaches nothing outside its folder:

* :func:`read_manifest` refuses a folder whose manifest is missing, of another format (format 1 recorded no hashes:
  such a folder cannot be verified), malformed (every field the runtime and the builders read is checked for its
  type and range: one ``ValueError`` naming the field), names a file outside the folder (an absolute path, ``..``,
  a link leading out) or not listed under ``files``, or names files that are absent;
* :func:`verify_files` compares the sha256 of the files about to be loaded with the manifest's, and
  :func:`check_package` an AOTInductor package's members with the recorded ones, before any session is created, plan
  deserialized, library or package loaded. Files in a folder that its manifest does not name are never read (nothing
  loads a folder's files by pattern: onnxruntime reads the external data the verified graph names, the TensorRT
  backend loads the listed plugin libraries only) and are left alone; inside a package, whose loader extracts every
  member and dlopens the library among them, an unlisted member is refused;
* :func:`check_model` refuses an engine whose UNet (or IP-Adapter) is not the one exported;
* :func:`check_request` refuses a UNet call outside the profile with a ``ValueError`` naming the field. Never run an
  off-profile shape: TensorRT gives NaN or black images there rather than an error.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from dreamfuse.engine.files import atomic_path

MANIFEST = "dreamfuse.json"
FORMAT = 2
"""2: ``files`` holds the sha256 of every file the manifest names (1 had none; refused: it cannot be verified)."""
LATENT_MULTIPLE = 8
"""Exported latents are ``8·k`` high and wide (diffusers' down/upsamplers guard on it when the size is dynamic):
images in multiples of 64 pixels with the SD VAE."""
MAX_MANIFEST_BYTES = 4 << 20  # a manifest is a few KB (the personalize graph's layer lists ~10 KB)
HASH_CHUNK = 1 << 20

PLUGIN_OPS = ("AmaAttention", "MatchArgmax", "CycleMask", "CompositeBlend")
"""The plugin op types this dreamfuse runs (:data:`dreamfuse.export.plugins.PLUGINS`)."""


def plugins_entry(graphs: dict) -> dict | None:
    """The manifest's top-level ``plugins``: None when no graph lists plugin nodes."""
    ops = sorted({op for g in graphs.values() for op in g.get("plugins") or ()})
    if not ops:
        return None
    return {"domain": "dreamfuse", "plugin_namespace": "dreamfuse", "plugin_version": "1", "ops": ops,
            "graphs": sorted(name for name, g in graphs.items() if g.get("plugins"))}


def graph_plugins(manifest: dict, graph: str) -> list[str]:
    """The plugin op types graph ``graph`` of ``manifest`` holds ([] for none)."""
    return list(manifest["graphs"].get(graph, {}).get("plugins") or [])


def dreamfuse_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dreamfuse")
    except PackageNotFoundError:
        return "unknown"


def weights_hash(*modules: torch.nn.Module | None) -> str:
    """SHA-256 over the names, shapes and values of the modules' state dicts, floats rounded to fp16 first, so that
    the same checkpoint loaded in fp32 or fp16 hashes alike (a bf16 load rounds differently and hashes differently).
    ``None`` entries are skipped. About 1 s per GB of weights on CPU."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        if module is None:
            continue
        h.update(f"module {i}\n".encode())
        for name, t in module.state_dict().items():
            t = t.detach()
            if t.is_floating_point():
                t = t.to(torch.float16)
            h.update(f"{name} {tuple(t.shape)} {t.dtype}\n".encode())
            h.update(t.contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- file hashes
def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read 1 MiB at a time (never the whole file in memory). Measured ~1.0 GB/s on a 2-core VM
    from the page cache (512 MB in 0.51 s; 8 MiB reads were no faster): a 1.7 GB SD 1.5 UNet graph costs ~1.7 s,
    less than onnxruntime takes to build a session from it; from a cold disk the read itself dominates."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entries(folder: str | Path, names) -> dict[str, dict]:
    """The manifest's ``files`` table for ``names`` (paths relative to ``folder``): sha256 and size of each."""
    folder = Path(folder)
    return {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
            for name in sorted(set(names))}


def package_members(path: str | Path) -> list[dict]:
    """An AOTInductor package's (zip) members as the manifest records them: name, size and CRC-32, from the
    archive's central directory (nothing is decompressed)."""
    with zipfile.ZipFile(path) as z:
        return [{"name": i.filename, "bytes": i.file_size, "crc32": i.CRC} for i in z.infolist()]


def graph_files(manifest: dict, graph: str) -> list[str]:
    """The files graph ``graph`` loads: its ONNX graph, package or plan, then its external-data files."""
    g = manifest["graphs"][graph]
    return [g.get("plan") or g["file"], *g.get("data_files", ())]


def _not_described(field: str, path: Path, detail: str) -> ValueError:
    return ValueError(f"{field}: {str(path)!r} is not what its manifest describes ({detail}): it changed after the "
                      "export, or another file took its place; nothing from the folder was loaded. Export again, and "
                      "use only export folders you trust: they are programs")


def verify_files(folder: str | Path, manifest: dict, names, field: str = "unet_path") -> None:
    """Refuse (``ValueError`` naming ``field``) any of ``names`` whose size or sha256 is not the manifest's ``files``
    entry. Call it right before loading them (:func:`read_manifest` has checked that each is a listed file inside
    the folder)."""
    folder = Path(folder)
    for name in dict.fromkeys(names):
        want = manifest["files"][name]
        path = folder / name
        size = path.stat().st_size
        if size != want["bytes"]:
            raise _not_described(field, path, f"{size} bytes, the manifest records {want['bytes']}")
        got = sha256_file(path)
        if got != want["sha256"]:
            raise _not_described(field, path, f"sha256 {got[:16]}..., the manifest records {want['sha256'][:16]}...")


def check_package(folder: str | Path, manifest: dict, field: str = "unet_path") -> None:
    """Refuse an AOTInductor package whose members (names, sizes, CRC-32s in its central directory) are not exactly
    those the manifest records, or whose bytes are not the manifest's (:func:`verify_files`): the loader extracts
    every member and dlopens the shared library among them, so nothing may be added, dropped or changed."""
    folder = Path(folder)
    graph = manifest["graphs"]["unet"]
    path = folder / graph["file"]
    try:
        got = package_members(path)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise _not_described(field, path, f"not a readable package: {e}") from None
    want = {m["name"]: m for m in graph["members"]}
    names = [m["name"] for m in got]
    if len(set(names)) != len(names):
        raise _not_described(field, path, "a member name occurs twice")
    for m in got:
        recorded = want.get(m["name"])
        if recorded is None:
            raise _not_described(field, path, f"it holds {m['name']!r}, which the manifest does not list")
        if (m["bytes"], m["crc32"]) != (recorded["bytes"], recorded["crc32"]):
            raise _not_described(field, path, f"its member {m['name']!r} differs from the recorded one")
    missing = sorted(set(want) - set(names))
    if missing:
        raise _not_described(field, path, f"it lacks {missing[0]!r}")
    verify_files(folder, manifest, [graph["file"]], field)


# --------------------------------------------------------------------------------------------- writing, reading
def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write ``folder/dreamfuse.json`` atomically (a temporary file renamed into place)."""
    folder = Path(folder)
    path = folder / MANIFEST
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(folder: str | Path, field: str = "unet_path") -> dict:
    """The manifest of an export folder, checked: format, structure (:mod:`dreamfuse.export.manifest`'s fields, each
    with its type and range), every named file listed under ``files``, inside the folder and present. Hashes are
    checked by :func:`verify_files` when a file is about to be loaded. Raises one ``ValueError`` (or
    ``FileNotFoundError``) naming ``field``."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{field}: {str(folder)!r} has no {MANIFEST} (not a dreamfuse export folder; "
                                "make one with `dreamfuse export onnx`)")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ValueError(f"{size} bytes; a manifest is a few KB")
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{field}: {str(path)!r} is not a readable manifest (nested too deeply)") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{field}: {str(path)!r} is not a readable manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{field}: {str(path)!r} is not a readable manifest (a JSON {type(manifest).__name__}, not "
                         "an object)")
    got = manifest.get("format")
    if got == 1 and type(got) is int:
        raise ValueError(f"{field}: {str(path)!r} is a format-1 manifest, which records no sha256 of its files: they "
                         "cannot be verified before loading (export again with this dreamfuse)")
    if got != FORMAT or type(got) is not int:
        raise ValueError(f"{field}: {str(path)!r} has manifest format {got!r}; this dreamfuse reads format {FORMAT} "
                         "(export again)")
    try:
        named = _validate(manifest)
    except _Invalid as e:
        raise ValueError(f"{field}: {str(path)!r} is malformed: {e.where} {e.problem} (export again)") from None
    for name, graph in manifest["graphs"].items():
        unknown = sorted(set(graph.get("plugins") or ()) - set(PLUGIN_OPS))
        if unknown:
            raise ValueError(f"{field}: {name} needs plugin nodes {unknown} this dreamfuse does not know (export "
                             "again, or update dreamfuse)")
    root = folder.resolve()
    for at, (owner, name) in named.items():
        try:
            real = (folder / name).resolve()
            inside, exists, regular = real.is_relative_to(root), real.exists(), real.is_file()
        except (OSError, RuntimeError):  # a link loop, a name the file system refuses
            inside, exists, regular = True, True, False
        if not inside:
            raise ValueError(f"{field}: {at} {name!r} in {str(folder)!r} is a link leading outside the export "
                             "folder, which holds every file its manifest names")
        if not exists:
            raise FileNotFoundError(f"{field}: {str(folder)!r} lists {name!r} for {owner} but the file is missing")
        if not regular:
            raise ValueError(f"{field}: {at} {name!r} in {str(folder)!r} is not a regular file")
    return manifest


def folder_kind(manifest: dict) -> str:
    """``"aoti"``, ``"tensorrt"`` (a plan folder) or ``"onnx"``."""
    if manifest.get("kind") == "aoti":
        return "aoti"
    return "tensorrt" if manifest.get("tensorrt") else "onnx"


# --------------------------------------------------------------------------------------------- structure
class _Invalid(Exception):
    def __init__(self, where: str, problem: str):
        super().__init__(where, problem)
        self.where, self.problem = where, problem


def _what(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, str):
        return f"the string {v[:60]!r}"
    return repr(v)


def _get(obj: dict, key: str, at: str, optional: bool = False):
    where = f"{at}.{key}" if at else key
    if key not in obj:
        if optional:
            return None
        raise _Invalid(where, "is missing")
    return obj[key]


def _obj(v, at: str) -> dict:
    if not isinstance(v, dict):
        raise _Invalid(at, f"is {_what(v)}, expected an object")
    return v


def _list(v, at: str) -> list:
    if not isinstance(v, list):
        raise _Invalid(at, f"is {_what(v)}, expected a list")
    return v


def _str(v, at: str, choices=None) -> str:
    if not isinstance(v, str) or (choices is not None and v not in choices):
        raise _Invalid(at, f"is {_what(v)}, expected " + (f"one of {', '.join(choices)}" if choices else "a string"))
    return v


def _bool(v, at: str) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(at, f"is {_what(v)}, expected true or false")
    return v


def _int(v, at: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _Invalid(at, f"is {_what(v)}, expected an integer in [{lo}, {hi}]")
    return v


def _hex(v, at: str) -> str:
    if not isinstance(v, str) or len(v) != 64 or v.strip("0123456789abcdef"):
        raise _Invalid(at, f"is {_what(v)}, expected a sha256 (64 hex digits)")
    return v


def _name(v, at: str) -> str:
    """A file name relative to the folder: no absolute path, drive, ``..``, ``.``, empty part or backslash."""
    if not isinstance(v, str) or not v:
        raise _Invalid(at, f"is {_what(v)}, expected a file name inside the export folder")
    parts = v.split("/")
    if (v.startswith("/") or PureWindowsPath(v).drive or PurePosixPath(v).is_absolute() or "\\" in v or "\0" in v
            or any(p in ("", ".", "..") for p in parts)):
        raise _Invalid(at, f"{v!r} leads outside the export folder, which holds every file its manifest names")
    if len(v) > 1024 or any(len(p.encode()) > 255 for p in parts):
        raise _Invalid(at, f"is a {len(v)}-character name, longer than file systems allow")
    return v


def _ascending(v, at: str, n: int, lo: int, hi: int) -> list[int]:
    """``[min, max]`` (``n = 2``) or ``[min, opt, max]`` (``n = 3``): integers, ``lo <= min <= ... <= max <= hi``."""
    vals = _list(v, at)
    if len(vals) != n or any(type(x) is not int for x in vals) or not lo <= vals[0] or vals[-1] > hi \
            or any(a > b for a, b in zip(vals, vals[1:])):
        shape = "[MIN, MAX]" if n == 2 else "[MIN, OPT, MAX]"
        items = [str(x) if type(x) is int else _what(x) for x in vals[:4]] + (["..."] if vals[4:] else [])
        got = "[" + ", ".join(items) + "]"
        raise _Invalid(at, f"is {got}, expected {shape} integers with {lo} <= MIN <= ... <= MAX <= {hi}")
    return vals


MAX_ROWS = 1024  # what a backend may pad a call up to, or split it by: a bound on memory a manifest can ask for
MAX_LATENT = 1024  # 8192 px with the SD VAE
_DTYPES = ("float32", "float16", "bfloat16")
_INPUT_DTYPES = (*_DTYPES, "int64", "int32")


def _profile(v, at: str, n: int) -> dict:
    p = _obj(v, at)
    _ascending(_get(p, "batch", at), f"{at}.batch", n, 1, MAX_ROWS)
    for key in ("latent_height", "latent_width"):
        _ascending(_get(p, key, at), f"{at}.{key}", n, 1, MAX_LATENT)
    return p


def _validate(m: dict) -> dict[str, tuple[str, str]]:
    """Check every field the runtime and the builders read (type and range; a ``_Invalid`` naming the first bad
    one); returns the files the manifest names: ``{where: (owner, name)}``, each listed under ``files``."""
    kind = folder_kind(m)
    if m.get("kind") is not None:
        _str(m["kind"], "kind", ("aoti",))
    _str(_get(m, "dtype", ""), "dtype", _DTYPES)
    if kind == "aoti":
        _str(_get(m, "device", ""), "device", ("cpu", "cuda"))
    else:
        _int(_get(m, "opset", ""), "opset", 1, 100)
    model = _obj(_get(m, "model", ""), "model")
    _hex(_get(model, "hash", "model"), "model.hash")
    _bool(_get(model, "is_xl", "model"), "model.is_xl")
    for key, hi in (("in_channels", 64), ("cross_attention_dim", 1 << 16), ("text_len", 4096),
                    ("vae_scale_factor", 64), ("sample_size", MAX_LATENT)):
        _int(_get(model, key, "model"), f"model.{key}", 1, hi)
    _int(_get(model, "pooled_dim", "model"), "model.pooled_dim", 0, 1 << 16)
    if _get(model, "name", "model", optional=True) is not None:
        _str(model["name"], "model.name")
    ip = _get(m, "ip_adapter", "", optional=True)
    if ip is not None:
        _obj(ip, "ip_adapter")
        _hex(_get(ip, "hash", "ip_adapter"), "ip_adapter.hash")
        _int(_get(ip, "tokens", "ip_adapter"), "ip_adapter.tokens", 1, 4096)
    profile = _profile(_get(m, "profile", ""), "profile", 2)
    _bool(_get(profile, "static", "profile"), "profile.static")

    files = _obj(_get(m, "files", ""), "files")
    named: dict[str, tuple[str, str]] = {}

    def name_of(v, where: str, owner: str) -> None:
        named[where] = (owner, _name(v, where))
        if v not in files:
            raise _Invalid(where, f"{v!r} is not listed under files, which gives the sha256 of every file")

    graphs = _obj(_get(m, "graphs", ""), "graphs")
    _obj(_get(graphs, "unet", "graphs"), "graphs.unet")
    for gname, g in graphs.items():
        at = f"graphs.{gname}"
        _obj(g, at)
        key = "plan" if kind == "tensorrt" else "file"
        name_of(_get(g, key, at), f"{at}.{key}", gname)
        for i, data in enumerate(_list(_get(g, "data_files", at, optional=True) or [], f"{at}.data_files")):
            name_of(data, f"{at}.data_files[{i}]", gname)
        for i, op in enumerate(_list(_get(g, "plugins", at, optional=True) or [], f"{at}.plugins")):
            _str(op, f"{at}.plugins[{i}]")
        if kind == "tensorrt":
            for i, p in enumerate(_list(_get(g, "profiles", at), f"{at}.profiles")):
                _profile(p, f"{at}.profiles[{i}]", 3)
        if kind == "aoti":
            _validate_package(g, at)
        if gname == "unet_personalize":
            _validate_personalize(g, at)
    if kind == "tensorrt":
        trt = _obj(m["tensorrt"], "tensorrt")
        _str(_get(trt, "module", "tensorrt"), "tensorrt.module", ("tensorrt", "tensorrt_rtx"))
        _bool(_get(trt, "static", "tensorrt"), "tensorrt.static")
        _bool(_get(trt, "refit", "tensorrt"), "tensorrt.refit")
        libs = _list(_get(trt, "plugin_libraries", "tensorrt"), "tensorrt.plugin_libraries")
        for i, lib in enumerate(libs):
            name_of(lib, f"tensorrt.plugin_libraries[{i}]", "tensorrt.plugin_libraries")
    for name, entry in files.items():  # after the fields naming them: their names say more
        at = f"files[{name[:80]!r}]"
        _name(name, at)
        _obj(entry, at)
        _hex(_get(entry, "sha256", at), f"{at}.sha256")
        _int(_get(entry, "bytes", at), f"{at}.bytes", 0, 1 << 50)
    return named


def _validate_package(g: dict, at: str) -> None:
    for i, spec in enumerate(_list(_get(g, "inputs", at), f"{at}.inputs")):
        where = f"{at}.inputs[{i}]"
        _obj(spec, where)
        _str(_get(spec, "name", where), f"{where}.name")
        _str(_get(spec, "dtype", where), f"{where}.dtype", _INPUT_DTYPES)
    members = _list(_get(g, "members", at), f"{at}.members")
    if not members:
        raise _Invalid(f"{at}.members", "is empty")
    for i, member in enumerate(members):
        where = f"{at}.members[{i}]"
        _obj(member, where)
        _str(_get(member, "name", where), f"{where}.name")
        _int(_get(member, "bytes", where), f"{where}.bytes", 0, 1 << 50)
        _int(_get(member, "crc32", where), f"{where}.crc32", 0, (1 << 32) - 1)


def _validate_personalize(g: dict, at: str) -> None:
    ama = _obj(_get(g, "ama_layers", at), f"{at}.ama_layers")
    for name, factor in ama.items():
        _int(factor, f"{at}.ama_layers[{name!r}]", 1, 64)
    for key in ("foreground_layers", "feature_blocks"):
        for i, v in enumerate(_list(_get(g, key, at), f"{at}.{key}")):
            _str(v, f"{at}.{key}[{i}]")
    for i, f in enumerate(_list(_get(g, "ama_factors", at), f"{at}.ama_factors")):
        _int(f, f"{at}.ama_factors[{i}]", 1, 64)


# --------------------------------------------------------------------------------------------- checks
def check_model(manifest: dict, unet, ip_adapter=None, field: str = "unet_path") -> None:
    """Refuse an engine whose UNet or IP-Adapter is not the one the graphs were exported from."""
    model = manifest["model"]
    is_xl = unet.config.addition_embed_type == "text_time"
    if bool(model.get("is_xl")) != is_xl:
        raise ValueError(f"{field}: the export is of an {'SDXL' if model.get('is_xl') else 'SD 1.x/2.x'} UNet, the "
                         f"engine's is {'SDXL' if is_xl else 'SD 1.x/2.x'}")
    got = weights_hash(unet)
    if got != model["hash"]:
        raise ValueError(f"{field}: the exported UNet's weights (hash {model['hash'][:12]}) are not the engine's "
                         f"({got[:12]}): export this model (with the same LoRAs loaded), or load the model it was "
                         f"exported from ({model.get('name', '?')!r})")
    exported = manifest.get("ip_adapter")
    if ip_adapter is None:
        return
    if exported is None:
        raise ValueError(f"{field}: an IP-Adapter is loaded but the export has no image-prompt layers (export with "
                         "the adapter loaded: `dreamfuse export onnx --ip-adapter ...`)")
    got = weights_hash(ip_adapter.layers)
    if got != exported["hash"]:
        raise ValueError(f"{field}: the loaded IP-Adapter (hash {got[:12]}) is not the one exported "
                         f"({exported['hash'][:12]})")


def _check_range(field: str, value: int, lo_hi, unit: str, what: str) -> None:
    lo, hi = lo_hi
    if not lo <= value <= hi:
        raise ValueError(f"{field}: {value}{unit} is outside the exported profile [{lo}, {hi}]{unit} ({what}; export "
                         "or build again with a wider range)")


def check_request(manifest: dict, sample: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  check_batch: bool = True) -> None:
    """Refuse a UNet call outside the exported profile (``ValueError`` naming the field): batch rows (unless
    ``check_batch`` is false: the caller splits and pads rows into the range), latent height and width (multiples
    of 8 within the ranges, in latent pixels: image pixels / 8), text length."""
    prof = manifest["profile"]
    rows, _, h, w = sample.shape
    if check_batch:
        _check_range("batch", rows, prof["batch"], " rows", "UNet rows: CFG doubles the prompts")
    scale = int(manifest["model"].get("vae_scale_factor", 8))
    for field, v, key in (("height", h, "latent_height"), ("width", w, "latent_width")):
        lo, hi = prof[key]
        if v % LATENT_MULTIPLE and lo != hi:
            raise ValueError(f"{field}: {v * scale} px ({v} latent) is not a multiple of {LATENT_MULTIPLE * scale} px, "
                             "which the exported UNet needs (dynamic sizes are 8·k latent pixels)")
        if not lo <= v <= hi:
            raise ValueError(f"{field}: {v * scale} px is outside the exported profile [{lo * scale}, {hi * scale}] px "
                             "(export or build again with a wider range)")
    text = int(manifest["model"]["text_len"])
    if encoder_hidden_states.shape[1] != text:
        raise ValueError(f"encoder_hidden_states: {encoder_hidden_states.shape[1]} tokens, the export takes {text}")
