"""match_argmax and cycle_mask vs fp64 / plain-PyTorch oracles (Triton interpreter on CPU; `-m gpu` on CUDA)."""

import pytest
import torch
import torch.nn.functional as F
from dreamfuse.kernels import matching
from dreamfuse.kernels.matching import cycle_mask, cycle_mask_reference, match_argmax, match_argmax_reference

GAP = 1e-5  # the kernel's similarities may differ from the fp64 matrix by ~1e-6: near-ties below GAP may flip


def _feats(B, N, M, D, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ft = (torch.randn(B, N, D, generator=g) * 3 + 0.5).to(device=device, dtype=dtype)  # not normalized on purpose
    fr = torch.randn(B, M, D, generator=g).to(device=device, dtype=dtype)
    return ft, fr


def _cosine64(ft, fr):
    """The oracle: the materialized cosine matrix in fp64, from the very values the op saw."""
    return F.normalize(ft.double(), dim=-1) @ F.normalize(fr.double(), dim=-1).transpose(1, 2)


def _top2_gap(sim, dim):
    top = sim.topk(2, dim=dim).values if sim.shape[dim] > 1 else torch.cat([sim, sim - 1], dim)
    return top.select(dim, 0) - top.select(dim, 1)


def _check_against_oracle(out, ft, fr, sim_atol=1e-5):
    t2r, r2t, t2r_sim, r2t_sim = out
    B, N, M = ft.shape[0], ft.shape[1], fr.shape[1]
    assert t2r.dtype == r2t.dtype == torch.int64 and t2r_sim.dtype == r2t_sim.dtype == torch.float32
    assert t2r.shape == t2r_sim.shape == (B, N) and r2t.shape == r2t_sim.shape == (B, M)
    sim = _cosine64(ft, fr)
    best_t, arg_t = sim.max(2)
    best_r, arg_r = sim.max(1)
    torch.testing.assert_close(t2r_sim.double(), best_t, atol=sim_atol, rtol=0)
    torch.testing.assert_close(r2t_sim.double(), best_r, atol=sim_atol, rtol=0)
    # the chosen index achieves the maximum (robust to near-ties under rounding) ...
    assert (sim.gather(2, t2r[..., None]).squeeze(2) >= best_t - GAP).all()
    assert (sim.gather(1, r2t[:, None]).squeeze(1) >= best_r - GAP).all()
    # ... and wherever the runner-up is further than GAP away, it is exactly the argmax
    clear_t, clear_r = _top2_gap(sim, 2) > GAP, _top2_gap(sim, 1) > GAP
    assert clear_t.float().mean() > 0.9 and clear_r.float().mean() > 0.9  # the data has few near-ties
    assert torch.equal(t2r[clear_t], arg_t[clear_t]) and torch.equal(r2t[clear_r], arg_r[clear_r])


SHAPES = [(2, 37, 50, 257), (1, 100, 67, 64), (1, 16, 16, 32), (1, 1, 5, 7)]
_ids = lambda s: "x".join(map(str, s))


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_match_argmax_agrees_with_materialized_argmax(shape, dtype):
    ft, fr = _feats(*shape, dtype)
    _check_against_oracle(match_argmax(ft, fr), ft, fr)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=_ids)
def test_reference_agrees_with_materialized_argmax(shape):
    ft, fr = _feats(*shape, torch.float32)
    _check_against_oracle(match_argmax_reference(ft, fr), ft, fr)
    # row-blocked (the CPU path's bounded memory) gives the same answer as one block
    full = match_argmax_reference(ft, fr)
    for a, b in zip(match_argmax_reference(ft, fr, chunk_elems=7 * shape[2]), full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [16, 32, 1 << 20], ids=["splits16", "splits32", "one-split"])
def test_column_splits_give_the_same_answer(chunk):
    # the column-split axis (occupancy) must not change anything: force one split or many
    ft, fr = _feats(2, 37, 70, 40, torch.float32, seed=3)
    out = matching._launch_match(ft, fr, chunk=chunk)
    _check_against_oracle(out, ft, fr)
    for a, b in zip(out, matching._launch_match(ft, fr, chunk=1 << 20)):
        assert torch.equal(a, b)


def _tie_case():
    """Integer features (exact dot products and norms): target rows 3, 7, 20, 37 are identical, two in one 16-row
    tile and the others in two more tiles; reference columns 5, 9, 21, 45 equal that row up to a power-of-two
    scale (the same cosine, exactly), likewise spread within and across 16-column tiles."""
    g = torch.Generator().manual_seed(1)
    ft = torch.randint(-4, 5, (1, 40, 24), generator=g).float()
    fr = torch.randint(-4, 5, (1, 50, 24), generator=g).float()
    v = torch.arange(24, dtype=torch.float32) % 5 + 1  # all positive: far from every random row
    ft[0, [3, 7, 20, 37]] = v
    fr[0, 5], fr[0, 9], fr[0, 21], fr[0, 45] = 2 * v, v, 0.5 * v, 4 * v
    return ft, fr


