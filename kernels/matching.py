"""Semantic matching for DreamMatcher: streamed bidirectional cosine argmax, and the cycle-consistency mask.

* ``match_argmax(f_tgt, f_ref)``: for every target position the most similar reference position and back,
  from one pass over tiles of the similarity matrix; the N×M cost volume is never materialized.
* ``cycle_mask(t2r, r2t, fg, ...)``: ``m = fg · [‖coord(r2t[t2r[x]]) − coord(x)‖₂ < λc·H·fg_ratio]``.
  DreamMatcher warps with ``grid_sample(align_corners=True)`` at integer displacements, which is exactly
  the index gather these flows feed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, interpreting, pin_configs, use_triton


def _configs():
    cfgs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (64, 128)
        for bk in (32, 64)
        for w in (4, 8)
        for s in (2, 3)
    ]
    # 128x128 fp32 score tiles need 8 warps to stay out of spills; small tiles waste 8 warps.
    keep = lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 128) == (c.num_warps == 8)
    cfgs = [c for c in cfgs if keep(c)]
    if pin_configs():
        small = 16 if interpreting() else 64
        return [triton.Config({"BLOCK_M": small, "BLOCK_N": small, "BLOCK_K": 32}, num_warps=4, num_stages=2)]
    return cfgs


@triton.autotune(configs=_configs(), key=["N", "M", "D"], reset_to_zero=[])
@triton.jit
def _match_argmax_fwd_kernel(
    FT, FR, INV_T, INV_R, T2R, T2R_SIM, COL_SIM, COL_ARG,
    stb, stn, srb, srm, sib, srib, scb, scp,
    N, M, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: BLOCK_M target rows x all reference columns, streamed in BLOCK_N tiles.
    # Rows: running max/argmax in registers. Columns: the tile's column max/argmax goes to a partial buffer
    # (B, ceil(N/BLOCK_M), M) -- BLOCK_M times smaller than the cost volume -- reduced by torch afterwards.
    # (An atomic max on packed (sim, index) keys would avoid the buffer but makes the lowest-index tie rule
    # depend on float-to-int packing; the buffer keeps the rule exact and is 1/64 of the volume.)
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    inv_t = tl.load(INV_T + b * sib + offs_m, mask=m_ok, other=0.0)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int64)
    offs_k0 = tl.arange(0, BLOCK_K)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < M
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + offs_k0
            k_ok = offs_k < D
            a = tl.load(FT + b * stb + offs_m[:, None] * stn + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0).to(DOT_DTYPE)
            r = tl.load(FR + b * srb + offs_n[None, :] * srm + offs_k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                        other=0.0).to(DOT_DTYPE)
            if IEEE:
                s += tl.dot(a, r, input_precision="ieee")
            else:
                s += tl.dot(a, r)
        inv_r = tl.load(INV_R + b * srib + offs_n, mask=n_ok, other=0.0)
        s = s * inv_t[:, None] * inv_r[None, :]  # cosine similarity
        valid = m_ok[:, None] & n_ok[None, :]
        s = tl.where(valid, s, float("-inf"))
        # rows: strict '>' keeps the earlier (lower) index on ties across tiles; tl.argmax breaks ties left
        tile_max = tl.max(s, 1)
        tile_arg = tl.argmax(s, 1).to(tl.int64) + start_n
        upd = tile_max > best
        best_idx = tl.where(upd, tile_arg, best_idx)
        best = tl.where(upd, tile_max, best)
        # columns: this row tile's candidates
        col_max = tl.max(s, 0)
        col_arg = tl.argmax(s, 0).to(tl.int64) + pid_m * BLOCK_M
        tl.store(COL_SIM + b * scb + pid_m * scp + offs_n, col_max, mask=n_ok)
        tl.store(COL_ARG + b * scb + pid_m * scp + offs_n, col_arg, mask=n_ok)
    tl.store(T2R + b * N + offs_m, best_idx, mask=m_ok)
    tl.store(T2R_SIM + b * N + offs_m, best, mask=m_ok)


@triton.jit
def _cycle_mask_fwd_kernel(T2R, R2T, FG, THR, OUT, N, M, W, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    t = tl.load(T2R + b * N + offs, mask=ok, other=0).to(tl.int64)
    y = tl.load(R2T + b * M + t, mask=ok, other=0).to(tl.int64)
    dy = (y // W - offs // W).to(tl.float32)
    dx = (y % W - offs % W).to(tl.float32)
    err = tl.sqrt(dx * dx + dy * dy)
    thr = tl.load(THR + b)
    fg = tl.load(FG + b * N + offs, mask=ok, other=0.0)
    out = tl.where(err < thr, fg, 0.0)
    tl.store(OUT + b * N + offs, out.to(OUT.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------- launchers
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _check_features(f_tgt, f_ref):
    for n, f in (("f_tgt", f_tgt), ("f_ref", f_ref)):
        check(isinstance(f, torch.Tensor) and f.ndim == 3, f"{n}: expected (B, L, D), got "
              f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        check(f.dtype in _FLOATS, f"{n}: dtype {f.dtype} not supported (fp16, bf16, fp32)")
    check(f_tgt.shape[0] == f_ref.shape[0], f"batch: f_tgt has B={f_tgt.shape[0]}, f_ref B={f_ref.shape[0]}")
    check(f_tgt.shape[2] == f_ref.shape[2], f"dim: f_tgt has D={f_tgt.shape[2]}, f_ref D={f_ref.shape[2]}")
    check(f_tgt.dtype == f_ref.dtype, f"dtype: f_tgt is {f_tgt.dtype}, f_ref is {f_ref.dtype}")
    check(f_tgt.device == f_ref.device, f"device: f_tgt on {f_tgt.device}, f_ref on {f_ref.device}")
    check(f_tgt.shape[1] >= 1 and f_ref.shape[1] >= 1, "positions: N and M must be >= 1")


def _inv_norm(f):
    # 1/‖f‖ per row in fp32 (an O(L·D) pass); zero rows get 0: similarity 0, not NaN.
    n = f.float().norm(dim=-1)
    return torch.where(n > 0, 1.0 / n, torch.zeros_like(n))


def _launch_match(f_tgt, f_ref):
    f_tgt = f_tgt if f_tgt.stride(-1) == 1 else f_tgt.contiguous()
    f_ref = f_ref if f_ref.stride(-1) == 1 else f_ref.contiguous()
    B, N, D = f_tgt.shape
    M = f_ref.shape[1]
    inv_t, inv_r = _inv_norm(f_tgt), _inv_norm(f_ref)
    dev = f_tgt.device
    t2r = torch.empty(B, N, dtype=torch.int64, device=dev)
    t2r_sim = torch.empty(B, N, dtype=torch.float32, device=dev)
    # the partial buffer is sized for the smallest BLOCK_M any config uses (16 interpreted, 64 compiled)
    min_bm = 16 if interpreting() else 64
    parts = triton.cdiv(N, min_bm)
    col_sim = torch.full((B, parts, M), float("-inf"), dtype=torch.float32, device=dev)
    col_arg = torch.zeros((B, parts, M), dtype=torch.int64, device=dev)
    dot_dtype = tl.float32 if (f_tgt.dtype == torch.bfloat16 and interpreting()) else _TL[f_tgt.dtype]
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B)
    _match_argmax_fwd_kernel[grid](
        f_tgt, f_ref, inv_t, inv_r, t2r, t2r_sim, col_sim, col_arg,
        f_tgt.stride(0), f_tgt.stride(1), f_ref.stride(0), f_ref.stride(1), inv_t.stride(0), inv_r.stride(0),
        col_sim.stride(0), col_sim.stride(1),
        N, M, D, DOT_DTYPE=dot_dtype, IEEE=f_tgt.dtype == torch.float32,
    )
    # finish the column direction: first maximal row tile wins, i.e. the lowest row index on ties
    r2t_sim, part = col_sim.max(dim=1)
    r2t = torch.gather(col_arg, 1, part[:, None]).squeeze(1)
    return t2r, r2t, t2r_sim, r2t_sim


# ----------------------------------------------------------------------------------------------- torch ops
@torch.library.custom_op("dreamfuse::match_argmax", mutates_args=())
def _match_argmax_op(f_tgt: torch.Tensor, f_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]:
    if use_triton(f_tgt):
        return _launch_match(f_tgt, f_ref)
    return match_argmax_reference(f_tgt, f_ref)


@_match_argmax_op.register_fake
def _(f_tgt, f_ref):
    B, N, _ = f_tgt.shape
    M = f_ref.shape[1]
    i64, f32 = torch.int64, torch.float32
    return (f_tgt.new_empty(B, N, dtype=i64), f_tgt.new_empty(B, M, dtype=i64), f_tgt.new_empty(B, N, dtype=f32),
            f_tgt.new_empty(B, M, dtype=f32))


@torch.library.custom_op("dreamfuse::cycle_mask", mutates_args=())
def _cycle_mask_op(t2r: torch.Tensor, r2t: torch.Tensor, fg: torch.Tensor, height: int, width: int,
                   lambda_c: float) -> torch.Tensor:
    if use_triton(fg):
        B, N = t2r.shape
        thr = (lambda_c * height * fg.float().sum(1) / N).contiguous()  # per-batch threshold: a torch reduction
        t2r, r2t, fgc = t2r.contiguous(), r2t.contiguous(), fg.contiguous()
        out = torch.empty_like(fgc)
        block = 64 if interpreting() else 1024
        _cycle_mask_fwd_kernel[(triton.cdiv(N, block), B)](t2r, r2t, fgc, thr, out, N, r2t.shape[1], width,
                                                           BLOCK=block)
        return out
    return cycle_mask_reference(t2r, r2t, fg, height=height, width=width, lambda_c=lambda_c)


@_cycle_mask_op.register_fake
def _(t2r, r2t, fg, height, width, lambda_c):
    return torch.empty_like(fg)


# ----------------------------------------------------------------------------------------------- public API
def match_argmax(f_tgt: torch.Tensor, f_ref: torch.Tensor):
    """Bidirectional nearest neighbours by cosine similarity, streamed (no N×M cost volume).

    Args:
        f_tgt: ``(B, N, D)`` target features; f_ref: ``(B, M, D)`` reference features; one float dtype
            (fp16/bf16/fp32), not necessarily normalized.

    Returns:
        ``(t2r, r2t, t2r_sim, r2t_sim)``: ``t2r (B, N)`` int64, for each target position the index of the most
        similar reference position; ``r2t (B, M)`` the other way; ``*_sim`` float32, the maximal cosine
        similarities. Ties go to the lowest index, as ``torch.argmax``.
    """
    _check_features(f_tgt, f_ref)
    return _match_argmax_op(f_tgt, f_ref)


def cycle_mask(t2r: torch.Tensor, r2t: torch.Tensor, fg: torch.Tensor, *, height: int, width: int,
               lambda_c: float) -> torch.Tensor:
    """DreamMatcher's semantic-consistent mask ``m' = M ⊙ U``.

    Positions are row-major on a ``height × width`` grid. For target position x, ``err(x) =
    ‖coord(r2t[t2r[x]]) − coord(x)‖₂`` in pixels; ``U(x) = err(x) < lambda_c · height · fg_ratio`` with
    ``fg_ratio = fg.sum() / N`` per batch item.

    Args:
        t2r: ``(B, N)`` int; r2t: ``(B, M)`` int with M = N (one grid); fg: ``(B, N)`` float foreground (soft ok).

    Returns ``fg · U`` ``(B, N)`` in fg's dtype.
    """
    for n, t in (("t2r", t2r), ("r2t", r2t)):
        check(isinstance(t, torch.Tensor) and t.ndim == 2, f"{n}: expected (B, N), got "
              f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        check(t.dtype in (torch.int32, torch.int64), f"{n}: must be an integer flow, got {t.dtype}")
    check(isinstance(fg, torch.Tensor) and fg.ndim == 2 and fg.is_floating_point(),
          f"fg: expected a float (B, N) mask, got {getattr(fg, 'dtype', type(fg).__name__)} "
          f"{tuple(getattr(fg, 'shape', ()))}")
    check(int(height) >= 1 and int(width) >= 1, f"height/width: must be >= 1, got {height}x{width}")
    n = int(height) * int(width)
    check(t2r.shape[1] == n, f"t2r: N = {t2r.shape[1]} but height*width = {n}")
    check(r2t.shape[1] == n, f"r2t: M = {r2t.shape[1]} must equal height*width = {n} (one grid)")
    check(fg.shape == t2r.shape, f"fg: shape {tuple(fg.shape)} must equal t2r's {tuple(t2r.shape)}")
    check(r2t.shape[0] == t2r.shape[0], f"batch: t2r has B={t2r.shape[0]}, r2t B={r2t.shape[0]}")
    check(t2r.device == fg.device and r2t.device == fg.device, "device: t2r, r2t and fg must share a device")
    check(lambda_c > 0, f"lambda_c: must be > 0, got {lambda_c}")
    return _cycle_mask_op(t2r, r2t, fg, int(height), int(width), float(lambda_c))


# ----------------------------------------------------------------------------------------------- references
def match_argmax_reference(f_tgt: torch.Tensor, f_ref: torch.Tensor):
    """Materialized cosine matrix + argmax both ways (fp32; fp64 for fp64 inputs)."""
    acc = torch.promote_types(f_tgt.dtype, torch.float32)
    ft = f_tgt.to(acc) * _inv_norm(f_tgt).to(acc)[..., None]
    fr = f_ref.to(acc) * _inv_norm(f_ref).to(acc)[..., None]
    sim = ft @ fr.transpose(1, 2)
    t2r_sim, t2r = sim.max(dim=2)
    r2t_sim, r2t = sim.max(dim=1)
    return t2r, r2t, t2r_sim, r2t_sim  # float32 (float64 for a float64 oracle)


def cycle_mask_reference(t2r, r2t, fg, *, height: int, width: int, lambda_c: float):
    """Plain PyTorch ``fg · U`` (see :func:`cycle_mask`)."""
    n = t2r.shape[1]
    y = torch.gather(r2t.long(), 1, t2r.long())
    x = torch.arange(n, device=t2r.device).expand_as(y)
    err = torch.hypot((y // width - x // width).float(), (y % width - x % width).float())
    thr = lambda_c * height * fg.float().sum(1, keepdim=True) / n
    return torch.where(err < thr, fg, torch.zeros_like(fg))
