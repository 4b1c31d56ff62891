"""ONNX export of the whole pipeline: the UNet (and its personalize variant), the text encoder(s), the VAE decoder.

``torch.export`` traces one tensors-only wrapper per graph (:class:`UNetGraph`, :class:`PersonalizeUNetGraph`,
:class:`TextEncoderGraph`, :class:`VaeDecoderGraph`), then the dynamo ONNX exporter lowers it. The attention
layers run dreamfuse's processors with the ``triton`` backend while tracing, so every attention product is one
``torch.ops.dreamfuse.attention`` node; :func:`translation_table` gives the exporter a translation of each
dreamfuse op that can appear in a UNet graph:

* ``dreamfuse::attention`` -> ONNX ``Attention`` (opset 23) or ``MatMul``/``Softmax``/``MatMul`` (opsets 18-22),
  plus ``ReduceLogSumExp`` for the log-sum-exp output (pruned where unused). TensorRT >= 8.6 fuses the standard
  pattern by itself, so the plain path needs no plugin.
* ``dreamfuse::ama_attention`` -> the AMA value warp in standard ops: ``GatherElements`` of the reference values by
  the flow, the blend by the mask, then the attention above. A DreamMatcher step runs in onnxruntime and TensorRT
  with no plugin. With ``plugins=True`` (``--plugins``) each AMA layer is instead one ``dreamfuse::AmaAttention``
  custom-domain node (:mod:`dreamfuse.export.plugins` holds the node spec): ``torch.export`` once, then
  ``run_decompositions`` lowers the op to ``torch.onnx.ops.symbolic`` before the exporter runs. TensorRT runs those
  nodes with dreamfuse's plugin library; onnxruntime with onnxruntime-extensions' Python custom ops.

The other dreamfuse ops (matching, cycle mask, composite blending) run in the pipelines between UNet calls and are
never part of an exported UNet graph; :func:`dreamfuse.export.plugins.op_graph` gives each its one-node plugin graph.

Shapes. ``sample (B, 4, h, w)`` with ``B`` and ``h = 8·a``, ``w = 8·b`` dynamic within the profile (diffusers'
down/upsamplers guard on multiples of 8 latent pixels; ``Upsample2D`` caps a dynamic batch at 63); ``timestep
(B,)`` float32, one per row, so that one call serves rows at different steps (diffusers' UNet gives per-row results
equal to separate calls). Tracing happens at latents of at least 16x16 (8x8 latents specialize the sizes). SDXL adds
``text_embeds (B, P)`` and ``time_ids (B, 6)``; a loaded IP-Adapter adds ``ip_tokens (B, T, cross_dim)`` and
``ip_scale (1,)`` (its image layers' weights are baked in).

Personalize (DreamMatcher). ``unet_personalize.onnx`` is the UNet with the pipeline's per-layer handlers traced in:
the foreground cross-attention layers read the subject tokens' attention probabilities (weights ``fg_tokens (B, L)``
per row) and give the min-max normalized foreground map; each AMA self-attention layer blends the reference values
(row ``ama_ref_index[b]``) gathered by the flow ``ama_flow_<f> (B, h/f, w/f)`` with the mask
``m' = M ⊙ U``, where ``M`` is the foreground map of row ``fg_source[b]`` (nearest-resized) and ``U = err <
thresh·Σm/N`` the cycle-consistency test on ``ama_err_<f>`` (the cycle error in pixels, ``+inf`` for a row without
AMA) and ``ama_thresh_<f> = λc·h_f``. Outputs: ``noise_pred``, ``foreground (B, h/4, w/4)`` and the matching
features ``feature_up_blocks_<i>``. The flows come from the previous step's features (outside the graph: the
matching kernel), the mask from the current step's cross-attention (inside): as in the PyTorch pipeline.
:class:`dreamfuse.export.runtime.OnnxRuntimeUNet` turns personalize's handlers into these inputs.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path

import torch
from dreamfuse.engine.processors import CallContext, LayerInfo
from torch import nn

from .manifest import (
    FORMAT,
    LATENT_MULTIPLE,
    dreamfuse_version,
    file_entries,
    graph_files,
    plugins_entry,
    weights_hash,
    write_manifest,
)

LAYOUTS = ("dreamfuse", "optimum")
"""Export folder layouts: dreamfuse's (``--unet DIR``, manifest-checked) and diffusers'/optimum's pipeline folder."""
OPSETS = range(18, 24)
DEFAULT_OPSET = 18
"""MatMul/Softmax attention: what every onnxruntime and TensorRT build parses (opset 23's ``Attention`` needs
onnxruntime >= 1.22 and a TensorRT whose parser knows it)."""
MAX_DYNAMIC_BATCH = 63  # diffusers' Upsample2D guards a dynamic batch below 64 (nearest upsampling's int32 index math)
MIN_TRACE_LATENT = 16  # tracing at 8x8 latents specializes height and width
EXTERNAL_DATA_BYTES = 1 << 30  # graphs past 2 GB must keep their weights outside the protobuf; switch well before
FOREGROUND_FACTOR = 4  # the foreground cross-attention grid is the latent's / 4 (16x16 at 512² in SD and SDXL)

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- op translations
def _opset(version: int):
    import onnxscript

    return getattr(onnxscript, f"opset{version}")


