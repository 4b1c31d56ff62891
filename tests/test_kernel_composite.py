"""composite_blend, composite_latents and segment_fill vs their references (Triton interpreter on CPU; `-m gpu`
on CUDA). Oracle: the references in fp64 on the same (rounded) inputs; half precision passes when
``err(kernel) <= 2 * err(the same expression in torch at that precision) + atol``."""

import pytest
import torch
from dreamfuse.kernels._common import use_triton
from dreamfuse.kernels.composite import (
    composite_blend,
    composite_blend_reference,
    composite_latents,
    composite_latents_reference,
    segment_fill,
    segment_fill_reference,
)

DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)]  # (dtype, atol)
DTYPE_IDS = ["fp32", "fp16", "bf16"]
SHAPES = [(1, 1, 4, 7, 9), (2, 2, 4, 13, 5), (1, 3, 3, 7, 9), (2, 3, 4, 16, 8)]  # (B, S, C, h, w); 32-px tiles
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _masks(B, S, h, w, seed=0, device="cpu"):
    """Soft, overlapping masks with holes: a few pixels no segment covers, some zeros per segment, some 1s."""
    g = _gen(seed)
    m = torch.rand(B, S, h, w, generator=g)
    m = torch.where(m < 0.25, torch.zeros_like(m), m)  # each segment misses ~1/4 of the pixels
    m[:, :, 0, :3] = 0  # uncovered pixels
    m[:, 0, -1, -2:] = 1.0
    return m.to(device)


def _eps(B, S, C, h, w, dtype, seed=0, device="cpu"):
    g = _gen(seed + 100)
    u = torch.randn(B, S, C, h, w, generator=g).to(device, dtype)
    c = (u.float() + 0.5 * torch.randn(B, S, C, h, w, generator=g).to(device)).to(dtype)  # cond ≈ uncond
    return u, c


def _naive_blend(u, c, m, g):
    """What a user writes, at the inputs' precision: the baseline error of half precision."""
    if isinstance(g, torch.Tensor):
        g = g.to(u.dtype)[:, :, None, None, None]
    m = m.to(u.dtype)
    return (m[:, :, None] * (u + g * (c - u))).sum(1) / m.sum(1).clamp_min(1e-6)[:, None]


def _assert_within(got, want64, naive, atol):
    err = (got.double() - want64).abs().max().item()
    err_torch = (naive.double() - want64).abs().max().item()
    assert err <= 2 * err_torch + atol, f"kernel err {err:.3g} vs torch err {err_torch:.3g} (+ atol {atol})"


def _as64(g):
    return g.double() if isinstance(g, torch.Tensor) else g


# ----------------------------------------------------------------------------------------------- blend
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("per_segment", [False, True], ids=["g-float", "g-tensor"])
def test_blend_matches_oracle(shape, dtype, atol, per_segment):
    B, S, C, h, w = shape
    u, c = _eps(*shape, dtype)
    m = _masks(B, S, h, w)
    g = torch.rand(B, S, generator=_gen(3)) * 8 + 1 if per_segment else 7.5
    got = composite_blend(u, c, m, g)
    assert got.shape == (B, C, h, w) and got.dtype == dtype and got.is_contiguous()
    want = composite_blend_reference(u.double(), c.double(), m.double(), _as64(g))
    _assert_within(got, want, _naive_blend(u, c, m, g), atol)


