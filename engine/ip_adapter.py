"""IP-Adapter and IP-Adapter-Plus (SD 1.x/2.x and SDXL): image prompts through decoupled cross-attention.

Nothing here is architecture specific: the IP layers take the UNet's ``cross_attention_dim`` (768 for SD 1.x,
2048 for SDXL) and the image encoder is whatever the weights were trained with (ViT-H/14 for the SD 1.5 files and
``ip-adapter-plus_sdxl_vit-h``, ViT-bigG/14 for ``ip-adapter_sdxl``); a mismatch is a ``ValueError``, not a shape
error inside the UNet. The SDXL path is tested against diffusers' own SDXL IP-Adapter loading.

An :class:`IPAdapter` owns everything the method adds to the model: the CLIP image encoder
(``transformers.CLIPVisionModelWithProjection``), the image projection (diffusers' ``ImageProjection``: linear to
4 tokens + LayerNorm; or ``IPAdapterPlusImageProjection``: the Perceiver Resampler, 16 query tokens) and, per
cross-attention layer, the ``to_k_ip``/``to_v_ip`` Linear weights in an ``nn.ModuleDict`` keyed by the layer's
index in ``unet.attn_processors`` order, so ``adapter.layers.state_dict()`` *is* the standard ``"ip_adapter"``
dict (``"1.to_k_ip.weight"``, ``"1.to_v_ip.weight"``, ``"3.to_k_ip.weight"`` ...). Loading attaches each of those
modules to its layer's :class:`~dreamfuse.engine.processors.DreamfuseAttnProcessor` (``ip_layer``); the image
tokens travel per UNet call in the :class:`~dreamfuse.engine.processors.CallContext` (see ``Engine.unet_call``).

Image embeddings follow the official IP-Adapter code: base uses the encoder's projected ``image_embeds``, Plus its
penultimate hidden states (``hidden_states[-2]``). Classifier-free guidance gives the unconditional rows the
official "zero image" prompt: base projects an all-zero ``image_embeds``; Plus runs the encoder on an all-zero
*preprocessed* image (``torch.zeros_like(clip_image)``, i.e. the CLIP mean colour) and resamples its features.

Files: the standard IP-Adapter layout ``{"image_proj": {...}, "ip_adapter": {...}}`` with the original (non
diffusers) key names, as ``.bin`` (``torch.save``) or ``.safetensors`` (flat keys ``image_proj.*``,
``ip_adapter.*``); base vs Plus is read from the ``image_proj`` keys (the Resampler has ``latents``). The image
encoder is a transformers folder (``save_pretrained``); nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .concurrency import changes_model
from .files import check_file, safetensors_load, safetensors_save_atomic, torch_load_weights, torch_save_atomic
from .images import image_tensor, open_image

# CLIP's preprocessing constants (openai/clip-vit-*: CLIPImageProcessor's image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
_CLIP_MODEL_TYPES = ("clip_vision_model", "clip")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


class IPAttnLayer(nn.Module):
    """The image branch of one decoupled cross-attention layer (names as in the official ``IPAttnProcessor``)."""

    def __init__(self, cross_attention_dim: int, inner_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)


class IPAdapter(nn.Module):
    """Image encoder + image projection + per-layer ``to_k_ip``/``to_v_ip`` of one IP-Adapter(-Plus).

    ``layers`` is keyed by the standard index (position in ``unet.attn_processors``), ``layer_names`` maps that
    index to the attention layer's module path (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``).
    """

    def __init__(self, image_encoder, image_proj: nn.Module, layers: nn.ModuleDict, layer_names: dict[str, str]):
        from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

        super().__init__()
        if not isinstance(image_proj, (ImageProjection, IPAdapterPlusImageProjection)):
            raise ValueError(f"image_proj: unsupported projection {type(image_proj).__name__} "
                             "(IP-Adapter ImageProjection or IP-Adapter-Plus IPAdapterPlusImageProjection)")
        self.image_encoder = image_encoder
        self.image_proj = image_proj
        self.layers = layers
        self.layer_names = dict(layer_names)
        self.plus = isinstance(image_proj, IPAdapterPlusImageProjection)
        self.image_size = int(image_encoder.config.image_size)
        embed_dim = image_proj.proj_in.in_features if self.plus else image_proj.image_embeds.in_features
        enc_dim = image_encoder.config.hidden_size if self.plus else image_encoder.config.projection_dim
        if enc_dim != embed_dim:
            kind = "hidden_size" if self.plus else "projection_dim"
            raise ValueError(f"image_encoder: its {kind} is {enc_dim} but the IP-Adapter's image projection expects "
                             f"{embed_dim} (wrong image encoder for these weights?)")

    @property
    def cross_attention_dim(self) -> int:
        norm = self.image_proj.norm_out if self.plus else self.image_proj.norm
        return int(norm.normalized_shape[0])

    # ------------------------------------------------------------------------------------------ images
    def preprocess(self, images: Sequence, field: str = "ip_image") -> torch.Tensor:
        """PIL images, paths, ``(3, H, W)`` tensors in [0, 1] or ``(H, W, 3)`` arrays -> ``(B, 3, S, S)`` float32
        CLIP pixels (S = the encoder's ``image_size``): shortest side resized to S (bicubic, antialiased), centre
        crop, mean/std."""
        size = self.image_size
        out = []
        for image in images:
            image = open_image(image, field)
            if isinstance(image, Image.Image):
                hw = (image.height, image.width)
            elif isinstance(image, torch.Tensor) and image.ndim in (3, 4):
                hw = tuple(image.shape[-2:])
            elif isinstance(image, np.ndarray) and image.ndim == 3:
                hw = tuple(image.shape[:2])
            else:
                raise ValueError(f"{field}: unsupported input {type(image).__name__} (PIL image, path, (3, H, W) "
                                 "tensor or (H, W, 3) array)")
            x = image_tensor(image, hw[0], hw[1], field)
            h, w = x.shape[-2:]
            nh, nw = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            top, left = (nh - size) // 2, (nw - size) // 2
            out.append(x[..., top:top + size, left:left + size])
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (torch.cat(out) - mean) / std

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels ``(B, 3, S, S)`` -> image prompt tokens ``(B, T, cross_attention_dim)``."""
        p = next(self.image_proj.parameters())
        pixels = pixels.to(p.device, p.dtype)
        if self.plus:
            feats = self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
        else:
            feats = self.image_encoder(pixels).image_embeds
        return self.image_proj(feats.to(p.dtype))

    def image_tokens(self, images: Sequence, field: str = "ip_image") -> torch.Tensor:
        """Image prompt tokens ``(len(images), T, cross_attention_dim)`` of reference images."""
        return self.encode_pixels(self.preprocess(images, field))

    def uncond_tokens(self) -> torch.Tensor:
        """The tokens of the unconditional CFG rows ``(1, T, cross_attention_dim)``, as the official code makes
        them: base projects zero ``image_embeds``; Plus encodes a zero (preprocessed) image."""
        p = next(self.image_proj.parameters())
        if self.plus:
            return self.encode_pixels(torch.zeros(1, 3, self.image_size, self.image_size))
        return self.image_proj(torch.zeros(1, self.image_proj.image_embeds.in_features, device=p.device,
                                           dtype=p.dtype))

    # ------------------------------------------------------------------------------------------ files
    def standard_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"image_proj": ..., "ip_adapter": ...}`` with the official IP-Adapter key names (CPU tensors)."""
        proj = {k: v.detach().cpu() for k, v in self.image_proj.state_dict().items()}
        proj = _plus_proj_to_standard(proj) if self.plus else {k.replace("image_embeds", "proj"): v
                                                                for k, v in proj.items()}
        ip = {k: v.detach().cpu().contiguous() for k, v in self.layers.state_dict().items()}
        return {"image_proj": {k: v.contiguous() for k, v in proj.items()}, "ip_adapter": ip}


def _plus_proj_to_standard(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``IPAdapterPlusImageProjection`` keys -> the official ``Resampler`` keys (the inverse of
    diffusers' ``_convert_ip_adapter_image_proj_to_diffusers``): PerceiverAttention is ``layers.i.0`` (``norm1``,
    ``norm2``, ``to_q``, ``to_kv`` = cat(to_k, to_v), ``to_out``), FeedForward is ``layers.i.1`` (LN, fc, GELU, fc)."""
    renames = {"ln0.": "0.norm1.", "ln1.": "0.norm2.", "attn.to_q.": "0.to_q.", "attn.to_out.0.": "0.to_out.",
               "ff.0.": "1.0.", "ff.1.net.0.proj.": "1.1.", "ff.1.net.2.": "1.3."}
    out = {}
    for key, value in sd.items():
        if not key.startswith("layers."):
            out[key] = value
            continue
        _, i, rest = key.split(".", 2)
        if rest.startswith("attn.to_k."):
            out[f"layers.{i}.0.to_kv.{rest.removeprefix('attn.to_k.')}"] = torch.cat(
                [value, sd[f"layers.{i}.attn.to_v.{rest.removeprefix('attn.to_k.')}"]])
            continue
        if rest.startswith("attn.to_v."):
            continue
        src = next((s for s in renames if rest.startswith(s)), None)
        if src is None:
            raise ValueError(f"image_proj: unexpected Resampler parameter {key!r}")
        out[f"layers.{i}.{renames[src]}{rest.removeprefix(src)}"] = value
    return out


