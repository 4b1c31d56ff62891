"""DreamMatcher personalization: appearance-matching self-attention (AMA) on any SD checkpoint.

A reference image of the subject is DDIM-inverted (empty prompt) and follows its inverted trajectory beside
the targets; one UNet call per step evaluates ``[ref_uncond, tgt_uncond x n, ref_cond, tgt_cond x n]``.
In the self-attention of the last decoder blocks the targets keep their queries and keys but take values
warped from the reference by semantic matching, filtered by a cycle-consistency confidence mask and a
foreground mask (``m' = M ⊙ U``): ``V_w[j] = m'[j]·V_ref[t2r[j]] + (1 − m'[j])·V_tgt[j]``, fused into the
attention kernel. Matching uses the previous step's decoder features (as the official code does); the foreground
mask is the current step's: the cross-attention layers that give it (the grid a quarter of the latent's, 16x16 at
512²: ``down_blocks.2`` and ``up_blocks.1`` in SD, ``down_blocks.2`` and ``up_blocks.0`` in SDXL) run before the AMA
layers in the same UNet call, and the first AMA layer of the call finishes their average (as the official code
aggregates the step's cross-attention maps when its AMA layers run). Optional semantic matching guidance pulls
the targets' predicted x0 toward the warped reference latent, differentiating through the model's noise
prediction only (x̂0 is formed from the latents without gradient), so that it lowers the distance.

Any ``prediction_type`` works (ε, v, x0): the inversion and the guidance convert the model output to ε and x̂0
(:mod:`dreamfuse.engine.prediction`) and write the guided output back in the model's own parameterization.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..adapters import holding, request_adapters
from ..images import image_tensor
from ..limits import DEFAULT_LIMITS, Limits
from ..ops import ops_for
from ..prediction import prediction_type_of, to_eps_x0, update_output
from ..processors import CallContext, LayerInfo, capturable_blocks
from ..samplers import check_sampler
from ..validation import check_callable, check_flag, check_int_arg, check_number, check_text
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

if TYPE_CHECKING:
    from ..engine import Engine

_PCA_SEED = 0  # the randomized PCA's sketch comes from a private generator with this seed: reproducible, thread-safe
AMA_MASKS = ("consistent", "foreground", "none")
"""Which target positions take warped reference values (``ama_mask``): ``"consistent"`` the semantic-consistent mask
``m' = M ⊙ U`` (DreamMatcher's AMA), ``"foreground"`` the foreground mask ``M`` alone (no cycle-consistency filter),
``"none"`` every position (semantic matching without a mask: row (III) of the paper's component analysis)."""


# --------------------------------------------------------------------------------------------- inputs
def load_reference(image, height: int, width: int, limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """A PIL image, a path, or a ``(3, H, W)``/``(1, 3, H, W)`` float tensor in [0, 1] -> ``(1, 3, height, width)``,
    resized when the aspect ratio matches (see :func:`dreamfuse.engine.images.image_tensor`)."""
    return image_tensor(image, height, width, "reference_image", limits=limits)


def subject_token_indices(tokenizer, prompt: str, word: str, tokenize=None) -> list[int]:
    """Positions of ``word``'s tokens in the tokenized ``prompt`` (BOS included, so index 0 is BOS).

    A word that splits into several BPE tokens gives all of its positions; the first occurrence is used.
    ``tokenize`` (e.g. :meth:`Engine.tokenize`, which holds the engine's tokenizer lock) replaces the plain
    ``tokenizer(...)`` call when other threads share the tokenizer.
    """
    if not word or not word.strip():
        raise ValueError("subject_token: empty")
    tokenize = tokenize or (lambda text, **kw: tokenizer(text, **kw))
    sub = tokenize(word.strip(), add_special_tokens=False).input_ids
    ids = tokenize(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    for start in range(len(ids) - len(sub) + 1):
        if ids[start : start + len(sub)] == sub:
            return list(range(start, start + len(sub)))
    raise ValueError(f"subject_token: {word!r} does not occur in the prompt {prompt!r} (tokens {sub})")


# --------------------------------------------------------------------------------------------- inversion
@torch.no_grad()
def ddim_invert_program(engine: Engine, latent0: torch.Tensor, steps: int, embedding: torch.Tensor,
                        progress: bool | None = None, pooled: torch.Tensor | None = None,
                        adapters=None) -> list[torch.Tensor]:
    """DDIM inversion of a clean latent: returns ``traj`` with ``traj[i]`` the latent at the ``i``-th denoising
    timestep (``traj[0]`` is the noisiest), so that denoising step ``i`` sees the reference at ``traj[i]``.

    As the official code: each step evaluates the model once, at the cleaner latent with the noisier timestep
    ``t``, and moves along that ε (``z_t = sqrt(ᾱ_t)·x̂0 + sqrt(1 − ᾱ_t)·ε``); the output is read as the scheduler's
    ``prediction_type`` says (a v-model's ``v`` at timestep ``t`` becomes ``ε = sqrt(ᾱ_t)·v + sqrt(1 − ᾱ_t)·z``).
    Inverting then denoising returns the start up to DDIM inversion's own first-order error (it halves when the
    steps double). :func:`ddim_invert` runs it; this is its program (its UNet calls can share a scheduler's batched
    calls: they carry no layer handlers)."""
    sched = engine.new_scheduler(steps)
    kind = prediction_type_of(sched)
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
            out = yield UNetCall(z, t, embedding, pooled=pooled, adapters=adapters)
            eps, _ = to_eps_x0(out, z, a_t, kind)  # the model was told timestep t: its ᾱ converts the output
            x0 = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            z = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
            traj[j] = z
            bar.update(1)
    return traj


ddim_invert = driven(ddim_invert_program, "ddim_invert")


def _inversion(engine: Engine, reference: torch.Tensor, steps: int, progress, adapters=None):
    """Program: (clean reference latent, inverted trajectory), cached per reference image, size, dtype, step count
    and the request's adapters (an inversion made with a LoRA is that LoRA's)."""
    digest = hashlib.sha1(reference.numpy().tobytes()).hexdigest()
    key = (digest, tuple(reference.shape), steps, str(engine.dtype))
    if adapters is not None and (adapters.text_key or adapters.unet_key):
        key += (adapters.text_key, adapters.unet_key)
    found = engine.inversion_cache.get(key)
    if found is None:  # computed outside the cache's lock (two threads may both invert a new image: same result)
        z0 = engine.encode_image(reference)
        emb, pooled = engine.encode_text([""], adapters)
        found = (z0, (yield from ddim_invert_program(engine, z0, steps, emb, progress, pooled, adapters)))
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
    """Matching features carried from one step to the next, the current call's foreground mask (accumulated by
    the foreground layers, finished by the first AMA layer), and the flows and semantic-consistent masks derived
    from them per resolution (computed lazily, once per step)."""

    layout: _Layout
    ops: object
    lambda_c: float
    pca_dim: int
    fg_expected: int = 0  # foreground layers per call (0: unchecked); every one must run before the mask is used
    psi_ref: torch.Tensor | None = None  # (2n, Q, H0, W0) reference features, one per target row
    psi_tgt: torch.Tensor | None = None  # (2n, Q, H0, W0)
    fg: torch.Tensor | None = None  # (2n, hf, wf) foreground masks in [0, 1], of the current call once finished
    _flows: dict = field(default_factory=dict)
    # foreground accumulation during a call
    fg_sum: torch.Tensor | None = None
    fg_layers: int = 0
    mask_mode: str = "consistent"  # one of AMA_MASKS

    def set_features(self, feats: list[torch.Tensor]) -> None:
        """From the captured decoder features ``[(R, C_b, h_b, w_b)]``: each block upsampled to the largest grid
        (bilinear, ``align_corners=True`` as the official code's pre-PCA interpolation), PCA per block over the
        stacked (reference, target) pair, concatenated, L2-normalized."""
        lay = self.layout
        size = max((f.shape[-2], f.shape[-1]) for f in feats)
        t_idx, r_idx = lay.targets, lay.refs_of_targets
        parts_ref, parts_tgt = [], []
        for f in feats:
            f = f.float()
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=True)
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
        map serves both its uncond and cond rows. A no-op when nothing is pending (the call's mask is finished,
        or no foreground layer ran)."""
        if self.fg_sum is None:
            return
        if self.fg_expected and self.fg_layers != self.fg_expected:
            raise RuntimeError(f"foreground mask: {self.fg_layers} of {self.fg_expected} foreground cross-attention "
                               "layers ran before it was needed (an AMA layer runs before a foreground layer)")
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
        """Target->reference flow ``(2n, h*w)`` int64 and the mask of the positions that take warped values
        ``(2n, h*w)`` on an ``hw`` grid: the semantic-consistent mask ``m' = M ⊙ U``, or ``M`` / ones as
        ``mask_mode`` says (:data:`AMA_MASKS`)."""
        if hw not in self._flows:
            h, w = hw
            resize = lambda x: F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
            f_ref = F.normalize(resize(self.psi_ref), dim=1).flatten(2).transpose(1, 2).contiguous()
            f_tgt = F.normalize(resize(self.psi_tgt), dim=1).flatten(2).transpose(1, 2).contiguous()
            t2r, r2t, _, _ = self.ops.match_argmax(f_tgt, f_ref)
            fg = F.interpolate(self.fg[:, None], size=hw, mode="nearest").flatten(1)
            if self.mask_mode == "consistent":
                mask = self.ops.cycle_mask(t2r, r2t, fg, height=h, width=w, lambda_c=self.lambda_c)
            elif self.mask_mode == "foreground":
                mask = fg.contiguous()
            else:
                mask = torch.ones_like(fg)
            self._flows[hw] = (t2r, mask)
        return self._flows[hw]


# --------------------------------------------------------------------------------------------- handlers
def _ama_handler(state: _MatchState, ops) -> Callable:
    """Self-attention of an AMA layer: plain attention for the reference rows, value-warped for the targets.

    The first AMA layer of a call finishes the call's foreground accumulation (every foreground layer has run
    by then: :meth:`_MatchState.finish_foreground` checks it), so the mask is the current step's; the later ones
    find nothing pending."""
    lay = state.layout

    def handler(layer: LayerInfo, q, k, v):
        state.finish_foreground()
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

    handler.dreamfuse_role, handler.state = "ama", state  # read by exported-graph UNet backends (export/runtime.py)
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

    handler.dreamfuse_role, handler.state, handler.token_idx = "foreground", state, token_idx  # export/runtime.py
    return handler


def _layer_names(engine: Engine, blocks: Sequence[int], attn: str) -> list[str]:
    return [n for n in engine.processors if n.endswith(attn) and any(n.startswith(f"up_blocks.{b}.") for b in blocks)]


def _foreground_up_block(engine: Engine) -> int:
    """The up block holding the decoder's foreground layers: 1 in SD, 0 in SDXL (the third level from the top)."""
    return len(engine.unet.up_blocks) - 3


def _foreground_layers(engine: Engine) -> list[str]:
    """Cross-attention layers on the grid a quarter of the latent's (16x16 at 512², SD's foreground-mask
    layers): ``down_blocks.2`` and ``up_blocks.1`` in the SD layout, ``down_blocks.2`` and ``up_blocks.0`` in
    SDXL's (the third level from the top, counted from either end). All of them run before any layer of a later
    up block, which is where AMA may run."""
    down = ["down_blocks.2.", f"up_blocks.{_foreground_up_block(engine)}."]
    return [n for n in engine.processors if n.endswith("attn2") and any(n.startswith(p) for p in down)]


def default_blocks(engine: Engine) -> tuple[list[int], list[int]]:
    """``(ama_blocks, feature_blocks)`` for the engine's architecture: SD ``[2, 3], [1, 2]``; SDXL ``[1], [0, 1]``
    (SDXL's last up block has no attention; the feature outputs are at half and full latent size in both)."""
    return ([1], [0, 1]) if engine.is_xl else ([2, 3], [1, 2])


# --------------------------------------------------------------------------------------------- pipeline
def personalize_program(
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
    ama_mask: str = "consistent",
    progress: bool | None = None,
    output_type: str = "pil",
    callback: Callable[[dict], None] | None = None,
    sampler: str = "ddim",
    loras=None,
    learned_tokens=None,
):
    """Generate the subject of ``reference_image`` in the scenes of ``prompts`` (one reference, n targets).

    :func:`personalize` runs it; ``personalize_program`` returns it as a program (see
    :mod:`~dreamfuse.engine.pipelines.program`): arguments checked at once, the work done as it is driven. Its
    sampling calls carry AMA's layer handlers, so a scheduler never merges them with other requests' rows; the
    reference's inversion calls can be merged.

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
            ``round(4/50·steps)`` (at least 1: matching uses the previous step's features) to the end. The
            foreground mask is the current step's (its cross-attention layers run earlier in the same UNet call).
        ama_blocks: ``up_blocks`` whose self-attention becomes AMA (default: 2 and 3 in SD, the last six
            transformer blocks; 1 in SDXL, its highest-resolution attention level). Only blocks after the one
            holding the foreground layers (``up_blocks.1`` in SD, ``.0`` in SDXL), so the mask is complete.
        feature_blocks: ``up_blocks`` whose outputs are the matching features (default: 1 and 2 in SD, 0 and 1 in
            SDXL: the outputs at half and full latent resolution in both).
        pca_dim: PCA components per feature block (256 as the official code).
        lambda_c: cycle-consistency threshold factor λc (0.4).
        ama_mask: the target positions that take warped reference values, in AMA and in the guidance's loss
            (:data:`AMA_MASKS`): ``"consistent"`` (default) DreamMatcher's semantic-consistent mask ``M ⊙ U``;
            ``"foreground"`` the foreground mask alone; ``"none"`` every position, the paper's "semantic matching"
            ablation (the paper's Table 5: more of the reference's appearance, less prompt fidelity). Worth it where
            the subject word's cross-attention does not outline the subject, so the foreground mask passes mostly
            background (the small ``shapes`` model: ``python -m bench.ama_leverage``).
        lambda_g: semantic matching guidance strength λg (0 = off, exactly the unguided result; 50–75 in the
            paper). The gradient of the masked distance between the warped reference latent and each target's
            x̂0 flows through the model's noise prediction only (x̂0 formed from the latents without gradient, as
            the official code), and ``ε −= λg·sqrt(1 − ᾱ_t)·∇`` on the target rows before CFG lowers the distance.
            Costs a UNet backward per guided step.
        callback: called after each UNet call with ``{"step", "timestep", "eps", "rows"}`` (``eps``: the UNet
            output of every row, before guidance and CFG, in the model's parameterization: ε, or v / x0 as the
            scheduler's ``prediction_type`` says; rows = the batch layout), for inspection and tests.
        sampler: ``"ddim"`` only. The reference row must sit on its DDIM-inverted trajectory at every timestep the
            targets are evaluated at, in the same (variance-preserving) sample space, and AMA's matching and the
            guidance pair the reference and target rows of one step. Other samplers evaluate at other timesteps
            (DPM-Solver++, UniPC's own spacing; Heun's intermediate ones) or in σ space (the Euler family), and
            multistep solvers would step the reference's history too: they are refused rather than approximated.
        loras, learned_tokens: per-request adapters (a DreamBooth-LoRA of the subject, its learned token), as
            :func:`~dreamfuse.engine.pipelines.text2img.text2img`; every row, the reference's inversion included,
            runs with them (as with ``engine.load_lora``).
    """
    limits = engine.config.limits
    if check_sampler(sampler) != "ddim":
        raise ValueError(f"sampler: personalize samples with 'ddim' only (the reference row follows its DDIM "
                         f"inversion step for step), got {sampler!r}")
    prompts = as_prompt_list(prompts, limits=limits)
    n = check_batch(len(prompts), limits)
    steps = check_model_steps(engine, check_steps(steps, limits=limits))
    guidance_scale = check_guidance(guidance_scale)
    height, width = resolve_size(engine, height, width)
    seeds = resolve_seeds(seed, n)
    check_output_type(output_type)
    check_flag(progress, "progress", optional=True)
    check_callable(callback, "callback")
    check_int_arg(pca_dim, "pca_dim", low=1)
    lambda_c = check_number(lambda_c, "lambda_c", low=0, low_open=True)
    lambda_g = check_number(lambda_g, "lambda_g", low=0)
    if ama_mask not in AMA_MASKS:
        raise ValueError(f"ama_mask: must be one of {', '.join(AMA_MASKS)}, got {ama_mask!r}")
    if not isinstance(ama, bool):
        raise ValueError(f"ama: must be True or False, got {ama!r}")
    matching = ama or lambda_g > 0
    if subject_token is None and matching:
        raise ValueError("subject_token: needed for appearance matching and guidance (its cross-attention gives the "
                         "foreground mask); pass ama=False and lambda_g=0 to generate without it")
    if subject_token is not None and not isinstance(subject_token, str):
        raise ValueError("subject_token: must be a string")
    reference_prompt = check_text(reference_prompt, "reference_prompt", limits.max_prompt_chars)
    adapters = request_adapters(engine, loras, learned_tokens)
    token_idx = (torch.tensor([_subject_indices(engine, p, subject_token, adapters) for p in prompts])
                 if matching else None)
    n_up = len(engine.unet.up_blocks)
    for name, blocks in (("ama_blocks", ama_blocks), ("feature_blocks", feature_blocks)):
        if blocks is not None and not isinstance(blocks, (list, tuple, range)):
            raise TypeError(f"{name}: a list of up_blocks indices, got {type(blocks).__name__} {blocks!r}"[:200])
    ama_blocks = default_blocks(engine)[0] if ama_blocks is None else list(ama_blocks)
    feature_blocks = default_blocks(engine)[1] if feature_blocks is None else list(feature_blocks)
    for name, blocks in (("ama_blocks", ama_blocks), ("feature_blocks", feature_blocks)):
        if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or not (0 <= b < n_up) for b in blocks):
            raise ValueError(f"{name}: up_blocks indices in [0, {n_up}), got {list(blocks)}")
    fg_up = _foreground_up_block(engine)
    if ama and any(b <= fg_up for b in ama_blocks):
        raise ValueError(f"ama_blocks: AMA needs the current step's foreground mask, complete only after "
                         f"up_blocks.{fg_up} (its cross-attention gives it): use blocks in [{fg_up + 1}, {n_up}), "
                         f"got {list(ama_blocks)}")
    capturable = capturable_blocks(engine.unet)
    if any(f"up_blocks.{b}" not in capturable for b in feature_blocks):
        raise ValueError(f"feature_blocks: only up blocks with cross-attention give matching features "
                         f"({', '.join(c.removeprefix('up_blocks.') for c in capturable)}), got {list(feature_blocks)}")
    start = max(1, round(4 * steps / 50)) if ama_start is None else check_int_arg(ama_start, "ama_start")
    end = steps if ama_end is None else check_int_arg(ama_end, "ama_end")
    if not (1 <= start <= end <= steps):
        raise ValueError(f"ama_start/ama_end: need 1 <= start <= end <= steps ({steps}), got [{start}, {end})")
    negatives = [None] * n if negative_prompt is None else as_prompt_list([negative_prompt], "negative_prompt",
                                                                          limits) * n
    reference = load_reference(reference_image, height, width, limits)
    return holding(adapters, _personalize_steps(
        engine, prompts, n, steps, guidance_scale, height, width, seeds, output_type, progress, callback,
        subject_token, reference_prompt, negatives, reference, matching, token_idx, ama, ama_blocks, feature_blocks,
        start, end, pca_dim, lambda_c, lambda_g, ama_mask, adapters))


