"""Persistent batches: the running requests' DDIM loops advanced together, a few tensor operations per tick.

A text2img request whose sampling is DDIM hands the scheduler the rest of its loop at once
(:class:`~dreamfuse.engine.pipelines.stepping.SamplingLoop`) instead of asking for one UNet call per step. The
scheduler keeps the loops that can share a UNet call (same latent size, dtype, conditioning widths, IP-Adapter scale,
CFG or not, prediction type) in one :class:`LoopGroup`: the latents of all its requests in one tensor ``X``, and
index tensors built once when a request joins or leaves. Each tick is then, whatever the number of requests:

* the UNet input ``X[in_index]`` (CFG rows duplicated by a gather), each row's timestep ``T[base + K][row_job]``;
* the UNet call(s), at most ``max_batch_rows`` rows each;
* CFG and the DDIM update of every row in one ``dreamfuse::cfg_ddim_step`` (per-row guidance and coefficients,
  gathered the same way);
* ``K += 1``, and per request only its step event (and, at its last step, handing its final latents back to its
  program, which decodes).

The arithmetic is the step-by-step path's (the same UNet rows, the same update), so a request's image is the one it
gets alone; no per-request tensor is made, copied or concatenated between joins and leaves. Requests too large for a
tick (more rows than ``max_batch_rows``) are stepped one call at a time instead, in pieces, by the scheduler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..adapters import row_adapters, rows_slice
from ..pipelines.stepping import SamplingLoop, apply_updates

if TYPE_CHECKING:
    from .scheduler import Job


def loop_key(loop: SamplingLoop) -> tuple:
    ip = None if loop.ip_tokens is None else (tuple(loop.ip_tokens.shape[1:]), float(loop.ip_scale))
    return (tuple(loop.latents.shape[1:]), loop.latents.dtype, tuple(loop.embeddings.shape[1:]), ip,
            loop.pooled is None, loop.time_ids is None, loop.guidance is None, loop.prediction,
            loop.latents.device)


def compat_key(loop: SamplingLoop) -> tuple:
    """The scheduler's merge key (``_merge_key``) of the loop's UNet calls: step-by-step calls with this key can
    share the loop group's calls."""
    ip = None if loop.ip_tokens is None else (tuple(loop.ip_tokens.shape[1:]), float(loop.ip_scale))
    return (tuple(loop.latents.shape[1:]), loop.latents.dtype, tuple(loop.embeddings.shape[1:]), ip,
            loop.pooled is None)


