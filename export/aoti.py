"""AOTInductor packages of the UNet call: ``DIR/unet.pt2`` and its ``dreamfuse.json``.

``torch.export`` traces the same tensors-only wrapper as the ONNX export (:class:`~dreamfuse.export.onnx.UNetGraph`:
``sample (B, 4, h, w)``, ``timestep (B,)`` float32 per row, ``encoder_hidden_states (B, L, C)``, SDXL
``text_embeds (B, P)`` and ``time_ids (B, 6)``, a baked-in IP-Adapter's ``ip_tokens (B, T, C)`` and ``ip_scale (1,)``;
output the noise prediction), with every attention product one ``dreamfuse::attention`` node, then
``torch._inductor.aoti_compile_and_package`` compiles it for the engine's device into one ``.pt2`` file that
``torch._inductor.aoti_load_package`` (Python) or ``torch::inductor::AOTIModelPackageLoader`` (C++) runs, without
dreamfuse and without Python:

* **CPU**: the dreamfuse ops are lowered to ATen before compiling (:func:`cpu_decompositions`: the references'
  math on ATen's scaled-dot-product attention, whose CPU flash kernel inductor calls, rather than the references'
  materialized score matrix), so the package holds no custom-op call: a loader that never imported dreamfuse runs it.
  Compiled with inductor's freezing (:data:`CPU_INDUCTOR_CONFIGS`).
* **CUDA**: the ops are ``torch.library.triton_op`` s (:mod:`dreamfuse.kernels.attention`), so inductor traces
  through them to the Triton kernels, autotunes them and embeds their cubins in the package. Never compiled or run
  on a GPU where this was written (no GPU there): the trace is checked on fake CUDA tensors only.

Shapes (the profile, :func:`aoti_profile`): the batch is dynamic over ``--batch MIN-MAX`` (at most 63 rows,
diffusers' ``Upsample2D``); the latent height/width are dynamic over ``--min-size/--max-size`` (multiples of 8
latent pixels) or fixed by ``--size`` (multiples of 64 px) / ``--static`` (any multiple of 8 px). ``static`` fixes
the size only, unlike the ONNX export's: the batch stays dynamic, so one package serves every batch of its range.

The manifest (:mod:`dreamfuse.export.manifest`) has the ONNX export's fields (model hash, profile, dtype, versions,
the package's sha256 under ``files``) plus ``kind: "aoti"``, the ``device`` the package was compiled for, and per
graph its input list (name, dtype, shape with ``batch``/``latent_height``/``latent_width`` for the dynamic axes, whose
ranges are under ``dims``) so that a C++ runner can build the inputs, and the package's members (name, size,
CRC-32). A package is a program: loading it dlopens the compiled shared library inside, whose code runs at once;
:class:`dreamfuse.export.runtime.AotiUNet` checks the members and the sha256 before loading, and the manifest before
every call.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .manifest import FORMAT, dreamfuse_version, file_entries, package_members, write_manifest
from .onnx import (
    MAX_DYNAMIC_BATCH,
    UNetGraph,
    _cast,
    _dims,
    _dynamic,
    _export_attention,
    _model_dtype,
    _parse_range,
    _trace_shape,
    make_profile,
    model_entry,
    unet_example_inputs,
    unet_input_names,
)

PACKAGE = "unet.pt2"
KIND = "aoti"
DEVICES = ("cpu", "cuda")
CPU_INDUCTOR_CONFIGS = {"freezing": True}
"""Freezing folds the weights into the graph as constants and prepacks the convolutions/linears for oneDNN: 1.85x
the unfrozen package on tiny (2-core CPU, 1 thread, 4 rows at 64²: 9.95 vs 18.4 ms per UNet call, eager 22.0 ms),
for a package 8% larger. Like all inductor CPU code it targets the compiling machine's vector ISA."""

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- lowering
def _attention_aten(q, k, v, scale: float):
    # the lse costs a second score matrix, but only where something reads it: a plain UNet graph drops it
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    lse = torch.logsumexp((q.float() * scale) @ k.float().transpose(-1, -2), dim=-1)
    return out, lse


def _ama_attention_aten(q, k, v_tgt, v_ref, flow, mask, scale: float):
    from dreamfuse.kernels.attention import _blend, _gather_rows

    m = mask.to(torch.float32)[:, None, :, None]
    flow = flow.clamp(0, k.shape[2] - 1)  # as the kernel: out-of-range flow is clamped, not read out of bounds
    v_w = _blend(v_tgt.float(), _gather_rows(v_ref.float(), flow), m).to(v_tgt.dtype)
    return _attention_aten(q, k, v_w, scale)


