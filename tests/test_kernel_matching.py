"""match_argmax and cycle_mask vs their references (Triton interpreter on CPU; `-m gpu` on CUDA)."""

import pytest
import torch
from dreamfuse.kernels.matching import cycle_mask, cycle_mask_reference, match_argmax, match_argmax_reference


def _feats(B, N, M, D, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ft = (torch.randn(B, N, D, generator=g) * 3).to(device=device, dtype=dtype)  # not normalized on purpose
    fr = torch.randn(B, M, D, generator=g).to(device=device, dtype=dtype)
    return ft, fr


def _check_against_materialized(ft, fr, exact=True):
    t2r, r2t, t2r_sim, r2t_sim = match_argmax(ft, fr)
    assert t2r.dtype == r2t.dtype == torch.int64 and t2r_sim.dtype == r2t_sim.dtype == torch.float32
    assert t2r.shape == ft.shape[:2] and r2t.shape == fr.shape[:2]
    rt, rr, rts, rrs = match_argmax_reference(ft.double(), fr.double())
    torch.testing.assert_close(t2r_sim.double(), rts, atol=1e-5, rtol=0)
    torch.testing.assert_close(r2t_sim.double(), rrs, atol=1e-5, rtol=0)
    # the chosen index achieves the maximum (robust to near-ties under rounding) ...
    sim = torch.nn.functional.normalize(ft.double(), dim=-1) @ torch.nn.functional.normalize(fr.double(), dim=-1).mT
    assert (sim.gather(2, t2r[..., None]).squeeze(2) >= rts - 1e-5).all()
    assert (sim.gather(1, r2t[:, None]).squeeze(1) >= rrs - 1e-5).all()
    if exact:  # ... and on random features (no near-ties) it is the argmax itself
        assert torch.equal(t2r, rt) and torch.equal(r2t, rr)


@pytest.mark.parametrize("shape", [(2, 37, 50, 257), (1, 100, 67, 64), (1, 16, 16, 32), (1, 1, 5, 7)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_match_argmax_agrees_with_materialized_argmax(shape, dtype):
    _check_against_materialized(*_feats(*shape, dtype))


def test_exact_ties_pick_lowest_index():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 3, 8, generator=g)
    fr = torch.cat([base[:, :1], base[:, :1] * 2, torch.randn(1, 30, 8, generator=g), base[:, :1]], 1)  # 0,1,32 tie
    ft = torch.cat([base, base[:, :1]], 1)  # target rows 0 and 3 tie for every reference column equal to them
    t2r, r2t, _, _ = match_argmax(ft, fr)
    assert t2r[0, 0] == 0 and t2r[0, 3] == 0
    assert r2t[0, 0] == 0 and r2t[0, 1] == 0 and r2t[0, 32] == 0
    rt, rr, _, _ = match_argmax_reference(ft, fr)
    assert torch.equal(t2r, rt) and torch.equal(r2t, rr)


def test_zero_feature_rows_do_not_produce_nan():
    ft, fr = _feats(1, 20, 20, 16, torch.float32)
    ft[0, 3] = 0
    out = match_argmax(ft, fr)
    assert torch.isfinite(out[2]).all() and out[2][0, 3] == 0


@pytest.mark.parametrize(
    "args, field",
    [
        ((torch.zeros(2, 3), torch.zeros(2, 3, 4)), "f_tgt"),
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
    m = cycle_mask(ident, ident, fg, height=h, width=w, lambda_c=0.4)
    assert torch.equal(m, fg)


def test_swap_gives_known_errors_and_threshold_decides():
    h, w = 4, 4
    t2r = torch.arange(16)[None].clone()
    r2t = torch.arange(16)[None].clone()
    # target 0 -> reference 5 -> target 10: coords (0,0) -> (2,2): error sqrt(8) = 2.83 px
    t2r[0, 0] = 5
    r2t[0, 5] = 10
    # target 1 -> reference 1 -> target 3: (0,1) -> (0,3): error 2 px
    r2t[0, 1] = 3
    fg = torch.ones(1, 16)  # fg_ratio 1: threshold = lambda_c * 4
    want = cycle_mask_reference(t2r, r2t, fg, height=h, width=w, lambda_c=0.6)  # threshold 2.4
    got = cycle_mask(t2r, r2t, fg, height=h, width=w, lambda_c=0.6)
    assert got[0, 0] == 0 and got[0, 1] == 1 and torch.equal(got, want)
    got = cycle_mask(t2r, r2t, fg, height=h, width=w, lambda_c=0.75)  # threshold 3.0: both pass
    assert got[0, 0] == 1 and got[0, 1] == 1
    # half the foreground halves the threshold (fg_ratio): 1.5 px rejects the 2 px error
    fg_half = torch.cat([torch.ones(1, 8), torch.zeros(1, 8)], 1)
    got = cycle_mask(t2r, r2t, fg_half, height=h, width=w, lambda_c=0.75)
    assert got[0, 1] == 0 and got[0, 2] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cycle_mask_random_matches_reference_and_keeps_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    h, w = 9, 11
    t2r = torch.randint(0, h * w, (3, h * w), generator=g, dtype=torch.int32)
    r2t = torch.randint(0, h * w, (3, h * w), generator=g)
    fg = torch.rand(3, h * w, generator=g).to(dtype)
    got = cycle_mask(t2r, r2t, fg, height=h, width=w, lambda_c=0.4)
    assert got.dtype == dtype
    assert torch.equal(got, cycle_mask_reference(t2r, r2t, fg, height=h, width=w, lambda_c=0.4))


def test_cycle_mask_bad_inputs():
    ident = torch.arange(16)[None]
    fg = torch.ones(1, 16)
    with pytest.raises(ValueError, match="t2r"):
        cycle_mask(ident.float(), ident, fg, height=4, width=4, lambda_c=0.4)
    with pytest.raises(ValueError, match="height"):
        cycle_mask(ident, ident, fg, height=3, width=4, lambda_c=0.4)
    with pytest.raises(ValueError, match="lambda_c"):
        cycle_mask(ident, ident, fg, height=4, width=4, lambda_c=0.0)
    with pytest.raises(ValueError, match="fg"):
        cycle_mask(ident, ident, fg[:, :8], height=4, width=4, lambda_c=0.4)


def test_opcheck():
    ft, fr = _feats(1, 9, 7, 16, torch.float32)
    torch.library.opcheck(torch.ops.dreamfuse.match_argmax.default, (ft, fr))
    ident = torch.arange(16)[None]
    torch.library.opcheck(torch.ops.dreamfuse.cycle_mask.default, (ident, ident, torch.rand(1, 16), 4, 4, 0.4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_match_argmax_cuda_real_size(dtype):
    ft, fr = _feats(2, 4096, 4096, 512, dtype, device="cuda")
    _check_against_materialized(ft, fr, exact=False)
