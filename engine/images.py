"""Reading input images (references, scaffolds, layouts, training images) with errors that name the argument.

One loader for the pipelines and the trainers, so an image means the same thing everywhere:

- the pixel count is checked from the file header before anything is decoded (``limits.max_input_pixels``);
  a corrupt or truncated file is a ``ValueError`` naming the field, never a decoder traceback;
- the EXIF orientation is applied (``PIL.ImageOps.exif_transpose``): a phone photo stored sideways with an
  orientation tag is read the way every viewer shows it;
- 16-bit grayscale (Pillow modes ``I;16``, ``I;16B``, ``I``) keeps its real values, scaled to [0, 1]
  (``convert("RGB")`` would clip everything above 255 of 65535 to white); 16-bit RGB(A) PNGs are reduced to
  8 bits per channel by Pillow itself (it has no 16-bit RGB mode), which is correct to 1/255;
- transparency (RGBA, LA, PA, P or L/RGB with a ``tRNS`` colour key) is composited over white: the colour
  stored under a fully transparent pixel is arbitrary (often black, sometimes leftovers of an edit) and is
  never what the image shows;
- grayscale and palette images become RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .files import check_file
from .limits import DEFAULT_LIMITS, Limits

_EXIF_ORIENTATION = 0x0112  # the EXIF "Orientation" tag; 1 = stored upright
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def check_pixels(width: int, height: int, field: str, limits: Limits = DEFAULT_LIMITS) -> None:
    if width * height > limits.max_input_pixels:
        raise ValueError(f"{field}: {width}x{height} is {width * height} pixels, the limit for input images is "
                         f"{limits.max_input_pixels} (limits.max_input_pixels)")


def _orient(img: Image.Image, field: str) -> Image.Image:
    """``img`` turned upright by its EXIF orientation (the same object when it has none, or 1)."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation not in range(2, 9):  # 1 = upright; anything else is not an orientation
            return img
        return ImageOps.exif_transpose(img)
    except Exception as e:  # a malformed EXIF block
        raise ValueError(f"{field}: cannot read the image's EXIF orientation ({type(e).__name__}: {e})") from None


def open_image(image, field: str, limits: Limits = DEFAULT_LIMITS):
    """A path -> the decoded PIL image, EXIF orientation applied (``ValueError`` naming ``field`` if missing,
    unreadable, corrupt, truncated, or larger than ``limits.max_input_pixels``, checked from the header before
    decoding); a PIL image is size-checked and oriented; anything else is returned as it is."""
    if isinstance(image, Image.Image):
        check_pixels(image.width, image.height, field, limits)
        return _orient(image, field)
    if not isinstance(image, (str, Path)):
        return image
    path = check_file(image, field)
    try:
        img = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own bound (2 x Image.MAX_IMAGE_PIXELS), from the header
        raise ValueError(f"{field}: {str(path)!r} is too large to decode ({e}); the limit for input images is "
                         f"{limits.max_input_pixels} pixels (limits.max_input_pixels)") from None
    except Exception as e:  # not an image, or a header no decoder accepts
        raise ValueError(f"{field}: cannot read {str(path)!r} as an image ({type(e).__name__}: {e})") from None
    check_pixels(img.width, img.height, field, limits)
    try:
        img.load()
    except Exception as e:  # truncated or corrupt data: decoders raise OSError, SyntaxError, EOFError, zlib errors...
        raise ValueError(f"{field}: cannot decode {str(path)!r} ({type(e).__name__}: {e})") from None
    return _orient(img, field)