def cpu_decompositions() -> dict:
    """``run_decompositions`` table lowering the dreamfuse ops of a UNet graph to ATen for a CPU package:
    ``attention`` as ``scaled_dot_product_attention`` (+ ``logsumexp`` of the scores for the lse, pruned when
    unused), ``ama_attention`` as the gather + blend of the values, then the same. Equal to the kernels' references
    up to fp32 rounding."""
    import dreamfuse.kernels  # noqa: F401 (registers the ops)

    ops = torch.ops.dreamfuse
    return {ops.attention.default: _attention_aten, ops.ama_attention.default: _ama_attention_aten}


def custom_ops(ep) -> list[str]:
    """The non-ATen operators left in an exported program's graph (``dreamfuse::...``, say), sorted."""
    found = set()
    for node in ep.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            ns = node.target.namespace
            if ns not in ("aten", "prims"):
                found.add(f"{ns}::{node.target._opname}")
    return sorted(found)


# --------------------------------------------------------------------------------------------- profile
def aoti_profile(engine, batch: tuple[int, int] | str = (1, 16), size: int | None = None,
                 min_size: int | None = None, max_size: int | None = None, static: bool = False) -> dict:
    """:func:`~dreamfuse.export.onnx.make_profile`'s profile, except that ``static`` fixes the image size only
    (``size``, any multiple of the VAE factor): the batch stays dynamic over its range (at most 63 rows when it
    is a range)."""
    if not static:
        return make_profile(engine, batch, size, min_size, max_size, False)
    b_lo, b_hi = _parse_range(batch, "batch") if isinstance(batch, str) else tuple(int(x) for x in batch)
    if not 1 <= b_lo <= b_hi:
        raise ValueError(f"batch: expected 1 <= MIN <= MAX, got {b_lo}-{b_hi}")
    if b_hi > b_lo and b_hi > MAX_DYNAMIC_BATCH:
        raise ValueError(f"batch: a dynamic batch is capped at {MAX_DYNAMIC_BATCH} rows (diffusers' Upsample2D); "
                         f"got {b_hi}")
    if size is None and (min_size is None or min_size != max_size):
        raise ValueError("static: needs one size (--size PX)")
    profile = make_profile(engine, (b_lo, b_lo), size, min_size, max_size, True)
    profile["batch"] = [b_lo, b_hi]
    return profile


def _axes(profile: dict) -> dict[str, list[int]]:
    """The dynamic axes of a profile by name, with their ranges (batch rows; latent pixels, multiples of 8)."""
    axes = {}
    for key in ("batch", "latent_height", "latent_width"):
        lo, hi = profile[key]
        if lo != hi and not (profile["static"] and key != "batch"):
            axes[key] = [int(lo), int(hi)]
    return axes


def _shape(t: torch.Tensor, names: dict[int, str]) -> list:
    return [names.get(i, int(s)) for i, s in enumerate(t.shape)]


