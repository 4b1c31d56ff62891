"""Composite diffusion (MSP-Diffusion): a segment layout, a prompt per segment, a global prompt.

Stages over the T DDIM steps of a request (``stage_schedule``):

1. **global diffuser** (first ``global_steps``; the paper's 2, or 8 with a scaffolding image): the shared latent
   is denoised under the global prompt, plain CFG exactly as text2img.
2. **scaffolding** (next ``k = round(scaffold_fraction · T)`` steps): every segment develops under its own prompt.
   Without a scaffolding image the segments are independent latents ``(S, C, h, w)`` started from the shared
   one, composited by their masks when the stage ends. With a scaffolding image (VAE-encoded once), each step
   segment s sees the shared latent inside its mask and the scaffolding latent noised to the current timestep
   outside it (``segment_fill``); after each step the segments are composited back (``composite_latents``).
3. **harmonization** (the rest): ``harmonize="blend"`` runs every segment's prompt on the shared latent and
   blends the CFG-combined predictions by the masks (``composite_blend``); ``"global"`` uses the global prompt.

Every request's rows go into ONE UNet call per step, laid out ``[uncond of every row; cond of every row]``
(a row = one segment, or the global prompt); CFG is per segment with its own guidance, and rows whose
guidance is <= 1 get no uncond row (as text2img). Requests of a batch may have different segment counts:
the kernels see ``(B, S_max, ...)`` tensors padded with zero-mask segments, which cost no UNet rows.

Subject-aware guidance (optional, ``sal_model`` + ``sal_scale``): for a subject segment j, the predicted
``x̂0 = (x_t − sqrt(1−ᾱ_t)·ε)/sqrt(ᾱ_t)`` masked by ``m_j`` is decoded and fed to a segmentation model; the
mean normalized entropy of its class probabilities is the loss, its gradient w.r.t. ``x_t`` (ε held constant:
no UNet backward) moves the latent inside the segment: ``x_t ← x_t − λ·∇ ⊙ m_j``.

Any ``prediction_type`` works (ε, v, x0): the DDIM step reads it itself; the guidance takes ε from the model's
(guided) output at ``x_t`` (:mod:`dreamfuse.engine.prediction`), and after it moved ``x_t`` the output handed to
the step is that same ε re-expressed at the new ``x_t``, so a v-model follows its ε-equivalent exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..adapters import holding, request_adapters
from ..images import image_tensor
from ..layout import DEFAULT_TOLERANCE, SegmentLayout, parse_layout
from ..limits import DEFAULT_LIMITS, Limits, check_size
from ..ops import ops_for
from ..prediction import prediction_type_of, to_eps_x0, update_output
from ..samplers import DEFAULT_SAMPLER, STATELESS_SAMPLERS, check_sampler
from ..validation import check_callable, check_flag, check_int_arg, check_number, check_text
from .common import (
    as_prompt_list,
    check_batch,
    check_guidance,
    check_model_steps,
    check_output_type,
    check_steps,
    finish_program,
    resolve_seeds,
)
from .program import UNetCall, drive, driven

COMPOSE_SAMPLERS = STATELESS_SAMPLERS
"""The samplers compose accepts: those that keep no per-row state between steps (see :func:`compose_batch`)."""

if TYPE_CHECKING:
    from ..engine import Engine

GLOBAL_STEPS = 2
"""Global-diffuser steps without a scaffolding image (MSP-Diffusion, appendix A.5, at 80 steps)."""
GLOBAL_STEPS_SCAFFOLD = 8
"""Global-diffuser steps with a scaffolding image (MSP-Diffusion, appendix A.5, at 80 steps)."""
SCAFFOLD_FRACTION = 0.3
"""Scaffolding steps as a fraction of all steps. MSP/Composite Diffusion do not state k: 0.3 is our choice
(segments settle their content in the first third of a DDIM trajectory; the rest harmonizes)."""
HARMONIZE = ("blend", "global")
STAGES = ("global", "scaffold", "harmonize")


# --------------------------------------------------------------------------------------------- inputs
@dataclass
class ComposeRequest:
    """One image of a :func:`compose_batch` call: its layout, segments, global prompt(s), scaffolding image."""

    layout: object
    """PIL image, path, or ``(H, W, 3)`` uint8 array; one flat colour per segment."""
    segments: object
    """Mapping (or SEGMENTS.json path): colour -> prompt or ``{"prompt", "negative_prompt", "guidance",
    "subject"}``; ``"background"`` -> the segment of unlisted pixels (default: the global prompt)."""
    prompt: str
    """The global prompt (global diffuser, background default, ``harmonize="global"``)."""
    negative_prompt: str | None = None
    """Negative prompt of the global prompt and default of every segment's (default empty)."""
    scaffold_image: object = None
    """Optional scaffolding image (PIL, path, ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in [0, 1], or ``(H, W, 3)``
    array)."""