def rgb_array(img: Image.Image, field: str) -> np.ndarray:
    """A PIL image -> ``(H, W, 3)`` float32 RGB in [0, 1]: 16-bit grayscale at its real values (/65535),
    transparency composited over white, grayscale and palette images expanded to RGB."""
    alpha = None
    try:
        if img.mode in _SIXTEEN_BIT:
            a = np.asarray(img)
            gray = np.clip(a.astype(np.float32) / 65535.0, 0.0, 1.0)
            key = img.info.get("transparency")
            if isinstance(key, int):  # a tRNS grey key: pixels of exactly that value are transparent
                alpha = (a != key).astype(np.float32)[..., None]
            rgb = np.repeat(gray[..., None], 3, axis=-1)
        elif img.mode == "F":  # 32-bit float samples: taken as [0, 1] intensities
            gray = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
            rgb = np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=-1)
        elif "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
            x = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
            rgb, alpha = x[..., :3], x[..., 3:]
        else:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except ValueError as e:  # a mode Pillow cannot convert to RGB (e.g. LAB)
        raise ValueError(f"{field}: cannot convert a {img.mode} image to RGB ({e})") from None
    if alpha is not None:
        rgb = rgb * alpha + (1.0 - alpha)  # over white
    return np.ascontiguousarray(rgb, dtype=np.float32)


