"""Pieces the trainers share: config checks, mixed-precision resolution, the output folder and checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..files import torch_save_atomic
from ..validation import check_number, is_int

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
CHECKPOINT_DIR = "checkpoints"

RESUMABLE_CHANGES = frozenset({"steps", "resume", "progress", "checkpoint_every"})
"""Config fields a resumed run may change: more (or fewer) steps extend (or end) the run, the others only
say where to read from, what to show and how often to save. Any other difference means the checkpoint's
optimizer state and loss history belong to another run."""


def check_int(value, field: str, *, low: int = 1) -> int:
    """An integer (bool refused) ``>= low``; ``ValueError`` naming ``field``."""
    if not is_int(value):
        raise ValueError(f"{field}: must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{field}: must be >= {low}, got {value!r}")
    return value


def check_choice(value, field: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{field}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_numbers(cfg, bounds: dict) -> None:
    """``bounds``: field -> keyword arguments of :func:`~dreamfuse.engine.validation.check_number` (finite
    numbers only: NaN and inf are refused whatever the bounds)."""
    for name, kw in bounds.items():
        check_number(getattr(cfg, name), name, **kw)


def check_resolution_and_resume(cfg) -> None:
    """The two fields every trainer config shares beyond numbers: ``resolution`` (None or a multiple of 8) and
    ``resume`` (None, ``"latest"`` or a checkpoint path)."""
    if cfg.resolution is not None:
        check_int(cfg.resolution, "resolution", low=8)
        if cfg.resolution % 8:
            raise ValueError(f"resolution: must be a multiple of 8, got {cfg.resolution!r}")
    if cfg.resume is not None and not isinstance(cfg.resume, str):
        raise ValueError(f"resume: must be 'latest' or a checkpoint path, got {cfg.resume!r}")


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``mode``: ``auto`` = bf16 (fp16 without bf16 support) on CUDA, none on CPU."""
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision: fp16 autocast needs CUDA (use 'no' or 'bf16' on CPU)")
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]


def output_folder(out, field: str = "out") -> Path:
    """The trainer's output folder (created later): refused when a file (or anything but a folder) is in the
    way, before any model is loaded."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{field}: {str(out)!r} exists and is not a folder")
    return path


def latest_checkpoint(out: Path) -> Path | None:
    """The newest ``OUT/checkpoints/step-*.pt``, or None."""
    found = sorted((out / CHECKPOINT_DIR).glob("step-*.pt"))
    return found[-1] if found else None


def resume_path(resume: str | None, out: Path) -> Path | None:
    """The checkpoint ``resume`` names: ``"latest"`` = the newest in ``OUT/checkpoints`` (None when there is
    none: a fresh start), a file path (``FileNotFoundError`` when missing), or None."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(out)
    path = Path(resume).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"resume: checkpoint {str(resume)!r} does not exist")
    return path


def shared_resume_path(resume: str | None, out: Path, dist) -> Path | None:
    """:func:`resume_path` on every rank of a data-parallel run (``dist``, a
    :class:`~dreamfuse.engine.train.distributed.Context`), rank 0's choice binding: a rank that resolves
    ``"latest"`` to another checkpoint (or none) does not see rank 0's ``OUT`` (``ValueError``: ``OUT`` must be a
    folder that every machine shares)."""
    mine = resume_path(resume, out)
    name = None if mine is None else str(mine)
    chosen = dist.broadcast(name)
    if name != chosen:
        raise ValueError(f"resume: rank {dist.rank} finds {name or 'no checkpoint'} in {str(out)!r} but rank 0 "
                         f"resumes from {chosen or 'no checkpoint'}; OUT must be a folder every machine shares")
    return mine


