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

A program can go further and hand over the *rest of its loop*: a :class:`SamplingLoop` holds everything its
remaining DDIM steps need (the latents, the conditioning, each remaining step's timestep and coefficients), and the
program is sent the final latents. Alone, :meth:`SamplingLoop.run` runs the steps (the same UNet calls and the same
updates as the step-by-step path: bit for bit the same latents); the step scheduler keeps the loops of many requests
as one persistent batch instead (:mod:`dreamfuse.engine.server.loops`), advancing all their rows with a handful of
batched tensor operations per tick and no per-request Python beyond the step event.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
        """The new latents from this step's UNet output (one update: no grouping, the op directly)."""
        n = self.rows
        if out.shape[0] != (2 * n if self.guidance is not None else n) or out.shape[1:] != self.latents.shape[1:]:
            return apply_updates([self], [out])[0]  # says what is wrong
        x = self.latents
        step = cfg_ddim_step if x.is_cuda else cfg_ddim_step_reference
        coeffs = self.coeffs.to(x.device).expand(n, 4).contiguous()
        pred = PREDICTIONS.index(self.prediction)
        if self.guidance is None:
            return step(None, out, x, None, coeffs, pred)
        g = torch.full((n,), self.guidance, dtype=torch.float32, device=x.device)
        return step(out[:n], out[n:], x, g, coeffs, pred)


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
        ns = [int(u.latents.shape[0]) for u in us]
        single = len(us) == 1
        x = us[0].latents if single else torch.cat([u.latents for u in us])
        counts = torch.tensor(ns)
        coeffs = (us[0].coeffs.expand(ns[0], 4) if single
                  else torch.stack([u.coeffs for u in us]).repeat_interleave(counts, dim=0)).to(device)
        if no_cfg:
            uncond, guidance = None, None
            cond = outs[idx[0]] if single else torch.cat([outs[i] for i in idx])
        else:
            uncond = outs[idx[0]][: ns[0]] if single else torch.cat([outs[i][:n] for i, n in zip(idx, ns)])
            cond = outs[idx[0]][ns[0]:] if single else torch.cat([outs[i][n:] for i, n in zip(idx, ns)])
            guidance = torch.tensor([u.guidance for u in us], dtype=torch.float32).repeat_interleave(counts)
            guidance = guidance.to(device)
        # CUDA: the fused Triton kernel (one launch per group, fp32 inside: within one rounding of diffusers' op-by-op
        # fp16); elsewhere the reference, diffusers' arithmetic bit for bit (the interpreter is for the kernel tests)
        step = cfg_ddim_step if x.is_cuda else cfg_ddim_step_reference
        new = step(uncond, cond, x, guidance, coeffs.contiguous(), PREDICTIONS.index(prediction))
        start = 0
        for i, n in zip(idx, ns):
            results[i] = new[start:start + n]
            start += n
    return results


@dataclass
class SamplingLoop:
    """The remaining DDIM (η = 0) steps of one program's ``n`` images, as data (see the module docs).

    Its UNet rows are the latents duplicated for CFG (``[x; x]``, uncond rows first: ``embeddings`` laid out
    ``[uncond × n, cond × n]``) or the latents alone (``guidance`` None). Step ``k`` (0-based within the loop) is
    the schedule's step ``start + k``, at ``timesteps[k]`` with DDIM coefficients ``coeffs[k]``."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    """``(T,)`` the remaining timesteps (on the engine's device)."""
    coeffs: torch.Tensor
    """``(T, 4)`` float32, :class:`StepUpdate`'s coefficients of each remaining step."""
    alpha_bars: Callable[[int], Any]
    """``ᾱ`` of step ``k``'s input (for previews: evaluated only when one is due)."""
    embeddings: torch.Tensor
    guidance: float | None
    prediction: str
    start: int
    """The schedule index of the loop's first step."""
    steps: int
    """Model evaluations of the whole schedule."""
    ip_tokens: torch.Tensor | None = None
    ip_scale: float = 1.0
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    preview_rows: slice | None = None
    """The rows (of the UNet call) a preview reads: the conditional row of the first image."""
    on_step: Callable[[], None] | None = None
    """Called after each step when run alone (a progress bar); a scheduler reports steps as events instead."""
    adapters: Any = None
    """The request's per-request adapters (an :class:`~dreamfuse.engine.adapters.AdapterSet` for all its rows), or
    None: a persistent batch gives every row its own (:mod:`dreamfuse.engine.server.loops`)."""

    @property
    def n(self) -> int:
        return int(self.latents.shape[0])

    @property
    def length(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def rows(self) -> int:
        """UNet rows per step."""
        return 2 * self.n if self.guidance is not None else self.n

    def call(self, k: int, x: torch.Tensor):
        """Step ``k``'s UNet call (its update attached) at latents ``x``: the step-by-step path's exact call."""
        from .program import UNetCall

        update = StepUpdate(x, self.guidance, self.coeffs[k], self.prediction)
        model_in = torch.cat([x, x]) if self.guidance is not None else x
        alpha = self.alpha_bars
        return UNetCall(model_in, self.timesteps[k], self.embeddings, self.ip_tokens, self.ip_scale,
                        pooled=self.pooled, time_ids=self.time_ids, step=self.start + k, steps=self.steps,
                        preview=None if self.preview_rows is None else (self.preview_rows, lambda: alpha(k)),
                        update=update, adapters=self.adapters)

    @torch.no_grad()
    def run(self, engine) -> torch.Tensor:
        """Every remaining step, alone; returns the final latents. The same UNet calls and updates as
        :meth:`call` describes, without building a request object per step."""
        x, n = self.latents, self.n
        dev = x.device
        step = cfg_ddim_step if x.is_cuda else cfg_ddim_step_reference
        pred = PREDICTIONS.index(self.prediction)
        coeffs = self.coeffs.to(dev)
        g = None if self.guidance is None else torch.full((n,), self.guidance, dtype=torch.float32, device=dev)
        for k in range(self.length):
            model_in = torch.cat([x, x]) if g is not None else x
            out = engine.unet_call(model_in, self.timesteps[k], self.embeddings, self.ip_tokens, self.ip_scale,
                                   pooled=self.pooled, time_ids=self.time_ids, adapters=self.adapters)
            c = coeffs[k].expand(n, 4).contiguous()
            x = step(None, out, x, None, c, pred) if g is None else step(out[:n], out[n:], x, g, c, pred)
            if self.on_step is not None:
                self.on_step()
        return x


def ddim_loop(sampler, start: int, latents: torch.Tensor, guidance: float | None, embeddings: torch.Tensor,
              cache: dict | None = None, **fields) -> SamplingLoop | None:
    """The remaining steps (from schedule index ``start``) of a DDIM ``sampler`` as a :class:`SamplingLoop`, or
    None when its steps are not the batchable ones (:func:`ddim_update` says which) or the schedule evaluates the
    model more than once per step. ``fields``: the loop's other fields (``ip_tokens``, ``pooled``, ...)."""
    timesteps = sampler.timesteps[start:]
    if len(timesteps) == 0:
        return None
    updates = [ddim_update(sampler, t, latents, guidance, cache) for t in timesteps]
    if any(u is None for u in updates):
        return None
    return SamplingLoop(latents, timesteps, torch.stack([u.coeffs for u in updates]),
                        lambda k: sampler.alpha_bar(timesteps[k]), embeddings, guidance, updates[0].prediction,
                        start, sampler.evaluations, **fields)


__all__ = ["SamplingLoop", "StepUpdate", "apply_updates", "ddim_loop", "ddim_update"]
