"""Fused attention forward (FlashAttention-2 style) and DreamMatcher's value-warped attention (AMA).

One kernel serves both: ``WARP`` is a ``tl.constexpr``, so the plain path compiles without the gather.

* ``attention(q, k, v)``: ``softmax(scale·q·kᵀ)·v`` with an online softmax over key tiles, fp32
  accumulation, optional log-sum-exp per query row (how token attention maps are read without the matrix:
  ``p(q, j) = exp(scale·q·k_j − lse(q))``).
* ``ama_attention(q, k, v_tgt, v_ref, flow, mask)``: the same attention with values
  ``V_w[j] = mask[j]·v_ref[flow[j]] + (1 − mask[j])·v_tgt[j]``, formed while the V tile is loaded (rows of
  ``v_ref`` gathered by ``flow``); ``V_w`` never exists in memory.

Head dims that are not powers of two (40, 80, 160) are padded to the next power of two inside the kernel by
masked loads; tensors are read through their strides (the processors pass ``(B, L, H, D)`` views transposed
to ``(B, H, L, D)``), never copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, interpreting, pin_configs, use_triton

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _configs():
    # BLOCK_M x BLOCK_N tiles of the score matrix. Small head dims (40 -> 64 padded) leave registers for wide
    # key tiles; 160 -> 256 needs narrower ones to stay out of spills.
    cfgs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]

    def keep(c):
        bm, bn, w = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
        return not (bm == 128 and w == 4) and not (bm == 64 and w == 8 and bn < 64)

    cfgs = [c for c in cfgs if keep(c)]
    if pin_configs():
        # Under pytest/the interpreter one config, for speed and reproducibility (and 16 rows are plenty there).
        return [triton.Config({"BLOCK_M": 16 if interpreting() else 64, "BLOCK_N": 16 if interpreting() else 64},
                              num_warps=4, num_stages=2)]
    return cfgs


def _prune(configs, named_args, **kwargs):
    # Large head dims: a 128x128 fp32 tile at D=256 spills; keep BLOCK_N <= 64 there.
    d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    out = [c for c in configs if not (d >= 256 and c.kwargs["BLOCK_N"] > 64)]
    return out or configs[:1]


@triton.autotune(configs=_configs(), key=["Lk", "BLOCK_D", "WARP"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, VR, FLOW, MASK, O, LSE,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, srb, srh, srn,
    sfb, sfn, smb, smn, sob, soh, som, slb, slh,
    H, Lq, Lk, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WARP: tl.constexpr, STORE_LSE: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: b*stride overflows int32 at batch 8 x 4096 tokens x 320 ch
    b = bh // H
    h = bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D  # head-dim padding: lanes >= D load 0 and are never stored

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Lq) & d_ok[None, :], other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Lk
        k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                    other=0.0).to(DOT_DTYPE)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        # scores in log2 units: exp2 is the native instruction
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vmask = n_ok[:, None] & d_ok[None, :]
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=vmask, other=0.0)
        if WARP:
            # V_w = m·V_ref[flow] + (1 − m)·V_tgt, built in registers: the warped values never hit memory.
            src = tl.load(FLOW + b * sfb + offs_n * sfn, mask=n_ok, other=0).to(tl.int64)
            w = tl.load(MASK + b * smb + offs_n * smn, mask=n_ok, other=0.0).to(tl.float32)
            vr = tl.load(VR + b * srb + h * srh + src[:, None] * srn + offs_d[None, :], mask=vmask, other=0.0)
            v = w[:, None] * vr.to(tl.float32) + (1.0 - w[:, None]) * v.to(tl.float32)
        v = v.to(DOT_DTYPE)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    m_ok = offs_m < Lq
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        # back to natural log: lse = (m + log2 l)·ln 2
        tl.store(LSE + b * slb + h * slh + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=m_ok)


# ----------------------------------------------------------------------------------------------- launchers
_TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _check_qkv(q, k, v, name_v="v"):
    for n, t in (("q", q), ("k", k), (name_v, v)):
        check(isinstance(t, torch.Tensor), f"{n}: expected a tensor, got {type(t).__name__}")
        check(t.ndim == 4, f"{n}: expected rank 4 (B, H, L, D), got shape {tuple(t.shape)}")
        check(t.dtype in _TORCH_TO_TL, f"{n}: dtype {t.dtype} not supported (fp16, bf16, fp32)")
    check(k.dtype == q.dtype and v.dtype == q.dtype,
          f"dtype: q, k, {name_v} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check(k.device == q.device and v.device == q.device,
          f"device: q, k, {name_v} must be on one device, got {q.device}, {k.device}, {v.device}")
    check(k.shape[0] == q.shape[0] and v.shape[0] == q.shape[0],
          f"batch: B differs between q {q.shape[0]}, k {k.shape[0]}, {name_v} {v.shape[0]}")
    check(k.shape[1] == q.shape[1] and v.shape[1] == q.shape[1],
          f"heads: H differs between q {q.shape[1]}, k {k.shape[1]}, {name_v} {v.shape[1]}")
    check(k.shape[3] == q.shape[3] and v.shape[3] == q.shape[3],
          f"head_dim: D differs between q {q.shape[3]}, k {k.shape[3]}, {name_v} {v.shape[3]}")
    check(k.shape[2] == v.shape[2], f"keys: k has {k.shape[2]} keys but {name_v} has {v.shape[2]}")
    check(q.shape[3] <= 256, f"head_dim: D = {q.shape[3]} > 256 is not supported by the kernel")
    check(k.shape[2] >= 1, "keys: Lk must be >= 1")


def _last_dim_contiguous(t):
    # The kernel reads rows through strides; only the head dim must be unit-stride (vectorized loads).
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, v, scale, vr=None, flow=None, mask=None):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = torch.empty_like(q, memory_format=torch.contiguous_format) if not q.is_contiguous() else torch.empty_like(q)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    warp = vr is not None
    if warp:
        vr = _last_dim_contiguous(vr)
    else:
        vr, flow, mask = v, lse, lse  # unused: WARP is a constexpr and the loads compile away
    # bf16 tl.dot is wrong in the Triton interpreter (numpy has no bf16): upcast there only.
    dot_dtype = tl.float32 if (q.dtype == torch.bfloat16 and interpreting()) else _TORCH_TO_TL[q.dtype]
    block_d = max(16, triton.next_power_of_2(D))
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    _attention_fwd_kernel[grid](
        q, k, v, vr, flow, mask, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), vr.stride(0), vr.stride(1), vr.stride(2),
        flow.stride(0), flow.stride(-1), mask.stride(0), mask.stride(-1),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        H, Lq, Lk, D, scale * _LOG2E,
        BLOCK_D=block_d, WARP=warp, STORE_LSE=True, DOT_DTYPE=dot_dtype, IEEE=q.dtype == torch.float32,
    )
    return o, lse


# ----------------------------------------------------------------------------------------------- torch ops
@torch.library.custom_op("dreamfuse::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return _launch(q, k, v, scale)
    o, lse = attention_reference(q, k, v, scale=scale, return_lse=True)
    return o, lse


@_attention_op.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _attention_backward(ctx, do, dlse):
    # Backward in PyTorch from the saved lse (no second softmax pass): exact, materializes Lq x Lk per head.
    # It serves semantic matching guidance and training, not the inference hot path.
    q, k, v, o, lse = ctx.saved_tensors
    scale = ctx.scale
    qf, kf, vf = q.float(), k.float(), v.float()
    p = torch.exp(scale * qf @ kf.transpose(-1, -2) - lse[..., None])
    dof = do.float() if do is not None else torch.zeros_like(o, dtype=torch.float32)
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    delta = (dof * o.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if dlse is not None:
        ds = ds + p * dlse[..., None]  # d lse / d s_j = p_j
    dq = scale * ds @ kf
    dk = scale * ds.transpose(-1, -2) @ qf
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


@torch.library.custom_op("dreamfuse::ama_attention", mutates_args=())
def _ama_attention_op(q: torch.Tensor, k: torch.Tensor, v_tgt: torch.Tensor, v_ref: torch.Tensor,
                      flow: torch.Tensor, mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return _launch(q, k, v_tgt, scale, v_ref, flow, mask)
    return ama_attention_reference(q, k, v_tgt, v_ref, flow, mask, scale=scale, return_lse=True)


@_ama_attention_op.register_fake
def _(q, k, v_tgt, v_ref, flow, mask, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- public API
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              return_lse: bool = False):
    """Fused scaled-dot-product attention.

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, H, Lk, D)``; one dtype (fp16, bf16 or fp32), one device; any strides
            with a unit-stride head dim; any Lq, Lk; D <= 256.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scaled scores, ``(B, H, Lq)`` float32.

    Returns:
        ``out`` ``(B, H, Lq, D)`` in q's dtype (fp32 accumulation), or ``(out, lse)``.

    Runs the Triton kernel on CUDA (and on CPU under ``TRITON_INTERPRET=1``), else :func:`attention_reference`.
    Differentiable (PyTorch backward from the saved lse). Also ``torch.ops.dreamfuse.attention``.
    """
    _check_qkv(q, k, v)
    o, lse = _attention_op(q, k, v, float(q.shape[-1] ** -0.5 if scale is None else scale))
    return (o, lse) if return_lse else o


def _check_ama(q, k, v_tgt, v_ref, flow, mask):
    _check_qkv(q, k, v_tgt, "v_tgt")
    check(isinstance(v_ref, torch.Tensor) and v_ref.shape == v_tgt.shape,
          f"v_ref: must have v_tgt's shape {tuple(v_tgt.shape)}, got "
          f"{tuple(v_ref.shape) if isinstance(v_ref, torch.Tensor) else type(v_ref).__name__}")
    check(v_ref.dtype == v_tgt.dtype and v_ref.device == v_tgt.device, "v_ref: must match v_tgt's dtype and device")
    B, _, Lk, _ = k.shape
    check(isinstance(flow, torch.Tensor) and flow.shape == (B, Lk),
          f"flow: expected shape (B, Lk) = {(B, Lk)}, got {tuple(getattr(flow, 'shape', ()))}")
    check(flow.dtype in (torch.int32, torch.int64), f"flow: must be int32 or int64, got {flow.dtype}")
    check(isinstance(mask, torch.Tensor) and mask.shape == (B, Lk),
          f"mask: expected shape (B, Lk) = {(B, Lk)}, got {tuple(getattr(mask, 'shape', ()))}")
    check(mask.is_floating_point(), f"mask: must be a float tensor, got {mask.dtype}")
    check(flow.device == q.device and mask.device == q.device, "device: flow and mask must be on q's device")


def ama_attention(q: torch.Tensor, k: torch.Tensor, v_tgt: torch.Tensor, v_ref: torch.Tensor, flow: torch.Tensor,
                  mask: torch.Tensor, *, scale: float | None = None, return_lse: bool = False):
    """Attention of q over k with DreamMatcher's warped values, fused.

    ``V_w[b, h, j] = mask[b, j]·v_ref[b, h, flow[b, j]] + (1 − mask[b, j])·v_tgt[b, h, j]``; the warped values
    are formed while V tiles load and never written to memory.

    Args:
        q: ``(B, H, Lq, D)``; k, v_tgt, v_ref: ``(B, H, Lk, D)``.
        flow: ``(B, Lk)`` int32/int64 indices into v_ref's key axis (target -> reference). Out-of-range values are
            undefined behaviour in the kernel (checking them would sync the GPU); the reference raises.
        mask: ``(B, Lk)`` float, soft values in [0, 1] (``m' = M ⊙ U``).

    Returns ``out`` like q, or ``(out, lse)``. Also ``torch.ops.dreamfuse.ama_attention`` (no autograd:
    differentiate :func:`ama_attention_reference` instead).
    """
    _check_ama(q, k, v_tgt, v_ref, flow, mask)
    o, lse = _ama_attention_op(q, k, v_tgt, v_ref, flow, mask,
                               float(q.shape[-1] ** -0.5 if scale is None else scale))
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------------------- references
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                        return_lse: bool = False):
    """Plain PyTorch attention accumulating in fp32 (fp64 for fp64 inputs: the tests' oracle); the CPU path.
    Output in q's dtype, lse ``(B, H, Lq)`` in the accumulation dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    s = scale * (q.to(acc) @ k.to(acc).transpose(-1, -2))
    lse = torch.logsumexp(s, dim=-1)
    o = (torch.exp(s - lse[..., None]) @ v.to(acc)).to(q.dtype)
    return (o, lse) if return_lse else o


def ama_attention_reference(q, k, v_tgt, v_ref, flow, mask, *, scale: float | None = None,
                            return_lse: bool = False):
    """Materializes ``V_w`` with a gather, then :func:`attention_reference`. Differentiable."""
    if flow.numel() and (int(flow.min()) < 0 or int(flow.max()) >= v_ref.shape[2]):
        raise ValueError(f"flow: indices must be in [0, {v_ref.shape[2]}), got [{int(flow.min())}, {int(flow.max())}]")
    idx = flow.long()[:, None, :, None].expand(-1, v_ref.shape[1], -1, v_ref.shape[3])
    acc = torch.promote_types(v_tgt.dtype, torch.float32)
    m = mask.to(acc)[:, None, :, None]
    v_w = (m * torch.gather(v_ref.to(acc), 2, idx) + (1 - m) * v_tgt.to(acc)).to(v_tgt.dtype)
    return attention_reference(q, k, v_w, scale=scale, return_lse=return_lse)
