"""PatchDPO's patch-quality estimator: how well each patch of a generated image matches the reference.

The official PatchDPO code never released this part; dreamfuse builds it as the paper describes. A vision
backbone (a transformers ViT, DINOv2 or CLIP vision tower) turns both images into patch features; each
generated patch's quality is the cosine similarity to its best-matching reference patch, and each reference
patch's quality likewise towards the generated image (one streamed bidirectional argmax,
``dreamfuse::match_argmax``: the Triton kernel on CUDA). The similarities are mapped to [0, 1] and resampled to
the latent grid, where the PatchDPO loss weighs ``(ε̂ − ε)²`` by ``[1 − p̃(ref); p̃(gen)]``.

The [0, 1] mapping: ``q = clamp((s − floor) / (1 − floor), 0, 1)`` with ``floor = 0`` by default.
- A patch whose features also occur in the other image (``s = 1``) gets exactly 1, whatever the floor: an
  identical pair is "perfect everywhere" (the clamp also absorbs the ~1e-7 rounding that can push a cosine
  of a vector with itself just above 1).
- Patches that match nothing, orthogonal or anti-correlated features (``s <= floor``), get 0: they carry no
  weight in the generated half of the loss and full weight in the reference half. ``(s + 1) / 2`` would
  give such patches 0.5, i.e. still reward half of a wrong patch.
- Affine in between, so the ranking of patches is the backbone's. Backbones whose unrelated patches already
  sit at a positive cosine (CLIP's patch tokens do) can raise ``floor`` for more contrast.

Preprocessing runs in torch: the image is resized (bicubic, antialiased) to the backbone's square input
size *without* a centre crop, so the patch grid covers the whole image and lines up with the latent grid,
then normalized with the mean/std of the model folder's ``preprocessor_config.json`` (else the CLIP
constants for CLIP towers, ImageNet's otherwise).

Datasets for PatchDPO training (``DIR/<sample>/{ref.png, gen*.png, prompt.txt}``) get their maps computed
once and cached by :func:`quality_maps`. The CLI ``dreamfuse patch-quality`` writes a viewable heat map.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .files import check_file, torch_load_weights, torch_save_atomic
from .images import load_rgb
from .limits import DEFAULT_LIMITS
from .ops import ops_for
from .validation import check_number, check_text, is_int, shown_int

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_VERSION = 1  # bump when the cached maps' meaning changes
MAX_GRID = 64
"""Largest patch grid side (``image_size // patch_size``): 64x64 = 4096 patches, the sequence length the matching
kernel is built for (DINOv2-L/14 at 518 is 37x37). The backbone's attention grows with the square of it."""
MAX_MAP_SIDE = DEFAULT_LIMITS.max_side // 8
"""Largest quality-map side (``latent_hw``): the latent grid of the largest image the engine generates."""


def _pair(hw, field: str) -> tuple[int, int]:
    """``hw`` (an int or an ``(h, w)`` pair of ints) -> ``(h, w)``, each in ``[1, MAX_MAP_SIDE]``."""
    pair = (hw, hw) if is_int(hw) else tuple(hw) if isinstance(hw, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(is_int(v) for v in pair):
        raise ValueError(f"{field}: an int or an (h, w) pair of ints, got {hw!r}")
    if not all(1 <= v <= MAX_MAP_SIDE for v in pair):
        raise ValueError(f"{field}: sizes must be in [1, {MAX_MAP_SIDE}] (the latent grid of limits.max_side), got "
                         f"{', '.join(shown_int(v) for v in pair)}")
    return pair


def check_image_size(image_size, patch_size: int, field: str = "image_size") -> int:
    """A backbone input size: an integer multiple of ``patch_size`` giving a patch grid of at most
    :data:`MAX_GRID` per side."""
    if not is_int(image_size) or image_size < patch_size:
        raise ValueError(f"{field}: must be an integer >= the patch size {patch_size}, got "
                         f"{shown_int(image_size) if is_int(image_size) else repr(image_size)}")
    if image_size % patch_size:
        raise ValueError(f"{field}: {image_size} is not a multiple of the patch size {patch_size}")
    if image_size // patch_size > MAX_GRID:
        raise ValueError(f"{field}: {shown_int(image_size)} gives a {shown_int(image_size // patch_size)}-patch-wide "
                         f"grid, at most {MAX_GRID} ({MAX_GRID * patch_size} for patch size {patch_size})")
    return image_size


def _load_backbone(path) -> torch.nn.Module:
    """A vision backbone from a local transformers folder (nothing is downloaded). ``ValueError`` naming the
    folder when its config or weights cannot be read (missing, truncated or garbage files) or when the weights
    leave parameters unset (transformers would fill them with random values and carry on)."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ValueError(f"backbone: {str(path)!r} is not a transformers model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True)
    except Exception as e:  # invalid JSON, an unknown model_type...: one line naming the folder
        raise ValueError(f"backbone: cannot read the config of {str(path)!r} ({type(e).__name__}: "
                         f"{_first_line(e)})") from None
    try:
        if config.model_type in ("clip", "clip_vision_model"):  # a full CLIP folder: keep only its vision tower
            model, info = CLIPVisionModel.from_pretrained(p, local_files_only=True, output_loading_info=True)
        else:
            # ViT's pooler reads only the CLS token: not built (checkpoints saved without it would get random
            # weights)
            kwargs = {"add_pooling_layer": False} if config.model_type == "vit" else {}
            model, info = AutoModel.from_pretrained(p, local_files_only=True, output_loading_info=True, **kwargs)
    except Exception as e:  # no weights file, a truncated or garbage safetensors/bin file (SafetensorError...)
        raise ValueError(f"backbone: cannot load the weights in {str(path)!r} ({type(e).__name__}: "
                         f"{_first_line(e)})") from None
    # A pooler reads the CLS token only (never a patch feature; the fingerprint skips it too): may be absent.
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched or info.get("error_msgs"):
        what = (f"{len(missing)} parameter(s) missing from the weights (e.g. {missing[0]})" if missing
                else f"{len(mismatched)} parameter(s) of the wrong shape (e.g. {mismatched[0]})" if mismatched
                else _first_line(info["error_msgs"][0]))
        raise ValueError(f"backbone: the weights in {str(path)!r} do not fit its config.json: {what}; the model "
                         "would run with random values there")
    return model


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_quietly(path) -> torch.nn.Module:
    """:func:`_load_backbone` without transformers' weight-loading progress bar (stderr noise for a local folder
    that loads in a blink); warnings such as missing keys still show."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load_backbone(path)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _read_norm(path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    f = Path(path).expanduser() / "preprocessor_config.json"
    if not f.is_file():
        return None
    cfg = json.loads(f.read_text())
    if "image_mean" in cfg and "image_std" in cfg:
        return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return None


def _vision_config(backbone):
    cfg = backbone.config
    return getattr(cfg, "vision_config", cfg)


def _to_batch(images, field: str) -> torch.Tensor:
    """PIL image, path or ``(3, H, W)`` / ``(B, 3, H, W)`` float tensor in [0, 1] -> ``(B, 3, H, W)`` float32
    (on CPU; tensors keep their device). Images are read by :func:`dreamfuse.engine.images.load_rgb` (EXIF
    orientation, 16-bit at real values, transparency over white)."""
    if images is None:
        raise ValueError(f"{field}: missing (give a PIL image, a path, a tensor or a list)")
    if isinstance(images, (str, Path, Image.Image)):
        return load_rgb(images, field)[None]
    if isinstance(images, torch.Tensor):
        if not images.is_floating_point():
            raise ValueError(f"{field}: tensor must be float in [0, 1], got {images.dtype}")
        x = images.detach().float()
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{field}: tensor must be (3, H, W) or (B, 3, H, W), got {tuple(images.shape)}")
        return x
    raise ValueError(f"{field}: unsupported type {type(images).__name__} (PIL image, path or tensor)")


class PatchQualityEstimator:
    """Patch quality of generated images against their references (PatchDPO).

    Args:
        backbone: a transformers vision model whose ``last_hidden_state`` is ``[CLS] (+ registers) + patch
            tokens`` (``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``CLIPVisionModel``), or the
            path of a local folder holding one (a full CLIP model or folder: its vision tower). Used as it is:
            its device and dtype are the estimator's; it is put in eval mode.
        backend: ``"torch"`` (matching by the PyTorch reference) or ``"triton"`` (``dreamfuse::match_argmax``:
            the Triton kernel on CUDA).
        image_size: the square input size (default: the config's ``image_size``); a multiple of the patch
            size. Other sizes than the config's use the model's position-embedding interpolation (DINOv2
            configs say 518, where its image processor feeds 224: pass ``image_size=224`` for that).
        mean, std: normalization (default: the folder's ``preprocessor_config.json``, else CLIP's constants
            for CLIP towers and ImageNet's otherwise).
        floor: the cosine similarity that maps to quality 0 (default 0; see the module docstring).
    """

    def __init__(self, backbone, *, backend: str = "torch", image_size: int | None = None,
                 mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                 floor: float = 0.0):
        self.ops = ops_for(backend)
        self.backend = backend
        norm = None
        if isinstance(backbone, (str, Path)):
            norm = _read_norm(backbone)
            backbone = _load_quietly(backbone)
        if hasattr(getattr(backbone, "config", None), "vision_config") and hasattr(backbone, "vision_model"):
            backbone = backbone.vision_model  # a full CLIP model passed as a module: its vision tower
        if not isinstance(backbone, torch.nn.Module) or not hasattr(backbone, "config"):
            raise ValueError(f"backbone: expected a transformers vision model or a folder, got "
                             f"{type(backbone).__name__}")
        self.backbone = backbone.eval()
        cfg = _vision_config(backbone)
        if not isinstance(getattr(cfg, "patch_size", None), int) or not hasattr(cfg, "image_size"):
            raise ValueError(f"backbone: {type(backbone).__name__} has no square patch grid (config.patch_size, "
                             f"config.image_size); use a ViT, DINOv2 or CLIP vision model")
        self.patch_size = int(cfg.patch_size)
        self.image_size = check_image_size(cfg.image_size if image_size is None else image_size, self.patch_size)
        self.num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)  # CLS + registers
        if (mean is None) != (std is None):
            raise ValueError("mean/std: give both or neither")
        if mean is None:
            clip = cfg.model_type.startswith("clip")
            mean, std = norm or ((CLIP_MEAN, CLIP_STD) if clip else (IMAGENET_MEAN, IMAGENET_STD))
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        check_number(floor, "floor", low=-1)
        if not floor < 1:
            raise ValueError(f"floor: must be in [-1, 1), got {floor!r}")
        self.floor = float(floor)
        params = inspect.signature(backbone.forward).parameters
        native = int(getattr(cfg, "image_size", self.image_size))
        self._forward_kw = ({"interpolate_pos_encoding": True}
                            if self.image_size != native and "interpolate_pos_encoding" in params else {})

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid ``(h, w)``."""
        n = self.image_size // self.patch_size
        return n, n

    def _param(self) -> torch.Tensor:
        return next(self.backbone.parameters())

    def resize(self, images, field: str = "images") -> torch.Tensor:
        """Images (see :func:`estimate`) -> ``(B, 3, S, S)`` float32 in [0, 1] on the backbone's device,
        ``S = image_size`` (bicubic, antialiased, no crop). A list may mix sizes: each item is resized."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError(f"{field}: empty list")
            return torch.cat([self.resize(im, f"{field}[{i}]") for i, im in enumerate(images)])
        x = _to_batch(images, field).to(self._param().device)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bicubic", align_corners=False, antialias=True)
        return x.clamp(0, 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in [0, 1] -> the backbone's input (mean/std, its dtype)."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self._param().dtype)

    def preprocess(self, images, field: str = "images") -> torch.Tensor:
        """Images (see :func:`estimate`) -> the backbone's normalized ``(B, 3, S, S)`` input."""
        return self.normalize(self.resize(images, field))

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalized pixels ``(B, 3, S, S)`` -> L2-normalized patch features ``(B, h·w, D)`` float32, row-major
        on the patch grid (CLS and register tokens dropped). Differentiable (no ``no_grad`` here)."""
        hidden = self.backbone(pixel_values=pixel_values, **self._forward_kw).last_hidden_state
        n = self.grid[0] * self.grid[1]
        if hidden.shape[1] != n + self.num_prefix:
            raise ValueError(f"backbone: {hidden.shape[1]} tokens for a {self.grid[0]}x{self.grid[1]} patch grid "
                             f"+ {self.num_prefix} CLS/register tokens; not a ViT-like model")
        return F.normalize(hidden[:, self.num_prefix:].float(), dim=-1)

    def to_quality(self, sim: torch.Tensor) -> torch.Tensor:
        """Cosine similarity -> quality ``clamp((s − floor) / (1 − floor), 0, 1)`` (identity match -> 1)."""
        return ((sim - self.floor) / (1.0 - self.floor)).clamp(0.0, 1.0)

    @torch.no_grad()
    def estimate(self, reference, generated, *, latent_hw=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch quality of ``generated`` against ``reference`` and of ``reference`` towards ``generated``.

        Args:
            reference, generated: a PIL image, a path, a float tensor in [0, 1] ``(3, H, W)`` or ``(B, 3, H, W)``,
                or a list of those (sizes may differ: every image is resized to the backbone's input). The
                batches must match, or ``reference`` is one image used for every generated image.
            latent_hw: ``(h, w)`` or an int: resample the maps bilinearly to that grid (the latent grid, e.g. 64
                for SD 1.5 at 512²). Default: the patch grid.

        Returns:
            ``(q_gen, q_ref)``, each ``(B, h, w)`` float32 in [0, 1] on the backbone's device: ``q_gen[b, y, x]``
            the quality of generated patch (y, x) (best cosine similarity to any patch of reference b, mapped to
            [0, 1]); ``q_ref`` the same the other way (how well each reference patch is reproduced).
        """
        x_ref = self.preprocess(reference, "reference")
        x_gen = self.preprocess(generated, "generated")
        b_ref, b_gen = x_ref.shape[0], x_gen.shape[0]
        if b_ref not in (1, b_gen):
            raise ValueError(f"reference: batch {b_ref} does not match generated batch {b_gen} (give 1 or {b_gen})")
        f = self.patch_features(torch.cat([x_ref, x_gen]))
        f_ref, f_gen = f[:b_ref].expand(b_gen, -1, -1), f[b_ref:]
        _, _, t2r_sim, r2t_sim = self.ops.match_argmax(f_gen.contiguous(), f_ref.contiguous())
        h, w = self.grid
        q_gen, q_ref = (self.to_quality(s.float()).view(b_gen, h, w) for s in (t2r_sim, r2t_sim))
        if latent_hw is not None:
            size = _pair(latent_hw, "latent_hw")
            q_gen, q_ref = (F.interpolate(q[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                            .clamp(0.0, 1.0) for q in (q_gen, q_ref))
        return q_gen, q_ref

    def fingerprint(self) -> str:
        """A hash of everything the maps depend on: the backbone's config and weights, the preprocessing and
        the mapping. Cache keys include it, so a fine-tuned or different backbone never reads stale maps."""
        h = hashlib.sha256()
        h.update(json.dumps([CACHE_VERSION, self.image_size, self.mean, self.std, self.floor]).encode())
        h.update(self.backbone.config.to_json_string().encode())
        for name, t in self.backbone.state_dict().items():
            if name.startswith("pooler."):  # reads the CLS token only: never changes a patch feature
                continue
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------------------------- fine-tuning
def _augment(x: torch.Tensor, g: torch.Generator, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A random view of ``x`` (``(B, 3, S, S)`` in [0, 1]) that keeps every patch where it is, up to a
    horizontal flip: brightness, contrast and saturation jitter, Gaussian noise, flip with p = 0.5. Returns
    the view and the ``(B,)`` flip flags. Geometric warps other than the flip would blur which patch is
    "the same patch", the positive of the loss; photometric changes are what generated images vary in."""
    B, dev = x.shape[0], x.device

    def u(spread: float) -> torch.Tensor:
        return (1 + spread * strength * (2 * torch.rand(B, 1, 1, 1, generator=g) - 1)).to(dev)

    x = x * u(0.4)  # brightness
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - m) * u(0.4) + m  # contrast
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * u(0.4) + gray  # saturation
    x = x + 0.03 * strength * torch.randn(x.shape, generator=g).to(dev)
    flip = (torch.rand(B, generator=g) < 0.5).to(dev)
    x = torch.where(flip.view(B, 1, 1, 1), x.flip(-1), x)
    return x.clamp(0, 1), flip


def patch_infonce_loss(estimator: PatchQualityEstimator, x: torch.Tensor, generator: torch.Generator, *,
                       tau: float = 0.1, strength: float = 1.0) -> torch.Tensor:
    """Self-supervised patch-level InfoNCE on two random views of ``x`` (``(B, 3, S, S)`` in [0, 1]).

    Positive of a patch in view A: the same patch (same image, same grid cell after undoing the flip) in view
    B; negatives: every other patch of every image of the batch in view B. Symmetric cross-entropy over the
    ``(B·N) × (B·N)`` cosine-similarity logits divided by ``tau``. Near-duplicate patches (flat sky, walls)
    are false negatives, as in any patch-level contrastive loss; the loss still ranks the true patch first.
    """
    h, w = estimator.grid
    views = []
    for _ in range(2):
        v, flip = _augment(x, generator, strength)
        z = estimator.patch_features(estimator.normalize(v))
        B, N, D = z.shape
        z = z.view(B, h, w, D)
        z = torch.where(flip.view(B, 1, 1, 1), z.flip(2), z)  # back to the original image's grid
        views.append(z.reshape(B * N, D))
    logits = views[0] @ views[1].T / tau
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def finetune_backbone(estimator: PatchQualityEstimator, images, *, steps: int = 100, batch_size: int = 8,
                      lr: float = 1e-5, weight_decay: float = 0.01, tau: float = 0.1, strength: float = 1.0,
                      seed: int = 0) -> list[float]:
    """Fine-tune the estimator's backbone in place with :func:`patch_infonce_loss`, so its patch features
    tell a patch's identity apart from photometric changes (the quality of a patch should not drop because
    the generated image is brighter). The backbone comes back in eval mode with its ``requires_grad`` flags
    restored; :meth:`PatchQualityEstimator.fingerprint` changes, so cached maps are recomputed.

    Args:
        images: the training images (paths, PIL images, tensors; see :meth:`PatchQualityEstimator.estimate`),
            e.g. the reference images of a PatchDPO dataset. Loaded once at the backbone's input size.
        steps, batch_size, lr, weight_decay: AdamW over all backbone parameters, ``batch_size`` images per
            step drawn without replacement (reshuffled per pass).
        tau: InfoNCE temperature. strength: augmentation strength (0 = identical views).

    Returns:
        The loss of each step.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps/batch_size: must be >= 1, got {steps}/{batch_size}")
    if tau <= 0:
        raise ValueError(f"tau: must be > 0, got {tau}")
    if estimator._param().dtype == torch.float16:
        raise ValueError("backbone: fp16 weights do not train with AdamW; fine-tune in fp32 (or bf16)")
    backbone = estimator.backbone
    x_all = estimator.resize(images, "images")
    g = torch.Generator().manual_seed(seed)
    flags = {n: p.requires_grad for n, p in backbone.named_parameters()}
    params = [p for p in backbone.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses, order = [], torch.empty(0, dtype=torch.long)
    backbone.train()
    try:
        for _ in range(steps):
            if len(order) < min(batch_size, len(x_all)):
                order = torch.randperm(len(x_all), generator=g)
            idx, order = order[:batch_size], order[batch_size:]
            loss = patch_infonce_loss(estimator, x_all[idx.to(x_all.device)], g, tau=tau, strength=strength)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        backbone.eval()
        for n, p in backbone.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
    return losses


# --------------------------------------------------------------------------------------------- dataset cache
@dataclass
class QualitySample:
    """One dataset sample and its maps: ``q_gen[g]`` / ``q_ref[g]`` are ``(h, w)`` in [0, 1] for the pair
    (``ref``, ``gens[g]``), on CPU."""

    name: str
    prompt: str
    ref: Path
    gens: list[Path]
    q_gen: torch.Tensor
    q_ref: torch.Tensor


def scan_sample(folder: Path) -> tuple[Path, list[Path], str]:
    """``(ref, gens, prompt)`` of one sample folder ``<sample>/{ref.png, gen*.png, prompt.txt}``."""
    refs = [p for p in sorted(folder.iterdir()) if p.stem == "ref" and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not refs:
        raise ValueError(f"dataset: sample {str(folder)!r} has no reference image (ref.png)")
    if len(refs) > 1:
        raise ValueError(f"dataset: sample {str(folder)!r} has several reference images {[p.name for p in refs]}")
    check_file(refs[0], "dataset", "reference image")
    gens = [p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.startswith("gen") and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not gens:
        raise ValueError(f"dataset: sample {str(folder)!r} has no generated image (gen*.png)")
    prompt_file = folder / "prompt.txt"
    if not prompt_file.exists():
        raise ValueError(f"dataset: sample {str(folder)!r} has no prompt.txt")
    check_file(prompt_file, "dataset")
    most = DEFAULT_LIMITS.max_prompt_chars
    if prompt_file.stat().st_size > 4 * most:  # UTF-8: at most 4 bytes a character
        raise ValueError(f"dataset: {str(prompt_file)!r} is {prompt_file.stat().st_size} bytes, more than a prompt "
                         f"of {most} characters (limits.max_prompt_chars)")
    try:
        prompt = prompt_file.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ValueError(f"dataset: {str(prompt_file)!r} is not UTF-8 text") from None
    return refs[0], gens, check_text(prompt, f"dataset: {str(prompt_file)!r}", most)


def quality_maps(dataset_dir, estimator: PatchQualityEstimator, latent_hw, cache_dir, *,
                 shard: tuple[int, int] = (0, 1)) -> list[QualitySample]:
    """Patch-quality maps of a PatchDPO dataset, computed once and cached.

    Layout: ``DATASET_DIR/<sample>/{ref.png, gen*.png, prompt.txt}`` (one reference, one or more generated
    images; other files are ignored). Each (ref, gen) pair is cached in ``cache_dir`` as ``<key>.pt`` holding
    ``{"q_gen", "q_ref"}`` at ``latent_hw``; the key hashes the two files' contents, ``latent_hw`` and
    :meth:`PatchQualityEstimator.fingerprint`, so an edited image or another backbone recomputes, and a
    renamed or copied sample does not. A sample's uncached pairs go through the estimator as one batch.

    ``shard = (rank, world_size)``: only the samples ``i`` (in folder-name order) with ``i % world_size == rank``
    (one rank's share of a data-parallel run's cache; the whole dataset is still validated first).

    Raises:
        ValueError: a missing or empty dataset folder, or a sample without ``ref.*``, ``gen*`` or
            ``prompt.txt``.
    """
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"dataset: folder {str(dataset_dir)!r} does not exist")
    folders = [p for p in sorted(root.iterdir()) if p.is_dir()]
    if not folders:
        raise ValueError(f"dataset: {str(dataset_dir)!r} has no sample folders (<sample>/ref.png, gen*.png)")
    size = _pair(latent_hw, "latent_hw")
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    scanned = [(f, *scan_sample(f)) for f in folders]  # validate everything before any model work
    rank, world = shard
    scanned = scanned[rank::world]
    tag = f"{estimator.fingerprint()}|{size[0]}x{size[1]}"
    out = []
    for folder, ref, gens, prompt in scanned:
        ref_hash = hashlib.sha256(ref.read_bytes()).hexdigest()
        keys = [hashlib.sha256(f"{tag}|{ref_hash}|{hashlib.sha256(g.read_bytes()).hexdigest()}".encode())
                .hexdigest() for g in gens]
        maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, k in enumerate(keys):
            f = cache / f"{k}.pt"
            if f.is_file():
                try:
                    d = torch_load_weights(f, "quality cache")
                    maps[i] = d["q_gen"], d["q_ref"]
                except (ValueError, KeyError, TypeError):  # a damaged entry: computed again and rewritten
                    pass
        todo = [i for i in range(len(gens)) if i not in maps]
        if todo:
            q_gen, q_ref = estimator.estimate(ref, [gens[i] for i in todo], latent_hw=size)
            for j, i in enumerate(todo):
                maps[i] = q_gen[j].cpu(), q_ref[j].cpu()
                # atomic, with a unique temporary name: a killed run or a concurrent one leaves no half-written entry
                torch_save_atomic({"q_gen": maps[i][0].clone(), "q_ref": maps[i][1].clone()}, cache / f"{keys[i]}.pt")
        out.append(QualitySample(folder.name, prompt, ref, gens, torch.stack([maps[i][0] for i in range(len(gens))]),
                                 torch.stack([maps[i][1] for i in range(len(gens))])))
    return out


# --------------------------------------------------------------------------------------------- visualisation
def heatmap(q: torch.Tensor) -> np.ndarray:
    """``(h, w)`` quality in [0, 1] -> ``(h, w, 3)`` uint8, a blue (0) -> red (1) ramp through magenta, so
    low-quality patches read cold and good ones hot."""
    q = q.detach().float().cpu().clamp(0, 1).numpy()
    rgb = np.stack([q, np.zeros_like(q), 1.0 - q], axis=-1)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def quality_figure(generated, q_gen: torch.Tensor) -> Image.Image:
    """The generated image and its quality heat map side by side, ``2W × H`` (the map upsampled nearest to
    the image size so each latent/patch cell stays a visible block)."""
    img = Image.fromarray((load_rgb(generated, "generated").permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    w, h = img.size
    heat = Image.fromarray(heatmap(q_gen)).resize((w, h), Image.NEAREST)
    fig = Image.new("RGB", (2 * w, h))
    fig.paste(img, (0, 0))
    fig.paste(heat, (w, 0))
    return fig
