"""DreamMatcher personalization: appearance-matching self-attention (AMA) on any SD checkpoint.

A reference image of the subject is DDIM-inverted (empty prompt) and follows its inverted trajectory beside
the targets; one UNet call per step evaluates ``[ref_uncond, tgt_uncond x n, ref_cond, tgt_cond x n]``.
In the self-attention of the last decoder blocks the targets keep their queries and keys but take values
warped from the reference by semantic matching, filtered by a cycle-consistency confidence mask and a
foreground mask (``m' = M ⊙ U``): ``V_w[j] = m'[j]·V_ref[t2r[j]] + (1 − m'[j])·V_tgt[j]``, fused into the
attention kernel. Matching uses the previous step's decoder features (as the official code does); optional
semantic matching guidance pulls the targets' predicted x0 toward the warped reference latent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..images import image_tensor
from ..limits import DEFAULT_LIMITS, Limits
from ..ops import ops_for
from ..processors import CallContext, LayerInfo, capturable_blocks
from ..validation import check_number, check_text
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

_PCA_SEED = 0  # the randomized PCA's sketch comes from a private generator with this seed: reproducible, thread-safe


# --------------------------------------------------------------------------------------------- inputs
def load_reference(image, height: int, width: int, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """A PIL image, a path, or a ``(3, H, W)``/``(1, 3, H, W)`` float tensor in [0, 1] -> ``(1, 3, height, width)``,
    resized when the aspect ratio matches (see :func:`dreamfuse.engine.images.image_tensor`)."""
    return image_tensor(image, height, width, "reference_image", limits=limits)


def subject_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in the tokenized ``prompt`` (BOS included, so index 0 is BOS).

    A word that splits into several BPE tokens gives all of its positions; the first occurrence is used.
    """
    if not word or not word.strip():
        raise ValueError("subject_token: empty")
    sub = tokenizer(word.strip(), add_special_tokens=False).input_ids
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    for start in range(len(ids) - len(sub) + 1):
        if ids[start : start + len(sub)] == sub:
            return list(range(start, start + len(sub)))
    raise ValueError(f"subject_token: {word!r} does not occur in the prompt {prompt!r} (tokens {sub})")


# --------------------------------------------------------------------------------------------- inversion
@torch.no_grad()
def ddim_invert(engine: Engine, latent0: torch.Tensor, steps: int, embedding: torch.Tensor,
                progress: bool | None = None, pooled: torch.Tensor | None = None) -> list[torch.Tensor]:
    """DDIM inversion of a clean latent: returns ``traj`` with ``traj[i]`` the latent at the ``i``-th denoising
    timestep (``traj[0]`` is the noisiest), so that denoising step ``i`` sees the reference at ``traj[i]``."""
    sched = engine.new_scheduler(steps)
    ac = sched.alphas_cumprod.to(engine.device)
    final = sched.final_alpha_cumprod.to(engine.device)
    timesteps = sched.timesteps.tolist()
    z = latent0
    traj: list[torch.Tensor] = [None] * steps  # type: ignore[list-item]
    with engine.progress(steps, "invert", progress) as bar:
        for j in reversed(range(steps)):  # cleanest timestep first
            t = timesteps[j]
            a_prev = ac[timesteps[j + 1]] if j + 1 < steps else final
            a_t = ac[t]
            eps = engine.unet_call(z, t, embedding, pooled=pooled)
            x0 = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            z = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
            traj[j] = z
            bar.update(1)
    return traj


def _inversion(engine: Engine, reference: torch.Tensor, steps: int, progress) -> tuple[torch.Tensor, list]:
    """(clean reference latent, inverted trajectory), cached per reference image, size, dtype and step count."""
    digest = hashlib.sha1(reference.numpy().tobytes()).hexdigest()
    key = (digest, tuple(reference.shape), steps, str(engine.dtype))
    found = engine.inversion_cache.get(key)
    if found is None:  # computed outside the cache's lock (two threads may both invert a new image: same result)
        z0 = engine.encode_image(reference)
        emb, pooled = engine.encode_text([""])
        found = (z0, ddim_invert(engine, z0, steps, emb, progress, pooled))
        engine.inversion_cache.put(key, found)
    return found