def _subject_indices(engine: Engine, prompt: str, word: str, adapters) -> list[int]:
    """:func:`subject_token_indices` of the prompt as the text encoder will read it (a request's learned tokens
    become placeholder tokens of the adapters' tokenizer)."""
    if adapters is None or not adapters.tokens:
        return subject_token_indices(engine.tokenizer, prompt, word, engine.tokenize)
    (text, word_text), tok = engine.adapters.rewrite(adapters, [prompt, word or ""])
    try:
        return subject_token_indices(tok, text, word_text, lambda t, **kw: engine.tokenize(t, tok, **kw))
    except ValueError:
        raise ValueError(f"subject_token: {word!r} does not occur in the prompt {prompt!r}") from None


def _personalize_steps(engine, prompts, n, steps, guidance_scale, height, width, seeds, output_type, progress,
                       callback, subject_token, reference_prompt, negatives, reference, matching, token_idx, ama,
                       ama_blocks, feature_blocks, start, end, pca_dim, lambda_c, lambda_g, ama_mask, adapters=None):
    ops = ops_for(engine.config.backend)
    lay = _Layout(n)
    z0_ref, traj = yield from _inversion(engine, reference, steps, progress, adapters)
    texts = [None, *negatives, reference_prompt, *prompts]  # None: the unconditional (absent negative) row
    emb, pooled = engine.encode_text(texts, adapters)
    latents = engine.initial_latents(seeds, height, width)
    sched = engine.new_scheduler(steps)
    ac = sched.alphas_cumprod.to(engine.device)

    kind = prediction_type_of(sched)
    fg_layers = _foreground_layers(engine) if matching else []
    state = _MatchState(lay, ops, lambda_c, pca_dim, fg_expected=len(fg_layers), mask_mode=ama_mask)
    capture = frozenset(f"up_blocks.{b}" for b in feature_blocks)
    ama_layers = _layer_names(engine, ama_blocks, "attn1") if ama else []
    tokens = token_idx.to(engine.device) if matching else None
    t_idx = lay.targets

    def run(x: torch.Tensor, i: int, t: torch.Tensor, ctx: CallContext, features: bool) -> torch.Tensor:
        """The step's one UNet call made here (the guided steps, which need its graph); see :func:`after`."""
        return after(engine.unet_call(x, t, emb, pooled=pooled, ctx=ctx, adapters=adapters), i, t, ctx, features)

    def after(out: torch.Tensor, i: int, t: torch.Tensor, ctx: CallContext, features: bool) -> torch.Tensor:
        """After the step's UNet call: its features (for guidance now and AMA at the next step) and foreground
        mask (unless its first AMA layer already finished it)."""
        if features:
            state.set_features([ctx.features[f"up_blocks.{b}"] for b in feature_blocks])
        state.finish_foreground()
        if callback is not None:
            callback({"step": i, "timestep": int(t), "eps": out.detach(), "rows": lay})
        return out

    with engine.progress(steps, "personalize", progress) as bar:
        for i, t in enumerate(sched.timesteps):
            active = start <= i < end
            guide = active and lambda_g > 0
            # The foreground mask is this call's (its layers run before the AMA layers); the matching features
            # are the previous call's (AMA at step i uses step i-1's), and this call's when it is guided.
            features = guide or (ama and start <= i + 1 < end)
            ctx = CallContext(capture=capture if features else frozenset())  # this step's call only
            if active:
                for name in fg_layers:
                    ctx.handlers[name] = _foreground_handler(state, ops, tokens)
            if active and ama:
                for name in ama_layers:
                    ctx.handlers[name] = _ama_handler(state, ops)
            ref = traj[i]
            model_in = sched.scale_model_input(torch.cat([ref, latents, ref, latents]), t)
            call = functools.partial(run, i=i, t=t, ctx=ctx, features=features)
            if guide:
                match = functools.partial(state.flow_and_mask, tuple(model_in.shape[-2:]))
                out, grad = _matching_guidance_grad(call, model_in, z0_ref, ac[t], t_idx, match, kind, n)
                out = _apply_guidance(out, grad, ac[t], lambda_g, t_idx, kind)
            else:
                out = yield UNetCall(model_in, t, emb, pooled=pooled, ctx=ctx, step=i, steps=steps,
                                     preview=(slice(n + 2, n + 3), ac[t]), adapters=adapters)
                out = after(out, i, t, ctx, features)
            out_t = out[t_idx]  # (2n, ...): [uncond x n, cond x n]
            out_t = cfg_combine(out_t, n, guidance_scale) if guidance_scale > 1.0 else out_t[n:]
            latents = sched.step(out_t, t, latents, return_dict=False)[0]
            bar.update(1)

    infos = [{"prompt": p, "seed": s, "steps": steps, "subject_token": subject_token or ""}
             for p, s in zip(prompts, seeds)]
    if adapters is not None:
        for info in infos:
            info["adapters"] = adapters.describe()
    return (yield from finish_program(engine, latents, output_type, infos))


