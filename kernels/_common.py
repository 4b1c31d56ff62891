"""Helpers shared by the kernel files: when to run Triton, and autotune pinning.

Kept tiny on purpose: every kernel file stays readable top to bottom on its own.
"""

from __future__ import annotations

import os
import sys

import torch

try:  # triton is Linux-only; without it every op runs its PyTorch reference.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on platforms without triton
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``), i.e. on CPU tensors.

    Note that Triton reads the variable when a ``@triton.jit`` function is defined, so it must be
    set before ``dreamfuse.kernels`` is imported (tests/conftest.py does this).
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_disabled() -> bool:
    """``DREAMFUSE_DISABLE_KERNELS=1`` switches every op to its PyTorch reference."""
    return os.environ.get("DREAMFUSE_DISABLE_KERNELS", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernel for tensor ``t``: on CUDA, or on CPU under the interpreter."""
    if not HAS_TRITON or kernels_disabled():
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def pin_configs() -> bool:
    """Autotuning is off (first config only) under the interpreter and under pytest, for speed and
    reproducibility; ``DREAMFUSE_AUTOTUNE=1`` forces it back on."""
    if os.environ.get("DREAMFUSE_AUTOTUNE", "0") not in ("", "0"):
        return False
    # `pytest` in sys.modules: kernels are defined at import, which under pytest is collection time.
    return interpreting() or "pytest" in sys.modules


def check(cond: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless ``cond``: launchers validate before any kernel runs."""
    if not cond:
        raise ValueError(msg)
