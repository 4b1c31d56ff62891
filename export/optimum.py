"""ONNX export in the pipeline-folder layout of diffusers' ONNX pipelines and optimum (``--layout optimum``).

The folder loads with ``diffusers.OnnxStableDiffusionPipeline.from_pretrained(DIR)`` and with optimum's
``ORTStableDiffusionPipeline.from_pretrained(DIR)``; dreamfuse's own runtime (``--unet DIR``) reads the default
layout instead (:mod:`dreamfuse.export.onnx`). What both loaders read (checked against diffusers 0.42's
``pipelines/onnx_utils.py`` / ``pipeline_onnx_stable_diffusion.py`` and optimum's ``onnxruntime/modeling_diffusion.py``
/ ``exporters/onnx/model_configs.py``)::

    model_index.json             the components: unet, text_encoder, vae_encoder, vae_decoder ("OnnxRuntimeModel"),
                                 tokenizer, scheduler; safety_checker and feature_extractor null
    <component>/model.onnx       each graph (diffusers' ONNX_WEIGHTS_NAME)
    <component>/config.json      the torch module's config (optimum refuses a component without one)
    tokenizer/                   the tokenizer's files
    scheduler/scheduler_config.json

Graphs (names are the contract; dynamic axes named ``batch``, ``height``, ``width``):

* ``text_encoder``: ``input_ids (batch, L)`` **int32** (diffusers feeds ``astype(np.int32)``; optimum casts to the
  graph's type) -> ``last_hidden_state``, ``pooler_output``.
* ``unet``: ``sample (batch, C, height, width)``, ``timestep (timestep_batch,)`` float32, ``encoder_hidden_states
  (batch, L, D)`` -> ``out_sample``. The timestep is one value for all rows (diffusers passes ``np.array([t])``,
  optimum unsqueezes its scalar ``t`` for a rank-1 input) or one per row; the graph broadcasts it by index, so both
  trace to one graph with no guard between the two lengths.
* ``vae_decoder``: ``latent_sample`` (the latents already divided by ``scaling_factor``: both pipelines divide
  before decoding) -> ``sample``, the decoder's raw output in [-1, 1] (the pipelines map it to [0, 1]).
* ``vae_encoder``: ``sample`` (pixels in [-1, 1]) -> ``latent_sample``, the posterior's mean, unscaled (img2img
  multiplies by the scaling factor itself). The mean, not a draw: the graph is deterministic.

SD 1.x/2.x layouts only (optimum's SDXL folder has a second text encoder with other outputs; diffusers' ONNX
pipeline has no SDXL). No dreamfuse manifest: the folder is not a ``--unet`` export.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from .onnx import (
    DEFAULT_OPSET,
    LATENT_MULTIPLE,
    OPSETS,
    _cast,
    _dims,
    _dynamic,
    _export_attention,
    _export_graph,
    _model_dtype,
    _spec,
    _times,
    _trace_shape,
    make_profile,
)

WEIGHTS_NAME = "model.onnx"  # diffusers' ONNX_WEIGHTS_NAME, optimum's too
CONFIG_NAME = "config.json"
MODEL_INDEX = "model_index.json"
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
IO = {  # graph -> (inputs, outputs): what diffusers' ONNX pipelines and optimum's ORT models call them by
    "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
    "vae_decoder": (["latent_sample"], ["sample"]),
    "vae_encoder": (["sample"], ["latent_sample"]),
}


class TextEncoderGraph(nn.Module):
    """``input_ids (B, L)`` int32 -> ``(last_hidden_state, pooler_output)`` of a CLIP text model."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids.long(), return_dict=True)
        return out.last_hidden_state, out.pooler_output