@pytest.mark.parametrize("chunk", [16, None], ids=["splits", "default"])
def test_exact_ties_pick_lowest_index(chunk, device="cpu"):
    ft, fr = _tie_case()
    ft, fr = ft.to(device), fr.to(device)
    t2r, r2t, t2r_sim, r2t_sim = matching._launch_match(ft, fr, chunk=chunk)
    assert t2r[0, 3] == t2r[0, 7] == t2r[0, 20] == t2r[0, 37] == 5
    assert r2t[0, 5] == r2t[0, 9] == r2t[0, 21] == r2t[0, 45] == 3
    assert t2r_sim[0, 3] == r2t_sim[0, 45] == pytest.approx(1.0, abs=1e-6)
    sim = _cosine64(ft, fr)  # torch.argmax agrees (exact duplicates tie exactly in fp64 too)
    assert torch.equal(t2r, sim.argmax(2)) and torch.equal(r2t, sim.argmax(1))
    ref = match_argmax_reference(ft, fr, chunk_elems=16 * 50)  # row blocks of 16: ties across blocks
    assert torch.equal(ref[0], t2r) and torch.equal(ref[1], r2t)


def test_zero_feature_rows_do_not_produce_nan():
    ft, fr = _feats(1, 20, 20, 16, torch.float32)
    ft[0, 3] = 0
    fr[0, 7] = 0
    t2r, r2t, t2r_sim, r2t_sim = match_argmax(ft, fr)
    assert torch.isfinite(t2r_sim).all() and torch.isfinite(r2t_sim).all()
    assert t2r_sim[0, 3] == 0 and t2r[0, 3] == 0  # all similarities 0: the lowest index
    ref = match_argmax_reference(ft, fr)
    assert torch.equal(t2r, ref[0]) and torch.equal(r2t, ref[1])


def test_strided_inputs():
    ft, fr = _feats(2, 30, 20, 48, torch.float16)
    wide = torch.zeros(2, 30, 64, dtype=torch.float16)
    wide[..., :48] = ft
    ft_view = wide[..., :48]  # row stride 64, unit stride on D: used in place
    fr_t = fr.transpose(1, 2).contiguous().transpose(1, 2)  # stride 1 along M, not D: copied
    out = match_argmax(ft_view, fr_t)
    for a, b in zip(out, match_argmax(ft, fr)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "args, field",
    [
        ((torch.zeros(2, 3), torch.zeros(2, 3, 4)), "f_tgt"),
        ((torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, 1)), "f_ref"),
        ((torch.zeros(2, 0, 4), torch.zeros(2, 3, 4)), "f_tgt"),
        ((torch.zeros(2, 3, 4), torch.zeros(1, 3, 4)), "batch"),
        ((torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)), "dim"),
        ((torch.zeros(2, 3, 4), torch.zeros(2, 3, 4).half()), "dtype"),
        ((torch.zeros(2, 3, 4, dtype=torch.int32), torch.zeros(2, 3, 4, dtype=torch.int32)), "dtype"),
    ],
)
def test_match_argmax_bad_inputs(args, field):
    with pytest.raises(ValueError, match=field):
        match_argmax(*args)


# ---------------------------------------------------------------------------------------------- cycle mask
def test_identity_flows_keep_the_foreground():
    h, w = 5, 7
    ident = torch.arange(h * w)[None].repeat(2, 1)
    fg = torch.rand(2, h * w)
    fg[1] = 0.01  # a tiny foreground: threshold 0.4·5·0.01 = 0.02 px, still above an error of 0
    m = cycle_mask(ident, ident, fg, height=h, width=w, lambda_c=0.4)
    assert torch.equal(m, fg)


def _swap_flows():
    # 4x4 grid. target 0 -> reference 5 -> target 10: (0,0) -> (2,2), error sqrt(8) = 2.83 px
    #           target 1 -> reference 1 -> target 3:  (0,1) -> (0,3), error 2 px exactly
    t2r = torch.arange(16)[None].clone()
    r2t = torch.arange(16)[None].clone()
    t2r[0, 0] = 5
    r2t[0, 5] = 10
    r2t[0, 1] = 3
    return t2r, r2t


def test_swap_gives_known_errors_and_threshold_decides():
    t2r, r2t = _swap_flows()
    fg = torch.ones(1, 16)  # fg_ratio 1: threshold = lambda_c * height = 4 * lambda_c
    run = lambda lam, fg=fg: cycle_mask(t2r, r2t, fg, height=4, width=4, lambda_c=lam)
    others = torch.ones(16, dtype=torch.bool)
    others[:2] = False
    # threshold 2.4: rejects 2.83, keeps 2; everything else is a perfect cycle
    got = run(0.6)
    assert got[0, 0] == 0 and got[0, 1] == 1 and (got[0, others] == 1).all()
    assert torch.equal(got, cycle_mask_reference(t2r, r2t, fg, height=4, width=4, lambda_c=0.6))
    assert run(0.5)[0, 1] == 0  # threshold exactly 2.0: the comparison is strict
    assert run(0.5 + 1e-6)[0, 1] == 1
    assert run(0.70710)[0, 0] == 0 and run(0.70711)[0, 0] == 1  # sqrt(8)/4 = 0.707107
    # fg_ratio: half the foreground halves the threshold (4 · 0.75 · 0.5 = 1.5 px) -> the 2 px error is rejected
    fg_half = torch.cat([torch.ones(1, 8), torch.zeros(1, 8)], 1)
    got = run(0.75, fg_half)
    assert got[0, 1] == 0 and got[0, 2] == 1 and got[0, 9] == 0  # 9: consistent but background
    assert run(0.75)[0, 1] == 1  # the full foreground keeps it


