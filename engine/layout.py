"""Segment layouts for composite (MSP) generation: a colour image plus a prompt per colour -> soft masks.

A layout is an RGB image with one flat colour per segment. ``segments`` maps colours (``"#ff0000"``, ``"#f00"``)
to a prompt or to ``{"prompt", "negative_prompt", "guidance", "subject"}``; the key ``"background"`` names the
segment of every pixel whose colour is not listed. Without a ``"background"`` entry those pixels form a
background segment prompted with the *global* prompt (our choice: the global prompt describes the whole scene,
so it is the natural prompt for what the layout leaves unspecified).

Colour matching (:func:`assign_labels`) tolerates anti-aliased edges and lossy files: a pixel goes to the
nearest colour of the palette = the listed colours plus the unlisted colours that form regions (a pixel whose
3x3 neighbourhood is one unlisted colour), if it lies within ``tolerance`` (RGB Euclidean distance) of it;
unlisted palette colours and pixels far from every palette colour go to the background. An edge pixel
blended between two colours lies at most half their distance from the nearer one, so the default tolerance
(224, about half the RGB cube's diagonal) sends every edge pixel to the nearer of its two sides.

Masks (:func:`build_masks`) are the per-segment indicator images area-averaged onto the latent grid, optionally
blurred (Gaussian, ``blur`` = radius in latent pixels), renormalized so they sum to 1 at every latent pixel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .files import read_json
from .images import open_image
from .limits import DEFAULT_LIMITS, Limits, check_size
from .validation import check_number, check_text

BACKGROUND = "background"
DEFAULT_TOLERANCE = 224.0
PRESENT_DISTANCE = 48.0
"""A listed colour must have at least one pixel this close to it (RGB distance) to count as present in the
layout: flat regions of a JPEG stay within ~20 of their colour, neighbouring primaries are >= 255 apart."""
_MAX_UNLISTED = 256  # most frequent unlisted region colours kept in the palette (photos as layouts: bounded work)
_CHUNK = 8192  # pixels per distance block: 8192 x (64 + 256) palette x 3 float64 = 63 MB at the limits
_SEGMENT_KEYS = {"prompt", "negative_prompt", "guidance", "subject"}
_HEX = re.compile(r"#?([0-9a-fA-F]{3}|[0-9a-fA-F]{6})")


@dataclass(frozen=True)
class Segment:
    """One segment of a layout."""

    key: str
    """The colour as written by the user (``"#ff0000"``) or ``"background"``."""
    color: tuple[int, int, int] | None
    """RGB of the segment; None for the background."""
    prompt: str | None
    """The segment's prompt; None only for a background without an entry (it takes the global prompt)."""
    negative_prompt: str | None = None
    """None: the request's negative prompt."""
    guidance: float | None = None
    """CFG scale of this segment; None: the request's ``guidance_scale``."""
    subject: bool | None = None
    """Subject-aware guidance target (``"subject": true``); None when not specified."""


@dataclass
class SegmentLayout:
    """A parsed layout: its segments (listed colours in the order given, then the background when any pixel
    belongs to it), the per-pixel segment index and the latent-grid masks."""

    segments: list[Segment]
    labels: np.ndarray
    """``(H, W)`` int64: the segment index of every image pixel."""
    masks: torch.Tensor
    """``(S, h, w)`` float32 on CPU, >= 0, summing to 1 at every latent pixel."""

    @property
    def num_segments(self) -> int:
        return len(self.segments)


# --------------------------------------------------------------------------------------------- parsing
def parse_color(text: str, field: str = "segments") -> tuple[int, int, int]:
    """``"#rrggbb"`` / ``"#rgb"`` (the ``#`` optional, any case) -> ``(r, g, b)``; ValueError naming ``field``."""
    m = _HEX.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{field}: {text!r} is not a colour (use '#rrggbb' or '#rgb', e.g. '#ff0000')")
    h = m.group(1)
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


_MAX_JSON_BYTES = 1 << 20  # a SEGMENTS.json of 64 segments is a few KB


def load_segments(segments, field: str = "segments") -> dict:
    """A mapping, or a path to a SEGMENTS.json file holding one -> the mapping (not yet validated). Duplicate keys,
    files over 1 MiB and pathologically nested JSON are refused."""
    if isinstance(segments, (str, Path)):
        segments = read_json(segments, field, "a segments file", _MAX_JSON_BYTES)
    if not isinstance(segments, Mapping):
        raise ValueError(f"{field}: must be a mapping of colours to prompts, got {type(segments).__name__}")
    return dict(segments)


