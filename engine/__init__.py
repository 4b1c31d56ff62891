"""dreamfuse engine: model loading, attention processors, pipelines, trainers, CLI.

``Engine`` and ``EngineConfig`` are imported on first use, so that importing a torch-free part of the package
(the CLI's entry point, ``relation_prompts``, ``validation``) does not import torch.
"""

from __future__ import annotations

__all__ = ["Engine", "EngineConfig", "Limits"]


def __getattr__(name: str):
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "EngineConfig":
        from .config import EngineConfig

        return EngineConfig
    if name == "Limits":
        from .limits import Limits

        return Limits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
