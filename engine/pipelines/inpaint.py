"""Inpainting: repaint the white part of a mask under the prompt, keep the rest, as diffusers'
``StableDiffusionInpaintPipeline`` / ``StableDiffusionXLInpaintPipeline`` do, for both kinds of UNet:

- a regular UNet (4 input channels, any SD 1.x/2.x/SDXL checkpoint): after every step, the known region (black
  in the mask) is replaced by the input's latents noised to the next timestep with the row's start noise,
  ``latents = (1 − m)·add_noise(x0, noise, t_next) + m·latents`` (the input's own latents after the last step);
- an inpainting UNet (9 input channels: sd-v1-5-inpainting, sd-2-inpainting, SDXL inpainting 0.1): the mask at
  latent resolution and the latents of the masked input (the repaint region set to grey) are appended to the
  model input at every step; nothing is blended.

The mask is read as diffusers' mask processor reads it: grey levels (RGB by luma), binarized at 0.5, resized to
the latent grid by nearest sampling; the masked input is ``image · (mask < 0.5)`` in [-1, 1]. ``strength`` cuts
the schedule as in img2img; at 1 the start is pure noise (``noise · init_noise_sigma``), below 1 the input
noised. Every generator draw happens where diffusers makes it (row i's generator: the input's VAE sample when
it is needed, the start noise, the masked input's VAE sample — only drawn, not encoded, for a regular UNet, which
does not read it — then the step noise), so results equal diffusers' with one generator per image.

Pixels outside the mask come back through the VAE (encoded and decoded, as in diffusers), not pasted from the
input: on a real VAE they differ by its reconstruction error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..adapters import holding
from ..samplers import DEFAULT_SAMPLER
from .common import finish_program
from .img2img import (
    check_edit,
    conditioning,
    denoise,
    encode_inputs,
    latent_shape,
    posterior,
    row_noise,
    sample_latents,
)
from .program import driven

if TYPE_CHECKING:
    from ..engine import Engine


def inpaint_program(
    engine: Engine,
    prompts: str | Sequence[str],
    image,
    mask,
    *,
    strength: float = 1.0,
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
    """Inpainting: one image per prompt, the white region of ``mask`` repainted, the rest kept.

    :func:`inpaint` runs it; ``inpaint_program`` returns it as a program for a scheduler to drive (arguments
    checked and images read at once, the work as the generator is driven).

    Args:
        prompts: a prompt or a list (one image each).
        image: the input, as :func:`~dreamfuse.engine.pipelines.img2img.img2img` takes it (one, or one per prompt).
        mask: white = repaint, black = keep: a PIL image or path (any mode, by luma; transparent = black), an
            ``(H, W)`` or ``(H, W, 3)`` array (bool, uint8, or float in [0, 1]) or a tensor; binarized at 0.5. It has
            its image's size. One for all prompts or one per prompt. A mask with nothing white is an error.
        strength: in (0, 1] (default 1: the repaint region starts from pure noise); below 1 the region starts from
            the input noised, keeping some of what was there.
        negative_prompt, steps, guidance_scale, height, width, seed, progress, output_type, ip_image, ip_scale,
            sampler: as :func:`~dreamfuse.engine.pipelines.img2img.img2img` (every sampler works).
        loras, learned_tokens: per-request adapters, as :func:`~dreamfuse.engine.pipelines.text2img.text2img`.
    """
    r = check_edit(engine, prompts, image, strength=strength, negative_prompt=negative_prompt, steps=steps,
                   guidance_scale=guidance_scale, height=height, width=width, seed=seed, output_type=output_type,
                   ip_image=ip_image, ip_scale=ip_scale, sampler=sampler, mask=mask, inpaint=True, loras=loras,
                   learned_tokens=learned_tokens)
    return holding(r.adapters, _inpaint_steps(engine, r, progress))


@torch.no_grad()
def _inpaint_steps(engine: Engine, r, progress):
    blend = int(engine.unet.config.in_channels) == int(engine.vae.config.latent_channels)  # else 9 channels
    use_cfg = r.guidance_scale > 1.0
    embeddings, pooled, ip_tokens = conditioning(engine, r)
    sched = engine.new_sampler(r.sampler, r.steps, r.seeds)
    sched.start_at_strength(r.strength)
    timesteps = sched.timesteps
    full = r.strength == 1.0
    shape = latent_shape(engine, r)
    f = engine.vae_scale_factor
    # each generator draws in diffusers' order: the input's sample (when used), the start noise, the masked input's
    image_latents = encode_inputs(engine, r, sched) if blend or not full else None
    noise = row_noise(sched, shape, engine.device, engine.dtype)
    latents = noise * sched.init_noise_sigma if full else sched.add_noise(image_latents, noise, timesteps[0])
    pairs = list(zip(r.image_of, r.mask_of))
    small = [F.interpolate(m, size=(r.height // f, r.width // f)) for m in r.masks]  # nearest, as diffusers
    mask = torch.cat([small[k] for k in r.mask_of]).to(engine.device, engine.dtype)  # (n, 1, h, w)
    if blend:  # the masked input is encoded by diffusers but not read: only its draw is made
        vae_dtype = engine.vae.dtype
        for g in sched.generators:
            torch.randn((1, *shape), generator=g, dtype=vae_dtype)

        def after_step(i: int, x: torch.Tensor) -> torch.Tensor:
            known = image_latents if i == len(timesteps) - 1 else sched.add_noise(image_latents, noise,
                                                                                   timesteps[i + 1])
            return (1 - mask) * known + mask * x

        extra = None
    else:
        dists = {p: posterior(engine, (r.images[p[0]] * 2 - 1) * (r.masks[p[1]] < 0.5)) for p in dict.fromkeys(pairs)}
        masked = torch.cat([sample_latents(engine, dists[p], g) for p, g in zip(pairs, sched.generators)])
        extra = torch.cat([mask, masked], dim=1)
        if use_cfg:
            extra = torch.cat([extra, extra])
        after_step = None
    latents = yield from denoise(engine, sched, latents, embeddings, pooled, ip_tokens, r.ip_scale, r.n,
                                 r.guidance_scale, progress, "inpaint", extra=extra, after_step=after_step,
                                 adapters=r.adapters)
    return (yield from finish_program(engine, latents, r.output_type, r.infos()))


inpaint = driven(inpaint_program, "inpaint")
