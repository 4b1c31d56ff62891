"""Samplers: diffusers' schedulers by name, one instance per call (or per server request), with per-row noise.

A :class:`Sampler` wraps one freshly configured diffusers scheduler (built ``from_config`` of the model's own
scheduler config, so the beta schedule, ``prediction_type`` and timestep spacing are the model's) and, for the
stochastic samplers, one CPU generator per row: row ``i`` draws its initial latent and then every step's noise
from its own seed's generator, exactly as diffusers' pipelines do with ``generator=[one per prompt]``. So an image
depends only on its prompt and seed, whatever batch it is generated in, for every sampler. No sampler math is
written here: stepping, noise and timesteps are the scheduler's.

What the pipelines that compute x̂0 or ε themselves (composite's subject-aware guidance) need is the same for all
samplers: the model sees ``c_t · x`` (``c_t = 1`` for DDIM/LCM/DPM-Solver/UniPC, ``1/sqrt(σ²+1)`` for the
Euler/Heun family, whose samples live in σ space) and that input is the variance-preserving ``sqrt(ᾱ_t)·x0 +
sqrt(1 − ᾱ_t)·ε``; :meth:`Sampler.vp_scale` and :meth:`Sampler.alpha_bar` give ``c_t`` and ``ᾱ_t``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads the table above without it
    import torch


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One entry of :data:`SAMPLERS`."""

    scheduler: str
    """The diffusers scheduler class."""
    options: dict
    """Keyword arguments given to ``from_config`` on top of the model's scheduler config."""
    steps: int
    """Its usual step count (what benchmarks and the README compare at)."""
    stochastic: bool = False
    """Draws noise at every step (from each row's own generator)."""
    history: bool = False
    """Keeps per-row state from earlier steps (multistep solvers, second-order stages): the rows of every step
    must be the same rows, which composite generation (segments merge into one latent) cannot give."""
    needs: str | None = None
    """A package it needs beyond dreamfuse's own requirements."""

    @property
    def description(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.scheduler}({opts})" if opts else self.scheduler


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec("DDIMScheduler", {}, 50),
    "dpmpp-2m": SamplerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, 25,
                            history=True),
    "dpmpp-2m-karras": SamplerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                                   "use_karras_sigmas": True}, 25, history=True),
    "dpmpp-2m-sde": SamplerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                "solver_order": 2}, 25, stochastic=True,
                                history=True),
    "dpmpp-sde": SamplerSpec("DPMSolverSDEScheduler", {}, 20, stochastic=True, history=True, needs="torchsde"),
    "dpmpp-sde-karras": SamplerSpec("DPMSolverSDEScheduler", {"use_karras_sigmas": True}, 20, stochastic=True,
                                    history=True, needs="torchsde"),
    "euler": SamplerSpec("EulerDiscreteScheduler", {}, 30),
    "euler-a": SamplerSpec("EulerAncestralDiscreteScheduler", {}, 30, stochastic=True),
    "unipc": SamplerSpec("UniPCMultistepScheduler", {}, 20, history=True),
    "lcm": SamplerSpec("LCMScheduler", {}, 4, stochastic=True),
    "heun": SamplerSpec("HeunDiscreteScheduler", {}, 25, history=True),
}
"""Sampler name -> diffusers scheduler. ``dpmpp-sde`` is diffusers' ``DPMSolverSDEScheduler`` (needs
``torchsde``); ``dpmpp-2m-sde`` the SDE variant of DPM-Solver++(2M). ``lcm`` is meant for LCM-distilled models
or an LCM-LoRA (4-8 steps, guidance 1-2); on other models it gives blurry images."""

DEFAULT_SAMPLER = "ddim"

STATELESS_SAMPLERS = tuple(name for name, spec in SAMPLERS.items() if not spec.history)
"""The samplers that keep no per-row state between steps (what composite generation accepts)."""