# --------------------------------------------------------------------------------------------- matching state
def pca_project(x: torch.Tensor, q: int, niter: int = 2, seed: int = _PCA_SEED) -> torch.Tensor:
    """Batched PCA like the reference code (``torch.pca_lowrank(x, q, center=True, niter=2)``, then projection):
    ``x (P, L, C)`` centred per batch item, projected on its top ``q`` principal directions -> ``(P, L, q)``.

    The same randomized algorithm as ``torch.pca_lowrank`` (Halko et al. 2009, Alg. 5.1: a Gaussian sketch, ``niter``
    power iterations with QR re-orthonormalization, SVD of the small projected matrix), with the sketch drawn
    from a private CPU generator: the result does not depend on (and does not touch) the global RNG, so
    concurrent calls stay reproducible, and it is the same on every device."""
    q = min(q, x.shape[-1], x.shape[-2])
    a = x.float() - x.float().mean(dim=-2, keepdim=True)
    tall = a.shape[-2] >= a.shape[-1]
    m = a if tall else a.mT  # the algorithm wants a tall matrix (as torch's _svd_lowrank)
    sketch = torch.randn(m.shape[-1], q, generator=torch.Generator("cpu").manual_seed(seed)).to(a.device)
    basis = torch.linalg.qr(m @ sketch).Q
    for _ in range(niter):
        basis = torch.linalg.qr(m.mT @ basis).Q
        basis = torch.linalg.qr(m @ basis).Q
    u, _, vh = torch.linalg.svd(basis.mT @ m, full_matrices=False)
    v = vh.mT if tall else basis @ u  # right singular vectors of a: (P, C, q)
    return a @ v


@dataclass
class _Layout:
    """Row layout of the batch: ``[ref_uncond, tgt_uncond x n, ref_cond, tgt_cond x n]``."""

    n: int

    @property
    def rows(self) -> int:
        return 2 * (self.n + 1)

    @property
    def targets(self) -> list[int]:
        return [*range(1, self.n + 1), *range(self.n + 2, 2 * self.n + 2)]

    @property
    def refs_of_targets(self) -> list[int]:
        return [0] * self.n + [self.n + 1] * self.n

    @property
    def cond_targets(self) -> list[int]:
        return list(range(self.n + 2, 2 * self.n + 2))


