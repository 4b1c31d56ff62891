"""Image-to-image: start from an input image noised to a point of the schedule set by ``strength``, then denoise
under the prompt, as diffusers' ``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` do.

What diffusers does and this module does the same way (the tests compare against those pipelines on the same
modules and generators):

- the schedule: ``steps`` timesteps as for text2img, of which the last ``int(steps · strength)`` run
  (``t_start = steps − int(steps · strength)``, timesteps from ``t_start · order``, ``set_begin_index`` for the
  σ-space schedulers): :meth:`~dreamfuse.engine.samplers.Sampler.start_at_strength`;
- the start: the image's VAE posterior *sampled* with image i's generator, ``· scaling_factor``, then noised to the
  first kept timestep with noise drawn next from the same generator (``scheduler.add_noise``); the step noise of a
  stochastic sampler follows from that generator. An image depends only on its prompt, input and seed, never on
  the batch it runs in;
- SDXL's VAE runs in fp32 where its config says ``force_upcast`` (the engine keeps it there), the input being
  rounded to the engine's dtype first as diffusers does; the micro-conditioning is the text2img one,
  ``(H, W), (0, 0), (H, W)``.

Unlike diffusers, an input whose size is not a multiple of 8 is refused (diffusers silently squeezes it to the
multiple of 8 below) and the output size is the input's unless ``height``/``width`` say otherwise (then the input
is resized, its aspect ratio kept within 2 %). A ``strength`` so small that no step runs is an error, not an empty
loop.

:mod:`~dreamfuse.engine.pipelines.inpaint` builds on the pieces here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..adapters import AdapterSet, holding, request_adapters
from ..images import image_tensor, load_image_tensor, mask_tensor
from ..ip_adapter import check_ip_scale, prompt_tokens
from ..limits import DEFAULT_LIMITS, Limits, check_size
from ..samplers import DEFAULT_SAMPLER, Sampler, check_sampler
from ..validation import check_number
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
)
from .program import UNetCall, driven
from .stepping import ddim_loop

if TYPE_CHECKING:
    from ..engine import Engine


@dataclass
class EditRequest:
    """A checked img2img / inpainting call (every field resolved; images read and resized)."""

    prompts: list[str]
    negatives: list[str | None]
    seeds: list[int]
    steps: int
    strength: float
    guidance_scale: float
    height: int
    width: int
    sampler: str
    output_type: str
    ip_image: object
    ip_scale: float
    images: list[torch.Tensor]
    """The distinct input images, ``(1, 3, height, width)`` float32 in [0, 1] on CPU."""
    image_of: list[int]
    """Row i's image: ``images[image_of[i]]``."""
    masks: list[torch.Tensor] | None = None
    """Inpainting: the distinct masks, ``(1, 1, height, width)`` in {0, 1} (1 = repaint) on CPU."""
    mask_of: list[int] | None = None
    adapters: AdapterSet | None = None
    """The request's per-request LoRAs and learned tokens (:mod:`~dreamfuse.engine.adapters`)."""

    @property
    def n(self) -> int:
        return len(self.prompts)

    def infos(self) -> list[dict]:
        infos = [{"prompt": p, "seed": s, "steps": self.steps, "strength": self.strength,
                  "guidance_scale": self.guidance_scale, "sampler": self.sampler}
                 for p, s in zip(self.prompts, self.seeds)]
        if self.ip_image is not None:
            for info in infos:
                info["ip_scale"] = self.ip_scale
        if self.adapters is not None:
            for info in infos:
                info["adapters"] = self.adapters.describe()
        return infos