def _attention_onnx(op, q, k, v, scale: float, fused: bool):
    """``softmax(scale·q·kᵀ)·v`` and its log-sum-exp, both ``(B, H, Lq, ·)``, in standard ONNX ops."""
    scores = op.MatMul(op.Mul(q, op.CastLike(op.Constant(value_float=scale), q)), op.Transpose(k, perm=[0, 1, 3, 2]))
    lse = op.Cast(op.ReduceLogSumExp(op.Cast(scores, to=1), op.Constant(value_ints=[-1]), keepdims=0), to=1)
    if fused:
        out = op.Attention(q, k, v, scale=scale)
        out = out[0] if isinstance(out, (tuple, list)) else out
    else:
        out = op.MatMul(op.Softmax(scores, axis=-1), v)
    return out, lse


def translation_table(opset: int = DEFAULT_OPSET) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: an ONNX function for each dreamfuse op a UNet graph
    holds (``attention``, ``ama_attention``), in ``opset``'s ops (``Attention`` from opset 23)."""
    if opset not in OPSETS:
        raise ValueError(f"opset: {opset} is not supported (use {OPSETS.start}..{OPSETS.stop - 1})")
    op = _opset(opset)
    fused = opset >= 23

    def attention(q, k, v, scale: float):
        return _attention_onnx(op, q, k, v, scale, fused)

    def ama_attention(q, k, v_tgt, v_ref, flow, mask, scale: float):
        # V_w[b,h,j] = m[b,j]·v_ref[b,h,flow[b,j]] + (1 − m[b,j])·v_tgt[b,h,j]; flow (B, L) -> (B, H, L, D) indices
        index = op.Expand(op.Unsqueeze(op.Cast(flow, to=7), op.Constant(value_ints=[1, 3])), op.Shape(v_ref))
        warped = op.GatherElements(v_ref, index, axis=2)
        m = op.CastLike(op.Unsqueeze(mask, op.Constant(value_ints=[1, 3])), v_tgt)
        one = op.CastLike(op.Constant(value_float=1.0), v_tgt)
        v_w = op.Add(op.Mul(m, warped), op.Mul(op.Sub(one, m), v_tgt))
        return _attention_onnx(op, q, k, v_w, scale, fused)

    return {torch.ops.dreamfuse.attention.default: attention, torch.ops.dreamfuse.ama_attention.default: ama_attention}


# --------------------------------------------------------------------------------------------- graph wrappers
def unet_input_names(is_xl: bool, ip: bool) -> list[str]:
    names = ["sample", "timestep", "encoder_hidden_states"]
    if is_xl:
        names += ["text_embeds", "time_ids"]
    if ip:
        names += ["ip_tokens", "ip_scale"]
    return names


class UNetGraph(nn.Module):
    """The UNet call as tensors in, noise prediction out: ``(sample, timestep (B,), encoder_hidden_states[,
    text_embeds, time_ids][, ip_tokens, ip_scale])``."""

    def __init__(self, unet, is_xl: bool, ip: bool):
        super().__init__()
        self.unet, self.is_xl, self.ip = unet, is_xl, ip

    def unet_kwargs(self, extra: tuple) -> tuple[dict | None, dict]:
        added, cak = None, {}
        i = 0
        if self.is_xl:
            added = {"text_embeds": extra[0], "time_ids": extra[1]}
            i = 2
        if self.ip:
            cak["ip_tokens"], cak["ip_scale"] = extra[i], extra[i + 1]
        return added, cak

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        added, cak = self.unet_kwargs(extra)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         cross_attention_kwargs=cak or None, return_dict=False)[0]