def stage_schedule(steps: int, *, scaffold_image: bool = False, global_steps: int | None = None,
                   scaffold_fraction: float = SCAFFOLD_FRACTION) -> list[str]:
    """The stage of every step: ``["global"] * G + ["scaffold"] * k + ["harmonize"] * (steps − G − k)``.

    ``G = global_steps`` (default 2, or 8 with a scaffolding image, clipped to ``steps``) and
    ``k = min(round(scaffold_fraction · steps), steps − G)``.
    """
    steps = check_steps(steps)
    if global_steps is None:
        g = min(GLOBAL_STEPS_SCAFFOLD if scaffold_image else GLOBAL_STEPS, steps)
    else:
        if isinstance(global_steps, bool) or not isinstance(global_steps, int) or not 0 <= global_steps <= steps:
            raise ValueError(f"global_steps: must be an integer in [0, steps={steps}], got {global_steps!r}")
        g = global_steps
    if isinstance(scaffold_fraction, bool) or not isinstance(scaffold_fraction, (int, float)) \
            or not 0 <= scaffold_fraction <= 1:
        raise ValueError(f"scaffold_fraction: must be a number in [0, 1], got {scaffold_fraction!r}")
    k = min(round(scaffold_fraction * steps), steps - g)
    return ["global"] * g + ["scaffold"] * k + ["harmonize"] * (steps - g - k)


