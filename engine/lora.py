"""LoRA adapters for the engine's UNet and text encoder(s), SD 1.x/2.x and SDXL, through diffusers' own LoRA loaders
and peft: dreamfuse writes no LoRA math.

Files: ``.safetensors`` in the diffusers format (``unet.<module>.lora_A.weight`` / ``lora_B.weight``, the older
``...lora.down.weight`` / ``to_q_lora.down.weight`` spellings, ``text_encoder.`` / ``text_encoder_2.`` prefixes, peft
metadata in the header) or the kohya / A1111 format (``lora_unet_*``, ``lora_te_*`` / ``lora_te1_*`` / ``lora_te2_*``
with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``; SGM block names such as ``input_blocks_4_1`` are mapped
with the UNet's config). Only safetensors: a pickle can run code. A file is checked against the model before
anything changes: every LoRA layer must name a layer of this model with matching shapes, so an SDXL LoRA on SD 1.x
(or a UNet checkpoint passed as a LoRA) is a ``ValueError`` naming the field, never a shape error inside peft.

How: a diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` is built around the engine's own
modules (no copies) for each operation, and its ``load_lora_weights``, ``set_adapters``, ``fuse_lora``,
``unfuse_lora``, ``delete_adapters`` and ``unload_lora_weights`` do the work. peft wraps the targeted ``nn.Linear``
layers (``attn.to_q`` ...) in place; the attention modules and their dreamfuse processors (which call
``attn.to_q(...)``) stay as they are, and so do the IP-Adapter layers attached to those processors. Each LoRA gets
an internal peft adapter name (``dreamfuse_lora_<n>``), so any label is a valid ``name``.

Unfused (the default): every targeted layer adds ``scale * B(A(x))`` per loaded LoRA on each call; LoRAs are
hot-swappable (load, unload, rescale without touching the base weights). Fused (:func:`fuse_lora`): the LoRAs are
merged into the base weights, one matmul per layer as without a LoRA (peft's wrapper stays, a Python-level
branch); a CPU copy of the merged layers' original weights is kept so that :func:`unfuse_lora` restores them
bit-exactly (subtracting the delta again would drift, by up to an fp16 ulp per cycle). While fused, loading,
unloading or rescaling unfuses, applies the change and fuses again.

After every change the engine's prompt cache is cleared when a text encoder changed, and its inversion cache
(personalize's DDIM inversions, made with the UNet) when the UNet changed.

Thread safety: loading, unloading, fusing and scale changes mutate the shared model; do them while no call runs
(as for ``load_ip_adapter``). The engine's state lives in ``engine._lora_state``, created on first use.
"""

from __future__ import annotations

import json
import os
import re
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .concurrency import changes_model
from .files import check_file
from .validation import check_number

_INTERNAL_PREFIX = "dreamfuse_lora_"
_MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header is JSON describing the tensors; 100 MiB is far past any LoRA's
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?P<part>A|B|magnitude_vector)(\.(weight|bias))?$")
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class _Lora:
    name: str
    path: Path
    adapter: str
    """peft's adapter name (``dreamfuse_lora_<n>``)."""
    scale: float
    components: tuple[str, ...]
    """The engine modules this LoRA holds layers for (``unet``, ``text_encoder``, ``text_encoder_2``)."""


@dataclass
class _State:
    loras: dict[str, _Lora] = field(default_factory=dict)
    fused: bool = False
    saved: list = field(default_factory=list)
    """While fused: ``(parameter, CPU copy of its unfused value)`` of every LoRA-wrapped layer."""
    counter: int = 0


def _state(engine) -> _State:
    state = getattr(engine, "_lora_state", None)
    if state is None:
        state = engine._lora_state = _State()
    return state


# ------------------------------------------------------------------------------------------------ checks
def check_scale(scale, field: str = "scale") -> float:
    """A LoRA scale: a finite number >= 0 (0 switches the LoRA off without unloading it)."""
    return check_number(scale, field, low=0)


