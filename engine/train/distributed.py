"""Data-parallel training: ``torch.distributed`` + ``DistributedDataParallel``, started by ``torchrun`` or
``accelerate launch``.

Nothing here is a process group or a gradient sync of its own. The launcher starts the processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment (``accelerate launch``
starts them through ``torch.distributed.run`` too); :func:`setup` joins the group they describe
(``init_process_group`` with ``env://``; NCCL on CUDA, gloo on CPU) unless the caller already did, and
:func:`wrap` hands the trainable parameters, gathered into one :class:`Trainable` module, to DDP, which averages
their gradients. Frozen weights are never wrapped. One process (``WORLD_SIZE`` unset or 1) is the single-process
trainer, unchanged.

The global micro-batch. With ``W`` processes and ``B`` samples per process, a micro-batch holds ``G = W·B``
samples: sample ``k`` of micro-batch ``m`` is number ``m·G + k`` of the epoch-wise shuffled stream (the
permutation of epoch ``e`` is seeded by the training seed and ``e`` alone), and rank ``r`` trains rows
``[r·B, (r+1)·B)`` (:meth:`Context.first_row`). Every random draw of a micro-batch (noise, timesteps, templates,
positives) is made for all ``G`` rows, in the single-process order, from the trainer's CPU generator, on every rank;
each rank keeps its own rows. Hence:

- every sample is trained once per epoch across the ranks, and a run is deterministic given the seed and ``G``;
- ``W`` processes × batch ``B`` train on the same samples with the same noise as one process × batch ``W·B``: DDP's
  mean of the per-rank mean losses is the batch mean, so the runs agree to float rounding;
- the generator's state and the data position (a function of the step) are the same on every rank, so a checkpoint
  written by rank 0 (with every rank's torch/CUDA RNG state gathered into it) resumes every rank exactly, and a run
  may resume on another number of processes when the global batch ``W·B`` stays the same.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=60)
"""Collective timeout of a process group :func:`setup` creates. The first PatchDPO run builds the quality-map cache
(each rank its shard, then a barrier) and every rank VAE-encodes the whole dataset before the first step: on the
paper's 50,000 images that outlasts NCCL's default 10 minutes."""

MIXED_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
"""Where ``accelerate launch --mixed_precision fp16|bf16`` (or its config file) puts the precision for the
processes it starts."""

_OWNED = False  # whether setup() created the process group (then shutdown() destroys it)


@dataclass(frozen=True)
class Context:
    """Where this process stands in the data-parallel run: ``rank`` of ``world_size`` processes, ``local_rank`` on
    its machine. ``Context()`` is the single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process: collectives and DDP are in use."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0

    def first_row(self, per_rank: int) -> int:
        """This rank's first row in a global micro-batch of ``world_size · per_rank`` rows."""
        return self.rank * per_rank

    def describe(self, batch_size: int, grad_accum: int, unit: str) -> str:
        """``"effective batch 16 pairs per optimizer step = 2 per device × accumulation 1 × 8 processes"``."""
        n = batch_size * grad_accum * self.world_size
        procs = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        return (f"effective batch {n} {unit} per optimizer step = {batch_size} per device × accumulation "
                f"{grad_accum} × {procs}")

    def _device_ids(self):
        return [torch.cuda.current_device()] if dist.get_backend() == "nccl" else None

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(device_ids=self._device_ids())

    def all_gather(self, obj) -> list:
        """``obj`` of every rank (picklable), in rank order; ``[obj]`` for one process."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (picklable)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean over the ranks of each of ``values`` (float64 sum, divided by the world size): for logging.
        One process: ``values`` unchanged."""
        if not self.enabled:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return (t / self.world_size).tolist()


SINGLE = Context()


def _env_int(name: str, default: int, low: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}: the launcher's environment variable must be an integer, got {raw!r}") from None
    if value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    return value


