"""Reading input images (references, scaffolds, layouts) with errors that name the argument."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .limits import DEFAULT_LIMITS, Limits


def check_pixels(width: int, height: int, field: str, limits: Limits = DEFAULT_LIMITS) -> None:
    if width * height > limits.max_input_pixels:
        raise ValueError(f"{field}: {width}x{height} is {width * height} pixels, the limit for input images is "
                         f"{limits.max_input_pixels} (limits.max_input_pixels)")


def open_image(image, field: str, limits: Limits = DEFAULT_LIMITS):
    """A path -> the opened PIL image (``ValueError`` naming ``field`` if missing, unreadable, or larger than
    ``limits.max_input_pixels``, checked from the header before decoding); a PIL image is size-checked; anything
    else is returned as it is."""
    if isinstance(image, Image.Image):
        check_pixels(image.width, image.height, field, limits)
        return image
    if not isinstance(image, (str, Path)):
        return image
    path = Path(image).expanduser()
    if not path.is_file():
        raise ValueError(f"{field}: file {str(image)!r} does not exist")
    try:
        img = Image.open(path)  # reads the header only
        check_pixels(img.width, img.height, field, limits)
        img.load()
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{field}: cannot read {str(path)!r} as an image ({e})") from None
    return img


def image_tensor(image, height: int, width: int, field: str, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """PIL image, path, or ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in [0, 1] -> ``(1, 3, height, width)`` float32
    on CPU, resized when its aspect ratio matches the generation size (within 2%), an error otherwise: never a
    silent crop or stretch."""
    if image is None:
        raise ValueError(f"{field}: missing (give a PIL image, a path or a tensor)")
    image = open_image(image, field, limits)
    if isinstance(image, Image.Image):
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    elif isinstance(image, torch.Tensor):
        if image.ndim not in (3, 4) or tuple(image.shape[-3:-2]) != (3,) or (image.ndim == 4 and image.shape[0] != 1):
            raise ValueError(f"{field}: tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        check_pixels(image.shape[-1], image.shape[-2], field, limits)
        x = image.detach().float().cpu()
        x = x[None] if x.ndim == 3 else x
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{field}: tensor holds NaN or inf")
    else:
        raise ValueError(f"{field}: unsupported type {type(image).__name__} (PIL image, path or tensor)")
    h, w = x.shape[-2:]
    if min(h, w) < 8:
        raise ValueError(f"{field}: {w}x{h} is too small")
    if abs(w / h - width / height) > 0.02 * (width / height):
        raise ValueError(f"{field}: aspect ratio of {w}x{h} does not match the generation size {width}x{height}")
    if (h, w) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 1)
