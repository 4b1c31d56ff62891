"""Sampling steps a scheduler can batch across programs: classifier-free guidance and the DDIM update, as data.

A program that samples with DDIM (η = 0, no clipping or thresholding: the pipelines' default) does not combine
CFG and call ``DDIMScheduler.step`` itself: it hands a :class:`StepUpdate` along with its UNet call and is sent the
*new latents* instead of the UNet's output. Alone (``drive``) the update is applied at once; the step scheduler
collects the updates of every request that finished its UNet rows in a tick and applies them in one batched call of
``dreamfuse::cfg_ddim_step`` (:mod:`dreamfuse.kernels.sampler`), each row with its own guidance scale and DDIM
coefficients. Off CUDA the arithmetic is diffusers' own, operation by operation (the op's reference), so the latents
are the ones ``cfg_combine`` + ``DDIMScheduler.step`` give, bit for bit, whatever other requests share the call; on
CUDA one fused Triton launch per group keeps the intermediates in fp32 (within one rounding of diffusers' fp16
op-by-op result, and a batch of 64 requests costs one launch instead of ~1000). Other samplers (and DDIM
configurations outside that set) keep the per-program path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...kernels.sampler import PREDICTIONS, cfg_ddim_step, cfg_ddim_step_reference


@dataclass
class StepUpdate:
    """CFG and the DDIM update of one program's ``n`` images at one step (see the module docs)."""

    latents: torch.Tensor
    """``x_t`` ``(n, C, h, w)``."""
    guidance: float | None
    """The CFG scale (the UNet rows are ``[uncond × n, cond × n]``), or None (``n`` rows, no CFG)."""
    coeffs: torch.Tensor
    """``(4,)`` float32: ``sqrt(1 − ᾱ_t), sqrt(ᾱ_t), sqrt(ᾱ_prev), sqrt(1 − ᾱ_prev)``, computed as diffusers does."""
    prediction: str

    @property
    def rows(self) -> int:
        return int(self.latents.shape[0])

    def apply(self, out: torch.Tensor) -> torch.Tensor:
        """The new latents from this step's UNet output."""
        return apply_updates([self], [out])[0]


def ddim_update(sampler, t, latents: torch.Tensor, guidance: float | None,
                cache: dict | None = None) -> StepUpdate | None:
    """A :class:`StepUpdate` for a DDIM ``sampler`` (:class:`~dreamfuse.engine.samplers.Sampler`) at timestep
    ``t``, or None when its step is not the batchable one (another sampler, clipping, thresholding, an unknown
    prediction type): then the program steps with diffusers itself. ``cache``: a dict shared by the samplers of
    one model's scheduler config (the engine's), where the coefficients of each (steps, t) are computed once."""
    sched = getattr(sampler, "scheduler", None)
    if getattr(sampler, "name", None) != "ddim" or sched is None or type(sched).__name__ != "DDIMScheduler":
        return None
    cfg = sched.config
    if cfg.clip_sample or cfg.thresholding or cfg.prediction_type not in PREDICTIONS:
        return None
    cache = sampler.__dict__.setdefault("_ddim_coeffs", {}) if cache is None else cache
    key = (sched.num_inference_steps, int(t))
    if key not in cache:
        cache[key] = _ddim_coeffs(sched, t)
    return StepUpdate(latents, None if guidance is None else float(guidance), cache[key], cfg.prediction_type)


def _ddim_coeffs(sched, t) -> torch.Tensor:
    cfg = sched.config
    # diffusers' DDIMScheduler.step, steps 1-2 and 5-6 with eta = 0, on the same 0-d fp32 tensors
    prev_timestep = t - cfg.num_train_timesteps // sched.num_inference_steps
    alpha_prod_t = sched.alphas_cumprod[t]
    alpha_prod_t_prev = sched.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else sched.final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    std_dev_t = 0.0 * sched._get_variance(t, prev_timestep) ** 0.5
    return torch.stack([beta_prod_t ** 0.5, alpha_prod_t ** 0.5, alpha_prod_t_prev ** 0.5,
                        (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5]).to(torch.float32)


def apply_updates(updates: Sequence[StepUpdate], outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Apply many programs' updates to their UNet outputs (``outs[i]``: ``2n_i`` rows with CFG, else ``n_i``):
    one batched ``cfg_ddim_step`` per (prediction type, CFG or not, dtype, latent shape, device)."""
    results: list[torch.Tensor | None] = [None] * len(updates)
    groups: dict[tuple, list[int]] = {}
    for i, (u, out) in enumerate(zip(updates, outs)):
        want = 2 * u.rows if u.guidance is not None else u.rows
        if out.shape[0] != want or tuple(out.shape[1:]) != tuple(u.latents.shape[1:]):
            raise ValueError(f"update: a UNet output of {tuple(out.shape)} for {u.rows} image(s) "
                             f"{'with' if u.guidance is not None else 'without'} CFG")
        key = (u.prediction, u.guidance is None, out.dtype, tuple(out.shape[1:]), out.device)
        groups.setdefault(key, []).append(i)
    for (prediction, no_cfg, _, _, device), idx in groups.items():
        us = [updates[i] for i in idx]
        x = torch.cat([u.latents for u in us]) if len(us) > 1 else us[0].latents
        coeffs = torch.cat([u.coeffs.to(device).expand(u.rows, 4) for u in us])
        if no_cfg:
            uncond, guidance = None, None
            cond = torch.cat([outs[i] for i in idx]) if len(idx) > 1 else outs[idx[0]]
        else:
            uncond = torch.cat([outs[i][: u.rows] for i, u in zip(idx, us)])
            cond = torch.cat([outs[i][u.rows:] for i, u in zip(idx, us)])
            guidance = torch.cat([torch.full((u.rows,), u.guidance, dtype=torch.float32) for u in us]).to(device)
        # CUDA: the fused Triton kernel (one launch per group, fp32 inside: within one rounding of diffusers' op-by-op
        # fp16); elsewhere the reference, diffusers' arithmetic bit for bit (the interpreter is for the kernel tests)
        step = cfg_ddim_step if x.is_cuda else cfg_ddim_step_reference
        new = step(uncond, cond, x, guidance, coeffs, PREDICTIONS.index(prediction))
        start = 0
        for i, u in zip(idx, us):
            results[i] = new[start:start + u.rows]
            start += u.rows
    return results


__all__ = ["StepUpdate", "apply_updates", "ddim_update"]