def attention_layer_names(unet) -> list[str]:
    """Attention layer paths in ``unet.attn_processors`` order: the indices of the standard ``ip_adapter`` keys."""
    return [k.removesuffix(".processor") for k in unet.attn_processors]


def _ip_layers(unet, ip_sd: dict[str, torch.Tensor] | None) -> tuple[nn.ModuleDict, dict[str, str]]:
    """One :class:`IPAttnLayer` per cross-attention layer of ``unet`` (from ``ip_sd`` when given, checked against
    the UNet's layers: every attn2 index, the right shapes, nothing else)."""
    cross = unet.config.cross_attention_dim
    names = {str(i): n for i, n in enumerate(attention_layer_names(unet)) if n.endswith("attn2")}
    layers = nn.ModuleDict({i: IPAttnLayer(cross, unet.get_submodule(n).to_k.out_features) for i, n in names.items()})
    if ip_sd is not None:
        expected = set(layers.state_dict())
        got = set(ip_sd)
        if got != expected:
            extra, missing = sorted(got - expected)[:3], sorted(expected - got)[:3]
            raise ValueError(f"ip_adapter: weights do not fit this UNet's {len(names)} cross-attention layers "
                             f"(unexpected keys {extra}, missing keys {missing})")
        for key, value in ip_sd.items():
            want = layers.state_dict()[key].shape
            if value.shape != want:
                raise ValueError(f"ip_adapter: {key} has shape {tuple(value.shape)}, this UNet needs {tuple(want)}")
        layers.load_state_dict(ip_sd)
    return layers, names