def env_context() -> Context:
    """The :class:`Context` the launcher's environment describes (or the running process group's), without
    joining anything: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0, 0))
    world = _env_int("WORLD_SIZE", 1, 1)
    rank = _env_int("RANK", 0, 0)
    if rank >= world:
        raise ValueError(f"RANK: {rank} is not below WORLD_SIZE {world}")
    return Context(rank, world, _env_int("LOCAL_RANK", 0, 0))


def rank_device(device: str | None, ctx: Context | None = None) -> str | None:
    """The device this rank's engine runs on: with several processes, ``None`` or ``"cuda"`` becomes
    ``"cuda:LOCAL_RANK"`` (one GPU per process; ``cuda:0`` when the launcher left each process one visible GPU).
    Anything else is kept as given."""
    ctx = ctx or env_context()
    if not ctx.enabled or not torch.cuda.is_available() or device not in (None, "cuda"):
        return device
    return f"cuda:{ctx.local_rank if ctx.local_rank < torch.cuda.device_count() else 0}"


def setup(device: torch.device | str) -> Context:
    """Join the launcher's process group (``env://``; NCCL for a CUDA ``device``, gloo for CPU) when there are
    several processes and no group exists yet; return this process's :class:`Context`. One process: ``SINGLE``,
    nothing initialized."""
    global _OWNED
    ctx = env_context()
    if not ctx.enabled:
        return SINGLE
    dev = torch.device(device)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT)
        _OWNED = True
    return Context(dist.get_rank(), dist.get_world_size(), ctx.local_rank)


def shutdown() -> None:
    """Destroy the process group if :func:`setup` created it (the CLI calls this once training is over)."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


class Trainable(torch.nn.Module):
    """The trainable parameters as one module: the unit DDP wraps (and broadcasts from rank 0 at the start). Its
    forward runs ``compute()``, the micro-batch loss, so DDP sees the forward it prepares the gradient reduction
    for; the frozen networks it calls are not part of it."""

    def __init__(self, modules: dict[str, torch.nn.Module] | None = None,
                 params: dict[str, torch.nn.Parameter] | None = None):
        super().__init__()
        for name, m in (modules or {}).items():
            self.add_module(name, m)
        for name, p in (params or {}).items():
            self.register_parameter(name, p)

    def forward(self, compute: Callable[[], object]):
        return compute()


def wrap(module: Trainable, ctx: Context) -> torch.nn.Module:
    """``module`` in DDP when ``ctx`` has several processes (gradients averaged over the ranks during backward,
    parameters broadcast from rank 0 now); ``module`` itself for one process. The trainable parts hold no buffers,
    so DDP's per-forward buffer sync has nothing to send."""
    if not ctx.enabled:
        return module
    return torch.nn.parallel.DistributedDataParallel(module)


def no_sync(model: torch.nn.Module, last: bool):
    """Gradient accumulation: DDP's ``no_sync()`` for every micro-batch but the ``last`` of an optimizer step (the
    gradients are reduced once, on the last backward); a no-op for one process."""
    if last or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def launcher_mixed_precision(mode: str) -> str:
    """The trainer's ``mixed_precision``: ``mode`` as given, except that ``auto`` takes the launcher's standard switch
    when it asks for fp16 or bf16 (``accelerate launch --mixed_precision bf16`` sets ``ACCELERATE_MIXED_PRECISION``).
    ``no`` from the launcher is accelerate's default whether asked for or not, so it leaves ``auto`` alone: give
    ``--mixed-precision no`` for fp32 on CUDA. ``torchrun`` has no such switch: ``--mixed-precision`` is it."""
    launcher = os.environ.get(MIXED_PRECISION_ENV, "").strip().lower()
    if mode == "auto" and launcher in ("fp16", "bf16"):
        return launcher
    return mode


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for one-machine runs started from Python: tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


__all__ = ["SINGLE", "TIMEOUT", "Context", "Trainable", "env_context", "free_port", "launcher_mixed_precision",
           "no_sync", "rank_device", "setup", "shutdown", "wrap"]
