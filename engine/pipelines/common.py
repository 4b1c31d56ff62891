"""Input validation and small pieces shared by the pipelines (ValueErrors name the bad field).

Everything a request asks for is checked against the engine's :class:`~dreamfuse.engine.limits.Limits` before
any tensor is allocated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..limits import DEFAULT_LIMITS, Limits, check_size
from ..validation import SEED_MAX, check_number, check_seed, check_text, is_int, shown

if TYPE_CHECKING:
    from ..engine import Engine


class NonFiniteOutputError(ValueError):
    """The sampled latents or the decoded images hold NaN or inf: nothing is returned (a black image is not an
    answer). Usually a guidance scale far too large for the model, or a broken checkpoint."""


def as_prompt_list(prompts: str | Sequence[str], field: str = "prompts", limits: Limits = DEFAULT_LIMITS) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence):
        raise ValueError(f"{field}: give a string or a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{field}: at least one prompt is needed")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"{field}: every prompt must be a string, got {type(p).__name__}")
        check_text(p, field if len(prompts) == 1 else f"{field}[{i}]", limits.max_prompt_chars)
    return prompts


def check_prompts(prompts: Sequence[str], field: str, limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """The CLI's early check of prompt text (the same rules the pipelines apply)."""
    return as_prompt_list(list(prompts), field, limits)


def check_batch(n: int, limits: Limits, field: str = "prompts") -> int:
    if n > limits.max_images:
        raise ValueError(f"{field}: {n} images in one call, the limit is {limits.max_images} (limits.max_images)")
    return n


def resolve_seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
    """``None``: fresh random seeds; an int ``s``: prompt i gets ``s + i``; a list: one seed per prompt. Every
    seed must lie in [0, 2**64) (what torch generators take)."""
    from ..engine import random_seed

    if seed is None:
        base = random_seed()
        return [base + i for i in range(n)]
    if is_int(seed):
        check_seed(seed)
        if seed + n - 1 > SEED_MAX:
            raise ValueError(f"seed: {shown(seed)} + {n - 1} (one seed per image) passes 2**64 - 1")
        return [seed + i for i in range(n)]
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        raise ValueError(f"seed: give an int or one int per prompt ({n}), got {shown(seed)}")
    seeds = list(seed)
    if len(seeds) != n:
        raise ValueError(f"seed: give an int or exactly one int per prompt ({n}), got {len(seeds)}")
    return [check_seed(s, f"seed[{i}]") for i, s in enumerate(seeds)]


def check_steps(steps: int, field: str = "steps", limits: Limits = DEFAULT_LIMITS) -> int:
    if not is_int(steps) or steps < 1:
        raise ValueError(f"{field}: must be an integer >= 1, got {shown(steps)}")
    if steps > limits.max_steps:
        raise ValueError(f"{field}: {shown(steps)}, the limit is {limits.max_steps} (limits.max_steps)")
    return steps


def check_model_steps(engine: Engine, steps: int, field: str = "steps") -> int:
    """At most ``num_train_timesteps - steps_offset`` steps: one more and the schedule's first timestep falls off
    the model's training range (diffusers' DDIM at 1000 steps on SD's config indexes ᾱ[1000])."""
    cfg = engine.scheduler.config
    most = int(cfg.get("num_train_timesteps", 1000)) - int(cfg.get("steps_offset", 0) or 0)
    if steps > most:
        raise ValueError(f"{field}: {steps}, this model's scheduler samples at most {most} steps "
                         f"({cfg.get('num_train_timesteps', 1000)} training timesteps, steps_offset "
                         f"{cfg.get('steps_offset', 0)})")
    return steps


def check_guidance(guidance_scale: float, field: str = "guidance_scale") -> float:
    return check_number(guidance_scale, field, low=0)


def resolve_size(engine: Engine, height: int | None, width: int | None) -> tuple[int, int]:
    h = engine.default_size if height is None else height
    w = engine.default_size if width is None else width
    return check_size(h, w, engine.vae_scale_factor, engine.config.limits)


def cfg_combine(eps: torch.Tensor, n: int, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance over a batch laid out ``[uncond x n, cond x n]``."""
    uncond, cond = eps[:n], eps[n:]
    return uncond + guidance_scale * (cond - uncond)


OUTPUT_TYPES = ("pil", "pt", "latent")


def check_output_type(output_type: str) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type: must be 'pil', 'pt' or 'latent', got {shown(output_type)}")
    return output_type


def check_finite(x: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(x).flatten(1).all(1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise NonFiniteOutputError(f"output: the {what} of image(s) {rows} are not finite (NaN/inf); a guidance "
                                   "scale too large for this model, or a broken checkpoint")


def finish(engine: Engine, latents: torch.Tensor, output_type: str, infos: Sequence[dict]):
    """The pipelines' output: the latents, the decoded ``(B, 3, H, W)`` tensor in [0, 1], or PIL images whose
    ``.info`` holds ``infos[i]`` (values as strings: they go into the PNG's text chunks). Non-finite latents or
    decoded pixels raise :class:`NonFiniteOutputError` instead of returning a black image."""
    from .program import drive

    return drive(engine, finish_program(engine, latents, output_type, infos))


def finish_program(engine: Engine, latents: torch.Tensor, output_type: str, infos: Sequence[dict]):
    """:func:`finish` as a program step (``yield from`` it): the VAE decode is asked for, not made, so a scheduler
    can decode the images of several finished requests in one batch."""
    from .program import Decode

    check_finite(latents, "latents")
    if output_type == "latent":
        return latents
    images = yield Decode(latents)
    check_finite(images, "decoded pixels")
    if output_type == "pt":
        return images
    pil = engine.to_pil(images)
    for img, info in zip(pil, infos):
        img.info.update({k: str(v) for k, v in info.items()})
    return pil
