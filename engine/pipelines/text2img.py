"""Text-to-image: batched DDIM with classifier-free guidance folded into one UNet call per step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..ip_adapter import check_ip_scale, prompt_tokens
from .common import (
    as_prompt_list,
    cfg_combine,
    check_batch,
    check_guidance,
    check_output_type,
    check_steps,
    finish,
    resolve_seeds,
    resolve_size,
)

if TYPE_CHECKING:
    from ..engine import Engine


@torch.no_grad()
def text2img(
    engine: Engine,
    prompts: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] | None = None,
    steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int | Sequence[int] | None = None,
    progress: bool | None = None,
    output_type: str = "pil",
    ip_image=None,
    ip_scale: float = 0.6,
):
    """Generate one image per prompt.

    Args:
        prompts: a prompt or a list; the whole list is one batch (one UNet call per step).
        negative_prompt: one for all prompts or one per prompt (default: empty).
        steps: DDIM steps (eta = 0, deterministic).
        guidance_scale: classifier-free guidance scale; ``<= 1`` drops the unconditional branch (half the rows).
        height, width: image size in pixels, multiples of 8 (default: the model's native size).
        seed: an int (prompt i gets ``seed + i``), one int per prompt, or None (random). An image depends
            only on its prompt and seed: alone or inside a batch it comes out the same (within rounding).
        progress: progress bar over the steps (default: the engine config's).
        output_type: ``"pil"`` (list of ``PIL.Image`` whose ``.info`` holds prompt and seed), ``"pt"``
            (float tensor ``(B, 3, H, W)`` in [0, 1]) or ``"latent"`` (the final latents).
        ip_image: IP-Adapter image prompt (needs ``engine.load_ip_adapter``): one PIL image, path or ``(3, H, W)``
            tensor for all prompts, or a list with one per prompt. CFG's unconditional rows get the zero-image
            tokens, as in the official IP-Adapter code.
        ip_scale: weight of the image attention in the decoupled cross-attention (``>= 0``; 0 = text only).
    """
    limits = engine.config.limits
    prompts = as_prompt_list(prompts, limits=limits)
    n = check_batch(len(prompts), limits)
    steps = check_steps(steps, limits=limits)
    guidance_scale = check_guidance(guidance_scale)
    height, width = resolve_size(engine, height, width)
    seeds = resolve_seeds(seed, n)
    check_output_type(output_type)
    ip_scale = check_ip_scale(ip_scale)
    negatives = as_prompt_list(negative_prompt if negative_prompt is not None else [""] * n, "negative_prompt",
                               limits)
    if len(negatives) == 1 and n > 1:
        negatives = negatives * n
    if len(negatives) != n:
        raise ValueError(f"negative_prompt: give one for all prompts or one per prompt ({n}), got {len(negatives)}")

    use_cfg = guidance_scale > 1.0
    ip_tokens = prompt_tokens(engine, ip_image, n, use_cfg) if ip_image is not None else None
    rows = negatives + prompts if use_cfg else prompts
    embeddings, pooled = engine.encode_text(rows)
    latents = engine.initial_latents(seeds, height, width)
    sched = engine.new_scheduler(steps)
    with engine.progress(steps, "text2img", progress) as bar:
        for t in sched.timesteps:
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            model_in = sched.scale_model_input(model_in, t)
            eps = engine.unet_call(model_in, t, embeddings, ip_tokens, ip_scale, pooled=pooled)
            if use_cfg:
                eps = cfg_combine(eps, n, guidance_scale)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
            bar.update(1)

    infos = [{"prompt": p, "seed": s, "steps": steps, "guidance_scale": guidance_scale} for p, s in zip(prompts, seeds)]
    if ip_tokens is not None:
        for info in infos:
            info["ip_scale"] = ip_scale
    return finish(engine, latents, output_type, infos)