class UNetGraph(nn.Module):
    """``(sample, timestep (1,) or (B,), encoder_hidden_states) -> out_sample``."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        # row i reads timestep[i mod T]: T = 1 broadcasts, T = B is per row; an index, so torch.export sees no
        # broadcast between two symbolic sizes (which would guard T == B or T == 1). T as a tensor (a sum of ones):
        # the exporter has no translation of a tensor mod a symbolic int
        n = torch.ones_like(timestep, dtype=torch.long).sum()
        rows = torch.arange(sample.shape[0], device=sample.device) % n
        t = timestep.index_select(0, rows)
        return self.unet(sample, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeDecoderGraph(nn.Module):
    """``latent_sample`` (already / scaling_factor) -> ``sample`` in [-1, 1] (diffusers' ``vae.decode``)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderGraph(nn.Module):
    """``sample`` (pixels in [-1, 1]) -> ``latent_sample``, the posterior's mean, unscaled."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].mode()


REFUSED = {  # export_onnx's options this layout cannot honour -> why (the CLI names the flag)
    "personalize": "the optimum layout has no personalize graph (diffusers' and optimum's pipelines call the plain "
                   "UNet); use the default layout for it",
    "plugins": "dreamfuse plugin nodes are custom ops that diffusers' and optimum's onnxruntime sessions cannot run; "
               "use the default layout for them",
    "static": "the pipelines call the text encoder, UNet and VAE graphs with different batches (the VAE decoder row "
              "by row), so a one-shape export cannot serve them; drop --static",
    "no_text_encoders": "a pipeline folder needs every component (both loaders require the text encoder); drop "
                        "--no-text-encoders",
    "no_vae": "a pipeline folder needs every component (diffusers' loader requires both VAE graphs); drop --no-vae",
    "ip_adapter": "the optimum layout's UNet has no image-prompt inputs; export without an IP-Adapter or use the "
                  "default layout",
}


def refused(**options) -> str | None:
    """The first option set in ``options`` (``name=value``) that this layout cannot honour, as ``"name: why"``;
    ``None`` when all can be honoured."""
    for name, why in REFUSED.items():
        if options.get(name):
            return f"{name}: {why}"
    return None


def check_engine(engine) -> None:
    """Refuse what this layout cannot hold (``ValueError`` naming the option)."""
    if engine.is_xl:
        raise ValueError("model: the optimum layout is for SD 1.x/2.x models (diffusers' ONNX pipeline has no "
                         "SDXL; optimum's SDXL folder has a second text encoder); export SDXL with the default layout")
    if engine.ip_adapter is not None:
        raise ValueError(f"ip_adapter: {REFUSED['ip_adapter']}")


def export_optimum(engine, out: str | Path, *, opset: int = DEFAULT_OPSET, dtype=None, batch=(1, 16),
                   size: int | None = None, min_size: int | None = None, max_size: int | None = None,
                   progress=None) -> dict:
    """Export ``engine``'s SD 1.x/2.x pipeline to ``out`` in diffusers' / optimum's ONNX folder layout (module
    docstring); returns a summary (``layout``, ``dtype``, ``opset``, ``profile``, ``graphs``). ``batch``/``size``/
    ``min_size``/``max_size``: :func:`dreamfuse.export.onnx.make_profile` (the UNet's batch and latent ranges; the
    text encoder and VAE graphs take any batch from 1). Mutates the engine while it runs (as ``export_onnx``)."""
    if not OPSETS.start <= int(opset) < OPSETS.stop:
        raise ValueError(f"opset: {opset} is not supported (use {OPSETS.start}..{OPSETS.stop - 1})")
    check_engine(engine)
    dtype = engine.dtype if dtype is None else _model_dtype(dtype)
    profile = make_profile(engine, batch, size, min_size, max_size, static=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda line: None)
    dev = engine.device
    b, h, w = _trace_shape(profile)
    B, H8, W8 = _dims(profile)
    from torch.export import Dim

    # text encoder / VAE: any batch from 1 (diffusers decodes row by row), traced at 2 (1 would specialize)
    rows = Dim("batch", min=1, max=max(profile["batch"][1], 2))
    latent = _spec(d0=B, d2=_times(LATENT_MULTIPLE, H8), d3=_times(LATENT_MULTIPLE, W8))
    gen = torch.Generator("cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dev, dtype)  # noqa: E731
    unet, vae, enc = engine.unet, engine.vae, engine.text_encoder
    text_len = int(engine.tokenizer.model_max_length)
    scale = int(engine.vae_scale_factor)
    graphs = {}

    def export(name, module, args, dynamic):
        path = out / name / WEIGHTS_NAME
        path.parent.mkdir(exist_ok=True)
        info = _export_graph(module, args, dynamic, *IO[name], path, opset)
        name_axes(path)
        info["file"] = f"{name}/{WEIGHTS_NAME}"
        graphs[name] = info
        say(f"{name}: {info['export_s']} s")

    with torch.no_grad(), _export_attention(engine):
        ids = torch.randint(0, enc.config.vocab_size, (2, text_len), generator=gen, dtype=torch.int32)
        with _cast([enc], dtype):
            export("text_encoder", TextEncoderGraph(enc), (ids.to(dev),), ({0: rows},))
        say(f"unet: tracing at batch {b}, latents {h}x{w} ...")
        t_rows = Dim("timestep_batch", min=1, max=max(profile["batch"][1], 2))  # 1 or one per row
        args = (rand(b, unet.config.in_channels, h, w), torch.linspace(1, 999, 2).to(dev),
                rand(b, text_len, int(unet.config.cross_attention_dim)))
        with _cast([unet], dtype):
            export("unet", UNetGraph(unet), args, (latent, {0: t_rows}, {0: B} if B is not None else None))
        vae_lat = {0: rows, **{k: v for k, v in (latent or {}).items() if k != 0}}
        vae_px = {k: (v * scale if k else v) for k, v in vae_lat.items()}
        with _cast([vae], dtype):
            export("vae_decoder", VaeDecoderGraph(vae), (rand(2, vae.config.latent_channels, h, w),),
                   _dynamic([vae_lat]))
            export("vae_encoder", VaeEncoderGraph(vae), (rand(2, vae.config.in_channels, h * scale, w * scale),),
                   _dynamic([vae_px]))
    write_configs(engine, out)
    say(f"configs, tokenizer, scheduler, {MODEL_INDEX}")
    return {"layout": "optimum", "dtype": str(dtype).removeprefix("torch."), "opset": int(opset),
            "profile": profile, "graphs": graphs}


def write_configs(engine, out: Path) -> None:
    """Each component's ``config.json``, the tokenizer's files, the scheduler's config and ``model_index.json``."""
    import diffusers

    engine.unet.save_config(out / "unet")
    engine.text_encoder.config.save_pretrained(out / "text_encoder")
    for name in ("vae_decoder", "vae_encoder"):
        engine.vae.save_config(out / name)
    engine.tokenizer.save_pretrained(out / "tokenizer")
    _vocab_files(out / "tokenizer")
    engine.scheduler.save_pretrained(out / "scheduler")
    index = {"_class_name": "OnnxStableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             **{name: ["diffusers", "OnnxRuntimeModel"] for name in COMPONENTS},
             "tokenizer": ["transformers", type(engine.tokenizer).__name__],
             "scheduler": ["diffusers", type(engine.scheduler).__name__],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    (out / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _vocab_files(folder: Path) -> None:
    """``vocab.json`` + ``merges.txt`` beside a BPE ``tokenizer.json``, where the saved tokenizer wrote none:
    transformers 5 saves only ``tokenizer.json``, transformers 4's ``CLIPTokenizer`` (optimum's pin) reads these."""
    tok = folder / "tokenizer.json"
    if (folder / "vocab.json").exists() or not tok.is_file():
        return
    model = json.loads(tok.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE":
        return
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


_SYM = re.compile(r"(?:(\d+)\*)?(s\d+)\b")  # torch.export's symbols as the exporter writes them: s26, 8*s26


def axis_names(model) -> dict[str, tuple[str, int]]:
    """Root symbol -> (axis name, k) from a graph's inputs, where the input's size is ``k * symbol``: dim 0 of
    every input is ``batch`` (``timestep``'s is ``timestep_batch``: 1 or one per row), dims 2 and 3 of an image-
    shaped input are ``height`` and ``width``."""
    roots: dict[str, tuple[str, int]] = {}
    for v in model.graph.input:
        dims = v.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            name = ("timestep_batch" if v.name == "timestep" else "batch") if i == 0 else \
                {2: "height", 3: "width"}.get(i) if len(dims) == 4 else None
            m = _SYM.fullmatch(d.dim_param) if d.HasField("dim_param") and name else None
            if m:
                roots.setdefault(m.group(2), (name, int(m.group(1) or 1)))
    return roots


def axis_name(dim_param: str, roots: dict[str, tuple[str, int]]) -> str:
    """``dim_param`` with each known symbol's multiple written in axis names: with ``s26 -> ("height", 8)``,
    ``8*s26`` -> ``height``, ``64*s26`` -> ``8*height``, ``4*s26`` -> ``height/2``; unknown symbols stay."""

    def sub(m):
        if m.group(2) not in roots:
            return m.group(0)
        axis, k = roots[m.group(2)]
        f = Fraction(int(m.group(1) or 1), k)
        return (f"{f.numerator}*" if f.numerator != 1 else "") + axis + (f"/{f.denominator}" if f.denominator != 1
                                                                          else "")

    return _SYM.sub(sub, dim_param)


def name_axes(path: Path) -> None:
    """Rename the symbolic dimensions of the graph at ``path`` (inputs, outputs, value infos) to axis names
    (:func:`axis_names`); its weights stay where they are."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    roots = axis_names(model)
    g = model.graph
    for v in [*g.input, *g.output, *g.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = axis_name(d.dim_param, roots)
    onnx.save(model, str(path))