def _rows(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """SDXL time ids as one row per UNet row (a single ``(6,)`` vector for all rows expanded)."""
    if t is None:
        return None
    return t.reshape(1, -1).expand(rows, -1) if t.dim() == 1 else t


class LoopGroup:
    """The loops of one merge key; rebuilt when its requests change (see the module docs)."""

    def __init__(self, jobs: list[Job]):
        self.jobs = list(jobs)
        loops = [j._loop for j in self.jobs]
        first = loops[0]
        self.cfg = first.guidance is not None
        dev = first.latents.device
        ns = [lp.n for lp in loops]
        self.ns = ns
        self.offsets = [sum(ns[:i]) for i in range(len(ns))]
        self.X = torch.cat([j._loop_x for j in self.jobs]) if len(self.jobs) > 1 else self.jobs[0]._loop_x
        counts = torch.tensor(ns, device=dev)
        job_of_x = torch.repeat_interleave(torch.arange(len(ns), device=dev), counts)
        if self.cfg:  # per job: its rows twice ([uncond n; cond n] share the latents)
            in_index = torch.cat([torch.arange(o, o + n, device=dev).repeat(2) for o, n in zip(self.offsets, ns)])
            pos = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.cumsum(2 * counts, 0)[:-1]])
            self.u_index = torch.cat([torch.arange(p, p + n, device=dev) for p, n in zip(pos.tolist(), ns)])
            self.c_index = self.u_index + torch.repeat_interleave(counts, counts)
            self.guidance = torch.repeat_interleave(torch.tensor([lp.guidance for lp in loops], dtype=torch.float32),
                                                    counts.cpu()).to(dev)
            self.starts = pos.tolist()
        else:
            in_index = None
            self.starts = list(self.offsets)
        self.in_index = in_index
        self.job_of_in = job_of_x if in_index is None else job_of_x[in_index]
        self.job_of_x = job_of_x
        lengths = [lp.length for lp in loops]
        self.base = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))], device=dev)
        self.T = torch.cat([lp.timesteps.to(dev).float() for lp in loops])
        self.C = torch.cat([lp.coeffs for lp in loops]).to(dev)
        self.K = torch.tensor([j._loop_k for j in self.jobs], device=dev)
        self.embeddings = torch.cat([lp.embeddings for lp in loops])
        self.ip_tokens = None if first.ip_tokens is None else torch.cat([lp.ip_tokens for lp in loops])
        self.pooled = None if first.pooled is None else torch.cat([lp.pooled for lp in loops])
        self.time_ids = None if first.time_ids is None else torch.cat(
            [_rows(lp.time_ids, lp.rows) for lp in loops])
        self.ip_scale = first.ip_scale
        self.prediction = first.prediction
        # per-request LoRAs: one entry per UNet row (a job's rows are consecutive, CFG or not); loops merge whatever
        # their adapters, each row gets its own in the call (None when no loop has any)
        self.adapters = row_adapters([(lp.adapters, lp.rows) for lp in loops])

    @property
    def rows(self) -> int:
        return int(self.job_of_in.shape[0])

    @property
    def takes_guests(self) -> bool:
        """Step-by-step calls may share this group's UNet calls (SD 1.x/2.x: no per-row SDXL conditioning)."""
        return self.pooled is None and self.time_ids is None

    def same_jobs(self, jobs: list[Job]) -> bool:
        return len(jobs) == len(self.jobs) and all(a is b for a, b in zip(jobs, self.jobs))

    def latents_of(self, i: int) -> torch.Tensor:
        o, n = self.offsets[i], self.ns[i]
        return self.X[o:o + n]

    def save(self) -> None:
        """Write each job's current latents back to it (before a rebuild, or when it leaves)."""
        for i, job in enumerate(self.jobs):
            job._loop_x = self.latents_of(i)

    def step(self, unet, max_rows: int, guests=()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step of every row: the UNet call(s), then CFG and the DDIM update; ``self.X`` holds the new latents.
        ``guests``: step-by-step UNet calls (``takes_guests``) whose rows ride along in the same calls. Returns the
        group's UNet output (previews read it) and the guests' (their rows, in order). ``unet`` is called as
        ``unet(latents, t, embeddings, ip_tokens, ip_scale, pooled, time_ids, adapters)`` (adapters: one entry per
        row, or None)."""
        idx = self.base + self.K
        t_in = self.T[idx[self.job_of_in]]
        model_in = self.X if self.in_index is None else self.X[self.in_index]
        emb, ip, adapters = self.embeddings, self.ip_tokens, self.adapters
        mine = self.rows
        if guests:
            adapters = row_adapters([(adapters, mine), *((g.adapters, g.rows) for g in guests)])
            model_in = torch.cat([model_in, *(g.latents for g in guests)])
            t_in = torch.cat([t_in, *(torch.as_tensor(g.t, device=t_in.device).float().reshape(-1).expand(g.rows)
                                      for g in guests)])
            emb = torch.cat([emb, *(g.embeddings for g in guests)])
            ip = None if ip is None else torch.cat([ip, *(g.ip_tokens for g in guests)])
        total = int(model_in.shape[0])
        outs = []
        for a in range(0, total, max_rows):
            b = min(a + max_rows, total)
            outs.append(unet(model_in[a:b], t_in[a:b], emb[a:b], None if ip is None else ip[a:b], self.ip_scale,
                             None if self.pooled is None else self.pooled[a:b],
                             None if self.time_ids is None else self.time_ids[a:b], rows_slice(adapters, a, b)))
        full = outs[0] if len(outs) == 1 else torch.cat(outs)
        out, guest_out = (full[:mine], full[mine:]) if guests else (full, None)
        coeffs = self.C[idx[self.job_of_x]].contiguous()
        step = _step_fn(self.X)
        from dreamfuse.kernels.sampler import PREDICTIONS

        pred = PREDICTIONS.index(self.prediction)
        if self.cfg:
            self.X = step(out[self.u_index], out[self.c_index], self.X, self.guidance, coeffs, pred)
        else:
            self.X = step(None, out, self.X, None, coeffs, pred)
        self.K = self.K + 1
        return out, guest_out

    def output_of(self, i: int, out: torch.Tensor) -> torch.Tensor:
        """Job ``i``'s rows of the UNet output, in its own call's order ([uncond n; cond n] with CFG)."""
        s, n = self.starts[i], self.ns[i]
        return out[s:s + (2 * n if self.cfg else n)]


def _step_fn(x: torch.Tensor):
    from dreamfuse.kernels.sampler import cfg_ddim_step, cfg_ddim_step_reference

    return cfg_ddim_step if x.is_cuda else cfg_ddim_step_reference


def run_alone(job: Job, engine) -> None:
    """One step of ``job``'s loop alone (a merged step failed: find out whose fault it was). Raises what the step
    raises."""
    loop = job._loop
    call = loop.call(job._loop_k, job._loop_x)
    job._loop_x = apply_updates([call.update], [call.run(engine)])[0]
    job._loop_k += 1


__all__ = ["LoopGroup", "compat_key", "loop_key", "run_alone"]