def parse_segments(segments, field: str = "segments", limits: Limits = DEFAULT_LIMITS) -> list[Segment]:
    """Validate a segments mapping (or SEGMENTS.json path) -> segments: listed colours in the order given,
    then the ``"background"`` entry if there is one. ValueErrors name the entry and field."""
    segments = load_segments(segments, field)
    if not segments:
        raise ValueError(f"{field}: no segments given (map at least one colour to a prompt)")
    if len(segments) > limits.max_segments + 1:  # + the background entry
        raise ValueError(f"{field}: {len(segments)} entries, the limit is {limits.max_segments} segments "
                         "(limits.max_segments)")
    out: list[Segment] = []
    background = None
    seen: dict[tuple[int, int, int], str] = {}
    for key, spec in segments.items():
        where = f"{field}[{key!r}]"
        if not isinstance(key, str):
            raise ValueError(f"{field}: keys must be colour strings, got {key!r}")
        is_bg = key.strip().lower() == BACKGROUND
        color = None if is_bg else parse_color(key, f"{field} key {key!r}")
        if color is not None and color in seen:
            raise ValueError(f"{where}: the same colour as {seen[color]!r}")
        if isinstance(spec, str):
            spec = {"prompt": spec}
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: must be a prompt string or an object with 'prompt', got {type(spec).__name__}")
        unknown = set(spec) - _SEGMENT_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} (allowed: {sorted(_SEGMENT_KEYS)})")
        prompt = spec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}.prompt: must be a non-empty string, got {prompt!r}")
        check_text(prompt, f"{where}.prompt", limits.max_prompt_chars)
        neg = spec.get("negative_prompt")
        if neg is not None:
            if not isinstance(neg, str):
                raise ValueError(f"{where}.negative_prompt: must be a string, got {neg!r}")
            check_text(neg, f"{where}.negative_prompt", limits.max_prompt_chars)
        guidance = spec.get("guidance")
        if guidance is not None:
            guidance = check_number(guidance, f"{where}.guidance", low=0)
        subject = spec.get("subject")
        if subject is not None and not isinstance(subject, bool):
            raise ValueError(f"{where}.subject: must be true or false, got {subject!r}")
        seg = Segment(key, color, prompt, neg, guidance, subject)
        if is_bg:
            if background is not None:
                raise ValueError(f"{where}: a second background entry")
            background = seg
        else:
            seen[color] = key
            out.append(seg)
    if background is not None:
        out.append(background)
    return out


