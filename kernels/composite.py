"""Composite (MSP) diffusion: blending per-segment noise predictions, and compositing per-segment latents.

All three ops make one pass over their inputs with fp32 accumulation; the segment axis S is a loop inside the
kernel, so no ``S × C × h × w`` temporary is ever written. With ``m_s`` the segment masks (≥ 0):

* ``composite_blend(eps_uncond, eps_cond, masks, guidance)`` -- harmonization stage, blended predictions::

      eps = Σ_s m_s · (u_s + g_s · (c_s − u_s)) / max(Σ_s m_s, 1e-6)

* ``composite_latents(latents, masks, fill=None)`` -- scaffolding stage, segments back into one latent::

      no fill:   Σ_s m_s · x_s / max(Σ_s m_s, 1e-6)
      fill:      Σ_s m_s · x_s / max(Σ_s m_s, 1) + (1 − min(Σ_s m_s, 1)) · fill

* ``segment_fill(latents, masks, fill)`` -- scaffolding stage, each segment's UNet input::

      out_s = m_s · x_s + (1 − m_s) · fill

Where a segment's mask is exactly 0 the kernels do not read that segment's values (a masked load: with the
usual near-disjoint layouts that skips most of the ``S·C·h·w`` reads); likewise ``composite_latents`` does not
read ``fill`` where the masks cover a pixel fully. For finite inputs this changes nothing. A side effect: on
the Triton path, non-finite values there do not propagate, while the references (plain arithmetic,
``0 · NaN = NaN``) let them through -- masking them in PyTorch on the CPU costs ``torch.where`` over
``S·C·h·w``, which is 10x slower than the arithmetic itself.

Reading order: the Triton kernels, the launchers, the ``torch.library`` ops with their fakes, the public
functions, then the PyTorch references (the CPU path and the tests' oracle).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, interpreting, pin_configs, use_triton

__all__ = [
    "composite_blend", "composite_latents", "segment_fill",
    "composite_blend_reference", "composite_latents_reference", "segment_fill_reference",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_EPS = 1e-6  # the blend's denominator floor: pixels no segment covers come out 0, not NaN
_MAX_BLOCK_C = 16  # channels per program; SD latents have 4, so one program holds all of them


# --------------------------------------------------------------------------------------------- autotuning
def _configs() -> list[triton.Config]:
    if pin_configs():
        # Interpreter: 32-pixel tiles, so the tests' 7x9 and 13x5 planes span 2-3 tiles with a ragged tail.
        # pytest on a GPU: one ordinary config, reproducible.
        if interpreting():
            return [triton.Config({"BLOCK_P": 32}, num_warps=1)]
        return [triton.Config({"BLOCK_P": 256}, num_warps=4)]
    cfgs = [triton.Config({"BLOCK_P": bp}, num_warps=w) for bp in (128, 256, 512, 1024) for w in (2, 4, 8)]
    # These ops are bandwidth-bound: 2-8 pixels per thread (8-32 fp32 accumulators at C=4) gives each thread a
    # few independent vector loads in flight without spilling. Not yet tuned on a GPU.
    keep = lambda c: 2 <= c.kwargs["BLOCK_P"] // (32 * c.num_warps) <= 8
    return [c for c in cfgs if keep(c)]


_CONFIGS = _configs()


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _plane_offsets(offs_p, W, s_h, s_w, FLAT: tl.constexpr):
    """Element offsets of flat pixel indices ``offs_p`` in an ``(h, w)`` plane with strides ``(s_h, s_w)``."""
    if FLAT:  # s_h == W * s_w (any dense plane, sliced or not): no integer division
        return offs_p * s_w
    else:  # e.g. a crop along w: row/column from the flat index (one div/mod per pixel, cheap next to the loads)
        return (offs_p // W) * s_h + (offs_p % W) * s_w


@triton.autotune(configs=_CONFIGS, key=["S", "C", "HW"])
@triton.jit
def _composite_blend_fwd_kernel(
    U, CND, M, G, OUT,
    s_ub, s_us, s_uc, s_uh, s_uw,
    s_cb, s_cs, s_cc, s_ch, s_cw,
    s_mb, s_ms, s_mh, s_mw,
    s_gb, s_gs,
    g_scale,
    S, C, HW, W,
    PER_SEG_G: tl.constexpr, FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program: a tile of BLOCK_P pixels x BLOCK_C channels of one batch item, looping over the S segments.
    # The mask row is loaded once per (tile, segment) and reused for every channel.
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # b * stride reaches past 2^31 on big batches of 5-D tensors
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    p_ok = offs_p < HW
    ok = (offs_c < C)[:, None] & p_ok[None, :]
    u_ptr = U + b * s_ub + offs_c[:, None] * s_uc + _plane_offsets(offs_p, W, s_uh, s_uw, FLAT)[None, :]
    c_ptr = CND + b * s_cb + offs_c[:, None] * s_cc + _plane_offsets(offs_p, W, s_ch, s_cw, FLAT)[None, :]
    m_ptr = M + b * s_mb + _plane_offsets(offs_p, W, s_mh, s_mw, FLAT)
    g_ptr = G + b * s_gb
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)  # fp32: fp16 sums of S weighted terms lose ~S ulps
    msum = tl.zeros([BLOCK_P], dtype=tl.float32)
    for _ in range(0, S):
        m = tl.load(m_ptr, mask=p_ok, other=0.0).to(tl.float32)
        if PER_SEG_G:
            g = tl.load(g_ptr).to(tl.float32)
            g_ptr += s_gs
        else:
            g = g_scale
        live = ok & (m != 0.0)[None, :]  # zero-mask pixels: no memory traffic, and exactly no contribution
        u = tl.load(u_ptr, mask=live, other=0.0).to(tl.float32)
        c = tl.load(c_ptr, mask=live, other=0.0).to(tl.float32)
        acc += m[None, :] * (u + g * (c - u))
        msum += m
        u_ptr += s_us
        c_ptr += s_cs
        m_ptr += s_ms
    out = acc / tl.maximum(msum, 1e-6)[None, :]
    o_ptr = OUT + b * C * HW + offs_c[:, None] * HW + offs_p[None, :]  # OUT: contiguous (B, C, h, w)
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=ok)


@triton.autotune(configs=_CONFIGS, key=["S", "C", "HW"])
@triton.jit
def _composite_latents_fwd_kernel(
    X, M, F, OUT,
    s_xb, s_xs, s_xc, s_xh, s_xw,
    s_mb, s_ms, s_mh, s_mw,
    s_fb, s_fc, s_fh, s_fw,
    S, C, HW, W,
    HAS_FILL: tl.constexpr, FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Same tiling as the blend, one input instead of two and no guidance.
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    p_ok = offs_p < HW
    ok = (offs_c < C)[:, None] & p_ok[None, :]
    x_ptr = X + b * s_xb + offs_c[:, None] * s_xc + _plane_offsets(offs_p, W, s_xh, s_xw, FLAT)[None, :]
    m_ptr = M + b * s_mb + _plane_offsets(offs_p, W, s_mh, s_mw, FLAT)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    msum = tl.zeros([BLOCK_P], dtype=tl.float32)
    for _ in range(0, S):
        m = tl.load(m_ptr, mask=p_ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr, mask=ok & (m != 0.0)[None, :], other=0.0).to(tl.float32)
        acc += m[None, :] * x
        msum += m
        x_ptr += s_xs
        m_ptr += s_ms
    if HAS_FILL:
        # Uncovered share (1 - min(Σm, 1)) of each pixel comes from the fill; read only where it is nonzero.
        f_ptr = F + b * s_fb + offs_c[:, None] * s_fc + _plane_offsets(offs_p, W, s_fh, s_fw, FLAT)[None, :]
        f = tl.load(f_ptr, mask=ok & (msum < 1.0)[None, :], other=0.0).to(tl.float32)
        out = acc / tl.maximum(msum, 1.0)[None, :] + (1.0 - tl.minimum(msum, 1.0))[None, :] * f
    else:
        out = acc / tl.maximum(msum, 1e-6)[None, :]
    o_ptr = OUT + b * C * HW + offs_c[:, None] * HW + offs_p[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=ok)


@triton.autotune(configs=_CONFIGS, key=["S", "C", "HW"])
@triton.jit
def _segment_fill_fwd_kernel(
    X, M, F, OUT,
    s_xb, s_xs, s_xc, s_xh, s_xw,
    s_mb, s_ms, s_mh, s_mw,
    s_fb, s_fc, s_fh, s_fw,
    S, C, HW, W,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # The fill tile is shared by all S segments: load it once, then stream the segments through it.
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    p_ok = offs_p < HW
    ok = (offs_c < C)[:, None] & p_ok[None, :]
    f_ptr = F + b * s_fb + offs_c[:, None] * s_fc + _plane_offsets(offs_p, W, s_fh, s_fw, FLAT)[None, :]
    f = tl.load(f_ptr, mask=ok, other=0.0).to(tl.float32)
    x_ptr = X + b * s_xb + offs_c[:, None] * s_xc + _plane_offsets(offs_p, W, s_xh, s_xw, FLAT)[None, :]
    m_ptr = M + b * s_mb + _plane_offsets(offs_p, W, s_mh, s_mw, FLAT)
    o_ptr = OUT + b * S * C * HW + offs_c[:, None] * HW + offs_p[None, :]  # OUT: contiguous (B, S, C, h, w)
    for _ in range(0, S):
        m = tl.load(m_ptr, mask=p_ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr, mask=ok & (m != 0.0)[None, :], other=0.0).to(tl.float32)
        out = m[None, :] * x + (1.0 - m)[None, :] * f
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=ok)
        x_ptr += s_xs
        m_ptr += s_ms
        o_ptr += C * HW


# --------------------------------------------------------------------------------------------- launchers
def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_segments(name: str, x, masks) -> None:
    """``x (B, S, C, h, w)`` float16/bfloat16/float32 and ``masks (B, S, h, w)`` any float dtype, one device."""
    check(isinstance(x, torch.Tensor) and x.ndim == 5, f"{name}: expected (B, S, C, h, w), got {_shape(x)}")
    check(x.dtype in _DTYPES, f"{name}: dtype {x.dtype} not supported (float16, bfloat16, float32)")
    check(isinstance(masks, torch.Tensor) and masks.ndim == 4, f"masks: expected (B, S, h, w), got {_shape(masks)}")
    check(masks.is_floating_point(), f"masks: must be a float tensor, got {masks.dtype}")
    check(masks.device == x.device, f"device: masks on {masks.device}, {name} on {x.device}")
    B, S, _, h, w = x.shape
    check(tuple(masks.shape) == (B, S, h, w),
          f"masks: shape {tuple(masks.shape)} does not match {name}'s (B, S, h, w) = {(B, S, h, w)}")
    check(S >= 1, f"segments: S must be >= 1, got {name} with S = {S}")


def _check_fill(fill, x, required: bool) -> None:
    if fill is None:
        check(not required, "fill: required, got None")
        return
    B, _, C, h, w = x.shape
    check(isinstance(fill, torch.Tensor) and fill.ndim == 4, f"fill: expected (B, C, h, w), got {_shape(fill)}")
    check(tuple(fill.shape) == (B, C, h, w),
          f"fill: shape {tuple(fill.shape)} does not match latents' (B, C, h, w) = {(B, C, h, w)}")
    check(fill.dtype == x.dtype, f"fill: dtype {fill.dtype} must equal latents' {x.dtype}")
    check(fill.device == x.device, f"device: fill on {fill.device}, latents on {x.device}")


def _check_blend(eps_uncond, eps_cond, masks, guidance) -> None:
    _check_segments("eps_uncond", eps_uncond, masks)
    check(isinstance(eps_cond, torch.Tensor) and tuple(eps_cond.shape) == tuple(eps_uncond.shape),
          f"eps_cond: shape {_shape(eps_cond)} must equal eps_uncond's {tuple(eps_uncond.shape)}")
    check(eps_cond.dtype == eps_uncond.dtype, f"dtype: eps_cond is {eps_cond.dtype}, eps_uncond {eps_uncond.dtype}")
    check(eps_cond.device == eps_uncond.device,
          f"device: eps_cond on {eps_cond.device}, eps_uncond on {eps_uncond.device}")
    if isinstance(guidance, torch.Tensor):
        B, S = eps_uncond.shape[:2]
        check(guidance.is_floating_point(), f"guidance: must be a float tensor, got {guidance.dtype}")
        check(guidance.device == eps_uncond.device,
              f"device: guidance on {guidance.device}, eps_uncond on {eps_uncond.device}")
        check(guidance.ndim <= 2 and _broadcastable(guidance.shape, (B, S)),
              f"guidance: expected a float or a (B, S) = {(B, S)} tensor, got shape {tuple(guidance.shape)}")
    else:
        check(isinstance(guidance, (float, int)) and not isinstance(guidance, bool),
              f"guidance: expected a float or a (B, S) tensor, got {type(guidance).__name__}")


def _broadcastable(shape, target) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == torch.Size(target)
    except RuntimeError:
        return False


def _plane(t: torch.Tensor) -> tuple[int, int, bool]:
    """(stride_h, stride_w, flat): ``flat`` when pixel p sits at ``p * stride_w`` (a dense plane)."""
    h, w = t.shape[-2:]
    s_h, s_w = t.stride(-2), t.stride(-1)
    return s_h, s_w, h == 1 or s_h == w * s_w


def _block_c(C: int) -> int:
    return min(triton.next_power_of_2(C), _MAX_BLOCK_C)


def _blend_fwd(eps_uncond, eps_cond, masks, guidance, guidance_scale: float) -> torch.Tensor:
    B, S, C, h, w = eps_uncond.shape
    out = torch.empty((B, C, h, w), dtype=eps_uncond.dtype, device=eps_uncond.device)
    if out.numel() == 0:
        return out
    per_seg = guidance is not None
    g = guidance.expand(B, S) if per_seg else masks  # unused when PER_SEG_G is False; any pointer will do
    (uh, uw, _), (ch, cw, _), (mh, mw, _) = planes = [_plane(t) for t in (eps_uncond, eps_cond, masks)]
    flat = all(p[2] for p in planes)
    bc = _block_c(C)
    grid = lambda meta: (triton.cdiv(h * w, meta["BLOCK_P"]), triton.cdiv(C, bc), B)
    torch.library.wrap_triton(_composite_blend_fwd_kernel)[grid](
        eps_uncond, eps_cond, masks, g, out,
        eps_uncond.stride(0), eps_uncond.stride(1), eps_uncond.stride(2), uh, uw,
        eps_cond.stride(0), eps_cond.stride(1), eps_cond.stride(2), ch, cw,
        masks.stride(0), masks.stride(1), mh, mw,
        g.stride(0) if per_seg else 0, g.stride(1) if per_seg else 0,
        float(guidance_scale),
        S, C, h * w, w,
        PER_SEG_G=per_seg, FLAT=flat, BLOCK_C=bc,
    )
    return out


def _latents_fwd(latents, masks, fill) -> torch.Tensor:
    B, S, C, h, w = latents.shape
    out = torch.empty((B, C, h, w), dtype=latents.dtype, device=latents.device)
    if out.numel() == 0:
        return out
    has_fill = fill is not None
    f = fill if has_fill else latents[:, 0]  # unused when HAS_FILL is False
    (xh, xw, _), (mh, mw, _), (fh, fw, _) = planes = [_plane(t) for t in (latents, masks, f)]
    flat = all(p[2] for p in planes)
    bc = _block_c(C)
    grid = lambda meta: (triton.cdiv(h * w, meta["BLOCK_P"]), triton.cdiv(C, bc), B)
    torch.library.wrap_triton(_composite_latents_fwd_kernel)[grid](
        latents, masks, f, out,
        latents.stride(0), latents.stride(1), latents.stride(2), xh, xw,
        masks.stride(0), masks.stride(1), mh, mw,
        f.stride(0), f.stride(1), fh, fw,
        S, C, h * w, w,
        HAS_FILL=has_fill, FLAT=flat, BLOCK_C=bc,
    )
    return out


def _fill_fwd(latents, masks, fill) -> torch.Tensor:
    B, S, C, h, w = latents.shape
    out = torch.empty((B, S, C, h, w), dtype=latents.dtype, device=latents.device)
    if out.numel() == 0:
        return out
    (xh, xw, _), (mh, mw, _), (fh, fw, _) = planes = [_plane(t) for t in (latents, masks, fill)]
    flat = all(p[2] for p in planes)
    bc = _block_c(C)
    grid = lambda meta: (triton.cdiv(h * w, meta["BLOCK_P"]), triton.cdiv(C, bc), B)
    torch.library.wrap_triton(_segment_fill_fwd_kernel)[grid](
        latents, masks, fill, out,
        latents.stride(0), latents.stride(1), latents.stride(2), xh, xw,
        masks.stride(0), masks.stride(1), mh, mw,
        fill.stride(0), fill.stride(1), fh, fw,
        S, C, h * w, w,
        FLAT=flat, BLOCK_C=bc,
    )
    return out


# --------------------------------------------------------------------------------------------- torch ops
# Strided inputs go to the kernels as they are (strides are kernel arguments): slices of the UNet output, an
# `expand` over the segment axis (stride 0) or a crop along w cost no copy. Outputs are always contiguous.
# `triton_op` (see kernels/attention.py): torch.compile and AOTInductor trace the body, the Triton kernel on CUDA
# (`wrap_triton`, embedded in a package), the reference in ATen ops elsewhere; eager CPU calls take the CPU kernel
# (the interpreter under TRITON_INTERPRET=1, else the reference); the fakes are the shapes alone.
@torch.library.triton_op("dreamfuse::composite_blend", mutates_args=())
def _composite_blend_op(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, masks: torch.Tensor,
                        guidance: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    return _blend_impl(eps_uncond, eps_cond, masks, guidance, guidance_scale, eps_uncond.is_cuda)


@_composite_blend_op.register_kernel("cpu")
def _(eps_uncond, eps_cond, masks, guidance, guidance_scale):
    return _blend_impl(eps_uncond, eps_cond, masks, guidance, guidance_scale, True)


def _blend_impl(eps_uncond, eps_cond, masks, guidance, guidance_scale, kernel: bool):
    _check_blend(eps_uncond, eps_cond, masks, guidance if guidance is not None else guidance_scale)
    if kernel and use_triton(eps_uncond):
        return _blend_fwd(eps_uncond, eps_cond, masks, guidance, guidance_scale)
    return composite_blend_reference(eps_uncond, eps_cond, masks, guidance if guidance is not None else guidance_scale)


@_composite_blend_op.register_fake
def _(eps_uncond, eps_cond, masks, guidance, guidance_scale):
    _check_blend(eps_uncond, eps_cond, masks, guidance if guidance is not None else guidance_scale)
    B, _, C, h, w = eps_uncond.shape
    return eps_uncond.new_empty((B, C, h, w))


@torch.library.triton_op("dreamfuse::composite_latents", mutates_args=())
def _composite_latents_op(latents: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
    return _latents_impl(latents, masks, fill, latents.is_cuda)


@_composite_latents_op.register_kernel("cpu")
def _(latents, masks, fill):
    return _latents_impl(latents, masks, fill, True)


def _latents_impl(latents, masks, fill, kernel: bool):
    _check_segments("latents", latents, masks)
    _check_fill(fill, latents, required=False)
    if kernel and use_triton(latents):
        return _latents_fwd(latents, masks, fill)
    return composite_latents_reference(latents, masks, fill)


@_composite_latents_op.register_fake
def _(latents, masks, fill):
    _check_segments("latents", latents, masks)
    _check_fill(fill, latents, required=False)
    B, _, C, h, w = latents.shape
    return latents.new_empty((B, C, h, w))


@torch.library.triton_op("dreamfuse::segment_fill", mutates_args=())
def _segment_fill_op(latents: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    return _fill_impl(latents, masks, fill, latents.is_cuda)


@_segment_fill_op.register_kernel("cpu")
def _(latents, masks, fill):
    return _fill_impl(latents, masks, fill, True)


def _fill_impl(latents, masks, fill, kernel: bool):
    _check_segments("latents", latents, masks)
    _check_fill(fill, latents, required=True)
    if kernel and use_triton(latents):
        return _fill_fwd(latents, masks, fill)
    return segment_fill_reference(latents, masks, fill)


@_segment_fill_op.register_fake
def _(latents, masks, fill):
    _check_segments("latents", latents, masks)
    _check_fill(fill, latents, required=True)
    return latents.new_empty(latents.shape)


# --------------------------------------------------------------------------------------------- public API
def composite_blend(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, masks: torch.Tensor,
                    guidance: float | torch.Tensor) -> torch.Tensor:
    """Blend per-segment classifier-free-guided noise predictions by their masks (harmonization stage)::

        eps = Σ_s m_s · (u_s + g_s · (c_s − u_s)) / max(Σ_s m_s, 1e-6)

    One pass, fp32 accumulation, the segment loop inside the kernel (no ``S·C·h·w`` temporary).

    Args:
        eps_uncond, eps_cond: ``(B, S, C, h, w)`` unconditional / conditional predictions of S segments, one
            dtype (float16, bfloat16, float32) and device. Any strides (e.g. slices or views of the UNet's
            ``(2·B·S, C, h, w)`` output): they are read in place, never copied.
        masks: ``(B, S, h, w)`` segment weights ≥ 0, any float dtype (not checked for sign: that would
            synchronize the GPU). Pixels where every mask is 0 come out 0. Where ``m_s`` is exactly 0, segment
            s has no influence (on the Triton path it is not even read).
        guidance: the CFG scale, a Python float for all segments or a float tensor broadcastable to ``(B, S)``
            (one scale per segment).

    Returns ``(B, C, h, w)`` contiguous, in the predictions' dtype. Triton on CUDA (and on CPU under
    ``TRITON_INTERPRET=1``), :func:`composite_blend_reference` otherwise. Raises ``ValueError`` naming the
    offending argument on bad shapes, dtypes or devices. Not differentiable.
    """
    _check_blend(eps_uncond, eps_cond, masks, guidance)
    if isinstance(guidance, torch.Tensor):
        return _composite_blend_op(eps_uncond, eps_cond, masks, guidance.expand(eps_uncond.shape[:2]), 0.0)
    return _composite_blend_op(eps_uncond, eps_cond, masks, None, float(guidance))


def composite_latents(latents: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Composite per-segment latents into one (scaffolding stage)::

        no fill:   Σ_s m_s · x_s / max(Σ_s m_s, 1e-6)
        fill:      Σ_s m_s · x_s / max(Σ_s m_s, 1) + (1 − min(Σ_s m_s, 1)) · fill

    With a fill (the noised scaffolding latent), a pixel the masks cover fully (Σm ≥ 1) is the normalized
    mask-weighted mean and ignores the fill (the kernel does not even read it there); a partly covered pixel
    (Σm < 1) takes ``Σ m_s·x_s`` plus the uncovered share ``1 − Σm`` of the fill; an uncovered pixel is
    exactly the fill. Without a fill, uncovered pixels come out 0.

    Args:
        latents: ``(B, S, C, h, w)`` float16, bfloat16 or float32, any strides.
        masks: ``(B, S, h, w)`` weights ≥ 0, any float dtype.
        fill: optional ``(B, C, h, w)``, latents' dtype and device, any strides.

    Returns ``(B, C, h, w)`` contiguous, in latents' dtype; fp32 accumulation, one pass.
    """
    _check_segments("latents", latents, masks)
    _check_fill(fill, latents, required=False)
    return _composite_latents_op(latents, masks, fill)