def check_sampler(name, field: str = "sampler", allowed: Sequence[str] | None = None) -> str:
    """``name`` as a key of :data:`SAMPLERS` (case-insensitive, ``_`` read as ``-``), or ``ValueError``."""
    if not isinstance(name, str):
        raise ValueError(f"{field}: must be a sampler name ({', '.join(SAMPLERS)}), got {name!r}")
    key = name.strip().lower().replace("_", "-")
    if key not in SAMPLERS:
        raise ValueError(f"{field}: unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if allowed is not None and key not in allowed:
        raise ValueError(f"{field}: {key!r} is not available here; choose one of {', '.join(allowed)}")
    return key


def noise_seed(seed: int) -> int:
    """The Brownian-tree seed of a row (DPM-SDE draws its noise from a tree, not a generator): the row's seed
    folded into the 63 bits the tree takes."""
    return int(seed) % (2**63 - 1)


class Sampler:
    """One call's (or one request's) sampler: a fresh scheduler set to ``steps`` and, for stochastic samplers,
    one generator per row.

    Args:
        name: a key of :data:`SAMPLERS`.
        base_config: the model's scheduler config (``engine.scheduler.config``).
        steps: denoising steps (Heun and DPM-SDE evaluate the model twice per step but the first).
        device: where the timesteps live (the engine's device).
        seeds: one per row; row ``i``'s generator is ``torch.Generator("cpu").manual_seed(seeds[i])``, used for its
            initial latent (:meth:`initial_latents`) and then for its step noise.
    """

    def __init__(self, name: str, base_config, steps: int, device, seeds: Sequence[int] = ()):
        import diffusers
        import torch

        self.name = check_sampler(name)
        self.spec = SAMPLERS[self.name]
        cls = getattr(diffusers, self.spec.scheduler)
        try:
            self.scheduler = cls.from_config(base_config, **self.spec.options)
        except ImportError as e:  # a scheduler whose optional package is missing
            raise ValueError(f"sampler: {self.name!r} needs the {self.spec.needs or 'missing'} package "
                             f"(pip install {self.spec.needs or ''})".rstrip() + f": {e}") from None
        self.scheduler.set_timesteps(int(steps), device=device)
        self.steps = int(steps)
        self.begin = 0
        """Index of the first model evaluation in the scheduler's timesteps (> 0 after :meth:`start_at_strength`)."""
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        if self.spec.scheduler == "DPMSolverSDEScheduler" and self.seeds:
            # one Brownian tree per row, seeded from the row's seed (diffusers' BatchedBrownianTree takes a list)
            self.scheduler.noise_sampler_seed = [noise_seed(s) for s in self.seeds]

    # ------------------------------------------------------------------------------------------- schedule
    @property
    def timesteps(self) -> torch.Tensor:
        """Every model evaluation's timestep, in order (``2·steps − 1`` of them for Heun and DPM-SDE; after
        :meth:`start_at_strength`, the tail of them that is left)."""
        return self.scheduler.timesteps[self.begin:]

    def start_at_strength(self, strength: float) -> int:
        """img2img: keep only the last ``int(steps · strength)`` steps of the schedule, as diffusers' img2img and
        inpainting pipelines do (``t_start = steps − int(steps · strength)``; the timesteps from ``t_start · order``
        on; ``set_begin_index`` so that σ-space schedulers index their sigmas from there). Returns the steps left
        (0 when ``steps · strength < 1``: the caller refuses that). Call it once, before any step."""
        keep = min(int(self.steps * strength), self.steps)
        t_start = max(self.steps - keep, 0)
        self.begin = t_start * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(self.begin)
        return self.steps - t_start

    @property
    def evaluations(self) -> int:
        return len(self.timesteps)

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.init_noise_sigma)

    def initial_latents(self, shape: Sequence[int], device, dtype, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Gaussian latents ``(len(rows), *shape)`` from each row's own generator (all rows by default), scaled by the
        scheduler's ``init_noise_sigma``: what diffusers' pipelines draw with ``generator=[...]``."""
        import torch

        rows = range(len(self.generators)) if rows is None else rows
        noise = [torch.randn(tuple(shape), generator=self.generators[i]) for i in rows]
        return torch.stack(noise).to(device, dtype) * self.scheduler.init_noise_sigma

    # ------------------------------------------------------------------------------------------- stepping
    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.scheduler.scale_model_input(x, t)

    def step(self, output: torch.Tensor, t, x: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """One scheduler step of ``x`` (rows in the order of :attr:`seeds`, or those named by ``rows``: the
        generator of each row, repeated where a row has several latents, e.g. a compose request's segments)."""
        kwargs = {}
        if self.spec.stochastic and self.spec.scheduler != "DPMSolverSDEScheduler":
            gens = self.generators if rows is None else [self.generators[i] for i in rows]
            if len(gens) != x.shape[0]:
                raise ValueError(f"sampler: {x.shape[0]} rows but {len(gens)} generators")
            kwargs["generator"] = gens
        return self.scheduler.step(output, t, x, return_dict=False, **kwargs)[0]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """``x0`` noised to timestep ``t`` in this sampler's sample space (σ space for the Euler family)."""
        import torch

        return self.scheduler.add_noise(x0, noise, torch.as_tensor(t).reshape(1))

    # ------------------------------------------------------------------------------------------- VP view
    def _sigma(self, t) -> torch.Tensor | None:
        import torch

        sched = self.scheduler
        if not hasattr(sched, "sigmas") or sched.config.get("use_flow_sigmas", False) \
                or not hasattr(sched, "index_for_timestep") or float(sched.init_noise_sigma) == 1.0:
            return None
        index = sched.step_index if sched.step_index is not None else sched.index_for_timestep(t)
        return sched.sigmas[index].to(torch.float32)

    def vp_scale(self, t) -> float:
        """``c_t`` with model input ``= c_t · x`` (what :meth:`scale_model_input` multiplies by)."""
        sigma = self._sigma(t)
        return 1.0 if sigma is None else float((sigma**2 + 1) ** -0.5)

    def alpha_bar(self, t) -> torch.Tensor:
        """``ᾱ_t`` of the model input at ``t`` (fp32 scalar tensor on CPU)."""
        import torch

        sigma = self._sigma(t)
        if sigma is not None:
            return (1.0 / (sigma.cpu() ** 2 + 1)).reshape(())
        return self.scheduler.alphas_cumprod[int(round(float(t)))].to(torch.float32).reshape(())


__all__ = ["DEFAULT_SAMPLER", "SAMPLERS", "STATELESS_SAMPLERS", "Sampler", "SamplerSpec", "check_sampler", "noise_seed"]
