"""Resource limits: what one call may ask for, checked before anything is allocated.

Every pipeline and loader checks its inputs against a :class:`Limits` (the engine's ``config.limits``, or the
defaults), so a careless or hostile request (``height=100000``, a 13000² PNG, a layout with 10,000 colours)
fails in milliseconds with a ``ValueError`` naming the field and the limit, instead of running for minutes or
exhausting memory. Raise a limit when your hardware and traffic allow it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .validation import is_int, shown


@dataclass(frozen=True)
class Limits:
    """Upper bounds on one call's inputs (``ValueError`` beyond them). Change with ``dataclasses.replace``."""

    max_side: int = 4096
    """Largest height or width of a generated image, in pixels."""

    max_pixels: int = 2048 * 2048
    """Largest ``height * width`` of a generated image (SDXL's native 1024² is a quarter of it)."""

    max_images: int = 64
    """Most images one call generates (prompts x images per prompt; compose: requests)."""

    max_steps: int = 1000
    """Most denoising steps (DDIM cannot take more than the model's 1000 training timesteps)."""

    max_segments: int = 64
    """Most segments (colours) one compose layout may list."""

    max_blur: float = 64.0
    """Largest compose mask blur radius, in latent pixels."""

    max_prompt_chars: int = 10_000
    """Longest prompt in characters (anything past the tokenizer's 77 tokens is dropped anyway; a warning
    says so)."""

    max_input_pixels: int = 50_000_000
    """Largest input image (reference, layout, scaffold, IP-Adapter image, training image) in pixels, checked
    from the file header before it is decoded (a 48-megapixel photo passes; a 13000² decompression bomb not)."""

    def validated(self) -> Limits:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"limits.{f.name}: must be a positive number, got {shown(v)}")
        return self


DEFAULT_LIMITS = Limits()


def check_size(height: int, width: int, factor: int, limits: Limits = DEFAULT_LIMITS,
               fields=("height", "width")) -> tuple[int, int]:
    """An image size: positive multiples of ``factor`` (the VAE's downsampling) within ``limits``."""
    for name, v in zip(fields, (height, width)):
        if not is_int(v) or v < factor or v % factor:
            raise ValueError(f"{name}: must be a positive multiple of {factor}, got {shown(v)}")
        if v > limits.max_side:
            raise ValueError(f"{name}: {shown(v)} pixels, the limit is {limits.max_side} (limits.max_side)")
    if height * width > limits.max_pixels:
        raise ValueError(f"{fields[0]}/{fields[1]}: {width}x{height} is {height * width} pixels, the limit is "
                         f"{limits.max_pixels} (limits.max_pixels)")
    return height, width