def segment_fill(latents: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Each segment's UNet input during scaffolding: its own latent inside its mask, the fill outside::

        out[:, s] = m_s · x_s + (1 − m_s) · fill

    Args:
        latents: ``(B, S, C, h, w)`` float16, bfloat16 or float32, any strides -- a shared latent repeated over
            the segments can be passed as ``x[:, None].expand(-1, S, -1, -1, -1)`` (no copy).
        masks: ``(B, S, h, w)`` any float dtype; where ``m_s`` is 0 the output is exactly the fill, where it is 1
            exactly ``x_s``.
        fill: ``(B, C, h, w)`` (the noised scaffolding latent), latents' dtype and device, any strides.

    Returns ``(B, S, C, h, w)`` contiguous, in latents' dtype; the fill is read once per pixel tile for all S.
    """
    _check_segments("latents", latents, masks)
    _check_fill(fill, latents, required=True)
    return _segment_fill_op(latents, masks, fill)


# --------------------------------------------------------------------------------------------- references
# These are the CPU path as well as the oracle, so they mirror the kernels: a loop over the S segments with an
# fp32 accumulator and in-place updates, never a (B, S, C, h, w) temporary. On one CPU thread that runs at
# 0.6-1.6x the speed of the one-line broadcast expressions (faster at batch 4 / 96², slower at batch 1 / 64², where
# the loop's per-op overhead shows; bench/composite_blend.py) while those allocate several S·C·h·w temporaries.
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32, or fp64 when the oracle asks for it


def composite_blend_reference(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, masks: torch.Tensor,
                              guidance: float | torch.Tensor) -> torch.Tensor:
    """Plain PyTorch :func:`composite_blend` in fp32 (fp64 for fp64 inputs). Same arguments; returns
    ``(B, C, h, w)`` contiguous in the predictions' dtype."""
    ct = _compute_dtype(eps_uncond)
    B, S, C, h, w = eps_uncond.shape
    m = masks.to(ct)
    g = guidance.to(ct).expand(B, S) if isinstance(guidance, torch.Tensor) else float(guidance)
    acc = torch.zeros((B, C, h, w), dtype=ct, device=eps_uncond.device)
    for s in range(S):
        g_s = g[:, s, None, None, None] if isinstance(g, torch.Tensor) else g
        e = torch.lerp(eps_uncond[:, s].to(ct), eps_cond[:, s].to(ct), g_s)  # u + g·(c − u), one pass
        acc.addcmul_(e, m[:, s, None])
    acc.div_(m.sum(1, keepdim=True).clamp_min_(_EPS))
    return acc.to(eps_uncond.dtype)


def composite_latents_reference(latents: torch.Tensor, masks: torch.Tensor,
                                fill: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch :func:`composite_latents` (fp32; fp64 for fp64 inputs)."""
    ct = _compute_dtype(latents)
    B, S, C, h, w = latents.shape
    m = masks.to(ct)
    acc = torch.zeros((B, C, h, w), dtype=ct, device=latents.device)
    for s in range(S):
        acc.addcmul_(latents[:, s].to(ct), m[:, s, None])
    msum = m.sum(1, keepdim=True)
    if fill is None:
        acc.div_(msum.clamp_min(_EPS))
    else:  # uncovered pixels: 0 / 1 + 1 · fill, exactly the fill; covered ones: + 0 · fill
        acc.div_(msum.clamp_min(1.0)).addcmul_(1.0 - msum.clamp_max(1.0), fill.to(ct))
    return acc.to(latents.dtype)


def segment_fill_reference(latents: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch :func:`segment_fill` (fp32; fp64 for fp64 inputs)."""
    ct = _compute_dtype(latents)
    # lerp(fill, x, m) = fill + m·(x − fill) in one pass; exact at m = 0 (fill) and m = 1 (x), like the kernel
    out = torch.lerp(fill.to(ct)[:, None], latents.to(ct), masks.to(ct)[:, :, None])
    return out.to(latents.dtype).contiguous()
