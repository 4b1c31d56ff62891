"""Fused attention forward (FlashAttention-2 style online softmax) and DreamMatcher's AMA value warp.

``attention(q, k, v)`` computes ``softmax(scale * q @ k^T) @ v`` without materializing the attention
matrix and can return the per-row log-sum-exp, from which token attention maps are read back
(``p(i, j) = exp(scale * q_i . k_j - lse_i)``). ``ama_attention`` is the same kernel with the values
warped on the fly (appearance-matching self-attention, DreamMatcher):

    V_w[b, h, j] = mask[b, j] * v_ref[b, h, flow[b, j]] + (1 - mask[b, j]) * v_tgt[b, h, j]

``V_w`` is formed while V tiles are loaded and never written to memory.

Non-finite input is not checked (a check would synchronize the GPU) and raises nothing: it propagates by IEEE
arithmetic, identically on the Triton path and in the references (``torch.softmax`` / ``torch.logsumexp``):

* scores ``s_ij = scale * q_i . k_j`` are NaN or +-inf as IEEE makes them (a NaN in ``q_i`` or ``k_j``, or
  ``inf * 0`` / ``inf - inf`` inside the dot product, gives NaN);
* a row with a NaN or a +inf score, or only -inf scores, has a NaN output row; its lse is NaN if a score is NaN,
  else +inf if one is +inf, else -inf. A -inf score gives its key weight 0: the row stays finite otherwise;
* a NaN or +-inf in a value reaches every output entry that gives it nonzero weight (``inf * p = inf``); the
  lse does not depend on the values;
* AMA: ``V_w`` is the blend above in IEEE arithmetic (a non-finite ``mask[b, j]`` spoils row ``j`` of ``V_w``),
  except that a weight of exactly 0 reads ``v_tgt`` alone and exactly 1 ``v_ref[flow]`` alone (the kernel skips
  the other load), so a non-finite value in the unread tensor does not leak in as ``0 * inf = NaN``.

With fp16/bf16 inputs the kernel rounds the weights P to that dtype, so a weight under its smallest subnormal
is 0 and meets an infinite value as ``0 * inf = NaN`` where the fp32 reference keeps ``inf``. Under
``TRITON_INTERPRET=1`` numpy reports the invalid operations (``inf - inf``, ``0 * inf``, ``0 / 0``) as
RuntimeWarnings: these raise only where warnings are made errors (``-W error``, ``numpy.seterr``).

Reading order: the Triton kernel, the launcher, the ``torch.library`` ops (with fake and autograd), then the
PyTorch references (the CPU path and the tests' oracle).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["attention", "ama_attention", "attention_reference", "ama_attention_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256  # the fp32 accumulator of a 128 x 256 tile already fills the register file


# --------------------------------------------------------------------------------------------- autotuning
# Register and shared-memory figures below are from cuobjdump on this kernel's fp16 cubins (sm_80, sm_90).
def _keep(c: triton.Config) -> bool:
    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    # 128 query rows on 4 warps: 234-255 registers already at D=40 and local-memory spills from D=80 on.
    if bm == 128 and c.num_warps == 4:
        return False
    # BLOCK_N > BLOCK_M grows the P tile held in registers without more reuse (K/V tiles are reused across
    # the BLOCK_M rows, not the other way round).
    return bn <= bm


@functools.cache
def _smem_limit(device_index: int) -> int:
    try:
        return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    except Exception:  # no GPU driver: assume an A100's 164 KiB
        return 164 * 1024


def _prune(configs, named_args, **kwargs):
    """Drop configs that cannot fit the device's shared memory (q tile + num_stages K and V tiles: the sm_90
    figure exactly, an upper bound on sm_80) or that spill at this head dim, rather than compile them."""
    bd, q = kwargs["BLOCK_D"], named_args["Q"]
    smem = lambda c: (c.kwargs["BLOCK_M"] * bd + 2 * c.num_stages * c.kwargs["BLOCK_N"] * bd) * q.element_size()
    # D=160 -> 256 lanes: 128-key tiles spill on both archs (240-256 bytes of stack at 8 warps).
    fits = [c for c in configs if smem(c) <= _smem_limit(q.device.index or 0) and bd * c.kwargs["BLOCK_N"] <= 256 * 64]
    return fits or [min(configs, key=smem)]


if _common.pin_configs():
    # One config for the interpreter and pytest: reproducible, and it fits any GPU's shared memory even at
    # D=256 fp32 (num_stages=1: 128 KiB). BLOCK_N=32 also gives the tests several key blocks (77 keys -> 3
    # blocks with a ragged tail), which is what exercises the online softmax.
    _CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3, 4)
    ]
    _CONFIGS = [c for c in _CONFIGS if _keep(c)]


# --------------------------------------------------------------------------------------------- kernel
@triton.jit
def _round_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32. Used only under the interpreter, whose
    fp32 -> bf16 cast truncates where the GPU rounds to nearest even. +-inf round to themselves; NaN is kept as
    is (the carry would turn a NaN with mantissa bits >= 0x7F8000 into -0 or 0)."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, u.to(tl.float32, bitcast=True))


@triton.autotune(configs=_CONFIGS, key=["Lk", "BLOCK_D", "AMA"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, VREF, FLOW, MASK, O, LSE,
    qk_scale,  # scale * log2(e): the softmax runs on exp2, which is one MUFU instruction
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_rb, stride_rh, stride_rn,
    stride_fb, stride_fn,
    stride_wb, stride_wn,
    stride_ob, stride_oh, stride_om,
    H, Lq, Lk,
    HEAD_DIM: tl.constexpr,  # constexpr so `offs_d < HEAD_DIM` is provably 8-aligned at D=40: vector loads
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM; padded lanes are masked to 0, never copied
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    AMA: tl.constexpr,  # warp the values: V_w = m * V_ref[flow] + (1 - m) * V; the plain path compiles without it
    DOT_PRECISION: tl.constexpr,  # fp32: "tf32x3" unless torch allows TF32; fp16/bf16: None (default)
    INTERP_BF16: tl.constexpr,  # bf16 under TRITON_INTERPRET=1: dot in fp32 (see _interp_bf16)
    SA: tl.constexpr,  # stride unit, see _stride_unit
):
    # The q/k/v/v_ref/out strides arrive divided by SA (8 when all are multiples of 8); multiplying back by the
    # constexpr proves 16-byte-aligned rows, so D=40 rows load as 8-wide vectors. Triton only specializes
    # divisibility by 16, which the head stride 40 misses: without this, D=40 on sm_90 (BLOCK 128x64) compiles
    # to scalar ld.global.b16 only, 194 registers and no cp.async pipelining; with it, 16-byte loads and 123.
    stride_qb, stride_qh, stride_qm = stride_qb * SA, stride_qh * SA, stride_qm * SA
    stride_kb, stride_kh, stride_kn = stride_kb * SA, stride_kh * SA, stride_kn * SA
    stride_vb, stride_vh, stride_vn = stride_vb * SA, stride_vh * SA, stride_vn * SA
    stride_rb, stride_rh, stride_rn = stride_rb * SA, stride_rh * SA, stride_rn * SA
    stride_ob, stride_oh, stride_om = stride_ob * SA, stride_oh * SA, stride_om * SA
    pid_m = tl.program_id(0)
    # int64: b * stride_qb passes 2**31 once the storage does (183 images of 9216 tokens x 1280 channels, the
    # 768² top level, or a view into a larger buffer); offsets within one (b, h) row block stay int32.
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Lq
    d_mask = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if INTERP_BF16:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if AMA:
        r_base = VREF + b * stride_rb + h * stride_rh
        f_base = FLOW + b * stride_fb
        w_base = MASK + b * stride_wb

    # fp32 running max / sum / accumulator: an fp16 sum (11-bit mantissa) drops terms under 2**-11 of itself,
    # which at 4096 keys is most of them.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < Lk
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        if INTERP_BF16:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        # Non-finite scores end as in torch.softmax/logsumexp (module docstring), with no extra pass. A NaN score
        # reaches l_i, hence out and lse, through p (tl.max skips NaN: maxnumf). A row max of +-inf would make
        # qk - m_new = inf - inf = NaN at every key, so 0 is subtracted instead: for -inf (no finite score yet,
        # from -inf inputs; a block always holds a real key) p = 0, then l_i = 0, out = 0/0 = NaN, lse = -inf; for
        # +inf p = inf at the +inf keys, then out = NaN, lse = +inf. alpha is 0 while m_i = -inf, and inf once
        # m_i = +inf, when l_i and acc are non-finite already. A finite max is subtracted as before, bit for bit.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new

        if AMA:
            w = tl.load(w_base + cols * stride_wn, mask=n_mask, other=0.0).to(tl.float32)
            # Out-of-range flow is undefined behaviour; clamping keeps the gather inside v_ref's rows.
            src = tl.minimum(tl.maximum(tl.load(f_base + cols * stride_fn, mask=n_mask, other=0), 0), Lk - 1)
            # Skip the loads a row does not need: DreamMatcher's m' = M * U is 0 on the background, so most
            # gathers vanish there, and m = 1 rows need no target value.
            need_ref = n_mask & (w != 0.0)
            need_tgt = n_mask & (w != 1.0)
            v_r = tl.load(r_base + src[:, None].to(tl.int64) * stride_rn + offs_d[None, :],
                          mask=need_ref[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            v_t = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :],
                          mask=need_tgt[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            v = w[:, None] * v_r + (1.0 - w[:, None]) * v_t  # fp32 blend, rounded once to the dot dtype
            if INTERP_BF16:
                v = _round_to_bf16(v)
            else:
                v = v.to(V.dtype.element_ty)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
            if INTERP_BF16:
                v = v.to(tl.float32)
        if INTERP_BF16:
            p = _round_to_bf16(p)  # what the GPU's bf16 MMA operand would hold
        else:
            p = p.to(v.dtype)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)

    acc = acc / l_i[:, None]
    if INTERP_BF16:
        acc = _round_to_bf16(acc)  # the cast below then truncates exactly, matching the GPU's RTNE
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    # natural-log lse = ln2 * log2(sum exp2(qk)) = ln2 * (m + log2(l)); LSE is a contiguous (B, H, Lq) buffer.
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + pid_bh * Lq + offs_m, lse, mask=m_mask)


# --------------------------------------------------------------------------------------------- launcher
def _check_tensors(**named) -> None:
    for name, t in named.items():
        _common.check(isinstance(t, torch.Tensor), f"attention: {name} must be a tensor, got {type(t).__name__}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_name: str = "v") -> None:
    check = _common.check
    for name, t in (("q", q), ("k", k), (v_name, v)):
        check(t.dim() == 4, f"attention: {name} must be rank 4 (B, H, L, D), got shape {tuple(t.shape)}")
    check(q.dtype in _DTYPES, f"attention: dtype {q.dtype} unsupported (use float16, bfloat16 or float32)")
    check(k.dtype == q.dtype and v.dtype == q.dtype,
          f"attention: q, k, {v_name} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check(k.device == q.device and v.device == q.device,
          f"attention: q, k, {v_name} must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, _, D = q.shape
    for name, t in (("k", k), (v_name, v)):
        check(t.shape[0] == B and t.shape[1] == H and t.shape[3] == D,
              f"attention: {name} shape {tuple(t.shape)} does not match q's batch, heads, head dim {(B, H, D)}")
    check(k.shape[2] == v.shape[2], f"attention: k and {v_name} key lengths differ: {k.shape[2]} vs {v.shape[2]}")
    check(k.shape[2] > 0, "attention: no keys (Lk = 0), softmax is undefined")
    check(0 < D <= _MAX_HEAD_DIM, f"attention: head dim {D} unsupported (1..{_MAX_HEAD_DIM})")


def _check_ama(q, k, v_tgt, v_ref, flow, mask) -> None:
    check = _common.check
    _check_qkv(q, k, v_tgt, "v_tgt")
    check(v_ref.shape == v_tgt.shape,
          f"ama_attention: v_ref must have v_tgt's shape {tuple(v_tgt.shape)}, got {tuple(v_ref.shape)}")
    check(v_ref.dtype == v_tgt.dtype, f"ama_attention: v_ref dtype {v_ref.dtype} != v_tgt dtype {v_tgt.dtype}")
    B, _, Lk, _ = k.shape
    for name, t in (("flow", flow), ("mask", mask)):
        check(tuple(t.shape) == (B, Lk),
              f"ama_attention: {name} must have shape (B, Lk) = {(B, Lk)}, got {tuple(t.shape)}")
    check(flow.dtype in (torch.int32, torch.int64), f"ama_attention: flow must be int32 or int64, got {flow.dtype}")
    check(mask.is_floating_point(), f"ama_attention: mask must be a float tensor, got {mask.dtype}")
    for name, t in (("v_ref", v_ref), ("flow", flow), ("mask", mask)):
        check(t.device == q.device, f"ama_attention: {name} is on {t.device}, q on {q.device}")


def _check_head_dim(q: torch.Tensor) -> None:
    # before D ** -0.5, which is a ZeroDivisionError at D = 0 (rank 0 is left to the rank check)
    _common.check(q.dim() == 0 or q.shape[-1] > 0,
                  "attention: head dim 0 unsupported: q, k, v have no features (and the default scale D ** -0.5 "
                  "is undefined)")


def _softmax_scale(q: torch.Tensor, scale: float | None) -> float:
    if scale is None:
        _check_head_dim(q)
        scale = q.shape[-1] ** -0.5 if q.dim() else 1.0
    return float(scale)


def _unit_d(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 or t.shape[-1] == 1


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The kernel assumes unit stride along D (vector loads of whole rows). Views from the usual
    # `x.view(B, L, H, D).transpose(1, 2)` have it; only exotic layouts (a D-axis transpose) pay this copy.
    return t if _unit_d(t) else t.contiguous()


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    """The output buffer, ``empty_like(_unit_last(q))`` without the copy: the kernel writes out with unit stride
    along D. It keeps q's strides when q is a dense view with unit stride along D, e.g. (B, L, H, D) memory seen
    as (B, H, L, D): the caller's ``out.transpose(1, 2).reshape(B, L, H * D)`` is then free; other dense orders
    (D not innermost) get a contiguous out. The launcher, the ops' reference path and the fakes all allocate
    here, so the strides that torch.compile plans with are the ones every path returns."""
    return torch.empty_like(q) if _unit_d(q) else q.new_empty(q.shape)


def _interp_bf16(t: torch.Tensor) -> bool:
    """bf16 on the interpreter: it stores bf16 as uint16 and its tl.dot multiplies the raw bit patterns
    (triton-lang/triton#11584; the debugging guide says the interpreter does not support bf16 ops), and its
    fp32 -> bf16 cast truncates. The kernel then upcasts the loaded tiles to fp32, which is exact, and rounds
    P, V_w and the output to bf16 values itself (RTNE), so the arithmetic is the GPU's: bf16 operands, fp32
    accumulation. Keyed on the interpreter, not the device: TRITON_INTERPRET=1 also interprets CUDA tensors."""
    return t.dtype == torch.bfloat16 and _common.interpreting()


def _dot_precision(t: torch.Tensor) -> str | None:
    """fp32 inputs follow torch's matmul setting: TF32 when ``torch.backends.cuda.matmul.allow_tf32``, else
    3xTF32 (fp32-level products on tensor cores). Not "ieee": that lowers to FMA loops which spill 7 KiB of
    stack per thread at D=80 (sm_80 cubin). fp16/bf16: None, the backend default (the option is fp32-only)."""
    if t.dtype != torch.float32:
        return None
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3" if torch.version.hip is None else "ieee"


def _stride_unit(*ts: torch.Tensor) -> int:
    """8 when every (B, H, L) stride of ``ts`` is a multiple of 8 elements (the kernel then gets the strides
    divided by 8 and multiplies back, which tells the compiler that rows are 16-byte aligned), else 1."""
    return 8 if all(s % 8 == 0 for t in ts for s in t.stride()[:3]) else 1


def _attention_fwd(q, k, v, scale: float, v_ref=None, flow=None, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel; inputs are already validated. Returns ``(out, lse)``."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = _empty_out(q)  # from the unit-stride q: an out allocated like a D-strided q would be written wrongly
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    ama = v_ref is not None
    if ama:
        v_ref = _unit_last(v_ref)
    else:  # unused by the plain path (AMA=False compiles the branch away); any tensor keeps the signature
        v_ref, flow, mask = v, lse, lse
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    sa = _stride_unit(q, k, v, v_ref, out)
    st = lambda t: [s // sa for s in t.stride()[:3]]
    # wrap_triton: traced by torch.compile / AOTInductor as the kernel itself (embedded in a package); in eager
    # mode (and for the interpreter's kernels) it returns the kernel unchanged.
    torch.library.wrap_triton(_attention_fwd_kernel)[grid](
        q, k, v, v_ref, flow, mask, out, lse,
        scale * math.log2(math.e),
        *st(q), *st(k), *st(v), *st(v_ref),
        flow.stride(0) if ama else 0, flow.stride(1) if ama else 0,
        mask.stride(0) if ama else 0, mask.stride(1) if ama else 0,
        *st(out),
        H, Lq, Lk,
        HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)),  # 16: the smallest K dim of an MMA
        AMA=ama,
        DOT_PRECISION=_dot_precision(q),
        INTERP_BF16=_interp_bf16(q),
        SA=sa,
    )
    return out, lse


# --------------------------------------------------------------------------------------------- torch ops
# `triton_op`, not `custom_op`: torch.compile and AOTInductor trace through the op's body to the Triton launch
# (`wrap_triton` above), so a compiled graph, and an AOTInductor package on CUDA, embeds the kernel and runs it
# without Python; a `custom_op` stays an opaque Python call there (a C++ AOTIModelPackageLoader fails on it with
# "Could not find schema"). torch.export keeps each call as one `dreamfuse::attention` node (the ONNX exporter
# translates it; `run_decompositions(decompose_custom_triton_ops=True)` lowers it). The body is what those traces
# see: the Triton kernel on CUDA, the reference in ATen ops elsewhere, so a CPU graph compiles to plain ATen.
# Eager calls on CPU go to the registered CPU kernel: the Triton interpreter under TRITON_INTERPRET=1 (how the
# tests run the kernel), else the reference. The fake is the shapes alone (the body would trace the launcher).
@torch.library.triton_op("dreamfuse::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_qkv(q, k, v)
    if q.is_cuda and _common.use_triton(q):
        return _attention_fwd(q, k, v, scale)
    return _attention_torch(q, k, v, scale)


@_attention_op.register_kernel("cpu")
def _(q, k, v, scale):
    _check_qkv(q, k, v)
    if _common.use_triton(q):  # the interpreter
        return _attention_fwd(q, k, v, scale)
    return _attention_torch(q, k, v, scale)


def _attention_torch(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = attention_reference(q, k, v, scale=scale, return_lse=True)
    return _empty_out(q).copy_(out), lse  # same strides as the Triton path and the fake


@_attention_op.register_fake
def _(q, k, v, scale):
    _check_qkv(q, k, v)
    return _empty_out(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.scale = scale


def _attention_backward(ctx, d_out, d_lse):
    q, k, v, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_torch(q, k, v, lse, d_out, d_lse, ctx.scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@torch.library.triton_op("dreamfuse::ama_attention", mutates_args=())
def _ama_attention_op(q: torch.Tensor, k: torch.Tensor, v_tgt: torch.Tensor, v_ref: torch.Tensor,
                      flow: torch.Tensor, mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    # as dreamfuse::attention above; traced on CPU, the flow is clamped into [0, Lk) as the kernel does (checking it
    # would read the data), where an eager reference call raises on it
    _check_ama(q, k, v_tgt, v_ref, flow, mask)
    if q.is_cuda and _common.use_triton(q):
        return _attention_fwd(q, k, v_tgt, scale, v_ref, flow, mask)
    flow = flow.clamp(0, k.shape[2] - 1)
    ct = _compute_dtype(v_tgt)
    v_w = _blend(v_tgt.to(ct), _gather_rows(v_ref.to(ct), flow), mask.to(ct)[:, None, :, None])
    return _attention_torch(q, k, v_w, scale)


@_ama_attention_op.register_kernel("cpu")
def _(q, k, v_tgt, v_ref, flow, mask, scale):
    _check_ama(q, k, v_tgt, v_ref, flow, mask)
    if _common.use_triton(q):  # the interpreter
        return _attention_fwd(q, k, v_tgt, scale, v_ref, flow, mask)
    out, lse = ama_attention_reference(q, k, v_tgt, v_ref, flow, mask, scale=scale, return_lse=True)
    return _empty_out(q).copy_(out), lse


@_ama_attention_op.register_fake
def _(q, k, v_tgt, v_ref, flow, mask, scale):
    _check_ama(q, k, v_tgt, v_ref, flow, mask)
    return _empty_out(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _ama_setup_context(ctx, inputs, output):
    q, k, v_tgt, v_ref, flow, mask, scale = inputs
    ctx.save_for_backward(q, k, v_tgt, v_ref, flow, mask, output[1])
    ctx.scale = scale


def _ama_backward(ctx, d_out, d_lse):
    # Attention backward on V_w (recomputed in fp32), then the chain rule through the blend:
    # dV_tgt = (1 - m) dV_w, dV_ref = scatter-add of m dV_w to the flow rows, dm = sum_hd dV_w (V_ref[flow] - V_tgt).
    q, k, v_tgt, v_ref, flow, mask, lse = ctx.saved_tensors
    v_ref_w = _gather_rows(v_ref.float(), flow)
    m = mask.float()[:, None, :, None]
    v_w = _blend(v_tgt.float(), v_ref_w, m)
    dq, dk, dv_w = _attention_bwd_torch(q, k, v_w, lse, d_out, d_lse, ctx.scale)
    dv_tgt = (1 - m) * dv_w
    dv_ref = torch.zeros_like(dv_w).scatter_add_(2, _row_index(flow, dv_w.shape), m * dv_w)
    dmask = (dv_w * (v_ref_w - v_tgt.float())).sum(dim=(1, 3))
    return (dq.to(q.dtype), dk.to(k.dtype), dv_tgt.to(v_tgt.dtype), dv_ref.to(v_ref.dtype), None,
            dmask.to(mask.dtype), None)


_ama_attention_op.register_autograd(_ama_backward, setup_context=_ama_setup_context)


# --------------------------------------------------------------------------------------------- public API
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              return_lse: bool = False):
    """Fused scaled-dot-product attention, ``softmax(scale * q @ k^T) @ v``, fp32 accumulation.

    Args:
        q: ``(B, H, Lq, D)`` float16, bfloat16 or float32. Any strides with unit stride along D (e.g.
            ``x.view(B, L, H, D).transpose(1, 2)``); other layouts are copied once.
        k, v: ``(B, H, Lk, D)``, same dtype and device as ``q``. ``1 <= D <= 256``, any ``Lq``, ``Lk >= 1``.
        scale: softmax scale; default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scaled scores per query row.

    Returns:
        ``out`` ``(B, H, Lq, D)`` in ``q``'s dtype (with ``q``'s strides when ``q`` is a dense view with unit
        stride along D; contiguous when q's D axis is strided), or ``(out, lse)`` with ``lse`` ``(B, H, Lq)``
        float32 (natural log), so that ``p[b, h, i, j] = exp(scale * q[b, h, i] . k[b, h, j] - lse[b, h, i])``.

    Non-finite input propagates as in :func:`attention_reference`, with no check and no exception: a row with a
    NaN or +inf score, or only -inf scores, gives a NaN output row (lse NaN if a score is NaN, else +inf, else
    -inf); a -inf score gives its key weight 0; a NaN/inf value reaches every output entry weighting it (see the
    module docstring).

    Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1``), :func:`attention_reference` otherwise.
    Differentiable (backward in PyTorch, recomputing the probabilities from the saved lse).
    Raises ``ValueError`` on mismatched shapes, dtypes or devices, and on ``D = 0``.
    """
    _check_tensors(q=q, k=k, v=v)  # here, as the dispatcher rejects non-tensors before the op's own checks run
    scale = _softmax_scale(q, scale)
    out, lse = torch.ops.dreamfuse.attention(q, k, v, scale)
    return (out, lse) if return_lse else out


def ama_attention(q: torch.Tensor, k: torch.Tensor, v_tgt: torch.Tensor, v_ref: torch.Tensor, flow: torch.Tensor,
                  mask: torch.Tensor, *, scale: float | None = None, return_lse: bool = False):
    """Appearance-matching self-attention (DreamMatcher): :func:`attention` of ``q`` over ``k`` with the values

        ``V_w[b, h, j] = mask[b, j] * v_ref[b, h, flow[b, j]] + (1 - mask[b, j]) * v_tgt[b, h, j]``

    formed inside the kernel while V tiles are loaded (``V_w`` is never written to memory).

    Args:
        q: ``(B, H, Lq, D)``; k, v_tgt, v_ref: ``(B, H, Lk, D)``; one dtype (float16, bfloat16, float32).
        flow: ``(B, Lk)`` int32 or int64, indices into ``v_ref``'s key axis (target -> reference matches).
            Values outside ``[0, Lk)`` are undefined behaviour on the Triton path (clamped there, not
            checked: checking would synchronize the GPU); the reference raises ``ValueError``.
        mask: ``(B, Lk)`` any float dtype, soft weights in [0, 1] (1 = take the warped reference value).
        scale, return_lse: as in :func:`attention`.

    Returns ``out`` ``(B, H, Lq, D)`` (and ``lse`` ``(B, H, Lq)`` float32 with ``return_lse``).
    Differentiable w.r.t. q, k, v_tgt, v_ref and mask.

    Non-finite input propagates as in :func:`attention` (NaN/inf in ``mask`` spoils that key's ``V_w`` row),
    identically in :func:`ama_attention_reference`; a weight of exactly 0 reads ``v_tgt`` alone and exactly 1
    ``v_ref[flow]`` alone, so a NaN/inf in the unread tensor does not reach the output.
    """
    _check_tensors(q=q, k=k, v_tgt=v_tgt, v_ref=v_ref, flow=flow, mask=mask)
    scale = _softmax_scale(q, scale)
    out, lse = torch.ops.dreamfuse.ama_attention(q, k, v_tgt, v_ref, flow, mask, scale)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------- references
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32, or fp64 when the oracle asks for it


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                        return_lse: bool = False):
    """Plain PyTorch attention in fp32 (fp64 for fp64 inputs): the CPU path and the tests' oracle.

    Same contract as :func:`attention` (non-finite input included); ``out`` is contiguous, in ``q``'s dtype;
    ``lse`` is float32 (float64 for float64 inputs). Materializes the ``(B, H, Lq, Lk)`` score matrix."""
    _check_head_dim(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = _compute_dtype(q)
    # scale q (Lq x D) rather than the scores (Lq x Lk), and the fused softmax rather than exp(s - lse): one
    # pass less over the score matrix each: 2x on CPU at 1024 tokens. Out-of-place, so autograd works through it.
    scores = (q.to(ct) * scale) @ k.to(ct).transpose(-1, -2)
    out = (torch.softmax(scores, dim=-1) @ v.to(ct)).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.logsumexp(scores, dim=-1)
    return out, lse if ct == torch.float64 else lse.float()


def _row_index(flow: torch.Tensor, shape) -> torch.Tensor:
    B, H, Lk, D = shape
    return flow.long()[:, None, :, None].expand(B, H, Lk, D)


def _gather_rows(v_ref: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``v_ref[b, h, flow[b, j]]`` for every ``(b, h, j)``."""
    return torch.gather(v_ref, 2, _row_index(flow, v_ref.shape))


def _blend(v_tgt: torch.Tensor, v_ref_w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``V_w = m * v_ref_w + (1 - m) * v_tgt``, where a weight of exactly 0 (1) reads v_tgt (v_ref_w) alone, as the
    kernel does by skipping the other load: a NaN/inf in the unread tensor is zeroed, not multiplied by 0. Zeroing
    (rather than selecting with torch.where) keeps dV_w/dm = v_ref_w - v_tgt for autograd, and finite inputs give
    the plain blend bit for bit."""
    zero = dict(nan=0.0, posinf=0.0, neginf=0.0)
    v_ref_w = torch.where(m == 0, v_ref_w.nan_to_num(**zero), v_ref_w)
    v_tgt = torch.where(m == 1, v_tgt.nan_to_num(**zero), v_tgt)
    return m * v_ref_w + (1 - m) * v_tgt


def ama_attention_reference(q: torch.Tensor, k: torch.Tensor, v_tgt: torch.Tensor, v_ref: torch.Tensor,
                            flow: torch.Tensor, mask: torch.Tensor, *, scale: float | None = None,
                            return_lse: bool = False):
    """PyTorch AMA: materializes ``V_w`` (fp32, or fp64 for fp64 inputs) with ``torch.gather``, then
    :func:`attention_reference`. Raises ``ValueError`` if ``flow`` leaves ``[0, Lk)`` or on ``D = 0``."""
    _check_head_dim(q)
    Lk = v_ref.shape[2]
    if flow.numel():
        lo, hi = int(flow.min()), int(flow.max())
        _common.check(0 <= lo and hi < Lk, f"ama_attention: flow values must lie in [0, {Lk}), got [{lo}, {hi}]")
    ct = _compute_dtype(v_tgt)
    m = mask.to(ct)[:, None, :, None]
    v_w = _blend(v_tgt.to(ct), _gather_rows(v_ref.to(ct), flow), m)
    return attention_reference(q, k, v_w, scale=scale, return_lse=return_lse)


def _attention_bwd_torch(q, k, v, lse, d_out, d_lse, scale: float, chunk_elems: int = 1 << 25):
    """Attention backward in fp32, recomputing ``P = exp(scale q k^T - lse)`` from the saved lse, a block of
    query rows at a time so that P stays under ``chunk_elems`` floats (128 MiB) per block.

    ``dS = P * (dP - rowsum(P * dP)) + P * dlse``: ``rowsum(P * dP)`` equals FlashAttention's
    ``rowsum(dO * O)`` in exact arithmetic, and here does not inherit the fp16 rounding of the saved O.
    Returns fp32 ``(dq, dk, dv)``."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    qf, kf, vf = q.float(), k.float(), v.float()
    dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    rows = max(1, chunk_elems // max(1, B * H * Lk))
    for i in range(0, Lq, rows):
        sl = slice(i, i + rows)
        p = torch.exp(scale * (qf[:, :, sl] @ kf.transpose(-1, -2)) - lse[:, :, sl, None].float())
        ds = torch.zeros_like(p)
        if d_out is not None:
            do = d_out[:, :, sl].float()
            dv += p.transpose(-1, -2) @ do
            dp = do @ vf.transpose(-1, -2)
            ds += p * (dp - (p * dp).sum(-1, keepdim=True))
        if d_lse is not None:
            ds += p * d_lse[:, :, sl, None].float()
        dq[:, :, sl] = scale * (ds @ kf)
        dk += scale * (ds.transpose(-1, -2) @ qf[:, :, sl])
    return dq, dk, dv