def test_uncovered_pixels_are_zero():
    u, c = _eps(2, 3, 4, 7, 9, torch.float32)
    m = _masks(2, 3, 7, 9)
    out = composite_blend(u, c, m, 5.0)
    assert (m.sum(1)[:, 0, :3] == 0).all()
    assert torch.equal(out[:, :, 0, :3], torch.zeros_like(out[:, :, 0, :3]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("S", [2, 3])
def test_zero_mask_segment_has_no_influence(S):
    u, c = _eps(2, S, 4, 13, 5, torch.float16)
    m = _masks(2, S, 13, 5)
    m[:, 1] = 0
    g = torch.tensor([[3.0] * S, [9.0] * S])
    before = composite_blend(u, c, m, g)
    u2, c2 = u.clone(), c.clone()
    u2[:, 1] = 1e4
    c2[:, 1] = -3e4
    g2 = g.clone()
    g2[:, 1] = -100.0
    assert torch.equal(composite_blend(u2, c2, m, g2), before)
    assert torch.equal(composite_blend_reference(u2, c2, m, g2), composite_blend_reference(u, c, m, g))
    # and a live segment does change the result
    u2[:, 0] += 1
    assert not torch.equal(composite_blend(u2, c, m, g), before)


@pytest.mark.skipif(not use_triton(torch.empty(0)), reason="a property of the Triton path")
def test_kernels_do_not_read_zero_mask_values():
    """The masked loads skip zero-mask segments (and a fully covered pixel's fill): non-finite values there do
    not propagate on the Triton path (the references compute 0 · NaN = NaN, see the module docstring)."""
    u, c = _eps(2, 3, 4, 13, 5, torch.float16)
    m = _masks(2, 3, 13, 5)
    m[:, 1] = 0
    before = composite_blend(u, c, m, 4.0)
    u2, c2 = u.clone(), c.clone()
    u2[:, 1], c2[:, 1] = float("inf"), float("nan")
    assert torch.equal(composite_blend(u2, c2, m, 4.0), before)
    fill = torch.randn(2, 4, 13, 5, generator=_gen(1)).half()
    assert torch.equal(composite_latents(u2, m, fill), composite_latents(u, m, fill))
    assert torch.equal(segment_fill(u2, m, fill), segment_fill(u, m, fill))
    covered = m.sum(1) >= 1
    fill2 = fill.clone()
    fill2.permute(1, 0, 2, 3)[:, covered] = float("nan")
    assert torch.equal(composite_latents(u, m, fill2), composite_latents(u, m, fill))


def test_single_segment_full_mask_is_plain_cfg():
    u, c = _eps(2, 1, 4, 7, 9, torch.float32)
    m = torch.ones(2, 1, 7, 9, dtype=torch.float16)  # masks in another dtype than eps
    out = composite_blend(u, c, m, 7.5)
    torch.testing.assert_close(out, u[:, 0] + 7.5 * (c[:, 0] - u[:, 0]), atol=1e-5, rtol=1e-6)
    out = composite_blend(u, c, m * 0.3, torch.tensor([[2.0], [4.0]]))  # a constant mask normalizes away
    torch.testing.assert_close(out[1], u[1, 0] + 4.0 * (c[1, 0] - u[1, 0]), atol=1e-5, rtol=1e-6)


def test_per_segment_guidance_broadcasts():
    u, c = _eps(2, 3, 4, 7, 9, torch.float32)
    m = _masks(2, 3, 7, 9)
    g = torch.tensor([2.0, 5.0, 9.0])
    want = composite_blend(u, c, m, g.expand(2, 3).clone())
    assert torch.equal(composite_blend(u, c, m, g), want)  # (S,) broadcasts over the batch
    assert torch.equal(composite_blend(u, c, m, g[None]), want)
    assert torch.equal(composite_blend(u, c, m, torch.tensor(7.5)), composite_blend(u, c, m, 7.5))
    # disjoint full masks: each pixel is its own segment's CFG with its own scale
    m = torch.zeros(2, 3, 7, 9)
    m[:, 0, :, :3], m[:, 1, :, 3:6], m[:, 2, :, 6:] = 1, 1, 1
    out = composite_blend(u, c, m, g)
    for s, cols in enumerate((slice(0, 3), slice(3, 6), slice(6, 9))):
        cfg = u[:, s] + g[s] * (c[:, s] - u[:, s])
        torch.testing.assert_close(out[..., cols], cfg[..., cols], atol=1e-5, rtol=1e-6)


def test_blend_strided_inputs():
    B, S, C, h, w = 2, 3, 4, 7, 9
    # the UNet's (2·B·S, C, h, w) output, viewed as [uncond; cond]: batch-strided views, dense planes
    eps = torch.randn(2 * B * S, C, h, w, generator=_gen(5))
    u, c = eps.view(2, B, S, C, h, w).unbind(0)
    m = _masks(B, S, h, w)
    want = composite_blend_reference(u.double(), c.double(), m.double(), 6.0)
    torch.testing.assert_close(composite_blend(u, c, m, 6.0).double(), want, atol=1e-5, rtol=1e-6)
    # crops along w and a channel slice (planes not dense: the div/mod path), transposed masks, sliced guidance
    big = torch.randn(B, S, C + 2, h, w + 3, generator=_gen(6))
    u, c = big[:, :, 1:C + 1, :, 2:w + 2], big[:, :, :C, :, :w]
    mt = _masks(B, S, w, h).transpose(-1, -2)
    gs = (torch.rand(S, B, generator=_gen(7)) * 8).t()
    assert not u.is_contiguous() and not mt.is_contiguous() and not gs.is_contiguous()
    want = composite_blend_reference(u.double(), c.double(), mt.double(), gs.double())
    torch.testing.assert_close(composite_blend(u, c, mt, gs).double(), want, atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- latents
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_fill", [False, True], ids=["no-fill", "fill"])
def test_composite_latents_matches_oracle(shape, dtype, atol, with_fill):
    B, S, C, h, w = shape
    x, _ = _eps(*shape, dtype, seed=1)
    m = _masks(B, S, h, w, seed=1) * 0.6  # Σm spans < 1 and > 1
    fill = torch.randn(B, C, h, w, generator=_gen(2)).to(dtype) if with_fill else None
    got = composite_latents(x, m, fill)
    assert got.shape == (B, C, h, w) and got.dtype == dtype
    want = composite_latents_reference(x.double(), m.double(), None if fill is None else fill.double())
    # torch at the same precision: the same formula evaluated in `dtype`
    mm = m.to(dtype)
    msum = mm.sum(1)[:, None]
    num = (mm[:, :, None] * x).sum(1)
    naive = num / msum.clamp_min(1e-6) if fill is None else num / msum.clamp_min(1) + (1 - msum.clamp_max(1)) * fill
    _assert_within(got, want, naive, atol)


def test_composite_latents_fill_rule():
    B, S, C, h, w = 2, 3, 4, 7, 9
    x, _ = _eps(B, S, C, h, w, torch.float16, seed=4)
    m = torch.zeros(B, S, h, w)
    m[:, 0, :3] = 1.0  # rows 0-2: fully covered by one segment
    m[:, 1, 2:5] = 0.7  # row 2: Σm = 1.7 (overlap); rows 3-4: partial 0.7
    m[:, 2, :, :2] = 0.5  # cols 0-1: rows 5-6 partial 0.5, rows 2-4 Σm > 1; rows 5-6, cols 2+: uncovered
    fill = torch.randn(B, C, h, w, generator=_gen(8)).to(torch.float16)
    out = composite_latents(x, m, fill)
    msum = m.sum(1)
    uncovered, covered = msum == 0, msum >= 1
    assert uncovered.any() and covered.any() and ((msum > 0) & (msum < 1)).any()
    # uncovered pixels are the fill, exactly
    assert torch.equal(out.permute(1, 0, 2, 3)[:, uncovered], fill.permute(1, 0, 2, 3)[:, uncovered])
    # fully covered pixels ignore the fill and equal the no-fill mean
    fill2 = fill.clone()
    fill2.permute(1, 0, 2, 3)[:, covered] = 1e4
    assert torch.equal(composite_latents(x, m, fill2), out)
    plain = composite_latents(x, m)
    assert torch.equal(out.permute(1, 0, 2, 3)[:, covered], plain.permute(1, 0, 2, 3)[:, covered])
    # partial coverage: Σ m·x + (1 − Σm)·fill
    want = composite_latents_reference(x.double(), m.double(), fill.double())
    part = (x.double()[:, 1] * 0.7 + 0.3 * fill.double())[:, :, 3:5, 2:]  # (cols 0-1 there: Σm = 1.2)
    torch.testing.assert_close(want[:, :, 3:5, 2:], part)
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=0)
    # no fill: uncovered pixels are 0
    assert (plain.permute(1, 0, 2, 3)[:, uncovered] == 0).all()


def test_composite_latents_zero_mask_segment_and_strides():
    B, S, C, h, w = 1, 3, 4, 13, 5
    base = torch.randn(B, S, C, h, w + 4, generator=_gen(9))
    x = base[..., 1:w + 1]  # crop along w: non-dense planes
    m = _masks(B, S, h, w)
    m[:, 2] = 0
    fill = torch.randn(B, C, w, h, generator=_gen(10)).transpose(-1, -2)
    want = composite_latents_reference(x.double(), m.double(), fill.double())
    out = composite_latents(x, m, fill)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-6)
    x2 = x.clone()
    x2[:, 2] = 1e4
    assert torch.equal(composite_latents(x2, m, fill), out)


# ----------------------------------------------------------------------------------------------- segment fill
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=DTYPE_IDS)
def test_segment_fill_matches_oracle(shape, dtype, atol):
    B, S, C, h, w = shape
    x, _ = _eps(*shape, dtype, seed=2)
    m = _masks(B, S, h, w, seed=2)
    fill = torch.randn(B, C, h, w, generator=_gen(11)).to(dtype)
    got = segment_fill(x, m, fill)
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    want = segment_fill_reference(x.double(), m.double(), fill.double())
    mm = m.to(dtype)[:, :, None]
    _assert_within(got, want, mm * x + (1 - mm) * fill[:, None], atol)
    # mask 0 -> the fill exactly, mask 1 -> the segment's latent exactly
    zero, one = (m == 0)[:, :, None].expand_as(x), (m == 1)[:, :, None].expand_as(x)
    assert torch.equal(got[zero], fill[:, None].expand_as(x)[zero])
    assert torch.equal(got[one], x[one])