def load_layout_image(layout, field: str = "layout", limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """A PIL image, a path or an ``(H, W, 3)`` uint8 array -> ``(H, W, 3)`` uint8 (alpha dropped)."""
    if layout is None:
        raise ValueError(f"{field}: missing (give a PIL image, a path or an (H, W, 3) uint8 array)")
    layout = open_image(layout, field, limits=limits)
    if isinstance(layout, Image.Image):
        return np.asarray(layout.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(layout, np.ndarray):
        if layout.ndim != 3 or layout.shape[2] != 3 or layout.dtype != np.uint8:
            raise ValueError(f"{field}: array must be (H, W, 3) uint8, got {layout.shape} {layout.dtype}")
        return np.ascontiguousarray(layout)
    raise ValueError(f"{field}: unsupported type {type(layout).__name__} (PIL image, path or uint8 array)")


def check_layout_size(image: np.ndarray, height: int, width: int, multiple: int = 8, field: str = "layout") -> None:
    h, w = image.shape[:2]
    if h % multiple or w % multiple:
        raise ValueError(f"{field}: size {w}x{h} (WxH) is not a multiple of {multiple}")
    if (h, w) != (height, width):
        raise ValueError(f"{field}: size {w}x{h} (WxH) differs from the requested {width}x{height}")


# --------------------------------------------------------------------------------------------- colours
def _unlisted_region_colors(image: np.ndarray, listed: np.ndarray) -> np.ndarray:
    """Colours of the pixels whose 3x3 neighbourhood is all one colour that is not within PRESENT_DISTANCE
    of a listed colour: the unlisted regions of the layout (anti-aliased edges, 1–2 px wide, never qualify)."""
    h, w, _ = image.shape
    if h < 3 or w < 3:
        return np.zeros((0, 3), np.float64)
    packed = (image[..., 0].astype(np.int64) << 16) | (image[..., 1].astype(np.int64) << 8) | image[..., 2]
    centre = packed[1:-1, 1:-1]
    flat = np.ones_like(centre, dtype=bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            flat &= packed[dy:dy + h - 2, dx:dx + w - 2] == centre
    values, counts = np.unique(centre[flat], return_counts=True)
    if values.size == 0:
        return np.zeros((0, 3), np.float64)
    rgb = np.stack([(values >> 16) & 255, (values >> 8) & 255, values & 255], axis=1).astype(np.float64)
    if len(listed):
        d = np.sqrt(((rgb[:, None, :] - listed[None, :, :]) ** 2).sum(-1)).min(1)
        keep = d > PRESENT_DISTANCE
        rgb, counts = rgb[keep], counts[keep]
    return rgb[np.argsort(-counts, kind="stable")[:_MAX_UNLISTED]]


def assign_labels(image: np.ndarray, colors: list[tuple[int, int, int]], tolerance: float = DEFAULT_TOLERANCE,
                  field: str = "segments") -> np.ndarray:
    """Per-pixel index into ``colors``, or ``len(colors)`` for the background: ``(H, W)`` int64.

    Raises ValueError (naming ``field``) for a listed colour with no pixel within PRESENT_DISTANCE of it.
    """
    tolerance = check_number(tolerance, "tolerance", low=0)
    n = len(colors)
    h, w, _ = image.shape
    listed = np.asarray(colors, np.float64).reshape(n, 3)
    # The cheap check first, on the image's distinct colours (few in a layout): every listed colour is present.
    packed = (image[..., 0].astype(np.int64) << 16) | (image[..., 1].astype(np.int64) << 8) | image[..., 2]
    values = np.unique(packed)
    distinct = np.stack([(values >> 16) & 255, (values >> 8) & 255, values & 255], axis=1).astype(np.float64)
    for i, c in enumerate(colors):
        present = False
        for start in range(0, len(distinct), _CHUNK):
            if np.any(np.sqrt(((distinct[start:start + _CHUNK] - listed[i]) ** 2).sum(-1)) <= PRESENT_DISTANCE):
                present = True
                break
        if not present:
            hexc = "#{:02x}{:02x}{:02x}".format(*c)
            raise ValueError(f"{field}: colour {hexc} is listed but does not appear in the layout")
    palette = np.concatenate([listed, _unlisted_region_colors(image, listed)])
    pix = image.reshape(-1, 3).astype(np.float64)
    labels = np.full(pix.shape[0], n, np.int64)
    # Chunked so a photo-like layout (many unlisted colours) stays at O(chunk x palette) memory (~20 MB).
    for start in range(0, pix.shape[0], _CHUNK):
        p = pix[start:start + _CHUNK]
        d = np.sqrt(((p[:, None, :] - palette[None, :, :]) ** 2).sum(-1))
        idx = d.argmin(1)
        dist = d[np.arange(len(p)), idx]
        lab = np.where((idx < n) & (dist <= tolerance), idx, n)
        labels[start:start + _CHUNK] = lab
    return labels.reshape(h, w)


# --------------------------------------------------------------------------------------------- masks
def _gaussian_blur(masks: torch.Tensor, radius: float) -> torch.Tensor:
    """Separable Gaussian (sigma = radius / 2, support ±ceil(radius)) with replicated borders, so that a
    partition of unity stays one."""
    r = math.ceil(radius)
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / (radius / 2)) ** 2)
    k = k / k.sum()
    s = masks.shape[0]
    m = masks[:, None]
    m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return m.view(s, *masks.shape[1:])


def build_masks(labels: np.ndarray, num_segments: int, factor: int, blur: float = 0.0) -> torch.Tensor:
    """``(H, W)`` segment indices -> ``(S, H/factor, W/factor)`` float32 masks: area average of each segment's
    indicator, optional Gaussian blur (``blur`` = radius in latent pixels), renormalized to sum 1."""
    if isinstance(blur, bool) or not isinstance(blur, (int, float)) or not blur >= 0:
        raise ValueError(f"blur: must be a number >= 0 (radius in latent pixels), got {blur!r}")
    lab = torch.from_numpy(labels)
    onehot = F.one_hot(lab, num_segments).permute(2, 0, 1).float()  # (S, H, W)
    masks = F.avg_pool2d(onehot[None], factor)[0]
    if blur > 0:
        masks = _gaussian_blur(masks, float(blur))
    return masks / masks.sum(0, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------- all together
def parse_layout(layout, segments, *, height: int | None = None, width: int | None = None, factor: int = 8,
                 tolerance: float = DEFAULT_TOLERANCE, blur: float = 0.0, field: str = "",
                 limits: Limits = DEFAULT_LIMITS) -> SegmentLayout:
    """Layout image + segments -> :class:`SegmentLayout`.

    Args:
        layout: PIL image, path, or ``(H, W, 3)`` uint8 array; must be ``height x width`` when given, and a
            multiple of ``factor`` (the VAE's downsampling) in both sides.
        segments: mapping (or SEGMENTS.json path) of colours / ``"background"`` to prompts or objects.
        tolerance: RGB distance within which a pixel joins the nearest palette colour (see module doc).
        blur: Gaussian softening of the masks' edges, radius in latent pixels (0 = none: area averaging only).
        field: prefix of the error messages' field names (e.g. ``"requests[1]."``).
        limits: segments per layout, blur radius, layout size and input pixels (checked before the work).
    """
    segs = parse_segments(segments, f"{field}segments", limits)
    blur = check_number(blur, "blur", low=0, high=limits.max_blur)
    image = load_layout_image(layout, f"{field}layout", limits)
    h, w = image.shape[:2]
    check_layout_size(image, height or h, width or w, factor, f"{field}layout")
    check_size(h, w, factor, limits, (f"{field}layout height", f"{field}layout width"))
    listed = [s for s in segs if s.color is not None]
    labels = assign_labels(image, [s.color for s in listed], tolerance, f"{field}segments")
    if (labels == len(listed)).any():  # a background segment only when some pixel belongs to it
        segs = listed + [segs[-1] if segs[-1].color is None else Segment(BACKGROUND, None, None)]
    else:
        segs = listed
    masks = build_masks(labels, len(segs), factor, blur)
    return SegmentLayout(segs, labels, masks)