def _rng_state() -> dict:
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def write_checkpoint(trainer, weights: dict) -> Path:
    """Write ``OUT/checkpoints/step-NNNNNNN.pt`` atomically (:func:`~dreamfuse.engine.files.torch_save_atomic`):
    the trainer's ``weights`` entries plus what makes a resumed run continue exactly (step, optimizer, gradient
    scaler, the CPU sampling generator, torch and CUDA RNG states, loss history, config). ``trainer`` has
    ``out``, ``step``, ``optimizer``, ``scaler``, ``generator``, ``losses`` and ``cfg`` (a dataclass), and ``dist``
    (a :class:`~dreamfuse.engine.train.distributed.Context`; absent = one process).

    Data-parallel runs: every rank calls this (a collective); the torch/CUDA RNG states of all ranks are gathered
    into ``ranks`` (rank 0's are also the top-level ones), ``world_size`` is recorded, rank 0 alone writes, and no
    rank returns before the file is complete. The generator, the weights and the optimizer are the same on every
    rank (the same draws, DDP-averaged gradients), so rank 0's stand for all."""
    from .distributed import SINGLE

    ctx = getattr(trainer, "dist", SINGLE)
    ranks = ctx.all_gather(_rng_state())
    path = trainer.out / CHECKPOINT_DIR / f"step-{trainer.step:07d}.pt"
    if ctx.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": trainer.step, **weights,
            "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
            "generator": trainer.generator.get_state(), **ranks[0],
            "losses": list(trainer.losses), "config": dataclasses.asdict(trainer.cfg),
            "world_size": ctx.world_size, "ranks": ranks,
        }
        torch_save_atomic(state, path)
    ctx.barrier()
    return path


def read_checkpoint(path: Path, kind: str, weights_key: str) -> dict:
    """Load a checkpoint written by :func:`write_checkpoint` (``ValueError`` when unreadable or not a ``kind``
    checkpoint, i.e. without ``weights_key``)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"resume: cannot read checkpoint {str(path)!r} ({type(e).__name__}: {e})") from None
    if (not isinstance(state, dict) or weights_key not in state or "optimizer" not in state
            or not isinstance(state.get("config"), dict)):
        raise ValueError(f"resume: {str(path)!r} is not a {kind} checkpoint")
    return state


def check_resume_config(saved: dict, cfg, source: str, ignore=RESUMABLE_CHANGES,
                        world: tuple[int, int] = (1, 1)) -> None:
    """Refuse to resume with other hyper-parameters than the checkpoint's: ``ValueError`` listing every field
    that differs (``lr: 0.002 in the checkpoint, 0.001 now``), except the ``ignore`` fields. A field this version
    has and the checkpoint lacks counts as a difference (the run that wrote it may have behaved otherwise).

    ``world``: the number of processes that wrote the checkpoint and that resume it. When they differ,
    ``batch_size`` (per process) may differ too as long as the global micro-batch ``batch_size × processes`` is the
    same: the samples, the noise and the data position are functions of that alone (see
    :mod:`~dreamfuse.engine.train.distributed`)."""
    now = dataclasses.asdict(cfg)
    diffs = []
    then_w, now_w = world
    if then_w != now_w and "batch_size" in saved and "batch_size" in now:
        ignore = frozenset(ignore) | {"batch_size"}
        if saved["batch_size"] * then_w != now["batch_size"] * now_w:
            diffs.append(f"batch_size × processes: {saved['batch_size']} × {then_w} in the checkpoint, "
                         f"{now['batch_size']} × {now_w} now")
    for name, value in now.items():
        if name in ignore:
            continue
        if name not in saved:
            diffs.append(f"{name}: not recorded in the checkpoint, {value!r} now")
        elif saved[name] != value:
            diffs.append(f"{name}: {saved[name]!r} in the checkpoint, {value!r} now")
    diffs += [f"{name}: {saved[name]!r} in the checkpoint, unknown now" for name in saved
              if name not in now and name not in ignore]
    if diffs:
        raise ValueError(f"resume: {source} was trained with other settings ({'; '.join(diffs)}); resume with the "
                         "checkpoint's settings or start a new output folder")


def checkpoint_world_size(state: dict) -> int:
    """The number of processes that wrote a checkpoint (1 for checkpoints from before data parallelism)."""
    return int(state.get("world_size", 1))


def restore_training_state(trainer, state: dict) -> None:
    """Put back what :func:`write_checkpoint` saved besides the weights: rank ``r`` takes the torch/CUDA RNG state
    of rank ``r`` (of ``r mod`` the writing run's process count, when that differed)."""
    from .distributed import SINGLE

    ctx = getattr(trainer, "dist", SINGLE)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.generator.set_state(state["generator"])
    ranks = state.get("ranks") or [state]
    mine = ranks[ctx.rank % len(ranks)]
    torch.set_rng_state(mine["torch_rng"])
    if mine["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda_rng"])
    trainer.step = int(state["step"])
    trainer.losses = list(state["losses"])