@dataclass
class _MatchState:
    """Matching features and foreground masks carried from one step to the next, and the flows and
    semantic-consistent masks derived from them per resolution (computed lazily, once per step)."""

    layout: _Layout
    ops: object
    lambda_c: float
    pca_dim: int
    psi_ref: torch.Tensor | None = None  # (2n, Q, H0, W0) reference features, one per target row
    psi_tgt: torch.Tensor | None = None  # (2n, Q, H0, W0)
    fg: torch.Tensor | None = None  # (2n, hf, wf) foreground masks in [0, 1]
    _flows: dict = field(default_factory=dict)
    # foreground accumulation during a call
    fg_sum: torch.Tensor | None = None
    fg_layers: int = 0

    def set_features(self, feats: list[torch.Tensor]) -> None:
        """From the captured decoder features ``[(R, C_b, h_b, w_b)]``: PCA per block over the stacked
        (reference, target) pair, upsampled to the largest grid, concatenated."""
        lay = self.layout
        size = max((f.shape[-2], f.shape[-1]) for f in feats)
        t_idx, r_idx = lay.targets, lay.refs_of_targets
        parts_ref, parts_tgt = [], []
        for f in feats:
            f = f.float()
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            flat = f.flatten(2).transpose(1, 2)  # (R, N, C)
            pair = torch.cat([flat[r_idx], flat[t_idx]], dim=1)  # (2n, 2N, C): reference then target
            proj = pca_project(pair, self.pca_dim)
            n_pos = flat.shape[1]
            parts_ref.append(proj[:, :n_pos])
            parts_tgt.append(proj[:, n_pos:])
        to_map = lambda parts: torch.cat(parts, -1).transpose(1, 2).reshape(len(t_idx), -1, *size)
        self.psi_ref = F.normalize(to_map(parts_ref), dim=1)
        self.psi_tgt = F.normalize(to_map(parts_tgt), dim=1)
        self._flows.clear()

    def finish_foreground(self) -> None:
        """Average of the accumulated cross-attention maps, min-max normalized per image; the cond target's
        map serves both its uncond and cond rows."""
        if self.fg_sum is None:
            return
        m = self.fg_sum / max(self.fg_layers, 1)  # (n, h, w)
        lo = m.flatten(1).min(1).values[:, None, None]
        hi = m.flatten(1).max(1).values[:, None, None]
        m = (m - lo) / (hi - lo).clamp_min(1e-8)
        self.fg = torch.cat([m, m])
        self.fg_sum, self.fg_layers = None, 0
        self._flows.clear()

    @property
    def ready(self) -> bool:
        return self.psi_ref is not None and self.fg is not None

    def flow_and_mask(self, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target->reference flow ``(2n, h*w)`` int64 and semantic-consistent mask ``m' = M ⊙ U`` ``(2n, h*w)``
        on an ``hw`` grid."""
        if hw not in self._flows:
            h, w = hw
            resize = lambda x: F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
            f_ref = F.normalize(resize(self.psi_ref), dim=1).flatten(2).transpose(1, 2).contiguous()
            f_tgt = F.normalize(resize(self.psi_tgt), dim=1).flatten(2).transpose(1, 2).contiguous()
            t2r, r2t, _, _ = self.ops.match_argmax(f_tgt, f_ref)
            fg = F.interpolate(self.fg[:, None], size=hw, mode="nearest").flatten(1)
            mask = self.ops.cycle_mask(t2r, r2t, fg, height=h, width=w, lambda_c=self.lambda_c)
            self._flows[hw] = (t2r, mask)
        return self._flows[hw]


# --------------------------------------------------------------------------------------------- handlers
def _ama_handler(state: _MatchState, ops) -> Callable:
    """Self-attention of an AMA layer: plain attention for the reference rows, value-warped for the targets."""
    lay = state.layout

    def handler(layer: LayerInfo, q, k, v):
        if layer.hidden_hw is None or not state.ready:
            return layer.attend(q, k, v)
        flow, mask = state.flow_and_mask(layer.hidden_hw)
        t_idx, r_idx = lay.targets, lay.refs_of_targets
        out = torch.empty_like(q)
        refs = [0, lay.n + 1]
        out[refs] = layer.attend(q[refs], k[refs], v[refs])  # the reference rows stay exactly as without AMA
        # differentiable (semantic matching guidance backpropagates through the UNet)
        out[t_idx] = ops.ama_attention(q[t_idx], k[t_idx], v[t_idx], v[r_idx], flow, mask.to(q.dtype))
        return out

    return handler


def _foreground_handler(state: _MatchState, ops, token_idx: torch.Tensor) -> Callable:
    """Cross-attention at the foreground grid: ordinary output, plus the subject tokens' attention
    probabilities of the cond targets read through the log-sum-exp, ``p = exp(scale·q·k_j − lse)``, so the
    attention matrix is never materialized. ``token_idx (n, J)``: the subject's token positions per target."""
    lay = state.layout

    rows = lay.cond_targets
    others = [r for r in range(lay.rows) if r not in rows]

    def handler(layer: LayerInfo, q, k, v):
        if layer.hidden_hw is None:
            return layer.attend(q, k, v)
        out = torch.empty_like(q)
        out[others] = layer.attend(q[others], k[others], v[others])  # untouched rows: bit-identical to no handler
        out_c, lse = ops.attention(q[rows], k[rows], v[rows], return_lse=True)
        out[rows] = out_c
        qc, kc = q[rows].float(), k[rows].float()  # (n, H, Lq, D), (n, H, 77, D)
        ks = torch.stack([kc[i, :, token_idx[i]] for i in range(len(rows))])  # (n, H, J, D)
        scale = q.shape[-1] ** -0.5
        p = torch.exp(scale * qc @ ks.transpose(-1, -2) - lse.float()[..., None])  # (n, H, Lq, J)
        m = p.mean(dim=(1, 3)).reshape(len(rows), *layer.hidden_hw).detach()
        state.fg_sum = m if state.fg_sum is None else state.fg_sum + m
        state.fg_layers += 1
        return out

    return handler


def _layer_names(engine: Engine, blocks: Sequence[int], attn: str) -> list[str]:
    return [n for n in engine.processors if n.endswith(attn) and any(n.startswith(f"up_blocks.{b}.") for b in blocks)]


def _foreground_layers(engine: Engine) -> list[str]:
    """Cross-attention layers on the grid a quarter of the latent's (16x16 at 512², SD's foreground-mask
    layers): ``down_blocks.2`` and ``up_blocks.1`` in the SD layout, ``down_blocks.2`` and ``up_blocks.0`` in
    SDXL's (the third level from the top, counted from either end)."""
    n_up = len(engine.unet.up_blocks)
    down = ["down_blocks.2.", f"up_blocks.{n_up - 3}."]
    return [n for n in engine.processors if n.endswith("attn2") and any(n.startswith(p) for p in down)]


def default_blocks(engine: Engine) -> tuple[list[int], list[int]]:
    """``(ama_blocks, feature_blocks)`` for the engine's architecture: SD ``[2, 3], [1, 2]``; SDXL ``[1], [0, 1]``
    (SDXL's last up block has no attention; the feature outputs are at half and full latent size in both)."""
    return ([1], [0, 1]) if engine.is_xl else ([2, 3], [1, 2])


# --------------------------------------------------------------------------------------------- pipeline
def personalize(
    engine: Engine,
    prompts: str | Sequence[str],
    reference_image,
    *,
    subject_token: str | None = None,
    reference_prompt: str = "",
    negative_prompt: str | None = None,
    steps: int = 50,
    guidance_scale: float = 10.0,
    height: int | None = None,
    width: int | None = None,
    seed: int | Sequence[int] | None = None,
    ama: bool = True,
    ama_start: int | None = None,
    ama_end: int | None = None,
    ama_blocks: Sequence[int] | None = None,
    feature_blocks: Sequence[int] | None = None,
    pca_dim: int = 256,
    lambda_c: float = 0.4,
    lambda_g: float = 0.0,
    progress: bool | None = None,
    output_type: str = "pil",
    callback: Callable[[dict], None] | None = None,
):
    """Generate the subject of ``reference_image`` in the scenes of ``prompts`` (one reference, n targets).

    Args:
        prompts: target prompt(s), each containing ``subject_token`` (e.g. "a photo of a sks dog on the beach").
        reference_image: PIL image, path or tensor in [0, 1]; resized to the generation size (same aspect).
        subject_token: the word naming the subject (may be several BPE tokens); its cross-attention gives the
            foreground mask. Required unless ``ama=False`` and ``lambda_g=0``.
        reference_prompt: prompt of the reference branch's cond row (default empty, as its inversion).
        negative_prompt, steps, height, width, seed, output_type, progress: as :func:`text2img`.
        guidance_scale: CFG scale (10 in the official code).
        ama: appearance-matching self-attention on/off (off: plain generation beside the reference branch).
        ama_start, ama_end: step range ``[start, end)`` for AMA and guidance. Default: from step
            ``round(4/50·steps)`` (at least 1: matching uses the previous step's features) to the end.
        ama_blocks: ``up_blocks`` whose self-attention becomes AMA (default: 2 and 3 in SD, the last six
            transformer blocks; 1 in SDXL, its highest-resolution attention level).
        feature_blocks: ``up_blocks`` whose outputs are the matching features (default: 1 and 2 in SD, 0 and 1 in
            SDXL: the outputs at half and full latent resolution in both).
        pca_dim: PCA components per feature block (256 as the official code).
        lambda_c: cycle-consistency threshold factor λc (0.4).
        lambda_g: semantic matching guidance strength λg (0 = off; 50–75 in the paper). Costs a UNet backward
            per guided step.
        callback: called after each UNet call with ``{"step", "timestep", "eps", "rows"}`` (eps of every row,
            before guidance and CFG; rows = the batch layout), for inspection and tests.
    """
    limits = engine.config.limits
    prompts = as_prompt_list(prompts, limits=limits)
    n = check_batch(len(prompts), limits)
    steps = check_steps(steps, limits=limits)
    guidance_scale = check_guidance(guidance_scale)
    height, width = resolve_size(engine, height, width)
    seeds = resolve_seeds(seed, n)
    check_output_type(output_type)
    lambda_c = check_number(lambda_c, "lambda_c", low=0, low_open=True)
    lambda_g = check_number(lambda_g, "lambda_g", low=0)
    if not isinstance(ama, bool):
        raise ValueError(f"ama: must be True or False, got {ama!r}")
    matching = ama or lambda_g > 0
    if subject_token is None and matching:
        raise ValueError("subject_token: needed for appearance matching and guidance (its cross-attention gives the "
                         "foreground mask); pass ama=False and lambda_g=0 to generate without it")
    if subject_token is not None and not isinstance(subject_token, str):
        raise ValueError("subject_token: must be a string")
    reference_prompt = check_text(reference_prompt, "reference_prompt", limits.max_prompt_chars)
    token_idx = (torch.tensor([subject_token_indices(engine.tokenizer, p, subject_token) for p in prompts])
                 if matching else None)
    n_up = len(engine.unet.up_blocks)
    ama_blocks = default_blocks(engine)[0] if ama_blocks is None else list(ama_blocks)
    feature_blocks = default_blocks(engine)[1] if feature_blocks is None else list(feature_blocks)
    for name, blocks in (("ama_blocks", ama_blocks), ("feature_blocks", feature_blocks)):
        if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or not (0 <= b < n_up) for b in blocks):
            raise ValueError(f"{name}: up_blocks indices in [0, {n_up}), got {list(blocks)}")
    capturable = capturable_blocks(engine.unet)
    if any(f"up_blocks.{b}" not in capturable for b in feature_blocks):
        raise ValueError(f"feature_blocks: only up blocks with cross-attention give matching features "
                         f"({', '.join(c.removeprefix('up_blocks.') for c in capturable)}), got {list(feature_blocks)}")
    start = max(1, round(4 * steps / 50)) if ama_start is None else ama_start
    end = steps if ama_end is None else ama_end
    if not (1 <= start <= end <= steps):
        raise ValueError(f"ama_start/ama_end: need 1 <= start <= end <= steps ({steps}), got [{start}, {end})")
    negatives = as_prompt_list([negative_prompt or ""], "negative_prompt", limits) * n
    reference = load_reference(reference_image, height, width, limits)

    ops = ops_for(engine.config.backend)
    lay = _Layout(n)
    z0_ref, traj = _inversion(engine, reference, steps, progress)
    texts = ["", *negatives, reference_prompt, *prompts]
    emb, pooled = engine.encode_text(texts)
    latents = engine.initial_latents(seeds, height, width)
    sched = engine.new_scheduler(steps)
    ac = sched.alphas_cumprod.to(engine.device)

    state = _MatchState(lay, ops, lambda_c, pca_dim)
    capture = frozenset(f"up_blocks.{b}" for b in feature_blocks)
    ama_layers = _layer_names(engine, ama_blocks, "attn1") if ama else []
    fg_layers = _foreground_layers(engine) if matching else []
    t_idx = lay.targets
    with engine.progress(steps, "personalize", progress) as bar:
        for i, t in enumerate(sched.timesteps):
            active = start <= i < end
            guide = active and lambda_g > 0
            # Features and foreground are read when this step is guided or the next one runs AMA
            # (AMA at step i uses step i-1's features, as the official code does).
            need = guide or (ama and start <= i + 1 < end)
            ctx = CallContext(capture=capture if need else frozenset())  # this step's call only
            if need:
                for name in fg_layers:
                    ctx.handlers[name] = _foreground_handler(state, ops, token_idx.to(engine.device))
            if active and ama:
                for name in ama_layers:
                    ctx.handlers[name] = _ama_handler(state, ops)
            ref = traj[i]
            model_in = torch.cat([ref, latents, ref, latents])
            model_in = sched.scale_model_input(model_in, t)
            if guide:
                model_in = model_in.detach().requires_grad_(True)
            with torch.set_grad_enabled(guide):
                eps = engine.unet_call(model_in, t, emb, pooled=pooled, ctx=ctx)
                if need:
                    state.set_features([ctx.features[f"up_blocks.{b}"] for b in feature_blocks])
                    state.finish_foreground()
                if callback is not None:
                    callback({"step": i, "timestep": int(t), "eps": eps.detach(), "rows": lay})
                if guide:
                    grad = _matching_guidance_grad(state, model_in, eps, z0_ref, ac[t], t_idx)
                    eps = eps.detach()
                    eps[t_idx] -= lambda_g * (1 - ac[t]).sqrt() * grad
            eps = eps.detach()
            eps_t = eps[t_idx]  # (2n, ...): [uncond x n, cond x n]
            eps_t = cfg_combine(eps_t, n, guidance_scale) if guidance_scale > 1.0 else eps_t[n:]
            latents = sched.step(eps_t, t, latents, return_dict=False)[0]
            bar.update(1)

    infos = [{"prompt": p, "seed": s, "steps": steps, "subject_token": subject_token or ""}
             for p, s in zip(prompts, seeds)]
    return finish(engine, latents, output_type, infos)