def load_rgb(image, field: str, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """A path or PIL image -> ``(3, H, W)`` float32 RGB in [0, 1] on CPU, read by :func:`open_image` and
    :func:`rgb_array` (orientation, 16-bit, transparency, size limit)."""
    img = open_image(image, field, limits)
    if not isinstance(img, Image.Image):
        raise ValueError(f"{field}: unsupported type {type(img).__name__} (a PIL image or a path)")
    return torch.from_numpy(rgb_array(img, field)).permute(2, 0, 1)


def resize_whole(x: torch.Tensor, height: int, width: int | None = None) -> torch.Tensor:
    """``(3, H, W)`` or ``(B, 3, H, W)`` in [0, 1] resized whole to ``height x width`` (default square): bicubic,
    antialiased (as Pillow's bicubic resize), no crop, so a non-matching aspect ratio is stretched. Clamped to
    [0, 1] (bicubic overshoots at edges)."""
    width = height if width is None else width
    if tuple(x.shape[-2:]) == (height, width):
        return x
    batch = x[None] if x.ndim == 3 else x
    out = F.interpolate(batch, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    out = out.clamp(0, 1)
    return out[0] if x.ndim == 3 else out


def _array_tensor(a: np.ndarray, field: str) -> torch.Tensor:
    """An ``(H, W, 3)`` uint8 array, or a float one in [0, 1] -> ``(3, H, W)`` float32 tensor in [0, 1]."""
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{field}: array must be (H, W, 3) RGB, got shape {a.shape}")
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255.0
    if a.dtype.kind != "f":
        raise ValueError(f"{field}: array must be uint8 or float in [0, 1], got {a.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(f"{field}: a float array must hold finite values in [0, 1]")
    return x


def load_image_tensor(image, field: str, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """PIL image, path, ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in [0, 1], or ``(H, W, 3)`` numpy array (uint8, or
    float in [0, 1]: what ``np.asarray`` of an RGB image gives) -> ``(1, 3, H, W)`` float32 in [0, 1] on CPU at its
    own size. Images are read as :func:`rgb_array` describes; ``ValueError`` naming ``field`` otherwise."""
    if image is None:
        raise ValueError(f"{field}: missing (give a PIL image, a path, a tensor or an array)")
    if isinstance(image, np.ndarray):
        image = _array_tensor(image, field)
    image = open_image(image, field, limits)
    if isinstance(image, Image.Image):
        x = torch.from_numpy(rgb_array(image, field)).permute(2, 0, 1)[None]
    elif isinstance(image, torch.Tensor):
        if image.ndim not in (3, 4) or tuple(image.shape[-3:-2]) != (3,) or (image.ndim == 4 and image.shape[0] != 1):
            raise ValueError(f"{field}: tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        check_pixels(image.shape[-1], image.shape[-2], field, limits)
        x = image.detach().float().cpu()
        x = x[None] if x.ndim == 3 else x
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{field}: tensor holds NaN or inf")
    else:
        raise ValueError(f"{field}: unsupported type {type(image).__name__} (PIL image, path, tensor or array)")
    h, w = x.shape[-2:]
    if min(h, w) < 8:
        raise ValueError(f"{field}: {w}x{h} is too small")
    return x.clamp(0, 1).contiguous()


def image_tensor(image, height: int, width: int, field: str, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """An image as :func:`load_image_tensor` reads it -> ``(1, 3, height, width)`` float32 on CPU, resized when its
    aspect ratio matches the generation size (within 2%), an error otherwise: never a silent crop or stretch."""
    x = load_image_tensor(image, field, limits)
    h, w = x.shape[-2:]
    if abs(w / h - width / height) > 0.02 * (width / height):
        raise ValueError(f"{field}: aspect ratio of {w}x{h} does not match the generation size {width}x{height}")
    if (h, w) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` RGB -> ``(..., 1, H, W)`` luma with ITU-R 601-2 weights (Pillow's ``convert("L")``)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)
    return (x * w).sum(-3, keepdim=True)


def mask_tensor(mask, field: str = "mask", limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """An inpainting mask -> ``(1, 1, H, W)`` float32 grey levels in [0, 1] on CPU at its own size (white = repaint;
    the pipelines binarize at 0.5, as diffusers' mask processor does).

    Takes a PIL image or a path (any mode: RGB and palette images count by their luma, as Pillow's ``convert("L")``,
    what diffusers reads; 16-bit grey at its real values; transparent pixels count as black, i.e. keep: a mask
    painted on a transparent layer repaints where it was painted, whatever colour the editor stored under the
    transparency), a numpy array ``(H, W)`` or ``(H, W, 3)`` (bool, uint8, or float in [0, 1]) or a tensor
    ``(H, W)``, ``(1, H, W)``, ``(1, 1, H, W)``, ``(3, H, W)`` or ``(1, 3, H, W)`` in [0, 1]."""
    if mask is None:
        raise ValueError(f"{field}: missing (give a PIL image, a path, a tensor or an array; white = repaint)")
    if isinstance(mask, np.ndarray):
        a = mask
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[..., 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
            raise ValueError(f"{field}: array must be (H, W) or (H, W, 3), got shape {mask.shape}")
        if a.dtype == np.uint8 and a.ndim == 3:  # RGB: Pillow's own luma, as a PIL image would be read
            a = np.array(Image.fromarray(np.ascontiguousarray(a)).convert("L"))
        if a.dtype == np.bool_:
            x = torch.from_numpy(np.ascontiguousarray(a)).float()
        elif a.dtype == np.uint8:
            x = torch.from_numpy(np.ascontiguousarray(a)).float() / 255.0
        elif a.dtype.kind == "f":
            x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        else:
            raise ValueError(f"{field}: array must be bool, uint8 or float in [0, 1], got {a.dtype}")
        mask = x if x.ndim == 2 else x.permute(2, 0, 1)  # checked as a tensor below
    mask = open_image(mask, field, limits)
    if isinstance(mask, Image.Image):
        img = mask
        try:
            if img.mode in _SIXTEEN_BIT:
                x = torch.from_numpy(np.clip(np.asarray(img).astype(np.float32) / 65535.0, 0.0, 1.0))[None]
            elif img.mode == "F":
                a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
                x = torch.from_numpy(np.clip(a, 0.0, 1.0))[None]
            else:
                if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
                    over = Image.new("RGBA", img.size, (0, 0, 0, 255))
                    img = Image.alpha_composite(over, img.convert("RGBA"))
                x = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[None]
        except ValueError as e:  # a mode Pillow cannot convert (e.g. LAB)
            raise ValueError(f"{field}: cannot convert a {img.mode} image to grey levels ({e})") from None
        return x[None].contiguous()
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{field}: unsupported type {type(mask).__name__} (PIL image, path, tensor or array)")
    x = mask.detach().float().cpu()
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"{field}: tensor must be (H, W), (1, H, W), (3, H, W) or (1, C, H, W), got "
                         f"{tuple(mask.shape)}")
    check_pixels(x.shape[-1], x.shape[-2], field, limits)
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(f"{field}: values must be finite and in [0, 1]")
    if x.shape[0] == 3:
        x = _gray(x)
    return x[None].contiguous()
