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


def write_checkpoint(trainer, weights: dict) -> Path:
    """Write ``OUT/checkpoints/step-NNNNNNN.pt`` atomically (:func:`~dreamfuse.engine.files.torch_save_atomic`):
    the trainer's ``weights`` entries plus what makes a resumed run continue exactly (step, optimizer, gradient
    scaler, the CPU sampling generator, torch and CUDA RNG states, loss history, config). ``trainer`` has
    ``out``, ``step``, ``optimizer``, ``scaler``, ``generator``, ``losses`` and ``cfg`` (a dataclass)."""
    folder = trainer.out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": trainer.step, **weights,
        "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
        "generator": trainer.generator.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "losses": list(trainer.losses), "config": dataclasses.asdict(trainer.cfg),
    }
    return torch_save_atomic(state, folder / f"step-{trainer.step:07d}.pt")


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


def check_resume_config(saved: dict, cfg, source: str, ignore=RESUMABLE_CHANGES) -> None:
    """Refuse to resume with other hyper-parameters than the checkpoint's: ``ValueError`` listing every field
    that differs (``lr: 0.002 in the checkpoint, 0.001 now``), except the ``ignore`` fields. A field this version
    has and the checkpoint lacks counts as a difference (the run that wrote it may have behaved otherwise)."""
    now = dataclasses.asdict(cfg)
    diffs = []
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


def restore_training_state(trainer, state: dict) -> None:
    """Put back what :func:`write_checkpoint` saved besides the weights."""
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    trainer.step = int(state["step"])
    trainer.losses = list(state["losses"])
