"""The kernel ops a pipeline calls, by backend.

``triton``: the ``dreamfuse.kernels`` ops (Triton on CUDA; on CPU they run their reference, or the Triton
interpreter when ``TRITON_INTERPRET=1``). ``torch``: the kernels' PyTorch references, called directly, so the
CPU path never goes through the interpreter even when a test process has it switched on.
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

_OPS = {
    "attention": "dreamfuse.kernels.attention",
    "ama_attention": "dreamfuse.kernels.attention",
    "match_argmax": "dreamfuse.kernels.matching",
    "cycle_mask": "dreamfuse.kernels.matching",
    "composite_blend": "dreamfuse.kernels.composite",
    "composite_latents": "dreamfuse.kernels.composite",
    "segment_fill": "dreamfuse.kernels.composite",
}


@functools.cache
def ops_for(backend: str) -> SimpleNamespace:
    """A namespace with one callable per op name in ``_OPS`` for ``backend`` (``"triton"`` or ``"torch"``)."""
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend: unknown backend {backend!r} (use 'triton' or 'torch')")
    table = {}
    for name, module in _OPS.items():
        mod = importlib.import_module(module)
        table[name] = getattr(mod, name if backend == "triton" else f"{name}_reference")
    return SimpleNamespace(**table)