def _tensor_names(path: Path, field: str) -> list[str]:
    """The tensor names of a safetensors file, from its JSON header (no tensor is read, torch is not imported)."""
    shown = str(path)
    not_st = f"{field}: {shown!r} is not a safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{not_st} ({size} bytes)")
            n = int.from_bytes(head, "little")
            if not 2 <= n <= min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"{not_st} (no valid header)")
            raw = f.read(n)
    except OSError as e:
        raise ValueError(f"{field}: cannot read {shown!r} ({e.strerror or type(e).__name__})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"{not_st} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{not_st} (its header is not a JSON object)")
    names = [k for k in header if k != "__metadata__"]
    try:
        end = max((int(header[k]["data_offsets"][1]) for k in names), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ValueError(f"{not_st} (its header does not describe tensors)") from None
    if end != size - 8 - n:
        raise ValueError(f"{field}: {shown!r} is truncated or padded ({size - 8 - n} bytes of tensor data, its header "
                         f"describes {end})")
    return names


def check_lora_file(path, field: str = "lora") -> Path:
    """Cheap checks before any model work (no torch import): ``path`` is an existing ``.safetensors`` file whose
    header names LoRA tensors. ``ValueError`` naming ``field``. Whether the LoRA fits the model is checked on load."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{field}: expected the path of a .safetensors LoRA file, got {type(path).__name__}")
    p = check_file(path, field)
    if p.suffix.lower() != ".safetensors":
        raise ValueError(f"{field}: {str(path)!r} is not a .safetensors file (LoRAs are read from safetensors only: "
                         "a pickle can run code)")
    names = _tensor_names(p, field)
    if not names:
        raise ValueError(f"{field}: {str(path)!r} holds no tensors")
    plain = [k for k in names if "lora" not in k.lower() and not k.endswith(".alpha")]
    if plain:
        raise ValueError(f"{field}: {str(path)!r} is not a LoRA file ({len(plain)} of its {len(names)} tensors are "
                         f"not LoRA weights, e.g. {plain[0]!r})")
    return p


def _components(engine) -> tuple[str, ...]:
    return _COMPONENTS if engine.is_xl else _COMPONENTS[:2]


def _dims(module) -> tuple[int, int] | None:
    """(in, out) of a layer peft can wrap (``nn.Linear``, ``nn.Conv2d``, or one already wrapped), else None."""
    from torch import nn

    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Conv2d):
        return base.in_channels, base.out_channels
    return None


def _is_conv(module) -> bool:
    from torch import nn

    return isinstance(module.get_base_layer() if hasattr(module, "get_base_layer") else module, nn.Conv2d)


def _tensor_problem(parts: dict) -> str | None:
    """Why one layer's LoRA tensors (``{"A": ..., "B": ..., "B.bias": ..., "magnitude_vector": ...}``) are no LoRA
    weights: not tensors, not floating point (an int or bool tensor would be cast silently), or NaN / inf."""
    import torch

    for part, t in parts.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            return f"lora_{part} is {kind}, not floating-point weights"
        if not bool(torch.isfinite(t).all()):
            return f"lora_{part} holds NaN or inf"
    return None


def _rank_problem(a, b, conv: bool) -> str | None:
    """Why ``A`` (down) and ``B`` (up) are not low-rank factors of a layer of their kind: a Linear's are ``(r, in)``
    and ``(out, r)``, a Conv2d's ``(r, in, kh, kw)`` and ``(out, r, 1, 1)``. (Whether ``in`` and ``out`` are the
    layer's is the caller's check.)"""
    ndim = 4 if conv else 2
    if a.ndim != ndim or b.ndim != ndim or (conv and tuple(b.shape[2:]) != (1, 1)):
        return (f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not the weights of a "
                f"{'Conv2d' if conv else 'Linear'} LoRA ({ndim}-D)")
    return None


def _peft_keys(engine, component: str, sd: dict) -> dict:
    """One component's LoRA tensors with their keys as peft will see them: the conversions diffusers applies in
    ``load_lora_adapter`` (UNet) and ``_load_lora_into_text_encoder`` (text encoders), nothing more."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if component == "unet":
        return convert_unet_state_dict_to_peft(sd) if "lora_A" not in next(iter(sd)) else sd
    sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
    if not hasattr(getattr(engine, component), "text_model"):  # transformers 5 flattened CLIPTextModel
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    return sd


def _check_fits(engine, sd: dict, path: Path, field: str) -> dict[str, dict[str, tuple]]:
    """Every LoRA layer of ``sd`` (diffusers keys, as ``lora_state_dict`` returns them) must name a layer of this
    model with matching shapes. Returns ``{component: {layer path: (A, B)}}`` in model order (for
    :func:`_check_loaded`)."""
    present = _components(engine)
    by_component: dict[str, dict] = {}
    problems: list[str] = []
    damaged: list[str] = []
    for key, value in sd.items():
        comp = next((c for c in _COMPONENTS if key.startswith(f"{c}.")), None)
        if comp is None or comp not in present:
            where = "a text_encoder_2 (SDXL) layer" if comp else "not a unet./text_encoder. layer"
            problems.append(f"{key!r}: {where}, this model has {', '.join(present)}")
            continue
        by_component.setdefault(comp, {})[key.removeprefix(f"{comp}.")] = value
    layers = 0
    fits: dict[str, dict[str, tuple]] = {}
    for comp, part in by_component.items():
        try:
            part = _peft_keys(engine, comp, part)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{field}: cannot read the {comp} layers of {str(path)!r} ({e})") from None
        model = getattr(engine, comp)
        modules: dict[str, dict] = {}
        for key, value in part.items():
            m = _LORA_KEY.match(key)
            if m is None:
                problems.append(f"{comp}.{key!r}: not a LoRA weight")
                continue
            modules.setdefault(m["module"], {})[m["part"] + (".bias" if key.endswith(".bias") else "")] = value
        for name, parts in modules.items():
            layers += 1
            shown = f"{comp}.{name}"
            try:
                target = model.get_submodule(name)
            except AttributeError:
                problems.append(f"{shown!r}: no such layer")
                continue
            dims = _dims(target)
            if dims is None:
                problems.append(f"{shown!r}: a {type(target).__name__}, not a Linear/Conv2d layer")
                continue
            a, b = parts.get("A"), parts.get("B")
            if a is None or b is None:
                problems.append(f"{shown!r}: lora_{'A' if a is None else 'B'} (down/up) is missing")
                continue
            broken = _tensor_problem(parts) or _rank_problem(a, b, _is_conv(target))
            if broken:
                damaged.append(f"{shown!r}: {broken}")
            elif a.shape[1] != dims[0] or b.shape[0] != dims[1] or a.shape[0] != b.shape[1]:
                problems.append(f"{shown!r}: a rank-{a.shape[0]} LoRA for {a.shape[1]} -> {b.shape[0]} features, "
                                f"the layer has {dims[0]} -> {dims[1]}")
            else:
                fits.setdefault(comp, {})[name] = (a, b)
    if damaged:  # whatever else is wrong: these are no LoRA weights at all
        raise ValueError(f"{field}: {str(path)!r} holds broken LoRA weights ({len(damaged)} layer(s), e.g. "
                         f"{damaged[0]})")
    if problems:
        total = max(layers, 1)
        what = ("none of its layers fits this model" if len(problems) >= total
                else f"{len(problems)} of its {total} layers do not fit this model")
        raise ValueError(f"{field}: {str(path)!r}: {what} (e.g. {problems[0]}); a LoRA for another base model "
                         f"(SD 1.x, SD 2.x and SDXL LoRAs do not mix)?")
    if not layers:
        raise ValueError(f"{field}: {str(path)!r} holds no LoRA layers for this model")
    return {c: fits[c] for c in present if c in fits}


def _check_loaded(engine, adapter: str, fits: dict, path: Path, field: str) -> None:
    """After diffusers' load: every layer :func:`_check_fits` accepted holds the file's A and B under ``adapter``.
    diffusers and transformers only log keys they did not load (and transformers' report also lists the other
    adapters' keys as missing); this makes a layer that did not load an error instead."""
    import torch

    bad = []
    for comp, layers in fits.items():
        model = getattr(engine, comp)
        for name, (a, b) in layers.items():
            layer = model.get_submodule(name)
            la, lb = getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {})
            if adapter not in la or adapter not in lb:
                bad.append(f"{comp}.{name}")
                continue
            wa, wb = la[adapter].weight, lb[adapter].weight
            if not (torch.equal(wa.cpu(), a.to(wa.dtype)) and torch.equal(wb.cpu(), b.to(wb.dtype))):
                bad.append(f"{comp}.{name}")
    if bad:
        raise ValueError(f"{field}: {len(bad)} layers of {str(path)!r} did not load (e.g. {bad[0]!r})")