def _matching_guidance_grad(state: _MatchState, model_in: torch.Tensor, eps: torch.Tensor, z0_ref: torch.Tensor,
                            alpha_t: torch.Tensor, t_idx: list[int]) -> torch.Tensor:
    """Gradient w.r.t. the target rows' input latents of ``g = Σ_i m'_i ‖W(z0_ref; F)_i − x̂0_i‖₂ / Σ m'``, the
    masked distance between the reference latent warped onto the target and each target's predicted x0."""
    h, w = model_in.shape[-2:]
    flow, mask = state.flow_and_mask((h, w))  # (2n, h*w)
    x_t = model_in[t_idx]
    x0 = (x_t - (1 - alpha_t).sqrt() * eps[t_idx]) / alpha_t.sqrt()
    ref = z0_ref.flatten(2).float().expand(len(t_idx), -1, -1)  # (2n, C, h*w)
    warped = torch.gather(ref, 2, flow[:, None, :].expand(-1, ref.shape[1], -1)).view_as(x0)
    dist = (warped - x0.float()).norm(dim=1).flatten(1)  # (2n, h*w)
    m = mask.float()
    loss = ((dist * m).sum(1) / m.sum(1).clamp_min(1.0)).sum()
    return torch.autograd.grad(loss, model_in)[0][t_idx].to(eps.dtype)