# --------------------------------------------------------------------------------------------- export
def export_aoti(engine, out: str | Path, *, dtype=None, batch=(1, 16), size: int | None = None,
                min_size: int | None = None, max_size: int | None = None, static: bool = False,
                model_name: str | None = None, inductor_configs: dict | None = None, progress=None) -> dict:
    """Compile ``engine``'s UNet call into ``out/unet.pt2`` for the engine's device (CPU or CUDA) and write its
    manifest ``out/dreamfuse.json``; returns the manifest.

    ``dtype``: the package's dtype (default the engine's); ``batch``/``size``/``min_size``/``max_size``/``static``:
    :func:`aoti_profile`. A loaded IP-Adapter's image layers are baked in (``ip_tokens``/``ip_scale`` inputs).
    ``inductor_configs``: passed to ``aoti_compile_and_package`` (over :data:`CPU_INDUCTOR_CONFIGS` on CPU).
    ``progress``: a callable taking one line per stage (compiling takes minutes: about 35-60 s for tiny on 2 CPU
    cores). The package is written to a temporary file and renamed into place, then the manifest (also atomically).

    Mutates the engine while it runs (processor backends, module dtypes; restored on exit): export while no other
    call runs.
    """
    dtype = engine.dtype if dtype is None else _model_dtype(dtype)
    device = engine.device
    if device.type not in DEVICES:
        raise ValueError(f"device: AOTInductor packages are compiled for {' or '.join(DEVICES)}; the engine runs on "
                         f"{device.type}")
    if device.type == "cuda":
        from dreamfuse.kernels import _common

        if _common.interpreting():
            raise ValueError("device: TRITON_INTERPRET=1 interprets the kernels in Python, which a CUDA package "
                             "cannot embed (unset it to export for cuda)")
    profile = aoti_profile(engine, batch, size, min_size, max_size, static)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda line: None)
    unet = engine.unet
    dev = device
    is_xl = engine.is_xl
    ip = engine.ip_adapter is not None
    dyn_profile = {**profile, "static": False}  # static fixes the sizes only; _dims leaves fixed ranges static
    b, h, w = _trace_shape(dyn_profile)
    B, H8, W8 = _dims(dyn_profile)
    axes = _axes(profile)
    row_names = {0: "batch"} if B is not None else {}
    sample_names = {**row_names, **({2: "latent_height", 3: "latent_width"} if H8 is not None else {})}
    args, dyn, kinds, pooled_dim, ip_info = unet_example_inputs(engine, dyn_profile, dev, dtype)
    names = [{"sample": sample_names, "row": row_names, "shared": {}}[k] for k in kinds]
    input_names = unet_input_names(is_xl, ip)
    dynamic = _dynamic(dyn)
    if dynamic is not None and len(dynamic) > 3:  # forward(sample, timestep, encoder_hidden_states, *extra)
        dynamic = (*dynamic[:3], tuple(dynamic[3:]))

    t0 = time.perf_counter()
    with torch.no_grad(), _export_attention(engine), _cast([unet], dtype), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's deprecation chatter about pytree specs
        graph = UNetGraph(unet, is_xl, ip)
        say(f"unet: tracing at batch {b}, latents {h}x{w} ...")
        ep = torch.export.export(graph, tuple(args), dynamic_shapes=dynamic, strict=False)
        t_trace = time.perf_counter() - t0
        if dev.type == "cpu":
            ep = ep.run_decompositions(cpu_decompositions())
            left = custom_ops(ep)
            if left:
                raise RuntimeError(f"export_aoti: {left} survived the CPU lowering; a package calling them needs "
                                   "dreamfuse's Python ops at run time")
        attention = "aten" if dev.type == "cpu" else _cuda_attention()
        configs = {**(CPU_INDUCTOR_CONFIGS if dev.type == "cpu" else {}), **(inductor_configs or {})}
        t_lower = time.perf_counter() - t0 - t_trace
        say(f"unet: traced in {t_trace:.1f} s; AOTInductor compiling for {dev.type} ({attention} attention; this "
            "takes minutes) ...")
        t1 = time.perf_counter()
        from dreamfuse.engine.files import atomic_path

        with atomic_path(out / PACKAGE) as tmp, open(tmp, "wb") as f, _quiet_inductor():
            # a copy: it adds its own keys to the dict
            torch._inductor.aoti_compile_and_package(ep, package_path=f, inductor_configs=dict(configs))
        t_compile = time.perf_counter() - t1
    say(f"unet: compiled in {t_compile:.1f} s")

    inputs = [{"name": n, "dtype": str(a.dtype).removeprefix("torch."), "shape": _shape(a, nm)}
              for n, a, nm in zip(input_names, args, names)]
    manifest = {
        "format": FORMAT,
        "kind": KIND,
        "dreamfuse_version": dreamfuse_version(),
        "torch_version": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "device": dev.type,
        "model": model_entry(engine, model_name, pooled_dim),
        "ip_adapter": ip_info,
        "profile": profile,
        "dims": axes,
        "graphs": {"unet": {"file": PACKAGE, "kind": KIND, "model_name": "model", "inputs": inputs,
                            "outputs": [{"name": "noise_pred", "dtype": inputs[0]["dtype"],
                                         "shape": inputs[0]["shape"]}],
                            "members": package_members(out / PACKAGE),
                            "attention": attention, "inductor_configs": configs, "trace_s": round(t_trace, 1),
                            "lower_s": round(t_lower, 1), "compile_s": round(t_compile, 1),
                            "export_s": round(time.perf_counter() - t0, 1)}},
    }
    manifest["export_s"] = {"unet": manifest["graphs"]["unet"]["export_s"]}
    manifest["files"] = file_entries(out, [PACKAGE])
    write_manifest(out, manifest)
    return manifest


def _cuda_attention() -> str:
    """What the CUDA package's attention runs: the Triton kernels, or their references when the kernels are off."""
    from dreamfuse.kernels import _common

    return "triton" if _common.HAS_TRITON and not _common.kernels_disabled() else "aten"


@contextlib.contextmanager
def _quiet_inductor():
    """Inductor's and the C++ compiler's warnings are noise in a CLI's progress lines (kept at ERROR inside)."""
    loggers = [logging.getLogger(n) for n in ("torch._inductor", "torch._export", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