def read_lora(engine, path, field: str = "lora"):
    """Read a LoRA file as ``load_lora`` does and check it against the engine's model, changing nothing:
    ``(state dict, network alphas, peft metadata, fits)`` -- diffusers' ``lora_state_dict`` output (kohya files
    converted, SGM block names mapped with the UNet's config) and :func:`_check_fits`' ``{component: {layer path:
    (A, B)}}``. Every check of :func:`check_lora_file` and :func:`_check_fits` runs first; ``ValueError`` naming
    ``field``. Shared by ``load_lora`` and the per-request adapters (:mod:`~dreamfuse.engine.adapters`)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    p = check_lora_file(path, field)
    cls = StableDiffusionXLPipeline if engine.is_xl else StableDiffusionPipeline
    try:
        sd, alphas, metadata = cls.lora_state_dict(str(p), use_safetensors=True, return_lora_metadata=True,
                                                   unet_config=engine.unet.config)
    except Exception as e:  # noqa: BLE001 - reading only (nothing changed yet): the converters', safetensors' errors
        raise _reading_error(field, p, e) from None
    return sd, alphas, metadata, _check_fits(engine, sd, p, field)


def layer_scalings(engine, component: str, sd: dict, alphas, metadata, layers) -> dict[str, tuple[float, int]]:
    """``{layer: (scaling, r)}``: peft's ``scaling`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) and rank
    ``r`` of each of ``layers`` (layer paths of ``component``) for the file :func:`read_lora` read, at adapter weight
    1. The ``LoraConfig`` is built from the same inputs diffusers gives it (the peft metadata in the file's header,
    else its ranks and kohya's network alphas, through ``get_peft_kwargs``) and each layer's ``r`` / ``alpha``
    resolved through the config's rank and alpha patterns with peft's own ``get_pattern_key``: what ``load_lora``
    makes peft compute. The tests compare the figures with the loaded peft layers' ``scaling``."""
    import math

    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    prefix = f"{component}."
    part = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    meta = None if metadata is None else {k.removeprefix(prefix): v for k, v in metadata.items()
                                           if k.startswith(prefix)} or None
    nets = None if not alphas else {k.removeprefix(prefix): v for k, v in alphas.items()
                                    if k.startswith(prefix) and k.split(".")[0] == component} or None
    peft_sd = _peft_keys(engine, component, part)
    if component == "unet":  # diffusers' load_lora_adapter
        rank = {f"^{k}": v.shape[1] for k, v in peft_sd.items() if "lora_B" in k and v.ndim > 1}
    else:  # diffusers' _load_lora_into_text_encoder: the attention and MLP projections only
        model = getattr(engine, component)
        rank = {f"{n}.lora_B.weight": peft_sd[f"{n}.lora_B.weight"].shape[1] for n, _ in model.named_modules()
                if n.endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2"))
                and f"{n}.lora_B.weight" in peft_sd}
    try:
        kwargs = meta if meta is not None else get_peft_kwargs(rank, nets, peft_sd, is_unet=component == "unet")
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise ValueError(f"cannot build the {component} LoRA config ({type(e).__name__}: {e})") from None
    out = {}
    for name in layers:
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        out[name] = (alpha / math.sqrt(r) if config.use_rslora else alpha / r, int(r))
    return out


# ------------------------------------------------------------------------------------------------ diffusers
def _pipeline(engine):
    """A diffusers pipeline around the engine's modules (no copies), for its LoRA loader methods. Rebuilt per
    operation (cheap: no weights move), so it always holds the engine's current modules."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    # The pipeline's own scheduler and a restored UNet config: SD's __init__ rewrites outdated configs in place.
    scheduler = type(engine.scheduler).from_config(engine.scheduler.config)
    unet_config = engine.unet._internal_dict
    try:
        if engine.is_xl:
            return StableDiffusionXLPipeline(vae=engine.vae, text_encoder=engine.text_encoder,
                                             text_encoder_2=engine.text_encoder_2, tokenizer=engine.tokenizer,
                                             tokenizer_2=engine.tokenizer_2, unet=engine.unet, scheduler=scheduler,
                                             add_watermarker=False)
        return StableDiffusionPipeline(vae=engine.vae, text_encoder=engine.text_encoder, tokenizer=engine.tokenizer,
                                       unet=engine.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    finally:
        engine.unet._internal_dict = unet_config


def _tuner_layers(engine):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for comp in _components(engine):
        for module in getattr(engine, comp).modules():
            if isinstance(module, BaseTunerLayer):
                yield module


def _freeze(engine) -> None:
    """LoRA parameters never need gradients here (peft creates them trainable and ``set_adapter`` re-enables them):
    a guided personalize step backpropagates through the UNet and must not fill their ``.grad``."""
    for module in _tuner_layers(engine):
        for p in module.parameters():
            p.requires_grad_(False)


def _apply_scales(engine, pipe) -> None:
    state = _state(engine)
    if state.loras:
        pipe.set_adapters([x.adapter for x in state.loras.values()], [x.scale for x in state.loras.values()])
    _freeze(engine)


def _fuse(engine, pipe) -> None:
    state = _state(engine)
    state.saved = [(p, p.detach().to("cpu", copy=True)) for m in _tuner_layers(engine)
                   for p in m.get_base_layer().parameters(recurse=False)]
    pipe.fuse_lora(components=list(_components(engine)), adapter_names=[x.adapter for x in state.loras.values()])
    state.fused = True


def _unfuse(engine, pipe) -> None:
    import torch

    state = _state(engine)
    pipe.unfuse_lora(components=list(_components(engine)))
    with torch.no_grad():
        for p, saved in state.saved:
            p.copy_(saved)
    state.saved, state.fused = [], False


def _after_change(engine, components, processors: dict) -> None:
    """Clear the caches that depend on the changed modules; put back the attention processors the UNet had before
    the change (``processors``: ``unet.attn_processors`` then) should diffusers have replaced any. peft only wraps
    the projections, so this is a guard: the dreamfuse processors, and the IP-Adapter layers attached to them,
    must survive every LoRA operation."""
    if any(c.startswith("text_encoder") for c in components):
        engine.clear_prompt_cache()
    if "unet" in components:
        engine.inversion_cache.clear()
    now = engine.unet.attn_processors
    if now.keys() != processors.keys() or any(now[k] is not p for k, p in processors.items()):
        engine.unet.set_attn_processor(dict(processors))  # set_attn_processor empties the dict it is given


class _DropMessages:
    """A logging filter dropping records whose message contains one of ``needles``."""

    def __init__(self, *needles: str):
        self.needles = needles

    def filter(self, record) -> bool:
        return not any(n in str(record.msg) for n in self.needles)


@contextmanager
def _quiet_loading(engine):
    """Silence what loading a checked LoRA makes the libraries say: diffusers' notice that a UNet-only LoRA has no
    text encoder keys, peft's warning on a second adapter (several are the point here), transformers' load
    report (which lists the other adapters' weights as missing; :func:`_check_loaded` checks this one's), and its
    progress bar when the engine's progress is off. Loading runs while no call runs, so the global switches are
    safe to flip."""
    import logging
    import warnings

    from transformers.utils import logging as t_logging

    drop = _DropMessages("No LoRA keys associated to", "LOAD REPORT")
    loggers = [logging.getLogger(n) for n in ("diffusers.loaders.lora_base", "diffusers.loaders.peft",
                                              "transformers.integrations.peft")]
    bar = t_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.addFilter(drop)
    if not engine.config.progress:
        t_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)
        if bar and not t_logging.is_progress_bar_enabled():
            t_logging.enable_progress_bar()


def _reading_error(field: str, path: Path, e: Exception) -> ValueError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return ValueError(f"{field}: cannot load {str(path)!r} as a LoRA ({type(e).__name__}: {first})")


# ------------------------------------------------------------------------------------------------ API
def loras(engine) -> types.MappingProxyType:
    """name -> scale of the loaded LoRAs, in load order (a read-only snapshot)."""
    return types.MappingProxyType({n: x.scale for n, x in _state(engine).loras.items()})


def is_fused(engine) -> bool:
    """Whether the loaded LoRAs are merged into the base weights (:func:`fuse_lora`)."""
    return _state(engine).fused


@changes_model("load_lora")
def load_lora(engine, path, scale: float = 1.0, name: str | None = None, *, field: str = "lora") -> str:
    """Load a LoRA ``.safetensors`` (diffusers or kohya format; UNet and/or text encoder layers) next to any loaded
    ones and return its name.

    Args:
        path: the ``.safetensors`` file.
        scale: its weight, a finite number >= 0 (multiplies the file's own ``alpha / rank``; 0 = off).
        name: the label for :func:`unload_lora` / :func:`set_lora_scale` (default: the file's stem); unique.
        field: the name errors start with (the CLI passes ``--lora``).

    Everything is checked before the model changes: the file, the scale, the name, and that every LoRA layer fits
    a layer of this model. While fused, the new LoRA is fused too. Thread safety: mutates the shared model; call it
    while no pipeline runs on the engine.
    """
    p = check_lora_file(path, field)
    scale = check_scale(scale)
    name = p.stem if name is None else name
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name: must be a non-empty string, got {name!r}")
    state = _state(engine)
    if name in state.loras:
        raise ValueError(f"name: a LoRA named {name!r} is already loaded (unload it first, or pass another name=)")
    processors = engine.unet.attn_processors
    pipe = _pipeline(engine)
    # SGM block names (input_blocks_4_1 ...) in kohya files are mapped with the UNet's config; the SDXL loader
    # passes it itself, SD's takes it from us (SD 1.x LoRAs from LDM-layout trainers use those names too).
    extra = {} if engine.is_xl else {"unet_config": engine.unet.config}
    sd, _, _, fits = read_lora(engine, p, field)
    components = tuple(fits)
    del sd
    state.counter += 1
    lora = _Lora(name, p, f"{_INTERNAL_PREFIX}{state.counter}", scale, components)
    fused = state.fused
    if fused:
        _unfuse(engine, pipe)
    try:
        with _quiet_loading(engine):
            pipe.load_lora_weights(str(p), adapter_name=lora.adapter, use_safetensors=True, **extra)
        _check_loaded(engine, lora.adapter, fits, p, field)
    except (ValueError, KeyError, IndexError, OSError, RuntimeError) as e:
        # diffusers removes a UNet adapter that failed half-way; take out whatever else got in
        present = {a for names in pipe.get_list_adapters().values() for a in names}
        if lora.adapter in present:
            pipe.delete_adapters([lora.adapter])
        _apply_scales(engine, pipe)
        if fused:
            _fuse(engine, pipe)
        _after_change(engine, components, processors)
        raise (e if str(e).startswith(f"{field}: ") else _reading_error(field, p, e)) from None
    state.loras[name] = lora
    _apply_scales(engine, pipe)
    if fused:
        _fuse(engine, pipe)
    _after_change(engine, components, processors)
    return name


def _known(engine, name, field: str = "name") -> _Lora:
    state = _state(engine)
    if not isinstance(name, str) or name not in state.loras:
        loaded = ", ".join(repr(n) for n in state.loras) or "none"
        raise ValueError(f"{field}: no LoRA named {name!r} is loaded (loaded: {loaded})")
    return state.loras[name]


@changes_model("unload_lora")
def unload_lora(engine, name: str | None = None) -> None:
    """Remove the LoRA ``name`` (default: all of them). Removing the last one takes peft's wrappers out: the
    model is then bit-identical to the base (also after fusing, see the module docstring). Thread safety:
    mutates the shared model; call it while no pipeline runs on the engine."""
    state = _state(engine)
    if name is not None:
        _known(engine, name)
    if not state.loras:
        return
    processors = engine.unet.attn_processors
    pipe = _pipeline(engine)
    fused = state.fused
    if fused:
        _unfuse(engine, pipe)
    if name is None or len(state.loras) == 1:
        components = {c for x in state.loras.values() for c in x.components}
        pipe.unload_lora_weights()
        state.loras.clear()
    else:
        lora = state.loras.pop(name)
        components = set(lora.components)
        pipe.delete_adapters([lora.adapter])
        _apply_scales(engine, pipe)
        if fused:
            _fuse(engine, pipe)
    _after_change(engine, components, processors)


@changes_model("set_lora_scale")
def set_lora_scale(engine, name_or_scales: str | dict, scale: float | None = None) -> None:
    """Set one LoRA's scale (``set_lora_scale("style", 0.5)``) or several (``set_lora_scale({"style": 0.5,
    "subject": 1.0})``); names and scales are all checked before any changes. While fused, unfuses, rescales and
    fuses again. Thread safety: mutates the shared model; call it while no pipeline runs on the engine."""
    if isinstance(name_or_scales, dict):
        if scale is not None:
            raise ValueError("scale: give the scales in the dict or one name and one scale, not both")
        scales = dict(name_or_scales)
    else:
        if scale is None:
            raise ValueError(f"scale: required with a LoRA name ({name_or_scales!r})")
        scales = {name_or_scales: scale}
    checked = {}
    for n, s in scales.items():
        _known(engine, n)
        checked[n] = check_scale(s, f"scale ({n})" if len(scales) > 1 else "scale")
    state = _state(engine)
    if not checked:
        return
    processors = engine.unet.attn_processors
    pipe = _pipeline(engine)
    fused = state.fused
    if fused:
        _unfuse(engine, pipe)
    for n, s in checked.items():
        state.loras[n].scale = s
    _apply_scales(engine, pipe)
    if fused:
        _fuse(engine, pipe)
    _after_change(engine, {c for n in checked for c in state.loras[n].components}, processors)


@changes_model("fuse_lora")
def fuse_lora(engine) -> None:
    """Merge the loaded LoRAs (at their scales) into the base weights: one set of weights, no LoRA matmuls per
    call. A CPU copy of the merged layers' weights is kept for :func:`unfuse_lora`. No-op when already fused.
    Thread safety: mutates the shared model; call it while no pipeline runs on the engine."""
    state = _state(engine)
    if not state.loras:
        raise ValueError("lora: no LoRA is loaded (engine.load_lora first)")
    if state.fused:
        return
    processors = engine.unet.attn_processors
    _fuse(engine, _pipeline(engine))
    _after_change(engine, {c for x in state.loras.values() for c in x.components}, processors)


@changes_model("unfuse_lora")
def unfuse_lora(engine) -> None:
    """Undo :func:`fuse_lora`: the base weights come back bit-exactly, the LoRAs run as separate layers again
    (hot-swappable). No-op when not fused. Thread safety: mutates the shared model; call it while no pipeline
    runs on the engine."""
    state = _state(engine)
    if not state.fused:
        return
    processors = engine.unet.attn_processors
    _unfuse(engine, _pipeline(engine))
    _after_change(engine, {c for x in state.loras.values() for c in x.components}, processors)


# ------------------------------------------------------------------------------------------------ tiny
def _kohya_unet_name(engine, path: str) -> str:
    """kohya's name of a UNet layer: SD 1.x keeps diffusers' module path (sd-scripts trains the diffusers UNet);
    SDXL uses the SGM layout (``input_blocks_<i>_1`` ...), the inverse of diffusers' ``_maybe_map_sgm_blocks``."""
    parts = path.split(".")
    if not engine.is_xl or parts[0] not in ("down_blocks", "mid_block", "up_blocks"):
        return path.replace(".", "_")
    per = int(engine.unet.config.layers_per_block) + 1  # SGM blocks per level: the layers plus a down/upsampler
    if parts[0] == "mid_block":
        head, rest = "middle_block_1", parts[3:]
    else:
        block, layer = int(parts[1]), int(parts[3])
        head = (f"input_blocks_{1 + block * per + layer}_1" if parts[0] == "down_blocks"
                else f"output_blocks_{block * per + layer}_1")
        rest = parts[4:]
    return "_".join([head, *rest])