# ------------------------------------------------------------------------------------------------ files
def read_ip_adapter_file(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """A standard IP-Adapter file (``.bin``, ``.pt``, ``.pth`` or ``.safetensors``) -> its two state dicts."""
    path = check_file(path, "ip_adapter weights")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"ip_adapter weights: {str(path)!r} must be .bin, .pt, .pth or .safetensors")
    if path.suffix == ".safetensors":
        sd = {"image_proj": {}, "ip_adapter": {}}
        for key, value in safetensors_load(path, "ip_adapter weights").items():
            group, _, rest = key.partition(".")
            if group not in sd:
                raise ValueError(f"ip_adapter weights: unexpected key {key!r} in {str(path)!r} "
                                 "(expected image_proj.* and ip_adapter.*)")
            sd[group][rest] = value
    else:
        sd = torch_load_weights(path, "ip_adapter weights")
    return check_state_dict(sd, repr(str(path)))


def check_state_dict(sd, source: str = "the state dict") -> dict[str, dict[str, torch.Tensor]]:
    """A standard IP-Adapter state dict: ``{"image_proj": {...}, "ip_adapter": {...}}``, both non-empty, every entry
    a named finite floating-point tensor (an int tensor would be cast silently, a NaN would blacken every image).
    ``ValueError`` naming ``ip_adapter weights``; whether the shapes fit the UNet is checked when it is built."""
    if not isinstance(sd, dict) or not isinstance(sd.get("image_proj"), dict) or not isinstance(
            sd.get("ip_adapter"), dict) or not sd["image_proj"] or not sd["ip_adapter"]:
        raise ValueError(f"ip_adapter weights: {source} is not an IP-Adapter file "
                         "(needs 'image_proj' and 'ip_adapter' state dicts)")
    for group in ("image_proj", "ip_adapter"):
        for key, value in sd[group].items():
            if not isinstance(key, str):
                raise ValueError(f"ip_adapter weights: {source} has a {group} entry named {key!r}, not a string")
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"ip_adapter weights: {group}.{key} in {source} is {kind}, not floating-point "
                                 "weights")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"ip_adapter weights: {group}.{key} in {source} holds NaN or inf")
    return sd


