"""Semantic matching for DreamMatcher: streamed bidirectional cosine argmax, and the cycle-consistency mask.

* ``match_argmax(f_tgt, f_ref)``: for every target position the most similar reference position and back,
  from one pass over tiles of the similarity matrix; the N×M cost volume is never materialized.
* ``cycle_mask(t2r, r2t, fg, ...)``: ``m = fg · [‖coord(r2t[t2r[x]]) − coord(x)‖₂ < λc·H·fg_ratio]``.
  DreamMatcher warps with ``grid_sample(align_corners=True)`` at integer displacements, which is exactly
  the index gather these flows feed.

Reading order: the Triton kernels, the launchers, the ``torch.library`` ops, the public functions, then the
PyTorch references (the CPU path and the tests' oracle).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._common import check, interpreting, pin_configs, use_triton

__all__ = ["match_argmax", "cycle_mask", "match_argmax_reference", "cycle_mask_reference"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------- autotuning
def _keep(c: triton.Config) -> bool:
    # 8 warps only for the 128x128 score tile: its fp32 accumulator is 64 KiB of registers; on smaller
    # tiles 8 warps leave each warp less than one m16 MMA row block of work.
    return (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == 128 * 128) == (c.num_warps == 8)


_SMEM_BUDGET = 160 * 1024  # bytes: fits A100 (164 KiB) and H100 (228 KiB) per-block shared memory


def _prune(configs, named_args, **kwargs):
    """Drop configs whose A/B tile pipeline cannot fit in shared memory for this dtype (fp32 doubles it)."""
    esize = named_args["FT"].element_size()
    smem = lambda c: (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * esize * c.num_stages
    fits = [c for c in configs if smem(c) <= _SMEM_BUDGET]
    return fits or [min(configs, key=smem)]


if pin_configs():
    # One config for the interpreter and pytest. 16x16 tiles under the interpreter make the small test shapes
    # (37x50, 100x67) span several row tiles and column tiles with ragged tails, which is what exercises the
    # cross-tile reductions; on a GPU 64x64 is a safe middle.
    _small = 16 if interpreting() else 64
    _CONFIGS = [triton.Config({"BLOCK_M": _small, "BLOCK_N": _small, "BLOCK_K": 32}, num_warps=4, num_stages=2)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (64, 128)
        for bk in (32, 64)
        for w in (4, 8)
        for s in (3, 4)
    ]
    _CONFIGS = [c for c in _CONFIGS if _keep(c)]

# Column splits are multiples of every config's BLOCK_N, so no column tile straddles two splits.
_COL_ALIGN = max(c.kwargs["BLOCK_N"] for c in _CONFIGS)
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _CONFIGS)
_MAX_BLOCK_M = max(c.kwargs["BLOCK_M"] for c in _CONFIGS)


# --------------------------------------------------------------------------------------------- kernels
@triton.autotune(configs=_CONFIGS, key=["N", "M", "D", "CHUNK"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _match_argmax_fwd_kernel(
    FT, FR, INV_T, INV_R,            # features (B, N, D), (B, M, D), unit stride on D; fp32 inverse norms
    ROW_SIM, ROW_ARG,                # (B, S, N) fp32 / int32: per (column split, target row) max and argmax
    COL_SIM, COL_ARG,                # (B, P, M) fp32 / int32: per (row tile, reference column) max and argmax
    stb, stn, srb, srm,
    N, M, D, CHUNK,                  # CHUNK: reference columns per split, a multiple of BLOCK_N
    S, P,                            # split count and row-tile capacity of the buffers (their dim 1)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program (row tile, column split, batch): BLOCK_M target rows against the CHUNK reference columns of its
    # split, streamed in BLOCK_N tiles; each score tile is reduced both ways before the next one is computed.
    # * rows: a running max/argmax in registers, written once per split to ROW_*; the split axis exists for
    #   occupancy -- at N=1024, B=2 there are only 16 row tiles of 128 for 132 SMs.
    # * columns: the tile's column max/argmax over this program's rows goes straight to COL_* (each
    #   (row tile, column) cell has exactly one writer, so no atomics and no initialization pass).
    # Both buffers are finished by a max over their dim 1 in the launcher; taking the first maximal entry
    # there, and strict '>' across tiles here, gives torch.argmax's lowest-index tie rule exactly.
    # Why not atomic_max on packed (order-preserving sim bits << 32 | ~index) int64 keys: that needs a
    # -inf-filled (B, M) buffer first (an extra launch) and serializes P 64-bit atomics on every column, and
    # the interpreter's int64 atomics are a weaker test oracle -- while the buffers cost ~1/32 of the cost
    # volume, take plain coalesced stores, and the finishing max reads them once (~11 MiB at N=M=9216, B=2).
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64: b * stride passes 2**31 at B*N*D or B*P*M beyond that
    FT += b * stb
    FR += b * srb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    inv_t = tl.load(INV_T + b * N + offs_m, mask=m_ok, other=0.0)
    offs_k0 = tl.arange(0, BLOCK_K)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int32)
    col_lo = pid_s * CHUNK
    col_hi = tl.minimum(col_lo + CHUNK, M)
    for start_n in range(col_lo, col_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < col_hi
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # fp32 scores whatever the input dtype
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + offs_k0
            k_ok = offs_k < D
            a = tl.load(FT + offs_m[:, None] * stn + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            r = tl.load(FR + offs_n[None, :] * srm + offs_k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST:  # bf16 under the interpreter (see _launch_match): exact upcast, same products
                a = a.to(tl.float32)
                r = r.to(tl.float32)
            s = tl.dot(a, r, s, input_precision=DOT_PRECISION)
        # cosine similarity: scale the raw dot products instead of normalizing copies of the features
        inv_r = tl.load(INV_R + b * M + offs_n, mask=n_ok, other=0.0)
        s = s * inv_t[:, None] * inv_r[None, :]
        s = tl.where(m_ok[:, None] & n_ok[None, :], s, float("-inf"))
        # rows: tl.max breaks ties to the left within the tile; strict '>' keeps the earlier tile's index
        tile_max, tile_arg = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
        upd = tile_max > best
        best_idx = tl.where(upd, tile_arg.to(tl.int32) + start_n, best_idx)
        best = tl.where(upd, tile_max, best)
        # columns: this row tile's candidates (padded rows are -inf, so they never win)
        col_max, col_arg = tl.max(s, 0, return_indices=True, return_indices_tie_break_left=True)
        col_off = (b * P + pid_m) * M + offs_n
        tl.store(COL_SIM + col_off, col_max, mask=n_ok)
        tl.store(COL_ARG + col_off, col_arg.to(tl.int32) + pid_m * BLOCK_M, mask=n_ok)
    row_off = (b * S + pid_s) * N + offs_m
    tl.store(ROW_SIM + row_off, best, mask=m_ok)
    tl.store(ROW_ARG + row_off, best_idx, mask=m_ok)


@triton.jit
def _cycle_mask_fwd_kernel(T2R, R2T, FG, THR, OUT, N, W, BLOCK: tl.constexpr):
    # One program per (tile of target positions, batch item); flows, fg and out are contiguous (B, N).
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    t = tl.load(T2R + b * N + offs, mask=ok, other=0).to(tl.int64)
    # An out-of-range flow is never read through (masked load) and counts as inconsistent.
    t_ok = ok & (t >= 0) & (t < N)
    y = tl.load(R2T + b * N + t, mask=t_ok, other=0).to(tl.int64)
    dy = y // W - offs // W
    dx = y % W - offs % W
    # Integer squared distance is exact; sqrt_rn (correctly rounded, unlike tl.sqrt's approximation on GPU)
    # then gives the reference's float bit for bit, so `err < thr` decides the same way in both.
    err = tl.sqrt_rn((dy * dy + dx * dx).to(tl.float32))
    thr = tl.load(THR + b)
    fg = tl.load(FG + b * N + offs, mask=ok, other=0.0)
    out = tl.where(t_ok & (err < thr), fg, 0.0)
    tl.store(OUT + b * N + offs, out.to(OUT.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------- launchers
def _check_features(f_tgt, f_ref) -> None:
    for n, f in (("f_tgt", f_tgt), ("f_ref", f_ref)):
        check(isinstance(f, torch.Tensor) and f.ndim == 3, f"{n}: expected a (B, L, D) tensor, got "
              f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        check(f.dtype in _FLOATS, f"{n}: dtype {f.dtype} not supported (fp16, bf16, fp32)")
        check(f.shape[1] >= 1 and f.shape[2] >= 1, f"{n}: positions and channels must be >= 1, got {tuple(f.shape)}")
    check(f_tgt.shape[0] == f_ref.shape[0], f"batch: f_tgt has B={f_tgt.shape[0]}, f_ref has B={f_ref.shape[0]}")
    check(f_tgt.shape[2] == f_ref.shape[2], f"dim: f_tgt has D={f_tgt.shape[2]}, f_ref has D={f_ref.shape[2]}")
    check(f_tgt.dtype == f_ref.dtype, f"dtype: f_tgt is {f_tgt.dtype}, f_ref is {f_ref.dtype}")
    check(f_tgt.device == f_ref.device, f"device: f_tgt on {f_tgt.device}, f_ref on {f_ref.device}")


def _inv_norm(f: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # 1/‖f‖ per row (an O(L·D) pass, upcast inside the reduction); zero rows get 0: similarity 0, not NaN.
    n = torch.linalg.vector_norm(f, dim=-1, dtype=dtype)
    return torch.where(n > 0, 1.0 / n, torch.zeros_like(n))


def _dot_precision(f: torch.Tensor) -> str:
    # fp32 inputs: 3xTF32 (split-precision on tensor cores) keeps similarities within ~1e-6 of fp32, which
    # argmax needs -- plain TF32 (~1e-3) reorders near neighbours. Pre-Ampere GPUs have no TF32: FMA path.
    # fp16/bf16 get tl.dot's default, which only concerns fp32 operands (16-bit MMA, fp32 accumulation).
    if f.dtype != torch.float32:
        return "tf32"
    if f.is_cuda and torch.cuda.get_device_capability(f.device)[0] < 8:
        return "ieee"
    return "tf32x3"


def _col_chunk(B: int, N: int, M: int, num_sms: int | None) -> int:
    """Reference columns per program. Enough splits to give ~4 programs per SM (wave-quantization tails
    shrink with more, smaller programs), but at least 4 column tiles each so the per-program setup and the
    row-partial write stay amortized. ``num_sms=None`` (the interpreter): 8 programs, so the tests exercise
    the splits. Untuned on hardware so far: the factors are first guesses."""
    target = 4 * num_sms if num_sms else 8
    min_chunk = 4 * _COL_ALIGN if num_sms else _COL_ALIGN
    splits = triton.cdiv(target, B * triton.cdiv(N, _MAX_BLOCK_M))
    chunk = max(triton.cdiv(M, splits), min_chunk)
    return triton.cdiv(chunk, _COL_ALIGN) * _COL_ALIGN


def _launch_match(f_tgt: torch.Tensor, f_ref: torch.Tensor, chunk: int | None = None):
    """Run the kernel; inputs are validated. ``chunk`` (columns per split, a multiple of ``_COL_ALIGN``)
    overrides the occupancy heuristic (tests use it to force one split or many).

    Memory besides the outputs: the two inverse-norm vectors and the partial buffers,
    ``B·(P·M + S·N)·8`` bytes (fp32 max + int32 argmax) with ``P = ceil(N/64)`` row tiles (capacity for the
    smallest autotuned BLOCK_M) and ``S`` column splits -- about 1/32 of the fp32 cost volume's ``4·B·N·M``
    (N=M=9216, B=2: 21 MiB vs 648 MiB; ``python -m bench.match_argmax`` prints the figures).
    """
    B, N, D = f_tgt.shape
    M = f_ref.shape[1]
    dev = f_tgt.device
    f_tgt = f_tgt if f_tgt.stride(-1) == 1 else f_tgt.contiguous()  # unit stride on D for the tile loads
    f_ref = f_ref if f_ref.stride(-1) == 1 else f_ref.contiguous()
    inv_t, inv_r = _inv_norm(f_tgt).contiguous(), _inv_norm(f_ref).contiguous()
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else None
    chunk = chunk or _col_chunk(B, N, M, num_sms)
    check(chunk % _COL_ALIGN == 0, f"chunk: {chunk} is not a multiple of {_COL_ALIGN}")
    S = triton.cdiv(M, chunk)
    P = triton.cdiv(N, _MIN_BLOCK_M)  # capacity for any config; the tuned BLOCK_M may use fewer rows
    row_sim = torch.empty(B, S, N, dtype=torch.float32, device=dev)
    row_arg = torch.empty(B, S, N, dtype=torch.int32, device=dev)
    col_sim = torch.empty(B, P, M, dtype=torch.float32, device=dev)
    col_arg = torch.empty(B, P, M, dtype=torch.int32, device=dev)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), S, B)
    guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with guard:
        _match_argmax_fwd_kernel[grid](
            f_tgt, f_ref, inv_t, inv_r, row_sim, row_arg, col_sim, col_arg,
            f_tgt.stride(0), f_tgt.stride(1), f_ref.stride(0), f_ref.stride(1),
            N, M, D, chunk, S, P,
            # the interpreter keeps bf16 as raw uint16 and its tl.dot multiplies the bit patterns
            # (triton-lang/triton#11584): upcast the tiles, exact, so the products are the GPU's
            UPCAST=f_tgt.dtype == torch.bfloat16 and not f_tgt.is_cuda,
            DOT_PRECISION=_dot_precision(f_tgt),
        )
    # Rows written by the config that ran last (the tuned one); rows past them may hold autotuning leftovers.
    p_used = triton.cdiv(N, _match_argmax_fwd_kernel.best_config.kwargs["BLOCK_M"])
    col_sim, col_arg = col_sim[:, :p_used], col_arg[:, :p_used]
    # Finish both directions; max() returns the first maximal entry, i.e. the lowest split / row tile.
    t2r_sim, s_idx = row_sim.max(dim=1)
    t2r = row_arg.gather(1, s_idx[:, None]).squeeze(1).long()
    r2t_sim, p_idx = col_sim.max(dim=1)
    r2t = col_arg.gather(1, p_idx[:, None]).squeeze(1).long()
    return t2r, r2t, t2r_sim, r2t_sim


def _launch_cycle(t2r, r2t, fg, height: int, width: int, lambda_c: float) -> torch.Tensor:
    B, N = t2r.shape
    # fg_ratio: a torch reduction (one read of fg) before the kernel; the same expression as the reference,
    # so the thresholds are bit-identical.
    thr = (lambda_c * height * fg.float().sum(1) / N).contiguous()
    t2r, r2t, fg = t2r.contiguous(), r2t.contiguous(), fg.contiguous()
    out = torch.empty_like(fg)
    block = 64 if interpreting() else 1024  # elementwise gather: one wide tile per program on a GPU
    guard = torch.cuda.device(fg.device) if fg.is_cuda else contextlib.nullcontext()
    with guard:
        torch.library.wrap_triton(_cycle_mask_fwd_kernel)[(triton.cdiv(N, block), B)](
            t2r, r2t, fg, thr, out, N, width, BLOCK=block)
    return out


# --------------------------------------------------------------------------------------------- torch ops
# match_argmax stays a `custom_op` (opaque to torch.compile and AOTInductor: a package holding it needs dreamfuse's
# Python at run time): its result reads the autotuned BLOCK_M after the launch (`best_config`, how many row-tile
# partials are real), which a traced launch does not know. It runs between UNet calls, in no exported graph.
@torch.library.custom_op("dreamfuse::match_argmax", mutates_args=())
def _match_argmax_op(f_tgt: torch.Tensor, f_ref: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if f_tgt.shape[0] == 0:
        return _match_argmax_fake(f_tgt, f_ref)
    if use_triton(f_tgt):
        return _launch_match(f_tgt, f_ref)
    return match_argmax_reference(f_tgt, f_ref)


@_match_argmax_op.register_fake
def _match_argmax_fake(f_tgt, f_ref):
    B, N, _ = f_tgt.shape
    M = f_ref.shape[1]
    i64, f32 = torch.int64, torch.float32
    return (f_tgt.new_empty(B, N, dtype=i64), f_tgt.new_empty(B, M, dtype=i64), f_tgt.new_empty(B, N, dtype=f32),
            f_tgt.new_empty(B, M, dtype=f32))


# cycle_mask is a `triton_op` (see kernels/attention.py): compile/AOTInductor trace the Triton kernel on CUDA, the
# reference elsewhere; eager CPU calls take the CPU kernel (the interpreter under TRITON_INTERPRET=1).
@torch.library.triton_op("dreamfuse::cycle_mask", mutates_args=())
def _cycle_mask_op(t2r: torch.Tensor, r2t: torch.Tensor, fg: torch.Tensor, height: int, width: int,
                   lambda_c: float) -> torch.Tensor:
    return _cycle_impl(t2r, r2t, fg, height, width, lambda_c, fg.is_cuda)


@_cycle_mask_op.register_kernel("cpu")
def _(t2r, r2t, fg, height, width, lambda_c):
    return _cycle_impl(t2r, r2t, fg, height, width, lambda_c, True)


def _cycle_impl(t2r, r2t, fg, height: int, width: int, lambda_c: float, kernel: bool) -> torch.Tensor:
    if kernel and use_triton(fg) and fg.numel() > 0:
        return _launch_cycle(t2r, r2t, fg, height, width, lambda_c)
    return cycle_mask_reference(t2r, r2t, fg, height=height, width=width, lambda_c=lambda_c)


@_cycle_mask_op.register_fake
def _(t2r, r2t, fg, height, width, lambda_c):
    return fg.new_empty(fg.shape)


# --------------------------------------------------------------------------------------------- public API
def match_argmax(f_tgt: torch.Tensor, f_ref: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bidirectional nearest neighbours by cosine similarity, streamed (no N×M cost volume).

    Args:
        f_tgt: ``(B, N, D)`` target features.
        f_ref: ``(B, M, D)`` reference features, same dtype (fp16, bf16 or fp32) and device. Neither needs to be
            normalized; rows of zeros have similarity 0 to everything.

    Returns:
        ``(t2r, r2t, t2r_sim, r2t_sim)``: ``t2r (B, N)`` int64, for each target position the index of the most
        similar reference position; ``r2t (B, M)`` int64 the other way; ``t2r_sim (B, N)`` and ``r2t_sim
        (B, M)`` float32, the maximal cosine similarities. Ties go to the lowest index, like ``torch.argmax``.
        Scores accumulate in fp32; similarities agree with a materialized fp32 matrix to ~1e-6.
    """
    _check_features(f_tgt, f_ref)
    return _match_argmax_op(f_tgt, f_ref)