personalize = driven(personalize_program, "personalize")


def guidance_distance(x0: torch.Tensor, z0_ref: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor,
                      targets: int | None = None) -> torch.Tensor:
    """The semantic matching guidance loss, in the official code's form (``diffuser_utils.py``: an MSE with
    ``reduction="sum"`` of the masked warped reference against the masked x̂0, divided by the masked pixel count
    over the latent channels), so that the paper's λg (50-75) means what it means there:

    ``g = Σ_k  Σ_{r∈k} Σ_{c,j} (m'_rj·(W(z0_ref; F_r)_cj − x̂0_rcj))²  /  (C · Σ_{r∈k} Σ_j m'_rj)``

    where target ``k`` owns the rows ``k, k + targets, k + 2·targets, ...`` (its uncond and cond rows: the
    official code normalizes the pair together) and each target's term is separate, so a target's gradient does
    not depend on the others in the batch.

    ``x0 (N, C, h, w)``; ``z0_ref (1, C, h, w)``; ``flow (N, h*w)`` int64 target->reference indices;
    ``mask (N, h*w)`` the semantic-consistent mask ``m'``; ``targets``: rows per block (default ``N``: every row
    its own target). Returns a scalar (fp32), differentiable in ``x0``."""
    n_rows, channels = x0.shape[:2]
    targets = n_rows if targets is None else targets
    if n_rows % targets:
        raise ValueError(f"targets: {n_rows} rows do not split into blocks of {targets}")
    ref = z0_ref.flatten(2).float().expand(n_rows, -1, -1)  # (N, C, h*w)
    warped = torch.gather(ref, 2, flow[:, None, :].expand(-1, ref.shape[1], -1))
    m = mask.float()
    num = ((m[:, None] * (warped - x0.float().flatten(2))) ** 2).sum((1, 2))  # (N,)
    den = channels * m.sum(1)
    num, den = num.view(-1, targets).sum(0), den.view(-1, targets).sum(0)  # (targets,)
    return (num / den.clamp_min(1.0)).sum()


