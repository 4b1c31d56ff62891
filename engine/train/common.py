"""Pieces the trainers share: mixed-precision resolution and checkpoints."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
CHECKPOINT_DIR = "checkpoints"


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``mode``: ``auto`` = bf16 (fp16 without bf16 support) on CUDA, none on CPU."""
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision: fp16 autocast needs CUDA (use 'no' or 'bf16' on CPU)")
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]


def latest_checkpoint(out: Path) -> Path | None:
    """The newest ``OUT/checkpoints/step-*.pt``, or None."""
    found = sorted((out / CHECKPOINT_DIR).glob("step-*.pt"))
    return found[-1] if found else None


def write_checkpoint(trainer, weights: dict) -> Path:
    """Write ``OUT/checkpoints/step-NNNNNNN.pt`` atomically: the trainer's ``weights`` entries plus what makes a
    resumed run continue exactly (step, optimizer, gradient scaler, the CPU sampling generator, torch and CUDA RNG
    states, loss history, config). ``trainer`` has ``out``, ``step``, ``optimizer``, ``scaler``, ``generator``,
    ``losses`` and ``cfg`` (a dataclass)."""
    folder = trainer.out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{trainer.step:07d}.pt"
    state = {
        "step": trainer.step, **weights,
        "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
        "generator": trainer.generator.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "losses": list(trainer.losses), "config": dataclasses.asdict(trainer.cfg),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, str(tmp))
    os.replace(tmp, path)
    return path


def read_checkpoint(path: Path, kind: str, weights_key: str) -> dict:
    """Load a checkpoint written by :func:`write_checkpoint` (``ValueError`` when unreadable or not a ``kind``
    checkpoint, i.e. without ``weights_key``)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"resume: cannot read checkpoint {str(path)!r} ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or weights_key not in state or "optimizer" not in state:
        raise ValueError(f"resume: {str(path)!r} is not a {kind} checkpoint")
    return state


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
