"""Pipelines as programs: generators that *ask* for their UNet evaluations and VAE decodes instead of making them.

A pipeline program yields a :class:`UNetCall` (or a :class:`Decode`) and is sent back the result; it returns the
pipeline's output. :func:`drive` runs one program alone, each request through the engine: that is what
``engine.text2img(...)`` and the other pipeline calls do, so a program alone is exactly the pipeline. The server's
step scheduler (:mod:`dreamfuse.engine.server`) drives many programs at once instead: it merges the UNet calls of
programs whose rows fit together (same latent size and conditioning kind, no per-call layer handlers) into one
batched call with a per-row timestep (and per-row adapters), and gives each program its own rows of the output.
Nothing in a program depends on which rows it shared a call with, so a request's image is the one it gets alone,
within the rounding of batched matrix products.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..engine import Engine
    from ..processors import CallContext
    from .stepping import StepUpdate


@dataclass
class UNetCall:
    """One UNet evaluation a program needs: the arguments of :meth:`Engine.unet_call` plus what a scheduler needs
    to merge it with others and to report progress."""

    latents: torch.Tensor
    """``(rows, C, h, w)``: the model input (already ``scale_model_input``-ed)."""
    t: torch.Tensor | float | int
    """The timestep of every row (a scalar) or one per row ``(rows,)``."""
    embeddings: torch.Tensor
    ip_tokens: torch.Tensor | None = None
    ip_scale: float = 1.0
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    ctx: CallContext | None = None
    """Per-call layer handlers (personalize's AMA): such a call is never merged with another."""
    step: int | None = None
    """The sampling step this evaluation belongs to (``None``: not a sampling step, e.g. an inversion step)."""
    steps: int | None = None
    """Model evaluations of the sampling loop in all."""
    preview: tuple[slice, Any] | None = None
    """``(rows, alpha_bar)``: the rows whose x̂0 a preview may show (the conditional rows of the first image) and
    ``ᾱ_t`` of their input (or a zero-argument callable giving it, evaluated only for a preview, before the
    program steps on), or None."""
    update: StepUpdate | None = None
    """CFG and the sampler's update, when the program leaves them to whoever runs the call (:mod:`.stepping`):
    then the program is sent the new latents instead of the UNet's output."""
    adapters: Any = None
    """The rows' per-request LoRAs: an :class:`~dreamfuse.engine.adapters.AdapterSet` for every row, one entry per
    row (a merged call), or None. Calls merge whatever their adapters: each row keeps its own."""

    @property
    def rows(self) -> int:
        return int(self.latents.shape[0])

    def run(self, engine: Engine) -> torch.Tensor:
        with torch.no_grad():
            return engine.unet_call(self.latents, self.t, self.embeddings, self.ip_tokens, self.ip_scale,
                                    pooled=self.pooled, time_ids=self.time_ids, ctx=self.ctx, adapters=self.adapters)


@dataclass
class Decode:
    """A VAE decode a program needs: latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1] on CPU."""

    latents: torch.Tensor

    def run(self, engine: Engine) -> torch.Tensor:
        return engine.decode(self.latents)  # no_grad itself


Program = Generator["UNetCall | Decode", torch.Tensor, Any]


def drive(engine: Engine, program: Program):
    """Run ``program`` alone: every request it yields goes straight to the engine. Returns its result. The
    engine's model lock is held for reading meanwhile (a model change waits for the run to end)."""
    from ..concurrency import reading

    with reading(engine):
        try:
            request = next(program)
            while True:
                out = request.run(engine)
                update = getattr(request, "update", None)
                request = program.send(out if update is None else update.apply(out))
        except StopIteration as stop:
            return stop.value


def driven(program_fn: Callable[..., Program], name: str) -> Callable:
    """The pipeline function that runs ``program_fn``'s program alone (:func:`drive`): the same signature and
    documentation (``help()`` and ``inspect.signature`` show the program function's)."""

    @functools.wraps(program_fn)
    def pipeline(engine, *args, **kwargs):
        return drive(engine, program_fn(engine, *args, **kwargs))

    pipeline.__name__ = pipeline.__qualname__ = name
    return pipeline


__all__ = ["Decode", "Program", "UNetCall", "drive", "driven"]
