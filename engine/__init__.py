"""dreamfuse engine: model loading, attention processors, pipelines, CLI."""

from .config import EngineConfig
from .engine import Engine

__all__ = ["Engine", "EngineConfig"]