def load_scaffold_image(image, height: int, width: int, field: str = "scaffold_image",
                        limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """PIL image, path, or ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in [0, 1] -> ``(1, 3, height, width)`` float32,
    resized when its aspect ratio matches the generation size (within 2%), an error otherwise."""
    return image_tensor(image, height, width, field, limits=limits)


def load_sal_model(path: str | Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load a TorchScript segmentation model for subject-aware guidance from a file the *user* names.

    A TorchScript file is a program: loading it runs code with the caller's permissions (a crafted file can
    write anywhere the process can). Load only files you trust, and never a path that arrives in a request:
    :func:`compose_batch` therefore takes the loaded model, not a path."""
    from ..files import check_file

    p = check_file(path, "sal_model")
    try:
        return torch.jit.load(str(p), map_location=device)
    except Exception as e:  # a corrupt or foreign file: one line naming it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"sal_model: cannot load {str(p)!r} as TorchScript ({first})") from None


def _check_sal_model(model, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(model, (str, Path)):
        raise ValueError("sal_model: pass a loaded model, not a path (a TorchScript file is a program; load one you "
                         "trust with load_sal_model(path, device))")
    if isinstance(model, torch.nn.Module):
        return model.to(device)
    if callable(model):
        return model
    raise ValueError(f"sal_model: must be a torch.nn.Module or a callable, got {type(model).__name__}")


# --------------------------------------------------------------------------------------------- guidance
def subject_aware_grad(engine: Engine, latents: torch.Tensor, model_output: torch.Tensor,
                       alpha_t: torch.Tensor | float, masks: torch.Tensor,
                       sal_model: Callable[[torch.Tensor], torch.Tensor], prediction_type: str = "epsilon"
                       ) -> torch.Tensor:
    """Gradient of the subject-aware entropy loss w.r.t. ``x_t`` (MSP-Diffusion, appendix A.4).

    Args:
        latents: ``x_t`` ``(N, C, h, w)``; model_output: the guided (CFG) model output ``(N, C, h, w)`` in
            ``prediction_type`` (ε, v or x0, as the scheduler's config says); its ε at ``x_t`` is held constant.
        alpha_t: ``ᾱ_t`` of the step (scalar). masks: ``(N, h, w)`` latent-grid mask of each row's segment.
        sal_model: images ``(N, 3, H, W)`` in [0, 1] -> class probabilities ``(N, K, H', W')``, K >= 2.

    Returns ``(N, C, h, w)`` in the latents' dtype: ``∇_{x_t} Σ_n mean_hw E_n`` with
    ``E = −Σ_k P_k log P_k / log K`` of ``P = sal_model(decode(x̂0 ⊙ m))``. Rows are independent (the sum over
    rows gives each row its own gradient), so a batch of rows equals the rows alone.
    """
    alpha_t = torch.as_tensor(alpha_t, dtype=torch.float32, device=latents.device)
    eps = to_eps_x0(model_output.detach(), latents.detach(), alpha_t, prediction_type)[0]
    with torch.enable_grad():
        x = latents.detach().requires_grad_(True)
        x0 = (x - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
        x0 = x0 * masks[:, None].to(x0.dtype)
        vae = engine.vae
        img = vae.decode(x0.to(engine.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        img = (img.float() / 2 + 0.5).clamp(0, 1)
        probs = sal_model(img)
        if not isinstance(probs, torch.Tensor) or probs.ndim != 4 or probs.shape[0] != x.shape[0] \
                or probs.shape[1] < 2:
            shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
            raise ValueError(f"sal_model: must map (N, 3, H, W) images to (N, K, H, W) probabilities with K >= 2, "
                             f"got {shape}")
        probs = probs.float()
        if not bool(torch.isfinite(probs).all()):
            raise ValueError("sal_model: returned non-finite values (NaN/inf) for the predicted image")
        if (probs.sum(1) - 1).abs().max() > 1e-2 or probs.min() < -1e-4:
            raise ValueError("sal_model: its output must be class probabilities (>= 0, summing to 1 over dim 1); "
                             "apply softmax in the model")
        k = probs.shape[1]
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(k)  # (N, H', W') in [0, 1]
        loss = entropy.flatten(1).mean(1).sum()
        (grad,) = torch.autograd.grad(loss, x)
    return grad.to(latents.dtype)


def subject_aware_guidance(engine: Engine, latents: torch.Tensor, model_output: torch.Tensor, alpha_t,
                           masks: torch.Tensor, sal_model, scale: float, prediction_type: str = "epsilon"
                           ) -> torch.Tensor:
    """``x_t − scale · ∇L ⊙ m`` for every row (see :func:`subject_aware_grad`): the latent moves only inside
    its segment's mask (exactly unchanged where the mask is 0)."""
    grad = subject_aware_grad(engine, latents, model_output, alpha_t, masks, sal_model, prediction_type)
    return latents - scale * grad * masks[:, None].to(latents.dtype)


# --------------------------------------------------------------------------------------------- batch state
@dataclass
class _Request:
    """A parsed request and its state during sampling."""

    prompt: str
    seed: int
    layout: SegmentLayout
    schedule: list[str]
    prompts: list[str]  # per segment
    negatives: list[str | None]  # per segment (None: no negative prompt)
    guidance: list[float]  # per segment
    subjects: list[int]  # segment indices guided by subject-aware guidance
    global_negative: str | None
    scaffold: torch.Tensor | None = None  # (1, C, h, w) scaffolding latent
    noise: torch.Tensor | None = None  # (1, C, h, w) the request's initial noise (noises the scaffolding latent)
    seg_latents: torch.Tensor | None = None  # (S, C, h, w) independent segments while scaffolding (no image)

    @property
    def s(self) -> int:
        return self.layout.num_segments


@dataclass
class _Rows:
    """The UNet rows of one step: for each row its input, embedding indices and guidance."""

    inputs: list[torch.Tensor] = field(default_factory=list)  # (n_i, C, h, w) per track
    cond: list[int] = field(default_factory=list)  # embedding index per row
    uncond: list[int] = field(default_factory=list)  # embedding index per row (-1: no uncond row)
    guidance: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # rows [a, b) of each track

    def add(self, x: torch.Tensor, cond: list[int], uncond: list[int], guidance: list[float]) -> None:
        a = len(self.cond)
        self.inputs.append(x)
        self.cond += cond
        self.uncond += [u if g > 1.0 else -1 for u, g in zip(uncond, guidance)]
        self.guidance += guidance
        self.spans.append((a, a + len(cond)))


def _pad_segments(tensors: list[torch.Tensor], s_max: int) -> torch.Tensor:
    """``[(S_r, ...)]`` -> ``(B, s_max, ...)``, padded with zeros (zero-mask segments)."""
    out = tensors[0].new_zeros(len(tensors), s_max, *tensors[0].shape[1:])
    for b, x in enumerate(tensors):
        out[b, : x.shape[0]] = x
    return out


def _segment_rows(x: torch.Tensor, spans: list[tuple[int, int]], s_max: int) -> torch.Tensor:
    """Rows ``[a, e)`` of ``x`` for each span as ``(len(spans), s_max, ...)``: a view of ``x`` (the kernels read
    strided inputs in place) when the spans are consecutive runs of ``s_max`` rows, else a zero-padded copy."""
    a0 = spans[0][0]
    if all(a == a0 + j * s_max and e - a == s_max for j, (a, e) in enumerate(spans)):
        return x[a0 : a0 + len(spans) * s_max].unflatten(0, (len(spans), s_max))
    return _pad_segments([x[a:e] for a, e in spans], s_max)


def _parse_requests(engine: Engine, requests, height, width, seeds, guidance_scale, global_steps, scaffold_fraction,
                    steps, tolerance, blur) -> tuple[list[_Request], int, int]:
    reqs: list[_Request] = []
    factor = engine.vae_scale_factor
    limits = engine.config.limits
    for i, r in enumerate(requests):
        where = f"requests[{i}]." if len(requests) > 1 else ""
        if isinstance(r, dict):
            try:
                r = ComposeRequest(**r)
            except TypeError as e:
                raise ValueError(f"requests[{i}]: {e}") from None
        if not isinstance(r, ComposeRequest):
            raise ValueError(f"requests[{i}]: must be a ComposeRequest or a dict, got {type(r).__name__}")
        if not isinstance(r.prompt, str):
            raise ValueError(f"{where}prompt: must be a string, got {type(r.prompt).__name__}")
        (prompt,) = as_prompt_list(r.prompt, f"{where}prompt", limits)
        if not prompt.strip():
            raise ValueError(f"{where}prompt: empty")
        neg = (None if r.negative_prompt is None  # absent: the zero embedding on SDXL base, as diffusers
               else check_text(r.negative_prompt, f"{where}negative_prompt", limits.max_prompt_chars))
        lay = parse_layout(r.layout, r.segments, height=height, width=width, factor=factor, tolerance=tolerance,
                           blur=blur, field=where, limits=limits)
        if height is None or width is None:  # the first layout sets the size of the batch
            height, width = (int(v) for v in lay.labels.shape)
        segs = lay.segments
        marked = [j for j, s in enumerate(segs) if s.subject]
        any_marked = any(s.subject is not None for s in segs)
        subjects = marked if any_marked else [j for j, s in enumerate(segs) if s.color is not None]
        req = _Request(
            prompt=prompt, seed=seeds[i], layout=lay, global_negative=neg,
            schedule=stage_schedule(steps, scaffold_image=r.scaffold_image is not None, global_steps=global_steps,
                                    scaffold_fraction=scaffold_fraction),
            prompts=[s.prompt if s.prompt is not None else prompt for s in segs],
            negatives=[s.negative_prompt if s.negative_prompt is not None else neg for s in segs],
            guidance=[s.guidance if s.guidance is not None else guidance_scale for s in segs],
            subjects=subjects)
        if r.scaffold_image is not None:
            req.scaffold = load_scaffold_image(r.scaffold_image, height, width, f"{where}scaffold_image", limits)
        reqs.append(req)
    return reqs, height, width


# --------------------------------------------------------------------------------------------- pipeline
def compose_batch_program(
    engine: Engine,
    requests: Sequence[ComposeRequest | dict],
    *,
    steps: int = 80,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int | Sequence[int] | None = None,
    global_steps: int | None = None,
    scaffold_fraction: float = SCAFFOLD_FRACTION,
    harmonize: str = "blend",
    tolerance: float = DEFAULT_TOLERANCE,
    blur: float = 0.0,
    sal_model=None,
    sal_scale: float = 0.0,
    sal_steps: tuple[int, int] | None = None,
    progress: bool | None = None,
    output_type: str = "pil",
    callback: Callable[[dict], None] | None = None,
    sampler: str = DEFAULT_SAMPLER,
    loras=None,
    learned_tokens=None,
):
    """Composite generation of several requests in one batch (one UNet call per step for all of them).

    :func:`compose_batch` runs it; ``compose_batch_program`` returns it as a program (see
    :mod:`~dreamfuse.engine.pipelines.program`): arguments checked at once, work done as it is driven. Its UNet
    calls carry no layer handlers, so a scheduler may merge them with other requests' rows of the same size.

    Args:
        requests: :class:`ComposeRequest` (or dicts of its fields), one image each.
        steps: DDIM steps (80 in MSP-Diffusion).
        guidance_scale: CFG scale of the global prompt and default of every segment's ``guidance``.
        height, width: image size; default: the first layout's size. Every layout must be exactly this size.
        seed: as text2img: an int (request i gets ``seed + i``), one int per request, or None (random).
        global_steps: global-diffuser steps (default 2, or 8 for a request with a scaffolding image, as the
            paper at 80 steps; clipped to ``steps``).
        scaffold_fraction: scaffolding steps ``k = round(scaffold_fraction · steps)`` after the global diffuser
            (default 0.3 — our choice, the papers do not give k); 1.0 scaffolds every remaining step.
        harmonize: ``"blend"`` (segments' prompts on the shared latent, predictions blended by the masks) or
            ``"global"`` (the global prompt alone).
        tolerance, blur: colour matching and mask softening, see :mod:`dreamfuse.engine.layout`.
        sal_model: subject-aware guidance model: a ``torch.nn.Module`` (or callable) mapping images
            ``(N, 3, H, W)`` in [0, 1] to class probabilities ``(N, K, H, W)``. Not a path: a TorchScript file is
            a program; :func:`load_sal_model` loads one the user trusts.
        sal_scale: its strength λ (default 0 = off). Guided segments: those with ``"subject": true``; when no
            segment of a request says ``"subject"``, all its colour segments (not the background). Costs a VAE
            decode and backward per guided segment and step (no UNet backward).
        sal_steps: step range ``[start, end)`` of the guidance (default: every scaffolding and harmonization
            step; the global diffuser has no segments to guide).
        progress, output_type: as text2img (PIL ``.info`` holds the global prompt and the seed).
        callback: called after each UNet call with ``{"step", "timestep", "stages", "rows"}`` (the stage of
            each request, the number of UNet rows).
        sampler: one of :data:`COMPOSE_SAMPLERS` (default ``"ddim"``): the samplers that keep no per-row state
            between steps. Multistep and second-order samplers (DPM-Solver++, UniPC, Heun, DPM-SDE) are refused: a
            request's rows change from S segment latents to one shared latent between stages, and their history
            of earlier outputs has no row to follow. A stochastic sampler (``euler-a``, ``lcm``) draws each
            request's noise from its own seed, for all of its rows.
        loras, learned_tokens: per-request adapters for every row of every request of the batch, as
            :func:`~dreamfuse.engine.pipelines.text2img.text2img`.
    """
    if not isinstance(requests, Sequence) or isinstance(requests, (str, dict)) or not requests:
        raise ValueError("requests: give a non-empty list of ComposeRequest")
    limits = engine.config.limits
    check_batch(len(requests), limits, "requests")
    steps = check_model_steps(engine, check_steps(steps, limits=limits))
    guidance_scale = check_guidance(guidance_scale)
    sampler = check_sampler(sampler, allowed=COMPOSE_SAMPLERS)
    if height is not None or width is not None:  # validate what is given; the first layout gives the rest
        f = engine.vae_scale_factor
        check_size(f if height is None else height, f if width is None else width, f, limits)
    seeds = resolve_seeds(seed, len(requests))
    check_output_type(output_type)
    check_flag(progress, "progress", optional=True)
    check_callable(callback, "callback")
    if harmonize not in HARMONIZE:
        raise ValueError(f"harmonize: must be 'blend' or 'global', got {harmonize!r}")
    sal_scale = check_number(sal_scale, "sal_scale", low=0)
    if sal_scale > 0 and sal_model is None:
        raise ValueError("sal_model: needed when sal_scale > 0")
    reqs, height, width = _parse_requests(engine, requests, height, width, seeds, guidance_scale, global_steps,
                                          scaffold_fraction, steps, tolerance, blur)
    if sal_steps is None:
        sal_lo, sal_hi = 0, steps
    elif isinstance(sal_steps, (tuple, list)) and len(sal_steps) == 2:
        sal_lo, sal_hi = (check_int_arg(v, "sal_steps") for v in sal_steps)
    else:
        raise ValueError(f"sal_steps: must be a (start, end) pair of step indices, got {sal_steps!r}"[:200])
    if not (0 <= sal_lo <= sal_hi <= steps):
        raise ValueError(f"sal_steps: need 0 <= start <= end <= steps ({steps}), got {sal_steps!r}")
    guide_model = _check_sal_model(sal_model, engine.device) if sal_scale > 0 else None
    adapters = request_adapters(engine, loras, learned_tokens)
    return holding(adapters, _compose_steps(engine, reqs, steps, guidance_scale, height, width, harmonize,
                                            guide_model, sal_scale, sal_lo, sal_hi, progress, output_type, callback,
                                            sampler, adapters))


@torch.no_grad()
def _compose_steps(engine, reqs, steps, guidance_scale, height, width, harmonize, guide_model, sal_scale, sal_lo,
                   sal_hi, progress, output_type, callback, sampler, adapters=None):
    ops = ops_for(engine.config.backend)
    dev, dt = engine.device, engine.dtype
    s_max = max(r.s for r in reqs)
    # (B, S_max, h, w) fp32 (the kernels take any float masks; fp32 keeps blurred masks summing to 1)
    masks = _pad_segments([r.layout.masks for r in reqs], s_max).to(dev)

    # Every distinct prompt once; rows index into the table.
    table = list(dict.fromkeys(p for r in reqs for p in (r.global_negative, r.prompt, *r.negatives, *r.prompts)))
    index = {p: i for i, p in enumerate(table)}
    emb_table, pooled_table = engine.encode_text(table, adapters)

    sched = engine.new_sampler(sampler, steps, [r.seed for r in reqs])
    latents = sched.initial_latents(engine.latent_shape(height, width), dev, dt)  # (B, C, h, w), the shared latents
    kind = prediction_type_of(sched.scheduler)
    noise = latents / sched.init_noise_sigma
    for b, r in enumerate(reqs):
        r.noise = noise[b : b + 1]
        if r.scaffold is not None:
            r.scaffold = engine.encode_image(r.scaffold).to(dt)

    def finish_scaffold(ids: list[int]) -> None:
        """Composite the independent scaffolding segments of requests ``ids`` into their shared latents."""
        if ids:
            seg = _pad_segments([reqs[b].seg_latents for b in ids], s_max)
            latents[ids] = ops.composite_latents(seg, masks[ids])
            for b in ids:
                reqs[b].seg_latents = None

    with engine.progress(steps, "compose", progress) as bar:
        for i, t in enumerate(sched.timesteps):
            stages = [r.schedule[i] for r in reqs]
            finish_scaffold([b for b, r in enumerate(reqs) if stages[b] != "scaffold" and r.seg_latents is not None])

            # ---- rows of this step: one track per request (shared latent, or its S segments)
            rows = _Rows()
            kinds = []  # per request: "shared" (eps steps latents[b]), "blend", "segments", "filled"
            fill_ids = [b for b, r in enumerate(reqs) if stages[b] == "scaffold" and r.scaffold is not None]
            filled = {}
            if fill_ids:
                fill = torch.cat([sched.add_noise(reqs[b].scaffold, reqs[b].noise, t) for b in fill_ids])
                seg_in = ops.segment_fill(latents[fill_ids, None].expand(-1, s_max, -1, -1, -1), masks[fill_ids], fill)
                filled = {b: seg_in[j, : reqs[b].s] for j, b in enumerate(fill_ids)}
            for b, (r, st) in enumerate(zip(reqs, stages)):
                seg_cond = [index[p] for p in r.prompts]
                seg_uncond = [index[p] for p in r.negatives]
                if st == "global" or (st == "harmonize" and harmonize == "global"):
                    rows.add(latents[b : b + 1], [index[r.prompt]], [index[r.global_negative]], [guidance_scale])
                    kinds.append("shared")
                elif st == "harmonize":
                    rows.add(latents[b : b + 1].expand(r.s, -1, -1, -1), seg_cond, seg_uncond, r.guidance)
                    kinds.append("blend")
                elif r.scaffold is not None:
                    rows.add(filled[b], seg_cond, seg_uncond, r.guidance)
                    kinds.append("filled")
                else:
                    if r.seg_latents is None:
                        r.seg_latents = latents[b : b + 1].repeat(r.s, 1, 1, 1)
                    rows.add(r.seg_latents, seg_cond, seg_uncond, r.guidance)
                    kinds.append("segments")

            # ---- one UNet call: [uncond rows; cond rows]
            x_all = torch.cat(rows.inputs)
            has_u = [k for k, u in enumerate(rows.uncond) if u >= 0]
            all_u = len(has_u) == len(rows.cond)
            model_in = sched.scale_model_input(torch.cat([x_all if all_u else x_all[has_u], x_all]), t)
            pick = [rows.uncond[k] for k in has_u] + rows.cond
            pooled = None if pooled_table is None else pooled_table[pick]
            eps = yield UNetCall(model_in, t, emb_table[pick], pooled=pooled, step=i, steps=steps,
                                 preview=(slice(len(has_u), len(has_u) + 1), sched.alpha_bar(t)), adapters=adapters)
            eps_c = eps[len(has_u):]
            if all_u:
                eps_u = eps[: len(has_u)]
            else:  # rows without an uncond row (guidance <= 1) take u = c, so u + g·(c − u) = c exactly
                eps_u = eps_c.clone()
                eps_u[has_u] = eps[: len(has_u)]
            if callback is not None:
                callback({"step": i, "timestep": int(t), "stages": stages, "rows": eps.shape[0]})

            # ---- guided eps per track: CFG per row, masks blend for the harmonizing requests
            g_rows = torch.tensor(rows.guidance, device=dev, dtype=torch.float32)
            eps_rows = (eps_u + g_rows[:, None, None, None] * (eps_c - eps_u)).to(eps.dtype)
            blend_ids = [b for b, k in enumerate(kinds) if k == "blend"]
            blended = {}
            if blend_ids:
                spans = [rows.spans[b] for b in blend_ids]
                u, c, g = (_segment_rows(x, spans, s_max) for x in (eps_u, eps_c, g_rows))
                out = ops.composite_blend(u, c, masks[blend_ids], g)
                blended = {b: out[j : j + 1] for j, b in enumerate(blend_ids)}
            tracks_x, tracks_eps = [], []
            for b, k in enumerate(kinds):
                a, e = rows.spans[b]
                x = rows.inputs[b] if k != "blend" else latents[b : b + 1]
                tracks_x.append(x)
                tracks_eps.append(blended[b] if k == "blend" else eps_rows[a:e])

            # ---- subject-aware guidance on x_t inside the subject segments
            if guide_model is not None and sal_lo <= i < sal_hi:
                # the guidance works on the model's (variance-preserving) input c_t·x: c_t = 1 but for σ samplers
                c, alpha_t = sched.vp_scale(t), sched.alpha_bar(t).to(dev)
                vp_x = [x * c for x in tracks_x] if c != 1.0 else tracks_x
                vp_x, tracks_eps = _guide(engine, reqs, kinds, stages, vp_x, tracks_eps, masks, alpha_t,
                                          guide_model, float(sal_scale), kind)
                tracks_x = [x / c for x in vp_x] if c != 1.0 else vp_x

            # ---- one sampler step for every track (each row with its request's noise), then scatter back
            sizes = [x.shape[0] for x in tracks_x]
            owners = [b for b, n in enumerate(sizes) for _ in range(n)]
            stepped = sched.step(torch.cat(tracks_eps), t, torch.cat(tracks_x), rows=owners)
            stepped = list(stepped.split(sizes))
            for b, k in enumerate(kinds):
                if k in ("shared", "blend"):
                    latents[b] = stepped[b][0]
                elif k == "segments":
                    reqs[b].seg_latents = stepped[b]
            if fill_ids:
                seg = _pad_segments([stepped[b] for b in fill_ids], s_max)
                latents[fill_ids] = ops.composite_latents(seg, masks[fill_ids])
            bar.update(1)
        finish_scaffold([b for b, r in enumerate(reqs) if r.seg_latents is not None])

    infos = [{"prompt": r.prompt, "seed": r.seed, "steps": steps, "guidance_scale": guidance_scale, "segments": r.s,
              "harmonize": harmonize, "sampler": sampler} for r in reqs]
    return (yield from finish_program(engine, latents, output_type, infos))


compose_batch = driven(compose_batch_program, "compose_batch")


def _guide(engine, reqs, kinds, stages, tracks_x, tracks_eps, masks, alpha_t, model, scale,
           prediction_type: str = "epsilon") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Subject-aware guidance for every (track row, subject segment) pair of the step, in one batch: the moved
    latents, and the model outputs holding each row's ε at its moved latent (unchanged for an ε-model; for a v- or
    x0-model they change where the latent moved, and nowhere else, bit for bit)."""
    sel = []  # (track b, row within track, segment j)
    for b, (r, k) in enumerate(zip(reqs, kinds)):
        if stages[b] == "global":
            continue
        for j in r.subjects:
            sel.append((b, j if k in ("segments", "filled") else 0, j))
    if not sel:
        return tracks_x, tracks_eps
    x = torch.stack([tracks_x[b][row] for b, row, _ in sel])
    e = torch.stack([tracks_eps[b][row] for b, row, _ in sel])
    m = torch.stack([masks[b, j] for b, _, j in sel])
    delta = subject_aware_guidance(engine, x, e, alpha_t, m, model, scale, prediction_type) - x
    out = [tx.clone() for tx in tracks_x]
    outputs = tracks_eps if prediction_type == "epsilon" else [te.clone() for te in tracks_eps]
    for (b, row, _), d in zip(sel, delta):
        out[b][row] += d  # several subjects on one shared latent: their (disjoint-mask) updates add up
        if prediction_type != "epsilon":  # the same ε at the moved latent (linear in d: the updates add up too)
            outputs[b][row] = update_output(outputs[b][row], alpha_t, prediction_type, d_sample=d)
    return out, outputs


def compose(engine: Engine, layout, segments, *, prompt: str, negative_prompt: str | None = None,
            scaffold_image=None, **kwargs):
    """Composite (MSP) generation of one image from a segment layout.

    Args:
        layout: PIL image, path, or ``(H, W, 3)`` uint8 array with one flat colour per segment (anti-aliased
            edges are fine); its size is the image size unless ``height``/``width`` are given (then it must match).
        segments: mapping or SEGMENTS.json path: ``{"#ff0000": "a red car", "#0000ff": {"prompt": "a dog",
            "negative_prompt": "blurry", "guidance": 9, "subject": true}, "background": "a street"}``. Without
            ``"background"``, pixels of unlisted colours take the global prompt.
        prompt: the global prompt; negative_prompt: its negative (and every segment's default).
        scaffold_image: optional scaffolding image.
        **kwargs: see :func:`compose_batch` (steps=80, guidance_scale, seed, global_steps, scaffold_fraction,
            harmonize, tolerance, blur, sal_model, sal_scale, sal_steps, progress, output_type, callback).

    Returns a list of one PIL image (``output_type="pil"``), or a ``(1, ...)`` tensor.
    """
    return drive(engine, compose_program(engine, layout, segments, prompt=prompt, negative_prompt=negative_prompt,
                                         scaffold_image=scaffold_image, **kwargs))


def compose_program(engine: Engine, layout, segments, *, prompt: str, negative_prompt: str | None = None,
                    scaffold_image=None, **kwargs):
    """:func:`compose` as a program (see :func:`compose_batch_program`)."""
    req = ComposeRequest(layout, segments, prompt, negative_prompt, scaffold_image)
    return compose_batch_program(engine, [req], **kwargs)