def _matching_guidance_grad(eps_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, z0_ref: torch.Tensor,
                            alpha_t: torch.Tensor, t_idx: list[int],
                            match: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                            prediction_type: str = "epsilon",
                            targets: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One model evaluation with the gradient of the guidance loss (:func:`guidance_distance`) w.r.t. its input.

    ``eps_fn(x)``: the model output for the whole batch ``x`` (in the pipeline: the step's one UNet call, every
    row), differentiable w.r.t. ``x``, in parameterization ``prediction_type``; ``match()``: ``(flow, mask)`` on the
    latent grid, read after ``eps_fn`` ran (the pipeline's flow comes from that call's features). The target rows'
    ε is the model's (:func:`~dreamfuse.engine.prediction.to_eps_x0`: a v-model gets its ε-equivalent's guidance)
    and ``x̂0 = (x.detach() − sqrt(1 − ᾱ)·ε(x)) / sqrt(ᾱ)``: the gradient flows through ε only, as in the official
    code, so that :func:`_apply_guidance` lowers the loss: to first order ``δg = −λg·(1−ᾱ)^1.5/ᾱ · uᵀ(∂ε/∂x)u``
    with ``u = ∂g/∂x̂0``, negative where ``uᵀ(∂ε/∂x)u > 0`` as for denoisers (an exact one has
    ``∂ε/∂x = (I − Cov[ε | x_t]) / sqrt(1−ᾱ)``). Through the whole x̂0 the gradient would be
    ``(I − sqrt(1−ᾱ)·∂ε/∂x)ᵀu / sqrt(ᾱ)``, whose identity part raises the loss.

    Returns ``(model output (B, ...) detached, grad (len(t_idx), C, h, w))``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = eps_fn(x)
        x_t = x[t_idx]
        eps, _ = to_eps_x0(out[t_idx], x_t, alpha_t, prediction_type)
        x0 = (x_t.detach() - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
        flow, mask = match()
        loss = guidance_distance(x0, z0_ref, flow, mask, targets)
        (grad,) = torch.autograd.grad(loss, x)
    return out.detach(), grad[t_idx].to(out.dtype)


def _apply_guidance(out: torch.Tensor, grad: torch.Tensor, alpha_t: torch.Tensor, lambda_g: float, t_idx: list[int],
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """``ε −= λg·sqrt(1 − ᾱ)·grad`` on the target rows, written back in the model's parameterization (the
    scheduler's step then sees a consistent output); λg = 0 returns ``out``'s values exactly."""
    out = out.clone()
    d_eps = -lambda_g * (1 - alpha_t).sqrt() * grad
    out[t_idx] = update_output(out[t_idx], alpha_t, prediction_type, d_eps=d_eps)
    return out
