"""Grouped low-rank (multi-LoRA) delta: rows of one batch carrying different LoRA adapters in one call.

For the tokens of all rows flattened into ``x (T, d_in)`` and a stacked adapter pool ``A (N, r_max, d_in)``,
``B (N, d_out, r_max)`` with per-adapter ranks, ``lora_delta`` computes, for each token ``t`` of segment ``s``::

    delta[t] = Σ_k  scale[s, k] · B[a, :, :r_a] @ (A[a, :r_a] @ x[t])      a = adapter[s, k], r_a = ranks[a]

over the segment's adapter slots ``k`` that hold an adapter (``a >= 0``) with a nonzero scale; ``out = delta``, or
``base + delta`` when ``base`` (the layer's base output) is given. The segment format is described in
:func:`lora_delta`.

Two Triton kernels, SGMV-style (Punica's "shrink" then "expand"):

* shrink: ``v[k, t] = scale[s, k] · A[a] @ x[t]``, grid (token tiles, slots), each program reducing over d_in
  with a fp32 ``BLOCK_M × BLOCK_R`` accumulator (BLOCK_R: r_max rounded up to a power of two >= 16); ``v`` is
  stored in x's dtype, ``K · T · BLOCK_R`` elements;
* expand: ``out[t] = Σ_k B[a] @ v[k, t] (+ base[t])``, grid (token tiles, d_out tiles), fp32 accumulator, every
  output element written exactly once (no atomics, no zero-fill: ``out`` starts as ``torch.empty``).

Why two kernels rather than one fused kernel. A fused program that owns a (token tile, d_out tile) must redo the
whole d_in reduction for every d_out tile: x is re-read ``d_out / BLOCK_N`` times -- 10x at d_out = 1280 and
80x for SD's GEGLU projection (d_out = 10240) -- and a fused program that instead loops over all of d_out leaves
``T / BLOCK_M`` programs, 16 for the 8×8 mid block at batch 16, on a 132-SM H100. The price of two kernels is the
round trip of ``v``: ``2 · K · T · BLOCK_R`` elements against the ``T · (d_in + d_out)`` of x and out that any
version moves -- for rank 16 at d_in = d_out = 320 (SD 1.5's outermost blocks, the worst case) that is 5 % more
bytes, 1.3 % at 1280 (byte counts, not a GPU timing: this module was written without a GPU; the figures to
compare are bench/multi_lora_kernel.py's). Both kernels keep their grids fixed by ``T`` and ``d_out`` alone: the
segment layout is data, read on the device, so a new batch composition needs no recompilation, no host
synchronization, and replays in a CUDA graph.

Per-adapter ranks: lanes ``r >= ranks[a]`` are never used -- A's are not loaded, B's are loaded with their row
(a mask by a loaded rank would break the 16-byte loads) and dropped by a select -- so a pool slot reused by a
lower-rank adapter needs no zeroing and may hold anything there, NaN included. A slot with scale 0, an adapter of
rank 0 and a segment without tokens cost a few scalar loads; x rows outside every live segment are not read.

Reading order: the Triton kernels, the launcher, the ``torch.library`` op with its fake, the public functions, then
the PyTorch references (the CPU path and the tests' oracle).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import check, interpreting, pin_configs, use_triton
from .attention import _round_to_bf16

__all__ = ["lora_delta", "lora_segments", "lora_delta_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_RANK = 128  # a 64 x 128 fp32 shrink accumulator is 64 registers a thread at 4 warps; past that it spills


# --------------------------------------------------------------------------------------------- autotuning
# Register figures below: cuobjdump --dump-resource-usage of this file's fp16 cubins (sm_80 / sm_90, Triton 3.9),
# 64-token tiles; none spills.
def _acc_regs(c: triton.Config, rows: int, cols: int) -> int:
    return rows * cols // (32 * c.num_warps)  # fp32 accumulator registers per thread


def _shrink_prune(configs, named_args, **kwargs):
    """At this BLOCK_R: keep configs whose ``BLOCK_M × BLOCK_R`` fp32 accumulator is 4-32 registers a thread (4:
    one m16n8 MMA tile a warp) and whose pipelined x and A tiles fit 96 KiB of shared memory (any sm_80+ GPU; two
    programs an SM on sm_90). 32, not 64: the operand fragments come on top -- BLOCK_R = 128 on 4 warps (64
    accumulator registers) uses 255 / 191 registers, on 8 warps (32) 128 / 108."""
    br, es = kwargs["BLOCK_R"], named_args["X"].element_size()
    regs = lambda c: _acc_regs(c, c.kwargs["BLOCK_M"], br)
    smem = lambda c: c.num_stages * (c.kwargs["BLOCK_M"] + br) * c.kwargs["BLOCK_K"] * es
    fits = [c for c in configs if 4 <= regs(c) <= 32 and smem(c) <= 96 * 1024]
    return fits or [min(configs, key=lambda c: (regs(c), smem(c)))]


def _expand_keep(c: triton.Config) -> bool:
    # a BLOCK_M x BLOCK_N fp32 accumulator of 16-64 registers a thread: larger tiles gain nothing on a kernel
    # that reads BLOCK_R (<= 128) values per output element, and they cost occupancy
    return 16 <= _acc_regs(c, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 64


def _expand_prune(configs, named_args, **kwargs):
    """At this BLOCK_R: the v and B operand tiles (``(BLOCK_M + BLOCK_N) × BLOCK_R``, one dot) at most 64 elements a
    thread. 64 x 64 outputs at BLOCK_R = 128 (128 a thread on 4 warps) use 254 / 244 registers, on 8 warps (64)
    128 / 110."""
    br = kwargs["BLOCK_R"]
    ops = lambda c: (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * br // (32 * c.num_warps)
    return [c for c in configs if ops(c) <= 64] or [min(configs, key=ops)]


if pin_configs():
    # Interpreter: 16-token tiles and 32-wide d tiles, so the tests' 7-50 token batches span several token tiles
    # with segments straddling tile edges and ragged d_in / d_out tails. pytest on a GPU: one ordinary config.
    if interpreting():
        _SHRINK_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=1, num_stages=1)]
        _EXPAND_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=1, num_stages=1)]
    else:
        _SHRINK_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2)]
        _EXPAND_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
else:
    # Small spaces (20 and 13 configs before pruning): each (d, BLOCK_R) key tunes once per process, at the first
    # call of a layer shape, and the UNet has ~10 such keys. 8 warps not for 32-token tiles (one MMA row each).
    _SHRINK_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm in (32, 64, 128)
        for bk in (32, 64)
        for w in (4, 8)
        for s in (2, 3)
        if w == 4 or bm >= 64
    ]
    _EXPAND_CONFIGS = [
        c
        for c in (
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=1)
            for bm in (32, 64, 128)
            for bn in (32, 64, 128)
            for w in (4, 8)
        )
        if _expand_keep(c)
    ]


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _first_segment(SEG_STARTS, S, m0):
    """The first segment ``s`` whose end ``seg_starts[s + 1]`` lies past token ``m0`` (``S`` if none): a binary
    search over the nondecreasing offsets, ~log2(S) scalar loads a program."""
    lo = 0
    hi = S
    while lo < hi:
        mid = (lo + hi) // 2
        past = tl.load(SEG_STARTS + mid + 1) > m0
        lo = tl.where(past, lo, mid + 1)
        hi = tl.where(past, mid, hi)
    return lo


@triton.jit
def _slot(SEG_ADAPTER, SEG_SCALE, RANKS, s, k, K, N, R_MAX):
    """Segment ``s``'s slot ``k``: (adapter, scale, rank, live). Live iff the adapter lies in [0, N), the scale is
    nonzero and the rank (clamped to r_max) positive -- the shrink and the expand must agree on it exactly (the
    expand reads ``v`` only where the shrink wrote it)."""
    a = tl.load(SEG_ADAPTER + s * K + k)
    scale = tl.load(SEG_SCALE + s * K + k)
    ok = (a >= 0) & (a < N) & (scale != 0.0)
    rank = tl.minimum(tl.load(RANKS + a, mask=ok, other=0), R_MAX)
    return a, scale, rank, ok & (rank > 0)


@triton.autotune(configs=_SHRINK_CONFIGS, key=["D_IN", "BLOCK_R"],
                 prune_configs_by={"early_config_prune": _shrink_prune})
@triton.jit
def _lora_shrink_kernel(
    X, A, RANKS, SEG_STARTS, SEG_ADAPTER, SEG_SCALE, V,
    stride_xt, stride_an, stride_ar, stride_vk,
    T, D_IN, N, S, K, R_MAX,
    BLOCK_R: tl.constexpr,  # next power of two >= r_max (>= 16, an MMA's smallest N); lanes >= rank are masked
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # fp32: "tf32x3" unless torch allows TF32; fp16/bf16: None (default)
    INTERP_BF16: tl.constexpr,  # bf16 under TRITON_INTERPRET=1: dot in fp32 (see attention._interp_bf16)
):
    # One program: BLOCK_M tokens x one adapter slot k. A token tile may straddle segment boundaries (rows of 77
    # text tokens, short segments): the program walks the segments that overlap it, each with its own row mask,
    # so every x row is loaded once per slot (masked-off rows cost no memory traffic).
    pid_m = tl.program_id(0)
    k = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    # int64: token * row stride passes 2**31 once x holds 2**31 elements (1.7 M tokens at 1280 channels), or in a
    # view into a larger buffer
    rows64 = rows.to(tl.int64)
    x_rows = X + rows64[:, None] * stride_xt
    v_rows = V + k.to(tl.int64) * stride_vk + rows64[:, None] * BLOCK_R  # v: (K, T, BLOCK_R), see the launcher
    s = _first_segment(SEG_STARTS, S, m0)
    lo = tl.load(SEG_STARTS + s)
    while (s < S) & (lo < m0 + BLOCK_M):
        hi = tl.load(SEG_STARTS + s + 1)
        a, scale, rank, live = _slot(SEG_ADAPTER, SEG_SCALE, RANKS, s, k, K, N, R_MAX)
        if live & (hi > lo):  # an empty segment would cost a whole d_in loop of MMAs on zeros
            in_seg = (rows >= lo) & (rows < hi) & (rows < T)
            r_ok = offs_r < rank
            a_rows = A + a.to(tl.int64) * stride_an + offs_r[:, None] * stride_ar
            # fp32 accumulator: d_in = 1280 fp16 products summed in fp16 would lose ~6 bits
            acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for d0 in range(0, D_IN, BLOCK_K):
                cols = d0 + offs_k
                c_ok = cols < D_IN
                xt = tl.load(x_rows + cols[None, :], mask=in_seg[:, None] & c_ok[None, :], other=0.0)
                at = tl.load(a_rows + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
                if INTERP_BF16:
                    xt = xt.to(tl.float32)
                    at = at.to(tl.float32)
                acc = tl.dot(xt, tl.trans(at), acc, input_precision=DOT_PRECISION)
            # the slot's scale folded in before the one rounding to x's dtype (the expand's MMA operand dtype)
            v = acc * scale
            if INTERP_BF16:
                v = _round_to_bf16(v)
            # all BLOCK_R lanes (0 past the rank): unmasked along r, so 16-byte stores whatever the rank
            tl.store(v_rows + offs_r[None, :], v.to(V.dtype.element_ty), mask=in_seg[:, None])
        s += 1
        lo = hi


@triton.autotune(configs=_EXPAND_CONFIGS, key=["D_OUT", "BLOCK_R", "HAS_BASE"],
                 prune_configs_by={"early_config_prune": _expand_prune})
@triton.jit
def _lora_expand_kernel(
    V, B, RANKS, SEG_STARTS, SEG_ADAPTER, SEG_SCALE, BASE, OUT,
    stride_vk, stride_bn, stride_bo, stride_baset, stride_ot,
    T, D_OUT, N, S, K, R_MAX,
    HAS_BASE: tl.constexpr,  # out = base + delta (one pass instead of a separate add); else out = delta
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    # One program: BLOCK_M tokens x BLOCK_N output channels, all the slots of all the segments overlapping the
    # token tile summed in one fp32 accumulator (several adapters on one row: one rounding, at the store).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    n_ok = cols < D_OUT
    v_tile = V + rows64[:, None] * BLOCK_R + offs_r[None, :]  # slot 0's plane; slot k's is k * stride_vk further
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    s = _first_segment(SEG_STARTS, S, m0)
    lo = tl.load(SEG_STARTS + s)
    while (s < S) & (lo < m0 + BLOCK_M):
        hi = tl.load(SEG_STARTS + s + 1)
        in_seg = (rows >= lo) & (rows < hi) & (rows < T)
        v_k = v_tile
        for k in range(0, K):
            a, scale, rank, live = _slot(SEG_ADAPTER, SEG_SCALE, RANKS, s, k, K, N, R_MAX)
            if live:
                # The rank mask is applied with `where` after loads masked by row / by r_max only: a mask by a
                # loaded rank has no provable alignment and would split every load into 2-byte ones. Lanes in
                # [rank, r_max) are read but never used, so what the pool holds there (NaN included) is ignored.
                r_ok = (offs_r < rank)[None, :]
                vt = tl.load(v_k, mask=in_seg[:, None], other=0.0)
                bt = tl.load(B + a.to(tl.int64) * stride_bn + cols[:, None] * stride_bo + offs_r[None, :],
                             mask=n_ok[:, None] & (offs_r < R_MAX)[None, :], other=0.0)
                vt = tl.where(r_ok, vt, 0.0)
                bt = tl.where(r_ok, bt, 0.0)
                if INTERP_BF16:
                    vt = vt.to(tl.float32)
                    bt = bt.to(tl.float32)
                acc = tl.dot(vt, tl.trans(bt), acc, input_precision=DOT_PRECISION)
            v_k += stride_vk  # pointer arithmetic is 64-bit: K * T * BLOCK_R may pass 2**31
        s += 1
        lo = hi
    ok = (rows < T)[:, None] & n_ok[None, :]
    if HAS_BASE:
        acc += tl.load(BASE + rows64[:, None] * stride_baset + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if INTERP_BF16:
        acc = _round_to_bf16(acc)  # the interpreter's cast below truncates; the GPU's rounds to nearest even
    tl.store(OUT + rows64[:, None] * stride_ot + cols[None, :], acc.to(OUT.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------- launcher
def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check(x, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base) -> None:
    """Shapes, dtypes and devices (never values: reading them would synchronize the GPU)."""
    named = dict(x=x, lora_a=lora_a, lora_b=lora_b, ranks=ranks, seg_starts=seg_starts, seg_adapter=seg_adapter,
                 seg_scale=seg_scale)
    for name, t in named.items():
        check(isinstance(t, torch.Tensor), f"lora_delta: {name} must be a tensor, got {type(t).__name__}")
    check(base is None or isinstance(base, torch.Tensor),
          f"lora_delta: base must be a tensor or None, got {type(base).__name__}")
    check(x.ndim == 2, f"lora_delta: x must be (T, d_in), got shape {_shape(x)}")
    check(x.dtype in _DTYPES, f"lora_delta: x dtype {x.dtype} not supported (float16, bfloat16, float32)")
    T, d_in = x.shape
    check(lora_a.ndim == 3, f"lora_delta: lora_a must be (N, r_max, d_in), got shape {_shape(lora_a)}")
    N, r_max = lora_a.shape[:2]
    check(lora_a.shape[2] == d_in, f"lora_delta: lora_a shape {_shape(lora_a)} does not match x's d_in = {d_in}")
    check(1 <= r_max <= _MAX_RANK, f"lora_delta: r_max = {r_max} (lora_a.shape[1]) outside 1..{_MAX_RANK}")
    check(lora_b.ndim == 3 and lora_b.shape[0] == N and lora_b.shape[2] == r_max,
          f"lora_delta: lora_b must be (N, d_out, r_max) = ({N}, d_out, {r_max}), got shape {_shape(lora_b)}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)) + ((("base", base),) if base is not None else ()):
        check(t.dtype == x.dtype, f"lora_delta: {name} dtype {t.dtype} must equal x's {x.dtype}")
    d_out = lora_b.shape[1]
    check(tuple(ranks.shape) == (N,), f"lora_delta: ranks must be (N,) = ({N},), got shape {_shape(ranks)}")
    check(seg_starts.ndim == 1 and seg_starts.shape[0] >= 1,
          f"lora_delta: seg_starts must be (S + 1,), got shape {_shape(seg_starts)}")
    S = seg_starts.shape[0] - 1
    check(seg_adapter.ndim == 2 and seg_adapter.shape[0] == S and seg_adapter.shape[1] >= 1,
          f"lora_delta: seg_adapter must be (S, K) = ({S}, K >= 1) for {S + 1} seg_starts, got shape "
          f"{_shape(seg_adapter)}")
    check(tuple(seg_scale.shape) == tuple(seg_adapter.shape),
          f"lora_delta: seg_scale shape {_shape(seg_scale)} must equal seg_adapter's {tuple(seg_adapter.shape)}")
    for name, t in (("ranks", ranks), ("seg_starts", seg_starts), ("seg_adapter", seg_adapter)):
        check(t.dtype == torch.int32, f"lora_delta: {name} must be int32, got {t.dtype}")
    check(seg_scale.dtype == torch.float32, f"lora_delta: seg_scale must be float32, got {seg_scale.dtype}")
    if base is not None:
        check(tuple(base.shape) == (T, d_out),
              f"lora_delta: base must be (T, d_out) = ({T}, {d_out}), got shape {_shape(base)}")
    for name, t in list(named.items())[1:] + ([("base", base)] if base is not None else []):
        check(t.device == x.device, f"lora_delta: {name} is on {t.device}, x on {x.device}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels read rows with unit stride (vector loads); row strides are arguments, so row slices and
    # `x.view(B * L, C)` of any dense layout cost nothing. Only a transposed last axis pays this copy.
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _dot_precision(t: torch.Tensor) -> str | None:
    """As attention._dot_precision: fp32 follows torch's matmul setting (TF32 when allowed, else 3xTF32, ~fp32
    products on tensor cores; "ieee" on ROCm); fp16/bf16 take the backend default."""
    if t.dtype != torch.float32:
        return None
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3" if torch.version.hip is None else "ieee"


def _block_r(r_max: int) -> int:
    return max(16, triton.next_power_of_2(r_max))


def _lora_delta_fwd(x, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base) -> torch.Tensor:
    """Launch shrink then expand; inputs are already validated. Returns ``out (T, d_out)`` contiguous."""
    T, d_in = x.shape
    N, r_max, _ = lora_a.shape
    d_out = lora_b.shape[1]
    S, K = seg_adapter.shape
    out = torch.empty((T, d_out), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x, lora_a, lora_b = _unit_last(x), _unit_last(lora_a), _unit_last(lora_b)
    ranks, seg_starts, seg_adapter, seg_scale = (t.contiguous() for t in (ranks, seg_starts, seg_adapter, seg_scale))
    has_base = base is not None
    base = _unit_last(base) if has_base else out  # unused when HAS_BASE is False; any tensor keeps the signature
    # v: one (T, BLOCK_R) plane per slot, in x's dtype, rows padded to the power of two BLOCK_R so that both
    # kernels move it in whole 16-byte vectors (the same bytes as r_max for the usual r_max = 16, 32, 64, 128);
    # rows of idle slots are never written nor read
    block_r = _block_r(r_max)
    v = torch.empty((K, T, block_r), dtype=x.dtype, device=x.device)
    prec = _dot_precision(x)
    interp_bf16 = x.dtype == torch.bfloat16 and interpreting()
    # wrap_triton: traced by torch.compile / AOTInductor as the kernels themselves; in eager mode it returns them
    torch.library.wrap_triton(_lora_shrink_kernel)[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), K)](
        x, lora_a, ranks, seg_starts, seg_adapter, seg_scale, v,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), v.stride(0),
        T, d_in, N, S, K, r_max,
        BLOCK_R=block_r, DOT_PRECISION=prec, INTERP_BF16=interp_bf16,
    )
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), triton.cdiv(d_out, meta["BLOCK_N"]))
    torch.library.wrap_triton(_lora_expand_kernel)[grid](
        v, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base, out,
        v.stride(0), lora_b.stride(0), lora_b.stride(1), base.stride(0), out.stride(0),
        T, d_out, N, S, K, r_max,
        HAS_BASE=has_base, BLOCK_R=block_r, DOT_PRECISION=prec, INTERP_BF16=interp_bf16,
    )
    return out


# --------------------------------------------------------------------------------------------- torch op
# `triton_op` (see kernels/attention.py): torch.compile and AOTInductor trace the body -- the two Triton launches
# on CUDA, embedded in a compiled graph or package; elsewhere `_lora_delta_dense`, a formulation in ATen ops that
# reads no tensor value (so it traces with fake tensors, where the reference's per-segment loop cannot). Eager CPU
# calls take the registered CPU kernel: the Triton interpreter under TRITON_INTERPRET=1, else the reference. The
# fake is the shape alone.
@torch.library.triton_op("dreamfuse::lora_delta", mutates_args=())
def _lora_delta_op(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor,
                   seg_starts: torch.Tensor, seg_adapter: torch.Tensor, seg_scale: torch.Tensor,
                   base: torch.Tensor | None) -> torch.Tensor:
    _check(x, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base)
    if x.is_cuda and use_triton(x):
        return _lora_delta_fwd(x, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base)
    return _lora_delta_dense(x, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base)


@_lora_delta_op.register_kernel("cpu")
def _(x, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base):
    _check(x, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base)
    if use_triton(x):  # the interpreter
        return _lora_delta_fwd(x, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base)
    return lora_delta_reference(x, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base)


@_lora_delta_op.register_fake
def _(x, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base):
    _check(x, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base)
    return x.new_empty((x.shape[0], lora_b.shape[1]))


# --------------------------------------------------------------------------------------------- public API
def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor,
               seg_starts: torch.Tensor, seg_adapter: torch.Tensor, seg_scale: torch.Tensor, *,
               base: torch.Tensor | None = None) -> torch.Tensor:
    """Per-segment multi-adapter LoRA delta of a linear layer, several adapters per token summed::

        out[t] = base[t] + Σ_k seg_scale[s, k] · lora_b[a] @ (lora_a[a] @ x[t])     a = seg_adapter[s, k]

    for the segment ``s`` holding token ``t`` (``base[t]`` taken as 0 without ``base``), the sum running over
    the live slots ``k``; the adapters' ranks cut ``lora_a[a]`` to its first ``ranks[a]`` rows and ``lora_b[a]``
    to its first ``ranks[a]`` columns. A layer computes ``y = lora_delta(x, ..., base=linear(x))``.

    Segment format: the tokens are cut into ``S`` consecutive, non-overlapping segments (typically one per batch
    row, or per run of consecutive rows with the same adapters); each carries up to ``K`` (adapter, scale) slots:

    * ``seg_starts`` ``(S + 1,)`` int32, nondecreasing: segment ``s`` is tokens ``[seg_starts[s], seg_starts[s+1])``
      (empty when equal). Tokens before ``seg_starts[0]`` or from ``seg_starts[S]`` on belong to no segment and
      get no delta. With rows of ``L`` tokens, one segment a row: ``seg_starts = arange(B + 1) * L``.
    * ``seg_adapter`` ``(S, K)`` int32 (or ``(S,)`` for K = 1): indices into the pool's first axis; ``-1`` marks an
      empty slot. A row with several adapters (a style and a subject LoRA) uses several slots; rows with fewer
      pad with -1; a row without adapter has all -1 (or lies outside every segment). The slots' deltas are
      summed in fp32 and rounded once. An adapter may appear in several slots (its scales then add up).
    * ``seg_scale`` ``(S, K)`` float32 (or ``(S,)``): each slot's scale (PEFT's ``lora_alpha / r`` times the
      user's weight). A slot with scale 0 contributes nothing and reads nothing.

    :func:`lora_segments` builds the three tensors from per-row lists of (adapter, scale) pairs.

    Args:
        x: ``(T, d_in)``, or ``(..., d_in)`` whose leading axes are flattened into ``T`` (rows contiguous, e.g.
            a processor's ``(B, L, C)`` hidden states); float16, bfloat16 or float32. Any row stride.
        lora_a: ``(N, r_max, d_in)`` the stacked A weights (PEFT's ``lora_A.weight`` is ``(r, d_in)``), x's dtype
            and device; ``1 <= r_max <= 128``.
        lora_b: ``(N, d_out, r_max)`` the stacked B weights (PEFT's ``lora_B.weight`` is ``(d_out, r)``).
        ranks: ``(N,)`` int32, each adapter's rank in ``[0, r_max]``: only ``lora_a[a, :ranks[a]]`` and
            ``lora_b[a, :, :ranks[a]]`` are read, so pool slots need no zero padding.
        seg_starts, seg_adapter, seg_scale: the segments, above. Index tensors stay on the device: nothing is
            read back to the host, so the layout may change every call (and under CUDA-graph replay).
        base: optional ``(T, d_out)`` (or ``(..., d_out)`` like x), x's dtype: added in the same pass.

    Returns ``(T, d_out)`` (or ``(..., d_out)``) contiguous, in x's dtype; tokens without a live slot get
    exactly ``base`` (or 0). fp32 accumulation; the shrink's result ``scale · A x`` is rounded once to x's dtype
    (as ``x @ A.T`` in torch at that precision would be) before the expand. Triton on CUDA (two kernels, see the
    module docstring) and on CPU under ``TRITON_INTERPRET=1``; :func:`lora_delta_reference` otherwise. Not
    differentiable.

    Values are not checked on the Triton path (that would synchronize): adapter indices outside ``[-1, N)`` are
    treated as -1, ranks are clamped to ``[0, r_max]``, and offsets that are not nondecreasing within ``[0, T]``
    give unspecified (but in-bounds) results; :func:`lora_delta_reference` raises ``ValueError`` on all three.
    Raises ``ValueError`` naming the argument on bad shapes, dtypes or devices.
    """
    check(isinstance(x, torch.Tensor) and x.ndim >= 1, f"lora_delta: x must be a tensor (..., d_in), got {_shape(x)}")
    lead = x.shape[:-1]
    T = math.prod(lead)
    x2 = x.reshape(T, x.shape[-1])
    if isinstance(base, torch.Tensor) and base.ndim != 2:
        check(base.ndim >= 1 and base.shape[:-1] == lead,
              f"lora_delta: base shape {_shape(base)} does not match x's leading axes {tuple(lead)}")
        base = base.reshape(T, base.shape[-1])
    seg_adapter, seg_scale = (t[:, None] if isinstance(t, torch.Tensor) and t.ndim == 1 else t
                              for t in (seg_adapter, seg_scale))
    _check(x2, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base)
    out = torch.ops.dreamfuse.lora_delta(x2, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base)
    return out.view(*lead, out.shape[-1])


def lora_segments(rows: Sequence[Sequence[tuple[int, float]]], tokens_per_row: int | Sequence[int], *,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The segment tensors of :func:`lora_delta` for a batch of rows, from host-side lists.

    Args:
        rows: one entry per batch row, in the order of x's rows: the row's (adapter index, scale) pairs, empty for
            a row without adapter, e.g. ``[[(3, 1.0)], [], [(3, 1.0), (7, 0.8)]]``.
        tokens_per_row: the tokens of every row (an int: each UNet layer has its own, 4096 ... 64 or 77), or one
            count per row.
        device: where the tensors go (they are built on the host; one small copy each).

    Consecutive rows with identical pairs are merged into one segment (CFG's uncond/cond halves of one request
    usually are), which lets token tiles that straddle row boundaries stay within one segment. Returns
    ``(seg_starts (S + 1,) int32, seg_adapter (S, K) int32, seg_scale (S, K) float32)`` with
    ``K = max(1, most pairs on a row)``, empty slots ``(-1, 0.0)``.
    """
    n = len(rows)
    lens = [int(tokens_per_row)] * n if isinstance(tokens_per_row, int) else [int(t) for t in tokens_per_row]
    check(len(lens) == n, f"lora_segments: {len(lens)} token counts for {n} rows")
    check(all(t >= 0 for t in lens), "lora_segments: token counts must be >= 0")
    pairs = [tuple((int(a), float(s)) for a, s in row) for row in rows]
    check(all(a >= -1 for p in pairs for a, _ in p), "lora_segments: adapter indices must be >= -1")
    K = max([1, *(len(p) for p in pairs)])
    starts, segs = [0], []
    for p, t in zip(pairs, lens):
        if segs and segs[-1] == p:
            starts[-1] += t
        else:
            segs.append(p)
            starts.append(starts[-1] + t)
    adapter = [[a for a, _ in p] + [-1] * (K - len(p)) for p in segs]
    scale = [[s for _, s in p] + [0.0] * (K - len(p)) for p in segs]
    return (torch.tensor(starts, dtype=torch.int32, device=device),
            torch.tensor(adapter, dtype=torch.int32, device=device).view(len(segs), K),
            torch.tensor(scale, dtype=torch.float32, device=device).view(len(segs), K))


# --------------------------------------------------------------------------------------------- references
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32, or fp64 when the oracle asks for it


def lora_delta_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor,
                         seg_starts: torch.Tensor, seg_adapter: torch.Tensor, seg_scale: torch.Tensor,
                         base: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch :func:`lora_delta` in fp32 (fp64 for fp64 inputs): the CPU path and the tests' oracle.

    Takes the op's 2-D arguments (``x (T, d_in)``, ``seg_adapter``/``seg_scale (S, K)``, ``base (T, d_out)``
    or None); returns ``(T, d_out)`` contiguous in x's dtype. One pair of matmuls per live (segment, slot) on
    that segment's rows, the slot's scale applied in fp32. Reads the segment tensors on the host and raises
    ``ValueError`` if ``seg_starts`` is not nondecreasing within ``[0, T]``, an adapter index lies outside
    ``[-1, N)`` or a rank outside ``[0, r_max]``."""
    T = x.shape[0]
    N, r_max = lora_a.shape[:2]
    ct = _compute_dtype(x)
    starts = seg_starts.tolist()
    adapters, scales, rk = seg_adapter.tolist(), seg_scale.tolist(), ranks.tolist()
    check(all(0 <= a <= b <= T for a, b in zip(starts, starts[1:])) and 0 <= starts[0] <= T,
          f"lora_delta: seg_starts must be nondecreasing within [0, T = {T}], got {starts}")
    check(all(-1 <= a < N for row in adapters for a in row),
          f"lora_delta: seg_adapter values must lie in [-1, N = {N}), got {adapters}")
    check(all(0 <= r <= r_max for r in rk), f"lora_delta: ranks must lie in [0, r_max = {r_max}], got {rk}")
    # starting from base (not 0, adding base last) saves a pass over (T, d_out): 10-25 % of this path on a CPU
    out = base.to(ct, copy=True) if base is not None else torch.zeros((T, lora_b.shape[1]), dtype=ct, device=x.device)
    for s, (lo, hi) in enumerate(zip(starts, starts[1:])):
        for a, scale in zip(adapters[s], scales[s]):
            if hi == lo or a < 0 or scale == 0.0 or rk[a] == 0:
                continue
            r = rk[a]
            v = x[lo:hi].to(ct) @ lora_a[a, :r].to(ct).T
            out[lo:hi].addmm_(v, lora_b[a, :, :r].to(ct).T, alpha=scale)
    return out.to(x.dtype)


def _lora_delta_dense(x, lora_a, lora_b, ranks, seg_starts, seg_adapter, seg_scale, base) -> torch.Tensor:
    """:func:`lora_delta_reference` without reading a value on the host: the op's body where Triton does not run
    (torch.compile / torch.export traces on CPU, CUDA with ``DREAMFUSE_DISABLE_KERNELS=1``). Each token's
    per-adapter weight ``w[t, n] = Σ_k scale[s_t, k] · [adapter[s_t, k] = n]`` goes into two dense matmuls over the
    whole pool, ``((x @ A_all^T) ⊙ w) @ B_all^T`` with inner size ``N · r_max``: N times the reference's products,
    fine for a traced CPU graph, not a GPU path. Lanes past a rank, unused adapters and uncovered tokens are
    selected out with ``where``, so like the kernels it is unaffected by what the pool holds there. Values
    outside the documented ranges follow the Triton path (adapters ignored, ranks clamped)."""
    T, d_in = x.shape
    N, r_max = lora_a.shape[:2]
    d_out = lora_b.shape[1]
    S, K = seg_adapter.shape
    ct = _compute_dtype(x)
    out = torch.zeros((T, d_out), dtype=ct, device=x.device)
    if S > 0 and N > 0:
        tok = torch.arange(T, device=x.device, dtype=seg_starts.dtype)
        seg = torch.searchsorted(seg_starts[1:].contiguous(), tok, right=True)  # first s with end > t
        covered = (tok >= seg_starts[0]) & (seg < S)
        seg = seg.clamp(max=S - 1)
        adapter, scale = seg_adapter[seg].long(), seg_scale[seg].to(ct)  # (T, K)
        rk = ranks.long().clamp(0, r_max)
        live = covered[:, None] & (adapter >= 0) & (adapter < N) & (scale != 0)
        adapter = torch.where(live, adapter, 0)
        live &= rk[adapter] > 0
        w = torch.zeros((T, N), dtype=ct, device=x.device).scatter_add_(1, adapter, torch.where(live, scale, 0))
        used = torch.zeros(N, dtype=ct, device=x.device).scatter_add_(0, adapter.flatten(), live.flatten().to(ct)) > 0
        lanes = (torch.arange(r_max, device=x.device) < rk[:, None]) & used[:, None]  # (N, r_max)
        a_all = torch.where(lanes[:, :, None], lora_a, 0).to(ct).reshape(N * r_max, d_in)
        b_all = torch.where(lanes[:, None, :], lora_b, 0).to(ct).permute(0, 2, 1).reshape(N * r_max, d_out)
        h = (x.to(ct) @ a_all.T).view(T, N, r_max)
        h = torch.where((w != 0)[:, :, None], h * w[:, :, None], 0)  # unused (token, adapter): 0 even for inf/NaN x
        out = h.reshape(T, N * r_max) @ b_all
    if base is not None:
        out = out + base.to(ct)
    return out.to(x.dtype)
