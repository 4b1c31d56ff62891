"""Validation shared by the library and the CLI, importable without torch: embedded model names, devices,
seeds, finite numbers, prompt text. Every error is a ``ValueError`` whose message starts with the field name."""

from __future__ import annotations

import math
import re

TINY_NAMES = ("tiny", "tiny-xl")
"""The embedded models (seeded random weights, built on load)."""
SYNTHETIC_NAMES = ("random-sd15", "random-sdxl")
"""Random weights in the real SD 1.5 / SDXL architectures, for benchmarks."""
BUNDLED_NAMES = ("shapes",)
"""Trained models shipped as package data (diffusers folders under ``dreamfuse/engine/assets``): ``shapes``, the
shapes world's model (``python -m tools.train_shapes``)."""
EMBEDDED_MODELS = TINY_NAMES + SYNTHETIC_NAMES + BUNDLED_NAMES
DTYPE_NAMES = ("fp32", "float32", "float", "fp16", "float16", "half", "bf16", "bfloat16")
DEVICE_TYPES = ("cpu", "cuda")
SEED_MAX = 2**64 - 1
"""torch generators take unsigned 64-bit seeds."""

_DEVICE = re.compile(r"(cpu|cuda)(:(\d+))?")


def check_device(device: str | None, field: str = "device") -> str | None:
    """``None`` (auto), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` with that GPU present. Other device types
    (``meta``, ``mps``, typos such as ``gpu0``) are refused: the pipelines run on CPU and CUDA."""
    if device is None:
        return None
    text = str(device).strip().lower()
    m = _DEVICE.fullmatch(text)
    if m is None:
        raise ValueError(f"{field}: unknown or unsupported device {device!r} (use cpu, cuda or cuda:N)")
    if m.group(1) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{field}: {device!r} requested but CUDA is not available on this machine")
        if m.group(3) is not None and int(m.group(3)) >= torch.cuda.device_count():
            raise ValueError(f"{field}: {device!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return text


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_seed(seed, field: str = "seed") -> int:
    if not is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{field}: must be an integer in [0, 2**64), got {seed!r}")
    return seed


def check_number(value, field: str, *, low: float | None = None, low_open: bool = False,
                 high: float | None = None) -> float:
    """A finite real number (bool, NaN and inf refused), optionally bounded; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{field}: must be a finite number, got {value!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{field}: must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and v > high:
        raise ValueError(f"{field}: must be <= {high:g}, got {value!r}")
    return v


def check_text(text, field: str, max_chars: int | None = None) -> str:
    """A string that is valid Unicode text (no lone surrogates, as undecodable bytes on a command line become)
    and at most ``max_chars`` long."""
    if not isinstance(text, str):
        raise ValueError(f"{field}: must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field}: is not valid UTF-8 text (undecodable bytes?)") from None
    if max_chars is not None and len(text) > max_chars:
        raise ValueError(f"{field}: {len(text)} characters, the limit is {max_chars} (limits.max_prompt_chars)")
    if "\x00" in text:
        raise ValueError(f"{field}: contains a NUL character")
    return text