def _per_prompt(value, n: int, field: str) -> list:
    """One value for every prompt, or a list/tuple with one per prompt."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, n):
        raise ValueError(f"{field}: give one for all prompts or one per prompt ({n}), got {len(values)}")
    return values


def check_strength(strength, steps: int, field: str = "strength") -> float:
    """``strength`` in (0, 1], large enough that ``int(steps · strength) >= 1`` step runs."""
    strength = check_number(strength, field, low=0, low_open=True, high=1)
    if int(steps * strength) < 1:
        raise ValueError(f"{field}: {strength:g} of {steps} steps leaves no step to run (int(steps * strength) = 0); "
                         "raise it or the steps")
    return strength


def read_edit_inputs(image, mask, n: int, height: int | None, width: int | None, factor: int,
                     limits: Limits = DEFAULT_LIMITS, *, inpaint: bool, image_field: str = "image",
                     mask_field: str = "mask"):
    """Read and check the input image(s) and, for inpainting, mask(s) of ``n`` prompts (one for all or one per
    prompt each). Returns ``(images, image_of, masks, mask_of, height, width)``: the distinct images resized to
    ``height x width`` (default: the first image's own size, which must then be a multiple of ``factor``), the
    masks binarized at 0.5 at that size (None without ``inpaint``), and each row's index into them. A mask must
    have its image's size and something white that the latent grid sees. Needs no model (the CLI calls it
    before loading one)."""
    raw = _per_prompt(image, n, image_field)
    fields = [image_field] if len(raw) == 1 else [f"{image_field}[{i}]" for i in range(len(raw))]
    images = [load_image_tensor(x, f, limits) for x, f in zip(raw, fields)]
    h0, w0 = images[0].shape[-2:]
    for v, own in ((height, h0), (width, w0)):
        if v is None and own % factor:
            raise ValueError(f"{fields[0]}: {w0}x{h0} is not a multiple of {factor} (the VAE's downsampling); "
                             f"resize it, or pass height and width to resize it to (multiples of {factor})")
    height, width = check_size(h0 if height is None else height, w0 if width is None else width, factor, limits)
    sizes = [tuple(x.shape[-2:]) for x in images]
    images = [image_tensor(x, height, width, f, limits) for x, f in zip(images, fields)]  # resized if need be
    image_of = [0 if len(images) == 1 else i for i in range(n)]
    if not inpaint:
        return images, image_of, None, None, height, width
    raw_masks = _per_prompt(mask, n, mask_field)
    mfields = [mask_field] if len(raw_masks) == 1 else [f"{mask_field}[{i}]" for i in range(len(raw_masks))]
    grey = [mask_tensor(m, f, limits) for m, f in zip(raw_masks, mfields)]
    for i in range(max(len(grey), len(images))):
        m, (h, w) = grey[min(i, len(grey) - 1)], sizes[min(i, len(sizes) - 1)]
        if tuple(m.shape[-2:]) != (h, w):
            mf, xf = mfields[min(i, len(grey) - 1)], fields[min(i, len(sizes) - 1)]
            raise ValueError(f"{mf}: {m.shape[-1]}x{m.shape[-2]} does not match {xf}'s {w}x{h} (a mask has its "
                             "image's size; white = repaint)")
    masks = []
    for m, f in zip(grey, mfields):
        if m.shape[-2:] != (height, width):
            m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        m = (m >= 0.5).float()  # diffusers' mask processor binarizes at 0.5
        if not bool(m.any()):
            raise ValueError(f"{f}: no pixel is white (>= 0.5): nothing to repaint (white = repaint, black = keep; "
                             "an inverted mask?)")
        if not bool(F.interpolate(m, size=(height // factor, width // factor)).any()):
            raise ValueError(f"{f}: the white area misses every {factor}x{factor} latent cell's sampled pixel (the "
                             "mask is read at latent resolution, nearest): nothing would be repainted; make it larger")
        masks.append(m)
    mask_of = [0 if len(masks) == 1 else i for i in range(n)]
    return images, image_of, masks, mask_of, height, width


def check_edit(engine: Engine, prompts, image, *, strength, negative_prompt, steps, guidance_scale, height, width,
               seed, output_type, ip_image, ip_scale, sampler, mask=None, inpaint: bool = False, loras=None,
               learned_tokens=None) -> EditRequest:
    """Check every argument of an img2img or inpainting call (``ValueError`` naming the field) and read the input
    images and masks (:func:`read_edit_inputs`), before any model work."""
    limits = engine.config.limits
    prompts = as_prompt_list(prompts, limits=limits)
    n = check_batch(len(prompts), limits)
    steps = check_model_steps(engine, check_steps(steps, limits=limits))
    strength = check_strength(strength, steps)
    guidance_scale = check_guidance(guidance_scale)
    seeds = resolve_seeds(seed, n)
    check_output_type(output_type)
    ip_scale = check_ip_scale(ip_scale)
    sampler = check_sampler(sampler)
    negatives = [None] * n if negative_prompt is None else as_prompt_list(negative_prompt, "negative_prompt", limits)
    if len(negatives) == 1 and n > 1:
        negatives = negatives * n
    if len(negatives) != n:
        raise ValueError(f"negative_prompt: give one for all prompts or one per prompt ({n}), got {len(negatives)}")
    if ip_image is not None and engine.ip_adapter is None:
        raise ValueError("ip_image: no IP-Adapter is loaded (call engine.load_ip_adapter first)")
    channels = int(engine.unet.config.in_channels)
    latent_channels = int(engine.vae.config.latent_channels)
    if inpaint and channels not in (latent_channels, 2 * latent_channels + 1):
        raise ValueError(f"model: inpainting takes a UNet with {latent_channels} input channels (the known region "
                         f"is blended in) or {2 * latent_channels + 1} (an inpainting UNet), this one has {channels}")
    if not inpaint and channels != latent_channels:
        raise ValueError(f"model: this UNet takes {channels} input channels, not the VAE's {latent_channels} (an "
                         "inpainting UNet?): use inpaint")
    images, image_of, masks, mask_of, height, width = read_edit_inputs(
        image, mask, n, height, width, engine.vae_scale_factor, limits, inpaint=inpaint)
    adapters = request_adapters(engine, loras, learned_tokens)
    return EditRequest(prompts, negatives, seeds, steps, strength, guidance_scale, height, width, sampler,
                       output_type, ip_image, ip_scale, images, image_of, masks, mask_of, adapters)


# ------------------------------------------------------------------------------------------------ pieces
@torch.no_grad()
def posterior(engine: Engine, pixels: torch.Tensor):
    """The VAE posterior of ``pixels`` ``(1, 3, H, W)`` in [-1, 1]: rounded to the engine's dtype, then run in the
    VAE's (fp32 for an upcast SDXL VAE), as diffusers' pipelines feed it."""
    x = pixels.to(engine.device, engine.dtype).to(engine.vae.dtype)
    return engine.vae.encode(x).latent_dist


def sample_latents(engine: Engine, dist, generator: torch.Generator) -> torch.Tensor:
    """One draw of a posterior with ``generator`` (diffusers' ``latent_dist.sample(generator)``), in the engine's
    dtype, times the VAE's scaling factor."""
    return dist.sample(generator=generator).to(engine.dtype) * engine.vae.config.scaling_factor


def row_noise(sched: Sampler, shape: Sequence[int], device, dtype) -> torch.Tensor:
    """Gaussian noise ``(rows, *shape)``, row i from its own generator (not scaled by ``init_noise_sigma``)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in sched.generators]).to(device, dtype)


def encode_inputs(engine: Engine, r: EditRequest, sched: Sampler) -> torch.Tensor:
    """Every row's image latents: each distinct image encoded once, its posterior sampled with each row's own
    generator (diffusers encodes row by row with ``generator[i]``: the same numbers)."""
    dists = [posterior(engine, x * 2 - 1) for x in r.images]
    return torch.cat([sample_latents(engine, dists[k], g) for k, g in zip(r.image_of, sched.generators)])


def denoise(engine: Engine, sched: Sampler, latents: torch.Tensor, embeddings, pooled, ip_tokens, ip_scale: float,
            n: int, guidance_scale: float, progress, desc: str, *, extra=None, after_step=None, adapters=None):
    """The sampling loop over ``sched.timesteps`` as a program (``yield from`` it; returns the final latents): one
    UNet call per evaluation with CFG folded in, as text2img. ``extra`` ``(rows, c, h, w)``: channels appended to
    the scaled model input (an inpainting UNet's mask and masked-image latents); ``after_step(i, latents)``: what
    replaces the latents after step i (inpainting's known-region blend); ``adapters``: the rows' per-request
    adapters."""
    use_cfg = guidance_scale > 1.0
    cond = slice(n, n + 1) if use_cfg else slice(0, 1)
    timesteps = sched.timesteps
    loop = None
    if extra is None and after_step is None:  # DDIM: the loop as data (a scheduler batches it with text2img's)
        loop = ddim_loop(sched, 0, latents, guidance_scale if use_cfg else None, embeddings,
                         engine.__dict__.setdefault("_ddim_coeffs", {}), ip_tokens=ip_tokens, ip_scale=ip_scale,
                         pooled=pooled, preview_rows=cond, adapters=adapters)
    with engine.progress(sched.evaluations, desc, progress) as bar:
        if loop is not None:
            loop.on_step = lambda: bar.update(1)
            return (yield loop)
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            model_in = sched.scale_model_input(model_in, t)
            if extra is not None:
                model_in = torch.cat([model_in, extra], dim=1)
            eps = yield UNetCall(model_in, t, embeddings, ip_tokens, ip_scale, pooled=pooled, step=i,
                                 steps=sched.evaluations, preview=(cond, sched.alpha_bar(t)), adapters=adapters)
            if use_cfg:
                eps = cfg_combine(eps, n, guidance_scale)
            latents = sched.step(eps, t, latents)
            if after_step is not None:
                latents = after_step(i, latents)
            bar.update(1)
    return latents


def conditioning(engine: Engine, r: EditRequest):
    """``(embeddings, pooled, ip_tokens)`` of the request's UNet rows (``[negatives; prompts]`` with CFG)."""
    use_cfg = r.guidance_scale > 1.0
    ip_tokens = prompt_tokens(engine, r.ip_image, r.n, use_cfg) if r.ip_image is not None else None
    embeddings, pooled = engine.encode_text(r.negatives + r.prompts if use_cfg else r.prompts, r.adapters)
    return embeddings, pooled, ip_tokens


def latent_shape(engine: Engine, r: EditRequest) -> tuple[int, int, int]:
    f = engine.vae_scale_factor
    return (int(engine.vae.config.latent_channels), r.height // f, r.width // f)


# ------------------------------------------------------------------------------------------------ img2img
def img2img_program(
    engine: Engine,
    prompts: str | Sequence[str],
    image,
    *,
    strength: float = 0.8,
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
    """Image-to-image: one image per prompt, each started from ``image`` noised by ``strength``.

    :func:`img2img` runs it; ``img2img_program`` returns it as a program (see
    :mod:`~dreamfuse.engine.pipelines.program`) for a scheduler to drive: the arguments are checked and the images
    read at once (``ValueError`` naming the field), the work happens as the generator is driven.

    Args:
        prompts: a prompt or a list (one image each; ``[prompt] * n`` for n images of one prompt).
        image: the input: a PIL image, a path, an ``(H, W, 3)`` array (uint8, or float in [0, 1]) or a ``(3, H, W)``
            tensor in [0, 1]; one for all prompts or a list with one per prompt. Its size must be a multiple of 8
            unless ``height``/``width`` are given.
        strength: in (0, 1]: how far into the noise the input is pushed; the last ``int(steps · strength)`` of the
            ``steps`` timesteps run (diffusers' rule). 1 keeps almost nothing of the input, small values keep
            nearly all of it.
        negative_prompt, guidance_scale, seed, progress, output_type, ip_image, ip_scale, sampler: as
            :func:`~dreamfuse.engine.pipelines.text2img.text2img` (every sampler works; the generator of image i
            draws its VAE sample, then its start noise, then its step noise).
        steps: the schedule's length before ``strength`` cuts it (diffusers' ``num_inference_steps``).
        height, width: the output size (default: the input's); the input is resized to it (aspect ratio kept).
        loras, learned_tokens: per-request adapters, as :func:`~dreamfuse.engine.pipelines.text2img.text2img`.
    """
    r = check_edit(engine, prompts, image, strength=strength, negative_prompt=negative_prompt, steps=steps,
                   guidance_scale=guidance_scale, height=height, width=width, seed=seed, output_type=output_type,
                   ip_image=ip_image, ip_scale=ip_scale, sampler=sampler, loras=loras, learned_tokens=learned_tokens)
    return holding(r.adapters, _img2img_steps(engine, r, progress))


@torch.no_grad()
def _img2img_steps(engine: Engine, r: EditRequest, progress):
    embeddings, pooled, ip_tokens = conditioning(engine, r)
    sched = engine.new_sampler(r.sampler, r.steps, r.seeds)
    sched.start_at_strength(r.strength)
    x0 = encode_inputs(engine, r, sched)
    noise = row_noise(sched, latent_shape(engine, r), engine.device, engine.dtype)
    latents = sched.add_noise(x0, noise, sched.timesteps[0])
    latents = yield from denoise(engine, sched, latents, embeddings, pooled, ip_tokens, r.ip_scale, r.n,
                                 r.guidance_scale, progress, "img2img", adapters=r.adapters)
    return (yield from finish_program(engine, latents, r.output_type, r.infos()))


img2img = driven(img2img_program, "img2img")