def save_ip_adapter(adapter: IPAdapter, weights_path: str | Path, image_encoder_dir: str | Path | None = None) -> Path:
    """Write ``adapter`` as a standard IP-Adapter file (format from the suffix: ``.safetensors`` flat keys, else
    ``torch.save``; written atomically) and, with ``image_encoder_dir``, its image encoder as a transformers folder."""
    path = Path(weights_path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"weights_path: {str(path)!r} must end in .bin, .pt, .pth or .safetensors")
    sd = adapter.standard_state_dict()
    if path.suffix == ".safetensors":
        safetensors_save_atomic({f"{group}.{k}": v for group, d in sd.items() for k, v in d.items()}, path)
    else:
        torch_save_atomic(sd, path)
    if image_encoder_dir is not None:
        adapter.image_encoder.save_pretrained(str(image_encoder_dir), safe_serialization=True)
    return path


def check_image_encoder_folder(path: str | Path, field: str = "image_encoder") -> Path:
    """Cheap checks before any model work: ``path`` is a transformers folder whose config is a CLIP vision model
    (``clip_vision_model``, or a full ``clip`` model) and holds weights. ``ValueError`` naming ``field``."""
    import json

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{field}: folder {str(path)!r} does not exist" if not folder.exists()
                         else f"{field}: {str(path)!r} is not a folder")
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{field}: {str(path)!r} is not a transformers model folder (no config.json)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError, RecursionError) as e:
        raise ValueError(f"{field}: {str(config)!r} is not a valid config ({type(e).__name__})") from None
    if model_type not in _CLIP_MODEL_TYPES:
        raise ValueError(f"{field}: {str(path)!r} holds a {model_type!r} model, not a CLIP image encoder "
                         f"(model_type {' or '.join(_CLIP_MODEL_TYPES)})")
    if not any((folder / w).is_file() for w in _WEIGHT_FILES):
        raise ValueError(f"{field}: {str(path)!r} has no weights ({' or '.join(_WEIGHT_FILES)})")
    return folder


def load_image_encoder(path: str | Path, field: str = "image_encoder"):
    """A ``CLIPVisionModelWithProjection`` from a local transformers folder (never downloads). Refuses a folder
    that is not a CLIP vision model, or whose weights leave parameters of the encoder unset (a random encoder
    would silently give meaningless image prompts)."""
    from transformers import CLIPVisionModelWithProjection

    folder = check_image_encoder_folder(path, field)
    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True,
                                                                    output_loading_info=True)
    except Exception as e:  # a corrupt weights file or config: name the folder, not the loader's internals
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{field}: cannot load {str(path)!r} ({type(e).__name__}: {first})") from None
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("text_")]
    if missing:
        raise ValueError(f"{field}: {str(path)!r} lacks {len(missing)} weights of a CLIP image encoder (e.g. "
                         f"{missing[0]!r}); not the adapter's image encoder")
    return model


