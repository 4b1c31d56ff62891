"""Input validation and small pieces shared by the pipelines (ValueErrors name the bad field)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..engine import Engine, random_seed


def as_prompt_list(prompts: str | Sequence[str], field: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{field}: at least one prompt is needed")
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"{field}: every prompt must be a string, got {type(p).__name__}")
    return prompts


def resolve_seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
    """``None``: fresh random seeds; an int ``s``: prompt i gets ``s + i``; a list: one seed per prompt."""
    if seed is None:
        base = random_seed()
        return [base + i for i in range(n)]
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [seed + i for i in range(n)]
    seeds = list(seed)
    if len(seeds) != n or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed: give an int or exactly one int per prompt ({n}), got {seed!r}")
    return seeds


def check_steps(steps: int, field: str = "steps") -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{field}: must be an integer >= 1, got {steps!r}")
    return steps


def check_guidance(guidance_scale: float) -> float:
    if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
        raise ValueError(f"guidance_scale: must be a number >= 0, got {guidance_scale!r}")
    return float(guidance_scale)


def resolve_size(engine: Engine, height: int | None, width: int | None) -> tuple[int, int]:
    h = engine.default_size if height is None else height
    w = engine.default_size if width is None else width
    for name, v in (("height", h), ("width", w)):
        if not isinstance(v, int) or isinstance(v, bool) or v < engine.vae_scale_factor or v % engine.vae_scale_factor:
            raise ValueError(f"{name}: must be a positive multiple of {engine.vae_scale_factor}, got {v!r}")
    return h, w


def cfg_combine(eps: torch.Tensor, n: int, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance over a batch laid out ``[uncond x n, cond x n]``."""
    uncond, cond = eps[:n], eps[n:]
    return uncond + guidance_scale * (cond - uncond)



OUTPUT_TYPES = ("pil", "pt", "latent")


def check_output_type(output_type: str) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type: must be 'pil', 'pt' or 'latent', got {output_type!r}")
    return output_type


def finish(engine: Engine, latents: torch.Tensor, output_type: str, infos: Sequence[dict]):
    """The pipelines' output: the latents, the decoded ``(B, 3, H, W)`` tensor in [0, 1], or PIL images whose
    ``.info`` holds ``infos[i]`` (values as strings: they go into the PNG's text chunks)."""
    if output_type == "latent":
        return latents
    images = engine.decode(latents)
    if output_type == "pt":
        return images
    pil = engine.to_pil(images)
    for img, info in zip(pil, infos):
        img.info.update({k: str(v) for k, v in info.items()})
    return pil