def tiny_lora_layers(engine, text_encoder: bool = True) -> list[tuple[str, str, int, int]]:
    """``(component, module path, in, out)`` of the layers a tiny LoRA adapts: every attention projection of the
    UNet (``attn1``/``attn2``: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and, with ``text_encoder``, of each text
    encoder's self-attention (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``): a DreamBooth-LoRA's targets."""
    out = []
    for name, m in engine.unet.named_modules():
        if name.endswith((".attn1", ".attn2")) and hasattr(m, "to_q"):
            out += [("unet", f"{name}.{p}", *_dims(m.get_submodule(p))) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    if text_encoder:
        for comp in _components(engine)[1:]:
            for name, m in getattr(engine, comp).named_modules():
                if name.endswith(".self_attn") and hasattr(m, "q_proj"):
                    out += [(comp, f"{name}.{p}", *_dims(m.get_submodule(p)))
                            for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    return out


def build_tiny_lora(engine, path, *, seed: int = 0, rank: int = 4, text_encoder: bool = True,
                    format: str = "diffusers") -> Path:
    """Write a seeded random LoRA for ``engine``'s model (any layout: ``tiny``, ``tiny-xl``, a real model) to
    ``path`` (``.safetensors``, atomically) and return the path. Layers: :func:`tiny_lora_layers`.

    The weights are ``A ~ N(0, 1/in)``, ``B ~ N(0, 0.6^2/rank)`` with ``alpha = rank / 2``: a delta about half the
    size of a layer's own weights, which changes images visibly. ``format="kohya"`` stores ``lora_down`` (A),
    ``lora_up`` (B) and ``alpha`` under kohya's names (``lora_unet_*``, ``lora_te_*``, SDXL: ``lora_te1_*`` /
    ``lora_te2_*`` and SGM block names); ``"diffusers"`` stores ``lora_A`` and ``B * alpha / rank`` (= B / 2,
    exact in floating point) under ``unet.`` / ``text_encoder.`` / ``text_encoder_2.``. The same seed and rank give
    the same LoRA in both formats."""
    import torch

    from .files import safetensors_save_atomic

    if format not in ("diffusers", "kohya"):
        raise ValueError(f"format: must be 'diffusers' or 'kohya', got {format!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 2 or rank % 2:
        raise ValueError(f"rank: must be an even integer >= 2 (alpha = rank / 2), got {rank!r}")
    alpha = rank / 2
    g = torch.Generator().manual_seed(int(seed))
    tensors = {}
    for comp, name, n_in, n_out in tiny_lora_layers(engine, text_encoder):
        a = torch.randn(rank, n_in, generator=g) / n_in**0.5
        b = torch.randn(n_out, rank, generator=g) * (0.6 / rank**0.5)
        te_name = name if hasattr(getattr(engine, comp), "text_model") else f"text_model.{name}"
        if format == "diffusers":
            key = f"{comp}.{name if comp == 'unet' else te_name}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b * (alpha / rank)
            continue
        if comp == "unet":
            key = f"lora_unet_{_kohya_unet_name(engine, name)}"
        else:
            prefix = {"text_encoder": "lora_te1_" if engine.is_xl else "lora_te_", "text_encoder_2": "lora_te2_"}
            key = prefix[comp] + te_name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = a, b
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return safetensors_save_atomic(tensors, Path(path))
