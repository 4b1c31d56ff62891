"""EngineConfig: every knob of the engine, documented in one place."""

from __future__ import annotations

import dataclasses
import operator
import sys
import warnings
from dataclasses import dataclass, field

import torch

from .limits import DEFAULT_LIMITS, Limits
from .validation import check_device, shown

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
BACKENDS = ("triton", "torch")


class BackendFallbackWarning(UserWarning):
    """``backend="triton"`` was asked for where the kernels cannot run; the engine uses ``"torch"`` instead."""


def _triton_runs_on(dev: torch.device) -> bool:
    """Whether the kernel ops run their Triton code on ``dev`` (the rule of ``kernels._common.use_triton``): on
    CUDA, or on CPU under the Triton interpreter; never without triton."""
    from dreamfuse.kernels import _common

    return _common.HAS_TRITON and (dev.type == "cuda" or (dev.type == "cpu" and _common.interpreting()))


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"fp16"``/``"float16"``/``"half"``, ``"bf16"``/``"bfloat16"``, ``"fp32"``/``"float32"`` or a torch dtype."""
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ValueError(f"dtype: {value} is not supported (use fp16, bf16 or fp32)")
        return value
    try:
        return _DTYPES[str(value).lower()]
    except KeyError:
        raise ValueError(f"dtype: unknown dtype {value!r} (use one of fp16, bf16, fp32)") from None


@dataclass
class EngineConfig:
    """How the engine runs. ``None`` fields are resolved by :meth:`resolved` from the machine."""

    device: str | None = None
    """Torch device, e.g. ``"cuda"``, ``"cuda:1"``, ``"cpu"``. Default: CUDA when available, else CPU."""

    dtype: str | torch.dtype | None = None
    """Weights and activations dtype: ``fp16`` (default on CUDA), ``bf16``, ``fp32`` (default on CPU).
    fp16 on CPU is slow and loses precision; prefer fp32 there."""

    backend: str | None = None
    """Attention backend of the dreamfuse processors: ``"triton"`` (the fused kernels; default on CUDA) or
    ``"torch"`` (PyTorch SDPA and the kernels' PyTorch references; default on CPU). ``"triton"`` where the
    kernels cannot run -- on CPU without the Triton interpreter (``TRITON_INTERPRET=1``, a correctness tool, not a
    speed path), or without triton installed -- resolves to ``"torch"`` with a :class:`BackendFallbackWarning`:
    the ops would run their references there, whose attention builds the whole score matrix (+1.1 GB and +36 %
    time at 512²) where SDPA does not. Set the environment variable ``DREAMFUSE_DISABLE_KERNELS=1`` to force
    every kernel op onto its reference."""

    compile: bool = False
    """``torch.compile`` the UNet call (only the UNet: the rest stays eager and debuggable). The first calls
    for each batch size pay the compile time; see ``batch_buckets``."""

    cuda_graphs: bool = False
    """With ``compile``, use mode ``"reduce-overhead"`` (CUDA graphs). Cuts launch overhead at small batch;
    costs one graph per batch bucket in memory. Ignored on CPU."""

    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)
    """With ``compile``, UNet batches are padded up to the next bucket (in prompts) so a handful of compiled
    graphs serve every request size. Padding rows cost compute: keep buckets close to your traffic."""

    progress: bool | None = None
    """Show a progress bar over denoising steps. ``None``: only when stderr is a terminal."""

    limits: Limits = DEFAULT_LIMITS
    """Upper bounds on what one call may ask for (image size, images, steps, segments, prompt length, input
    image pixels), checked before any allocation; see :class:`~dreamfuse.engine.limits.Limits`."""

    extra: dict = field(default_factory=dict)
    """Free-form options read by later pipelines; unknown keys are ignored."""

    def resolved(self) -> EngineConfig:
        """A copy with every ``None`` filled in and every value validated (``ValueError`` naming the field)."""
        if self.device is not None and not isinstance(self.device, (str, torch.device)):
            raise ValueError(f"device: must be a string such as 'cuda' or 'cpu', got {self.device!r}")
        device = check_device(str(self.device), "device") if self.device is not None else (
            "cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(device)
        dtype = parse_dtype(self.dtype) if self.dtype is not None else (
            torch.float16 if dev.type == "cuda" else torch.float32)
        backend = self.backend or ("triton" if dev.type == "cuda" else "torch")
        if backend not in BACKENDS:
            raise ValueError(f"backend: unknown backend {backend!r} (use one of {', '.join(BACKENDS)})")
        if backend == "triton" and not _triton_runs_on(dev):
            warnings.warn(f"backend: the Triton kernels do not run on {dev.type} here (they need CUDA, or "
                          "TRITON_INTERPRET=1 on CPU, and triton installed); using backend 'torch' (SDPA) rather "
                          "than the kernels' references, which build the whole attention matrix",
                          BackendFallbackWarning, stacklevel=2)
            backend = "torch"
        try:  # integers only: int("8") or int(7.9) would read what a typo wrote
            buckets = tuple(sorted(operator.index(b) for b in self.batch_buckets if not isinstance(b, bool)))
        except TypeError:
            raise ValueError(f"batch_buckets: must be integers, got {shown(self.batch_buckets)}") from None
        if not buckets or buckets[0] < 1 or len(buckets) != len(self.batch_buckets):
            raise ValueError(f"batch_buckets: needs at least one bucket, all integers >= 1, got "
                             f"{shown(self.batch_buckets)}")
        progress = sys.stderr.isatty() if self.progress is None else bool(self.progress)
        if not isinstance(self.limits, Limits):
            raise ValueError(f"limits: must be a Limits, got {type(self.limits).__name__}")
        return dataclasses.replace(self, device=str(dev), dtype=dtype, backend=backend, batch_buckets=buckets,
                                   progress=progress, limits=self.limits.validated())