def _upsample_nearest(x: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, h, w) -> (B, k·h, k·w)`` nearest (``F.interpolate(mode="nearest")`` at an integer factor), as an
    expand + reshape that exports with symbolic sizes."""
    if k == 1:
        return x
    b, h, w = x.shape
    return x[:, :, None, :, None].expand(b, h, k, w, k).reshape(b, h * k, w * k)


class PersonalizeUNetGraph(UNetGraph):
    """The UNet with personalize's foreground and AMA handlers traced in (see the module docstring). Inputs after
    the plain ones (no IP-Adapter): ``ama_ref_index (B,)``, ``fg_tokens (B, L)``, ``fg_source (B,)``, then per AMA
    factor ``f`` in :attr:`factors` ``ama_flow_<f>``, ``ama_err_<f>``, ``ama_thresh_<f>``. Outputs: ``noise_pred``,
    ``foreground``, then ``feature_<block>`` per feature block."""

    def __init__(self, unet, is_xl: bool, ama_layers: dict[str, int], foreground_layers: list[str],
                 feature_blocks: list[str]):
        super().__init__(unet, is_xl, ip=False)
        self.ama_layers = dict(ama_layers)  # layer name -> latent / layer grid factor
        self.factors = sorted(set(self.ama_layers.values()))
        self.foreground_layers = list(foreground_layers)
        self.feature_blocks = list(feature_blocks)

    def input_names(self) -> list[str]:
        names = unet_input_names(self.is_xl, False) + ["ama_ref_index", "fg_tokens", "fg_source"]
        for f in self.factors:
            names += [f"ama_flow_{f}", f"ama_err_{f}", f"ama_thresh_{f}"]
        return names

    def output_names(self) -> list[str]:
        return ["noise_pred", "foreground"] + [f"feature_{b.replace('.', '_')}" for b in self.feature_blocks]

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        n_plain = 2 if self.is_xl else 0
        added, _ = self.unet_kwargs(extra[:n_plain])
        ref_index, fg_tokens, fg_source = extra[n_plain:n_plain + 3]
        per_factor = extra[n_plain + 3:]
        ama_in = {f: per_factor[3 * i:3 * i + 3] for i, f in enumerate(self.factors)}
        h, w = sample.shape[-2:]
        fg_hw = (h // FOREGROUND_FACTOR, w // FOREGROUND_FACTOR)
        maps: list[torch.Tensor] = []
        finished: list[torch.Tensor] = []

        def foreground(layer: LayerInfo, q, k, v):
            scale = q.shape[-1] ** -0.5
            out, lse = torch.ops.dreamfuse.attention(q, k, v, scale)
            p = torch.exp(scale * q.float() @ k.float().transpose(-1, -2) - lse.float()[..., None])  # (B, H, Lq, L)
            maps.append((p * fg_tokens[:, None, None, :].float()).sum(-1).mean(1))  # (B, Lq)
            return out

        def normalized_foreground() -> torch.Tensor:
            if not finished:
                m = torch.stack(maps).sum(0) / max(len(maps), 1)
                lo, hi = m.min(1, keepdim=True).values, m.max(1, keepdim=True).values
                finished.append(((m - lo) / (hi - lo).clamp_min(1e-8)).reshape(-1, *fg_hw))
            return finished[0]

        def ama(factor: int):
            def handler(layer: LayerInfo, q, k, v):
                flow, err, thresh = ama_in[factor]
                fg = _upsample_nearest(normalized_foreground().index_select(0, fg_source),
                                       FOREGROUND_FACTOR // factor).flatten(1)  # (B, N)
                thr = thresh * fg.sum(1) / fg.shape[1]
                mask = torch.where(err.flatten(1) < thr[:, None], fg, torch.zeros_like(fg))
                v_ref = v.index_select(0, ref_index)
                out, _ = torch.ops.dreamfuse.ama_attention(q, k, v, v_ref, flow.flatten(1), mask.to(q.dtype),
                                                           q.shape[-1] ** -0.5)
                return out
            return handler

        handlers = {name: foreground for name in self.foreground_layers}
        handlers.update({name: ama(f) for name, f in self.ama_layers.items()})
        ctx = CallContext(handlers=handlers, latent_hw=None, capture=frozenset(self.feature_blocks))
        eps = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                        cross_attention_kwargs={"dreamfuse_ctx": ctx}, return_dict=False)[0]
        fg = normalized_foreground() if maps else sample.new_zeros(sample.shape[0], *fg_hw)
        return (eps, fg, *(ctx.features[b] for b in self.feature_blocks))


class TextEncoderGraph(nn.Module):
    """``input_ids (B, L)`` int64 -> what the engine reads from this encoder: SD the last hidden state; SDXL the
    penultimate hidden states (and, for the second encoder, the projected pooled ``text_embeds``)."""

    def __init__(self, encoder, penultimate: bool, pooled: bool):
        super().__init__()
        self.encoder, self.penultimate, self.pooled = encoder, penultimate, pooled

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out[0]
        return (hidden, out.text_embeds) if self.pooled else hidden


class VaeDecoderGraph(nn.Module):
    """``latents (B, 4, h, w)`` (the UNet's, scaled) -> ``image (B, 3, 8h, 8w)`` in [0, 1]: ``Engine.decode``."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        x = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------------------------- profile
def _parse_range(text: str, field: str) -> tuple[int, int]:
    parts = str(text).split("-")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or lo < 1 or hi < lo:
        raise ValueError(f"{field}: expected N or MIN-MAX with 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def make_profile(engine, batch: tuple[int, int] | str = (1, 16), size: int | None = None,
                 min_size: int | None = None, max_size: int | None = None, static: bool = False) -> dict:
    """The profile an export accepts: UNet batch rows ``[min, max]`` (CFG doubles the prompts; at most 63 when
    dynamic), latent height/width ranges from image pixels (multiples of 64 when dynamic). ``size``: one square
    image size; otherwise ``[min_size, max_size]`` for both sides (default: the model's native size / 2 .. x 2,
    at least 64 px). ``static``: one batch and one size (CUDA graphs; no dynamic dimension)."""
    b_lo, b_hi = _parse_range(batch, "batch") if isinstance(batch, str) else tuple(int(x) for x in batch)
    if not 1 <= b_lo <= b_hi:
        raise ValueError(f"batch: expected 1 <= MIN <= MAX, got {b_lo}-{b_hi}")
    scale = engine.vae_scale_factor
    px = LATENT_MULTIPLE * scale
    native = engine.default_size
    if size is not None:
        if min_size is not None or max_size is not None:
            raise ValueError("size: give --size or --min-size/--max-size, not both")
        min_size = max_size = size
    min_size = max(px, (native // 2) // px * px) if min_size is None else min_size
    max_size = max(min_size, native * 2) if max_size is None else max_size
    for name, v in (("min_size", min_size), ("max_size", max_size)):
        if v < px or (not static and v % px) or v % scale:
            raise ValueError(f"{name}: {v} px must be a multiple of {px if not static else scale} px and >= {px}")
    if max_size < min_size:
        raise ValueError(f"max_size: {max_size} px is below min_size {min_size} px")
    if static:
        if b_lo != b_hi or min_size != max_size:
            raise ValueError("static: needs one batch (--batch N) and one size (--size S)")
    elif b_hi > MAX_DYNAMIC_BATCH:
        raise ValueError(f"batch: a dynamic batch is capped at {MAX_DYNAMIC_BATCH} rows (diffusers' Upsample2D); "
                         f"got {b_hi}")
    lat = [min_size // scale, max_size // scale]
    return {"batch": [b_lo, b_hi], "latent_height": lat, "latent_width": list(lat), "static": bool(static)}


def _trace_shape(profile: dict) -> tuple[int, int, int]:
    """Batch and latent size to trace at: inside the profile, batch >= 2 and latents >= 16x16 when dynamic (a
    dimension traced at 1, or latents at 8x8, would be specialized)."""
    b_lo, b_hi = profile["batch"]
    lo, hi = profile["latent_height"]
    if profile["static"]:
        return b_lo, lo, lo
    b = min(max(2, b_lo), b_hi)
    s = min(max(MIN_TRACE_LATENT, lo), hi)
    return b, s, min(s + LATENT_MULTIPLE, hi) if hi > s else s  # h != w: neither is specialized to the other


# --------------------------------------------------------------------------------------------- export
@contextlib.contextmanager
def _export_attention(engine):
    """Trace with the fused-attention op in every layer (one ``dreamfuse::attention`` node each): the processors'
    backend is ``triton`` inside (tracing runs the op's fake only), the engine's own one again on exit. Mutates
    the shared processors: export while no call runs."""
    before = {name: p.backend for name, p in engine.processors.items()}
    try:
        for p in engine.processors.values():
            p.backend = "triton"
        yield
    finally:
        for name, p in engine.processors.items():
            p.backend = before[name]


def _dims(profile: dict):
    """``(batch, height/8, width/8)`` as ``torch.export.Dim``s, ``None`` for a dimension the profile fixes."""
    from torch.export import Dim

    def dim(name, lo, hi):
        return None if profile["static"] or lo == hi else Dim(name, min=lo, max=hi)

    lo, hi = profile["latent_height"]
    return (dim("batch", *profile["batch"]), dim("height8", lo // LATENT_MULTIPLE, hi // LATENT_MULTIPLE),
            dim("width8", lo // LATENT_MULTIPLE, hi // LATENT_MULTIPLE))


def _spec(**dims) -> dict | None:
    """A ``dynamic_shapes`` entry ``{axis: Dim}`` from ``d<axis>=Dim or None`` (None: static), or None if none."""
    out = {int(k[1:]): v for k, v in dims.items() if v is not None}
    return out or None


def _times(k: int, d):
    return None if d is None else k * d


def _dynamic(specs: list):
    return None if all(s is None for s in specs) else tuple(specs)


def _export_graph(module: nn.Module, args: tuple, dynamic_shapes, input_names, output_names, path: Path,
                  opset: int, fixed: int | None = None, plugins: bool = False) -> dict:
    """``torch.export`` + the dynamo ONNX exporter; writes ``path`` (weights in ``path.data`` past 1 GB).
    ``fixed``: the number of named parameters of ``module.forward`` before its ``*extra`` (their dynamic shapes
    come first, then one tuple for the rest). ``plugins``: dreamfuse ops with a plugin node (AMA attention) become
    that node instead of standard ops; the returned info lists the plugin op types in the graph."""
    if dynamic_shapes is not None and fixed is not None and len(dynamic_shapes) > fixed:
        dynamic_shapes = (*dynamic_shapes[:fixed], tuple(dynamic_shapes[fixed:]))
    from torch.onnx._internal.exporter import _registration  # noqa: F401 (its torchvision notices are noise here)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's deprecation chatter about pytree specs
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        if plugins:
            from .plugins import decompositions

            ep = ep.run_decompositions(decompositions())  # only these ops; the exporter decomposes the rest
        t_trace = time.perf_counter() - t0
        with contextlib.redirect_stdout(_Quiet()):
            prog = torch.onnx.export(ep, dynamo=True, input_names=input_names, output_names=output_names,
                                     opset_version=opset, custom_translation_table=translation_table(opset),
                                     verbose=False)
    t_lower = time.perf_counter() - t0 - t_trace
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weights > EXTERNAL_DATA_BYTES
    prog.save(str(path), external_data=external)
    return {"file": path.name, "data_files": _external_files(path) if external else [],
            "inputs": list(input_names), "outputs": list(output_names),
            "external_data": external, "plugins": _plugin_nodes(prog.model) if plugins else [],
            "trace_s": round(t_trace, 1),
            "lower_s": round(t_lower, 1),
            "export_s": round(time.perf_counter() - t0, 1)}


def _external_files(path: Path) -> list[str]:
    """The external-data files a saved graph reads (its tensors' ``location`` entries, relative to its folder),
    from the graph alone (its weights stay on disk)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found: set[str] = set()

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    for t in tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in t.external_data if e.key == "location")
    return sorted(found)


def _plugin_nodes(model) -> list[str]:
    """The dreamfuse plugin op types (sorted, unique) in an ``onnx_ir`` model, its functions included."""
    from .plugins import DOMAIN

    nodes = [*model.graph, *(n for f in model.functions.values() for n in f)]
    return sorted({n.op_type for n in nodes if n.domain == DOMAIN})


class _Quiet:
    """A stdout sink for the exporter's progress lines."""

    def write(self, s):
        return len(s)

    def flush(self):
        pass


def _model_dtype(dtype) -> torch.dtype:
    from dreamfuse.engine.config import parse_dtype

    return parse_dtype(dtype)


@contextlib.contextmanager
def _cast(modules, dtype):
    """The modules in ``dtype`` inside (an fp32 engine exports an fp16 graph), their own dtypes again on exit."""
    before = [next(m.parameters()).dtype for m in modules]
    try:
        for m, d in zip(modules, before):
            if d != dtype:
                m.to(dtype)
        yield
    finally:
        for m, d in zip(modules, before):
            if d != dtype:
                m.to(d)


def personalize_layers(engine) -> tuple[dict[str, int], list[str], list[str]]:
    """The AMA layers (name -> latent/grid factor), foreground layers and feature blocks of personalize's defaults
    for this architecture (``default_blocks``): what ``unet_personalize.onnx`` traces in."""
    from dreamfuse.engine.pipelines import personalize as pz

    ama_blocks, feature_blocks = pz.default_blocks(engine)
    n_up = len(engine.unet.up_blocks)
    ama = {}
    for name in pz._layer_names(engine, ama_blocks, "attn1"):
        block = int(name.split(".")[1])
        ama[name] = 2 ** (n_up - 1 - block)
    return ama, pz._foreground_layers(engine), [f"up_blocks.{b}" for b in feature_blocks]


def model_entry(engine, model_name, pooled_dim: int) -> dict:
    """The manifest's ``model`` entry of an export of ``engine``'s UNet: what the runtime checks a model against
    (:func:`dreamfuse.export.manifest.check_model`) and what its inputs are shaped by."""
    unet = engine.unet
    return {"name": model_name, "hash": weights_hash(unet), "is_xl": engine.is_xl,
            "in_channels": int(unet.config.in_channels), "cross_attention_dim": int(unet.config.cross_attention_dim),
            "text_len": int(engine.tokenizer.model_max_length), "pooled_dim": pooled_dim,
            "vae_scale_factor": int(engine.vae_scale_factor), "sample_size": int(unet.config.sample_size),
            "prediction_type": engine.scheduler.config.get("prediction_type", "epsilon")}


def unet_example_inputs(engine, profile: dict, dev: torch.device, dtype: torch.dtype,
                        gen: torch.Generator | None = None):
    """The UNet graph's example inputs at the profile's trace shape (:func:`unet_input_names` order), with the
    ``torch.export`` dynamic-shape spec of each, the kind of each (``"sample"``: dynamic batch, height and width;
    ``"row"``: one row per sample; ``"shared"``: one value for the call), SDXL's pooled width (0 otherwise) and the
    loaded IP-Adapter's manifest entry (``None`` without one). Random values come from ``gen`` (a CPU generator
    seeded 0 when not given)."""
    unet = engine.unet
    cross = int(unet.config.cross_attention_dim)
    text_len = int(engine.tokenizer.model_max_length)
    b, h, w = _trace_shape(profile)
    B, H8, W8 = _dims(profile)
    sample_dims = _spec(d0=B, d2=_times(LATENT_MULTIPLE, H8), d3=_times(LATENT_MULTIPLE, W8))
    row = _spec(d0=B)

    gen = torch.Generator("cpu").manual_seed(0) if gen is None else gen
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dev, dtype)
    args = [rand(b, unet.config.in_channels, h, w), torch.linspace(1, 999, b).to(dev), rand(b, text_len, cross)]
    dyn, kinds = [sample_dims, row, row], ["sample", "row", "row"]
    pooled_dim = 0
    if engine.is_xl:
        cfg = unet.config
        pooled_dim = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        args += [rand(b, pooled_dim), torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * b).to(dev, dtype)]
        dyn, kinds = dyn + [row, row], kinds + ["row", "row"]
    ip_info = None
    if engine.ip_adapter is not None:
        tokens = engine.ip_adapter.uncond_tokens()
        ip_info = {"hash": weights_hash(engine.ip_adapter.layers), "tokens": int(tokens.shape[1]),
                   "plus": bool(engine.ip_adapter.plus)}
        args += [rand(b, tokens.shape[1], cross), torch.tensor([0.6], device=dev, dtype=dtype)]
        dyn, kinds = dyn + [row, None], kinds + ["row", "shared"]
    return args, dyn, kinds, pooled_dim, ip_info


def export_onnx(engine, out: str | Path, *, opset: int = DEFAULT_OPSET, dtype=None, batch=(1, 16),
                size: int | None = None, min_size: int | None = None, max_size: int | None = None,
                static: bool = False, personalize: bool = False, plugins: bool = False, text_encoders: bool = True,
                vae: bool = True, model_name: str | None = None, layout: str = "dreamfuse", progress=None) -> dict:
    """Export ``engine``'s model to ONNX graphs in ``out`` and write their manifest; returns it.

    Writes ``unet.onnx``; with ``personalize`` also ``unet_personalize.onnx`` (DreamMatcher's AMA and foreground
    layers traced in, see the module docstring); with ``text_encoders`` ``text_encoder.onnx`` (+
    ``text_encoder_2.onnx`` on SDXL); with ``vae`` ``vae_decoder.onnx``; and ``dreamfuse.json``
    (:mod:`dreamfuse.export.manifest`). ``dtype``: the graphs' dtype (default the engine's); the VAE decoder of a
    model that upcasts its VAE stays fp32. A loaded IP-Adapter's image layers are baked into ``unet.onnx`` with
    ``ip_tokens``/``ip_scale`` inputs (the personalize graph has none: DreamMatcher runs no image prompt).
    ``batch``/``size``/``min_size``/``max_size``/``static``: :func:`make_profile`. ``plugins`` (with
    ``personalize``): the personalize graph's AMA layers as ``dreamfuse::AmaAttention`` plugin nodes (module
    docstring; the manifest lists them per graph under ``plugins``). ``progress``: a callable taking one line per
    graph. ``layout="optimum"``: the folder diffusers' ``OnnxStableDiffusionPipeline`` and optimum's
    ``ORTStableDiffusionPipeline`` load instead (:func:`dreamfuse.export.optimum.export_optimum`; SD 1.x/2.x, no
    personalize/plugins/static/IP-Adapter, every component; returns its summary, writes no manifest).

    Mutates the engine while it runs (processor backends, module dtypes; restored on exit): export while no other
    call runs. About 30 s per UNet graph for tiny on 2 CPU cores.
    """
    if not OPSETS.start <= int(opset) < OPSETS.stop:
        raise ValueError(f"opset: {opset} is not supported (use {OPSETS.start}..{OPSETS.stop - 1})")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: {layout!r} is not a layout (use {' or '.join(LAYOUTS)})")
    if layout == "optimum":
        from .optimum import export_optimum, refused

        why = refused(personalize=personalize, plugins=plugins, static=static, no_text_encoders=not text_encoders,
                      no_vae=not vae)
        if why:
            raise ValueError(why)
        return export_optimum(engine, out, opset=opset, dtype=dtype, batch=batch, size=size, min_size=min_size,
                              max_size=max_size, progress=progress)
    if plugins and not personalize:
        raise ValueError("plugins: only the personalize graph has plugin nodes (AMA attention): export it with "
                         "personalize=True (--personalize)")
    dtype = engine.dtype if dtype is None else _model_dtype(dtype)
    if plugins and dtype not in (torch.float32, torch.float16):
        raise ValueError(f"plugins: the plugin nodes are float32 or float16 (the TensorRT plugins' types), not "
                         f"{str(dtype).removeprefix('torch.')}")
    profile = make_profile(engine, batch, size, min_size, max_size, static)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda line: None)
    unet = engine.unet
    dev = engine.device
    text_len = int(engine.tokenizer.model_max_length)
    is_xl = engine.is_xl
    ip = engine.ip_adapter is not None
    b, h, w = _trace_shape(profile)
    B, H8, W8 = _dims(profile)
    row = _spec(d0=B)
    gen = torch.Generator("cpu").manual_seed(0)  # the personalize graph's example inputs continue its stream
    args, dyn, _, pooled_dim, ip_info = unet_example_inputs(engine, profile, dev, dtype, gen)

    manifest = {
        "format": FORMAT,
        "dreamfuse_version": dreamfuse_version(),
        "torch_version": torch.__version__,
        "opset": int(opset),
        "dtype": str(dtype).removeprefix("torch."),
        "model": model_entry(engine, model_name, pooled_dim),
        "ip_adapter": ip_info,
        "profile": profile,
        "graphs": {},
        "export_s": {},
    }
    dynamic = _dynamic(dyn)
    with torch.no_grad(), _export_attention(engine), _cast([unet], dtype):
        names = unet_input_names(is_xl, ip)
        say(f"unet: tracing at batch {b}, latents {h}x{w} ...")
        info = _export_graph(UNetGraph(unet, is_xl, ip), tuple(args), dynamic, names, ["noise_pred"],
                             out / "unet.onnx", opset, fixed=3)
        manifest["graphs"]["unet"] = info
        say(f"unet: {info['export_s']} s")
        if personalize:
            ama_layers, fg_layers, feature_blocks = personalize_layers(engine)
            graph = PersonalizeUNetGraph(unet, is_xl, ama_layers, fg_layers, feature_blocks)
            p_args = list(args[:5 if is_xl else 3])
            p_dyn = list(dyn[:5 if is_xl else 3])
            refs = torch.zeros(b, dtype=torch.long, device=dev)
            p_args += [refs, torch.rand(b, text_len, generator=gen).to(dev), refs.clone()]
            p_dyn += [row, row, row]
            for f in graph.factors:
                hf, wf = h // f, w // f
                p_args += [torch.randint(0, hf * wf, (b, hf, wf), generator=gen).to(dev),
                           torch.rand(b, hf, wf, generator=gen).to(dev) * hf,
                           torch.tensor([0.4 * hf], device=dev)]
                k = LATENT_MULTIPLE // f
                p_dyn += [_spec(d0=B, d1=_times(k, H8), d2=_times(k, W8))] * 2 + [None]
            say("unet_personalize: tracing ...")
            info = _export_graph(graph, tuple(p_args), _dynamic(p_dyn), graph.input_names(),
                                 graph.output_names(), out / "unet_personalize.onnx", opset, fixed=3,
                                 plugins=plugins)
            info.update(ama_layers=ama_layers, foreground_layers=fg_layers, feature_blocks=feature_blocks,
                        ama_factors=graph.factors, foreground_factor=FOREGROUND_FACTOR)
            manifest["graphs"]["unet_personalize"] = info
            say(f"unet_personalize: {info['export_s']} s" + (f" ({len(ama_layers)} {', '.join(info['plugins'])} "
                                                              "plugin nodes)" if plugins else ""))
    if text_encoders:
        manifest["graphs"].update(_export_text_encoders(engine, out, profile, dtype, opset, say))
    if vae:
        manifest["graphs"]["vae_decoder"] = _export_vae(engine, out, profile, dtype, opset, say)
    manifest["export_s"] = {k: g["export_s"] for k, g in manifest["graphs"].items()}
    manifest["plugins"] = plugins_entry(manifest["graphs"])
    manifest["files"] = file_entries(out, [f for g in manifest["graphs"] for f in graph_files(manifest, g)])
    write_manifest(out, manifest)
    return manifest


def _export_text_encoders(engine, out: Path, profile: dict, dtype, opset: int, say) -> dict:
    from torch.export import Dim

    graphs = {}
    text_len = int(engine.tokenizer.model_max_length)
    encoders = [("text_encoder", engine.text_encoder, engine.is_xl, False)]
    if engine.is_xl:
        encoders.append(("text_encoder_2", engine.text_encoder_2, True, True))
    b_hi = max(profile["batch"][1], 2)
    for name, enc, penultimate, pooled in encoders:
        ids = torch.randint(0, enc.config.vocab_size, (2, text_len), generator=torch.Generator().manual_seed(0))
        dyn = None if profile["static"] else ({0: Dim("batch", min=1, max=b_hi)},)  # prompts: at least 2 rows
        outputs = ["hidden_states", "text_embeds"] if pooled else ["hidden_states"]
        with torch.no_grad(), _cast([enc], dtype):
            info = _export_graph(TextEncoderGraph(enc, penultimate, pooled), (ids.to(engine.device),), dyn,
                                 ["input_ids"], outputs, out / f"{name}.onnx", opset)
        info["hidden"] = "penultimate" if penultimate else "last"
        graphs[name] = info
        say(f"{name}: {info['export_s']} s")
    return graphs


def _export_vae(engine, out: Path, profile: dict, dtype, opset: int, say) -> dict:
    vae = engine.vae
    # a VAE the engine upcasts (SDXL's overflows in fp16) stays fp32 in the graph too
    vae_dtype = torch.float32 if vae.dtype == torch.float32 and engine.dtype != torch.float32 else dtype
    b, h, w = _trace_shape(profile)
    B, H8, W8 = _dims(profile)
    dyn = _dynamic([_spec(d0=B, d2=_times(LATENT_MULTIPLE, H8), d3=_times(LATENT_MULTIPLE, W8))])
    lat = torch.randn(b, vae.config.latent_channels, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _cast([vae], vae_dtype):
        info = _export_graph(VaeDecoderGraph(vae), (lat.to(engine.device, vae_dtype),), dyn, ["latents"], ["image"],
                             out / "vae_decoder.onnx", opset)
    info["dtype"] = str(vae_dtype).removeprefix("torch.")
    say(f"vae_decoder: {info['export_s']} s")
    return info