def ip_adapter_from_state_dict(unet, sd: dict, image_encoder) -> IPAdapter:
    """Build an :class:`IPAdapter` for ``unet`` from a standard state dict and an image encoder (object or folder).
    The image projection goes through diffusers' converter from the official key layout. Everything about the
    weights (types, shapes against the UNet) is checked before the image encoder is loaded."""
    check_state_dict(sd)
    proj_sd = sd["image_proj"]
    if "latents" not in proj_sd and "proj.weight" not in proj_sd:
        raise ValueError("ip_adapter weights: image_proj is neither IP-Adapter (proj.*) nor IP-Adapter-Plus "
                         "(a Resampler with latents); other variants (Full, FaceID) are not supported")
    try:
        image_proj = unet._convert_ip_adapter_image_proj_to_diffusers(proj_sd, low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001 - reading only: shapes the converter cannot build from raise anything
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:200] or type(e).__name__
        raise ValueError(f"ip_adapter weights: cannot read image_proj ({text})") from None
    norm = image_proj.norm_out if hasattr(image_proj, "norm_out") else getattr(image_proj, "norm", None)
    tokens_dim = int(norm.normalized_shape[0]) if isinstance(norm, nn.LayerNorm) else None
    if tokens_dim != unet.config.cross_attention_dim:
        raise ValueError(f"ip_adapter weights: image tokens have {tokens_dim} channels, the UNet's "
                         f"cross_attention_dim is {unet.config.cross_attention_dim}")
    layers, names = _ip_layers(unet, sd["ip_adapter"])
    if isinstance(image_encoder, (str, Path)):
        image_encoder = load_image_encoder(image_encoder)
    return IPAdapter(image_encoder, image_proj, layers, names)


# ------------------------------------------------------------------------------------------------ engine
def check_arguments(weights, image_encoder) -> None:
    """The types :func:`load_ip_adapter` takes (``TypeError`` naming the argument, before anything is read)."""
    if not isinstance(weights, (IPAdapter, dict, str, os.PathLike)):
        raise TypeError(f"weights: an IP-Adapter file path, a {{'image_proj', 'ip_adapter'}} state dict or an "
                        f"IPAdapter, got {type(weights).__name__}")
    if image_encoder is not None and not isinstance(image_encoder, (str, os.PathLike)) and not (
            isinstance(image_encoder, nn.Module) and hasattr(image_encoder, "config")):
        raise TypeError(f"image_encoder: a CLIP image encoder folder or a transformers CLIPVisionModelWithProjection, "
                        f"got {type(image_encoder).__name__}")


@changes_model("load_ip_adapter")
def load_ip_adapter(engine, weights, image_encoder=None) -> IPAdapter:
    """Attach an IP-Adapter to ``engine`` (replacing any loaded one) and return it.

    Args:
        weights: a standard IP-Adapter file path (``.bin``/``.safetensors``), a ``{"image_proj", "ip_adapter"}``
            state dict, or an :class:`IPAdapter` (e.g. from :func:`build_tiny_ip_adapter`).
        image_encoder: a local ``CLIPVisionModelWithProjection`` folder or object; required unless ``weights``
            is an :class:`IPAdapter`.
    """
    check_arguments(weights, image_encoder)
    if isinstance(weights, IPAdapter):
        if image_encoder is not None:
            raise ValueError("image_encoder: an IPAdapter object already holds its image encoder")
        adapter = weights
        _ip_layers(engine.unet, adapter.layers.state_dict())  # the same shape checks as a file gets
    else:
        if image_encoder is None:
            raise ValueError("image_encoder: an IP-Adapter needs its CLIP image encoder (a local folder)")
        sd = check_state_dict(weights) if isinstance(weights, dict) else read_ip_adapter_file(weights)
        adapter = ip_adapter_from_state_dict(engine.unet, sd, image_encoder)
    unload_ip_adapter(engine)
    adapter.to(engine.device, engine.dtype).eval().requires_grad_(False)
    for index, layer in adapter.layers.items():
        engine.processors[adapter.layer_names[index]].ip_layer = layer
    engine.ip_adapter = adapter
    return adapter


