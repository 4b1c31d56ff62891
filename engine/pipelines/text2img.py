"""Text-to-image: batched sampling (DDIM or any sampler of :data:`~dreamfuse.engine.samplers.SAMPLERS`) with
classifier-free guidance folded into one UNet call per model evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch

from ..adapters import holding, request_adapters
from ..ip_adapter import check_ip_scale, prompt_tokens
from ..samplers import DEFAULT_SAMPLER, check_sampler
from ..validation import check_flag
from .common import (
    as_prompt_list,
    cfg_combine,
    check_batch,
    check_guidance,
    check_model_steps,
    check_output_type,
    check_steps,
    finish_program,
    resolve_seeds,
    resolve_size,
)
from .program import UNetCall, driven
from .stepping import ddim_loop

if TYPE_CHECKING:
    from ..engine import Engine


def text2img_program(
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
    sampler: str = DEFAULT_SAMPLER,
    loras=None,
    learned_tokens=None,
):
    """Generate one image per prompt.

    :func:`text2img` runs it; ``text2img_program`` returns it as a program (see
    :mod:`~dreamfuse.engine.pipelines.program`) for a scheduler to drive: the arguments are checked at once
    (``ValueError`` naming the field), the work happens as the generator is driven.

    Args:
        prompts: a prompt or a list; the whole list is one batch (one UNet call per step).
        negative_prompt: one for all prompts or one per prompt. Default (None): no negative prompt, i.e. the
            empty prompt's embedding, or on SDXL base the zero embedding (diffusers' rule: only an *absent*
            negative prompt is zeroed; an explicit ``""`` is encoded).
        steps: sampler steps (Heun and DPM-SDE evaluate the model ``2·steps − 1`` times).
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
        sampler: a name of :data:`~dreamfuse.engine.samplers.SAMPLERS` (default ``"ddim"``, eta = 0). Stochastic
            samplers draw each image's step noise from its own seed's generator, so batch invariance holds for
            them too.
        loras: per-request LoRAs from ``engine.adapters``: ``[("sks-dog", 0.8), "style"]`` (a name alone: scale 1),
            applied to this call's rows only (the shared model never changes; concurrent calls may use others). The
            image equals the one ``engine.load_lora`` of the same file at the same scale gives.
        learned_tokens: learned-token adapters (textual inversions, ReVersion relations) by name; their tokens
            (``<cat-toy>``) read as learned in this call's prompts only (SD 1.x/2.x).
    """
    limits = engine.config.limits
    prompts = as_prompt_list(prompts, limits=limits)
    n = check_batch(len(prompts), limits)
    steps = check_model_steps(engine, check_steps(steps, limits=limits))
    guidance_scale = check_guidance(guidance_scale)
    height, width = resolve_size(engine, height, width)
    seeds = resolve_seeds(seed, n)
    check_output_type(output_type)
    check_flag(progress, "progress", optional=True)
    ip_scale = check_ip_scale(ip_scale)
    sampler = check_sampler(sampler)
    # None = no negative prompt (SDXL base: the zero embedding, as diffusers); "" is encoded as text
    negatives = [None] * n if negative_prompt is None else as_prompt_list(negative_prompt, "negative_prompt", limits)
    if len(negatives) == 1 and n > 1:
        negatives = negatives * n
    if len(negatives) != n:
        raise ValueError(f"negative_prompt: give one for all prompts or one per prompt ({n}), got {len(negatives)}")

    if ip_image is not None and engine.ip_adapter is None:
        raise ValueError("ip_image: no IP-Adapter is loaded (call engine.load_ip_adapter first)")
    adapters = request_adapters(engine, loras, learned_tokens)
    return holding(adapters, _text2img_steps(engine, prompts, negatives, n, steps, guidance_scale, height, width,
                                             seeds, progress, output_type, ip_image, ip_scale, sampler, adapters))


@torch.no_grad()
def _text2img_steps(engine, prompts, negatives, n, steps, guidance_scale, height, width, seeds, progress,
                    output_type, ip_image, ip_scale, sampler, adapters=None):
    use_cfg = guidance_scale > 1.0
    ip_tokens = prompt_tokens(engine, ip_image, n, use_cfg) if ip_image is not None else None
    rows = negatives + prompts if use_cfg else prompts
    embeddings, pooled = engine.encode_text(rows, adapters)
    sched = engine.new_sampler(sampler, steps, seeds)
    latents = sched.initial_latents(engine.latent_shape(height, width), engine.device, engine.dtype)
    cond = slice(n, n + 1) if use_cfg else slice(0, 1)
    coeff_cache = engine.__dict__.setdefault("_ddim_coeffs", {})  # the engine's scheduler config: shared by calls
    loop = ddim_loop(sched, 0, latents, guidance_scale if use_cfg else None, embeddings, coeff_cache,
                     ip_tokens=ip_tokens, ip_scale=ip_scale, pooled=pooled, preview_rows=cond, adapters=adapters)
    with engine.progress(sched.evaluations, "text2img", progress) as bar:
        if loop is not None:  # DDIM: the whole loop as data, run alone or in a scheduler's persistent batch
            loop.on_step = lambda: bar.update(1)
            latents = yield loop
        else:
            for i, t in enumerate(sched.timesteps):
                model_in = torch.cat([latents, latents]) if use_cfg else latents
                model_in = sched.scale_model_input(model_in, t)
                out = yield UNetCall(model_in, t, embeddings, ip_tokens, ip_scale, pooled=pooled, step=i,
                                     steps=sched.evaluations, preview=(cond, partial(sched.alpha_bar, t)),
                                     adapters=adapters)
                latents = sched.step(cfg_combine(out, n, guidance_scale) if use_cfg else out, t, latents)
                bar.update(1)

    infos = [{"prompt": p, "seed": s, "steps": steps, "guidance_scale": guidance_scale, "sampler": sampler}
             for p, s in zip(prompts, seeds)]
    if ip_tokens is not None:
        for info in infos:
            info["ip_scale"] = ip_scale
    if adapters is not None:
        for info in infos:
            info["adapters"] = adapters.describe()
    return (yield from finish_program(engine, latents, output_type, infos))


text2img = driven(text2img_program, "text2img")
