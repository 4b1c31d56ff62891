"""The kernel ops a pipeline calls, by backend.

``triton``: the ``dreamfuse.kernels`` ops (Triton on CUDA; on CPU they run their reference, or the Triton
interpreter when ``TRITON_INTERPRET=1``). ``torch``: the kernels' PyTorch references, called directly, so the
CPU path never goes through the interpreter even when a test process has it switched on.
"""

from __future__ import annotations

import functools
import importlib

_OPS = {
    "attention": "dreamfuse.kernels.attention",
    "ama_attention": "dreamfuse.kernels.attention",
    "match_argmax": "dreamfuse.kernels.matching",
    "cycle_mask": "dreamfuse.kernels.matching",
    "composite_blend": "dreamfuse.kernels.composite",
    "composite_latents": "dreamfuse.kernels.composite",
    "segment_fill": "dreamfuse.kernels.composite",
}


class _Ops:
    """Resolves ``ops.<name>`` to the op (backend ``triton``) or its reference (``torch``) on first use."""

    def __init__(self, backend: str):
        self.backend = backend

    def __getattr__(self, name: str):
        try:
            module = _OPS[name]
        except KeyError:
            raise AttributeError(f"no kernel op named {name!r}") from None
        fn = getattr(importlib.import_module(module), name if self.backend == "triton" else f"{name}_reference")
        setattr(self, name, fn)  # cache: later lookups skip __getattr__
        return fn


@functools.cache
def ops_for(backend: str) -> _Ops:
    """The kernel ops for ``backend`` (``"triton"`` or ``"torch"``), e.g. ``ops_for("torch").match_argmax``."""
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend: unknown backend {backend!r} (use 'triton' or 'torch')")
    return _Ops(backend)