def test_soft_foreground_and_per_batch_ratio():
    t2r, r2t = _swap_flows()
    t2r, r2t = t2r.repeat(2, 1), r2t.repeat(2, 1)
    fg = torch.stack([torch.full((16,), 0.5), torch.full((16,), 1.0)])  # ratios 0.5 and 1 -> thr 1.6 and 3.2
    got = cycle_mask(t2r, r2t, fg, height=4, width=4, lambda_c=0.8)
    assert got[0, 1] == 0 and got[1, 1] == 1.0 and got[1, 0] == 1.0 and got[0, 5] == 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cycle_mask_random_matches_reference_and_keeps_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    h, w = 9, 11
    # flows that mostly return near their start, so both sides of the threshold are populated
    x = torch.arange(h * w).repeat(3, 1)
    t2r = (x + torch.randint(-2, 3, x.shape, generator=g)).clamp(0, h * w - 1).int()
    r2t = (x + torch.randint(-12, 13, x.shape, generator=g)).clamp(0, h * w - 1)
    fg = torch.rand(3, h * w, generator=g).to(dtype)
    got = cycle_mask(t2r, r2t, fg, height=h, width=w, lambda_c=0.4)
    want = cycle_mask_reference(t2r, r2t, fg, height=h, width=w, lambda_c=0.4)
    assert got.dtype == dtype and got.shape == fg.shape
    assert torch.equal(got, want)
    kept = (got != 0).float().mean()
    assert 0.1 < kept < 0.9


def test_cycle_mask_bad_inputs():
    ident = torch.arange(16)[None]
    fg = torch.ones(1, 16)
    cases = [
        ((ident.float(), ident, fg), {}, "t2r"),
        ((ident, ident.double(), fg), {}, "r2t"),
        ((ident[0], ident, fg), {}, "t2r"),
        ((ident, ident, fg[0]), {}, "fg"),
        ((ident, ident, fg.long()), {}, "fg"),
        ((ident, ident, fg), {"height": 3}, "height"),
        ((ident, torch.arange(20)[None], fg), {}, "r2t"),
        ((ident, ident.repeat(2, 1), fg), {}, "batch"),
        ((ident.repeat(2, 1), ident.repeat(2, 1), fg), {}, "fg"),
        ((ident, ident, fg), {"lambda_c": 0.0}, "lambda_c"),
        ((ident, ident, fg), {"lambda_c": -1.0}, "lambda_c"),
    ]
    for args, override, field in cases:
        kw = {"height": 4, "width": 4, "lambda_c": 0.4, **override}
        with pytest.raises(ValueError, match=field):
            cycle_mask(*args, **kw)


def test_opcheck():
    ft, fr = _feats(1, 9, 7, 16, torch.float32)
    torch.library.opcheck(torch.ops.dreamfuse.match_argmax.default, (ft, fr))
    t2r, r2t = _swap_flows()
    torch.library.opcheck(torch.ops.dreamfuse.cycle_mask.default, (t2r, r2t, torch.rand(1, 16), 4, 4, 0.4))


# ---------------------------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_match_argmax_cuda_real_size(dtype):
    ft, fr = _feats(2, 4096, 4096, 512, dtype, device="cuda")
    _check_against_oracle(match_argmax(ft, fr), ft, fr)


@pytest.mark.gpu
def test_exact_ties_pick_lowest_index_cuda():
    # the interpreter's argmax always breaks ties left; only the GPU checks the in-tile tie flag
    test_exact_ties_pick_lowest_index(chunk=128, device="cuda")
    test_exact_ties_pick_lowest_index(chunk=None, device="cuda")


@pytest.mark.gpu
def test_match_argmax_cuda_768_ragged():
    ft, fr = _feats(1, 9216, 2304 + 7, 256, torch.float16, device="cuda")
    _check_against_oracle(match_argmax(ft, fr), ft, fr)


@pytest.mark.gpu
def test_cycle_mask_cuda_real_size():
    g = torch.Generator().manual_seed(0)
    h = w = 64
    t2r = torch.randint(0, h * w, (2, h * w), generator=g).cuda()
    r2t = torch.randint(0, h * w, (2, h * w), generator=g).cuda()
    fg = torch.rand(2, h * w, generator=g).half().cuda()
    got = cycle_mask(t2r, r2t, fg, height=h, width=w, lambda_c=0.4)
    assert torch.equal(got, cycle_mask_reference(t2r, r2t, fg, height=h, width=w, lambda_c=0.4))