def test_segment_fill_expanded_shared_latent_and_strided_fill():
    B, S, C, h, w = 2, 3, 4, 7, 9
    shared = torch.randn(B, C, h, w, generator=_gen(12))
    x = shared[:, None].expand(-1, S, -1, -1, -1)  # stride 0 over segments: no copy
    m = _masks(B, S, h, w)
    fill = torch.randn(B, C, w, h, generator=_gen(13)).transpose(-1, -2)  # non-dense planes: the div/mod path
    got = segment_fill(x, m, fill)
    torch.testing.assert_close(got, segment_fill_reference(x.contiguous(), m, fill), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- validation
def _bad_blend_cases():
    u = torch.zeros(2, 3, 4, 5, 6)
    m = torch.zeros(2, 3, 5, 6)
    return [
        ((u[0], u, m, 1.0), "eps_uncond"),
        ((u, u[:, :2], m, 1.0), "eps_cond"),
        ((u, u.half(), m, 1.0), "dtype"),
        ((u.int(), u.int(), m, 1.0), "eps_uncond"),
        ((u, u, m[:, :2], 1.0), "masks"),
        ((u, u, m[..., :5], 1.0), "masks"),
        ((u, u, m.bool(), 1.0), "masks"),
        ((u, u, m, torch.ones(2, 4)), "guidance"),
        ((u, u, m, torch.ones(2, 3, 1)), "guidance"),
        ((u, u, m, torch.ones(2, 3, dtype=torch.int64)), "guidance"),
        ((u, u, m, "7.5"), "guidance"),
        ((u[:, :0], u[:, :0], m[:, :0], 1.0), "segments"),
    ]


@pytest.mark.parametrize("args, field", _bad_blend_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_blend_bad_inputs(args, field):
    with pytest.raises(ValueError, match=field):
        composite_blend(*args)


def test_latents_and_fill_bad_inputs():
    x = torch.zeros(2, 3, 4, 5, 6)
    m = torch.zeros(2, 3, 5, 6)
    f = torch.zeros(2, 4, 5, 6)
    for fn in (composite_latents, segment_fill):
        with pytest.raises(ValueError, match="latents"):
            fn(x[0], m, f)
        with pytest.raises(ValueError, match="masks"):
            fn(x, m[:, :, :4], f)
        with pytest.raises(ValueError, match="fill"):
            fn(x, m, f[:, :3])
        with pytest.raises(ValueError, match="fill"):
            fn(x, m, f.half())
        with pytest.raises(ValueError, match="segments"):
            fn(x[:, :0], m[:, :0], f)
    with pytest.raises(ValueError, match="fill"):
        segment_fill(x, m, None)


def test_empty_planes():
    u = torch.zeros(1, 2, 4, 0, 5)
    assert composite_blend(u, u, torch.zeros(1, 2, 0, 5), 2.0).shape == (1, 4, 0, 5)
    assert segment_fill(u, torch.zeros(1, 2, 0, 5), torch.zeros(1, 4, 0, 5)).shape == u.shape


def test_opcheck():
    u, c = _eps(1, 2, 3, 3, 5, torch.float32)
    m = _masks(1, 2, 3, 5)
    f = torch.randn(1, 3, 3, 5)
    ops = torch.ops.dreamfuse
    torch.library.opcheck(ops.composite_blend.default, (u, c, m, None, 7.5))
    torch.library.opcheck(ops.composite_blend.default, (u, c, m, torch.tensor([[2.0, 4.0]]), 0.0))
    torch.library.opcheck(ops.composite_latents.default, (u, m, None))
    torch.library.opcheck(ops.composite_latents.default, (u, m, f))
    torch.library.opcheck(ops.segment_fill.default, (u, m, f))


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("S, hw", [(2, 64), (8, 96)])
def test_cuda_real_sizes(dtype, atol, S, hw):
    B, C = 4, 4
    u, c = _eps(B, S, C, hw, hw, dtype, device="cuda")
    m = _masks(B, S, hw, hw, device="cuda").half()
    g = torch.rand(B, S, device="cuda") * 8 + 1
    want = composite_blend_reference(u.double(), c.double(), m.double(), g.double())
    _assert_within(composite_blend(u, c, m, g), want, _naive_blend(u, c, m, g), atol)
    fill = torch.randn(B, C, hw, hw, device="cuda").to(dtype)
    mm = m.float() * 0.6
    want = composite_latents_reference(u.double(), mm.double(), fill.double())
    torch.testing.assert_close(composite_latents(u, mm, fill).double(), want, atol=4 * atol, rtol=1e-2)
    want = segment_fill_reference(u.double(), m.double(), fill.double())
    torch.testing.assert_close(segment_fill(u, m, fill).double(), want, atol=4 * atol, rtol=1e-2)