@changes_model("unload_ip_adapter")
def unload_ip_adapter(engine) -> None:
    for proc in engine.processors.values():
        proc.ip_layer = None
    engine.ip_adapter = None


def check_ip_scale(ip_scale) -> float:
    if not isinstance(ip_scale, (int, float)) or isinstance(ip_scale, bool) or not ip_scale >= 0:
        raise ValueError(f"ip_scale: must be a number >= 0, got {ip_scale!r}")
    return float(ip_scale)


@torch.no_grad()
def prompt_tokens(engine, ip_image, n: int, use_cfg: bool) -> torch.Tensor:
    """IP tokens for a batch of ``n`` prompts laid out as the pipelines' UNet rows: ``[uncond x n, cond x n]``
    with CFG, ``[cond x n]`` without. ``ip_image``: one reference for all prompts or a list with one per prompt."""
    adapter = engine.ip_adapter
    if adapter is None:
        raise ValueError("ip_image: no IP-Adapter is loaded (call engine.load_ip_adapter first)")
    images = list(ip_image) if isinstance(ip_image, (list, tuple)) else [ip_image]
    if len(images) not in (1, n):
        raise ValueError(f"ip_image: give one image for all prompts or one per prompt ({n}), got {len(images)}")
    cond = adapter.image_tokens(images).to(engine.dtype)
    if len(images) == 1:
        cond = cond.expand(n, -1, -1)
    if not use_cfg:
        return cond
    return torch.cat([adapter.uncond_tokens().to(engine.dtype).expand(n, -1, -1), cond])


# ------------------------------------------------------------------------------------------------ tiny
def build_tiny_ip_adapter(engine, plus: bool = True, seed: int = 0) -> IPAdapter:
    """A tiny IP-Adapter(-Plus) for ``engine``'s UNet, seeded random weights (like the tiny model): a CLIP vision
    encoder (image 32, patch 8, hidden 32, 2 layers, projection 32) and a 4-token projection or a 16-query
    Resampler (depth 4, one 64-d head: diffusers' converter reads heads as ``to_q`` rows // 64)."""
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = engine.unet if hasattr(engine, "unet") else engine
    cross = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=32))
        if plus:
            proj = IPAdapterPlusImageProjection(embed_dims=32, output_dims=cross, hidden_dims=64, depth=4,
                                                dim_head=64, heads=1, num_queries=16)
        else:
            proj = ImageProjection(image_embed_dim=32, cross_attention_dim=cross, num_image_text_embeds=4)
        layers, names = _ip_layers(unet, None)
    adapter = IPAdapter(encoder.eval(), proj, layers, names)
    return adapter.eval().requires_grad_(False)


def save_tiny_ip_adapter(engine, out_dir: str | Path, plus: bool = True, seed: int = 0,
                         fmt: str = "safetensors") -> tuple[Path, Path]:
    """Write the tiny IP-Adapter as standard files under ``out_dir``: ``ip-adapter[-plus]_tiny.<fmt>`` and the
    ``image_encoder`` folder. Returns ``(weights_path, image_encoder_dir)``."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt: must be 'safetensors' or 'bin', got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"ip-adapter{'-plus' if plus else ''}_tiny.{fmt}"
    save_ip_adapter(build_tiny_ip_adapter(engine, plus, seed), weights, out / "image_encoder")
    return weights, out / "image_encoder"