def cycle_mask(t2r: torch.Tensor, r2t: torch.Tensor, fg: torch.Tensor, *, height: int, width: int,
               lambda_c: float) -> torch.Tensor:
    """DreamMatcher's semantic-consistent mask ``m' = M ⊙ U`` (cycle-consistency confidence × foreground).

    Positions are row-major on a ``height × width`` grid, ``coord(i) = (i // width, i % width)``. For target
    position x, ``err(x) = ‖coord(r2t[t2r[x]]) − coord(x)‖₂`` in pixels and ``U(x) = err(x) < lambda_c ·
    height · fg_ratio`` with ``fg_ratio = fg.sum() / N`` per batch item.

    Args:
        t2r: ``(B, N)`` int32/int64 target→reference flow, ``N = height·width``, values in ``[0, N)``.
        r2t: ``(B, N)`` int32/int64 reference→target flow on the same grid.
        fg: ``(B, N)`` float foreground mask (soft values are fine).
        lambda_c: the cycle-consistency factor λc > 0 (0.4 in DreamMatcher).

    Returns:
        ``fg · U``, ``(B, N)``, in fg's dtype.
    """
    for n, t in (("t2r", t2r), ("r2t", r2t)):
        check(isinstance(t, torch.Tensor) and t.ndim == 2, f"{n}: expected a (B, N) tensor, got "
              f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        check(t.dtype in (torch.int32, torch.int64), f"{n}: must be an integer flow (int32/int64), got {t.dtype}")
    check(isinstance(fg, torch.Tensor) and fg.ndim == 2 and fg.is_floating_point(),
          f"fg: expected a float (B, N) mask, got {getattr(fg, 'dtype', type(fg).__name__)} "
          f"{tuple(getattr(fg, 'shape', ()))}")
    check(int(height) >= 1 and int(width) >= 1, f"height/width: must be >= 1, got {height}x{width}")
    n = int(height) * int(width)
    check(t2r.shape[1] == n, f"height*width: {height}*{width} = {n} but t2r has N = {t2r.shape[1]}")
    check(r2t.shape[1] == n, f"r2t: M = {r2t.shape[1]} must equal N = height*width = {n} (one grid)")
    check(r2t.shape[0] == t2r.shape[0], f"batch: t2r has B={t2r.shape[0]}, r2t has B={r2t.shape[0]}")
    check(fg.shape == t2r.shape, f"fg: shape {tuple(fg.shape)} must equal t2r's {tuple(t2r.shape)}")
    check(t2r.device == fg.device and r2t.device == fg.device, "device: t2r, r2t and fg must share a device")
    check(lambda_c > 0, f"lambda_c: must be > 0, got {lambda_c}")
    return _cycle_mask_op(t2r, r2t, fg, int(height), int(width), float(lambda_c))


# --------------------------------------------------------------------------------------------- references
def match_argmax_reference(f_tgt: torch.Tensor, f_ref: torch.Tensor, *, chunk_elems: int = 1 << 24
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch :func:`match_argmax`: normalized features, cosine matrix by ``matmul``, max both ways.

    Computed in fp32 (fp64 for fp64 inputs, the tests' oracle). The matrix is built in row blocks of at most
    ``chunk_elems`` scores (64 MiB fp32) so the CPU path stays bounded at 768² (N=M=9216); the column direction
    carries a running max across blocks, strict '>' keeping the lower row on ties like ``torch.argmax``.
    """
    acc = torch.promote_types(f_tgt.dtype, torch.float32)
    ft = f_tgt.to(acc) * _inv_norm(f_tgt, acc)[..., None]
    fr = f_ref.to(acc) * _inv_norm(f_ref, acc)[..., None]
    B, N, _ = ft.shape
    M = fr.shape[1]
    rows = max(1, chunk_elems // max(1, B * M))
    t2r_sim, t2r = [], []
    r2t_sim = torch.full((B, M), float("-inf"), dtype=acc, device=ft.device)
    r2t = torch.zeros((B, M), dtype=torch.int64, device=ft.device)
    for i in range(0, N, rows):
        sim = ft[:, i:i + rows] @ fr.transpose(1, 2)
        v, a = sim.max(dim=2)
        t2r_sim.append(v)
        t2r.append(a)
        cv, ca = sim.max(dim=1)
        upd = cv > r2t_sim
        r2t_sim = torch.where(upd, cv, r2t_sim)
        r2t = torch.where(upd, ca + i, r2t)
    return torch.cat(t2r, 1), r2t, torch.cat(t2r_sim, 1), r2t_sim


def cycle_mask_reference(t2r: torch.Tensor, r2t: torch.Tensor, fg: torch.Tensor, *, height: int, width: int,
                         lambda_c: float) -> torch.Tensor:
    """Plain PyTorch :func:`cycle_mask` (``fg · U``)."""
    n = t2r.shape[1]
    y = torch.gather(r2t.long(), 1, t2r.long())
    x = torch.arange(n, device=t2r.device)
    dy, dx = y // width - x // width, y % width - x % width
    err = torch.sqrt((dy * dy + dx * dx).float())  # exact integer square, correctly rounded sqrt
    thr = lambda_c * height * fg.float().sum(1) / n
    return torch.where(err < thr[:, None], fg, torch.zeros_like(fg))
