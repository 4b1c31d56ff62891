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


def shown_int(v: int) -> str:
    """An integer for a message; one of hundreds of digits is described (``a 5000-digit number``), not printed (and
    ``str`` of an int past ``sys.get_int_max_str_digits()`` digits would raise)."""
    if -10**30 < v < 10**30:
        return str(v)
    digits = v.bit_length() * 30103 // 100000 + 1  # log10(2) = 0.30103: exact or one too many
    if 10 ** (digits - 1) > abs(v):
        digits -= 1
    return f"a {digits}-digit number"


def shown(value, limit: int = 80) -> str:
    """``repr(value)`` for a message, an integer through :func:`shown_int` and anything else cut after ``limit``
    characters (a 100,000-character prompt or a 5000-digit seed is not echoed)."""
    if is_int(value):
        return shown_int(value)
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_int_arg(value, field: str, *, low: int | None = None, high: int | None = None) -> int:
    """An integer argument (``TypeError`` for anything else, bool included) in ``[low, high]`` (``ValueError``)."""
    if not is_int(value):
        raise TypeError(f"{field}: must be an integer, got {type(value).__name__} {shown(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"in [{low}, {high}]" if low is not None and high is not None
                  else f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"{field}: must be {bounds}, got {shown_int(value)}")
    return value


def check_flag(value, field: str, *, optional: bool = False) -> bool | None:
    """``True`` or ``False`` (or ``None`` with ``optional``): ``TypeError`` for anything else (``"no"`` is truthy)."""
    if not isinstance(value, bool) and not (optional and value is None):
        raise TypeError(f"{field}: must be True or False{' or None' if optional else ''}, got "
                        f"{type(value).__name__} {shown(value)}")
    return value


def check_callable(value, field: str) -> object:
    """``None`` or a callable (``TypeError`` for anything else, before any work: not at its first call)."""
    if value is not None and not callable(value):
        raise TypeError(f"{field}: must be callable or None, got {type(value).__name__} {shown(value)}")
    return value


def check_seed(seed, field: str = "seed") -> int:
    if not is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{field}: must be an integer in [0, 2**64), got {shown(seed)}")
    return seed


def check_number(value, field: str, *, low: float | None = None, low_open: bool = False,
                 high: float | None = None) -> float:
    """A finite real number (bool, NaN and inf refused), optionally bounded; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: must be a number, got {shown(value)}")
    try:
        v = float(value)
    except OverflowError:  # an int past float's range
        v = math.inf
    if not math.isfinite(v):
        raise ValueError(f"{field}: must be a finite number, got {shown(value)}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{field}: must be {'>' if low_open else '>='} {low:g}, got {shown(value)}")
    if high is not None and v > high:
        raise ValueError(f"{field}: must be <= {high:g}, got {shown(value)}")
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
