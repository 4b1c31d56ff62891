"""Pieces the trainers share: mixed-precision resolution and checkpoint discovery."""

from __future__ import annotations

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
