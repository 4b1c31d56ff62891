"""dreamfuse::attention and dreamfuse::ama_attention against their fp64 oracle.

On CPU the Triton code runs through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the
`gpu`-marked tests repeat the comparisons on CUDA at SD sizes (`TRITON_INTERPRET=0 pytest -m gpu`).
Accuracy criterion (flash-attention's tests): the kernel is at most twice as far from the fp64 oracle as
PyTorch computing in the same precision, plus a small atol.
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from dreamfuse.kernels import _common
from dreamfuse.kernels.attention import ama_attention, ama_attention_reference, attention, attention_reference
from torch._subclasses.fake_tensor import FakeTensorMode

# the module itself: `dreamfuse.kernels.attention` as an attribute is the re-exported function
attn_mod = importlib.import_module("dreamfuse.kernels.attention")

# (B, H, Lq, Lk, D), chosen to be awkward: Lq != Lk; 77 text keys and 93 = 77 + 16 IP-Adapter keys; lengths
# off the block grid (33, 100, 130); head dims 40/80/160 (SD1.x, padded in-kernel to 64/128/256), 64 (SDXL),
# 24 (padded to 32); D=20 makes strides that are not multiples of 8 (the kernel's unaligned-stride path).
SHAPES = [(1, 2, 33, 77, 40), (2, 1, 100, 93, 80), (1, 1, 20, 130, 160), (1, 2, 64, 64, 64), (1, 1, 5, 33, 24),
          (1, 3, 7, 20, 20)]
DTYPES = [(torch.float32, 1e-6), (torch.float16, 1e-4), (torch.bfloat16, 1e-3)]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
shape_id = lambda s: "x".join(map(str, s))


def _qkv(B, H, Lq, Lk, D, dtype, seed=0, device="cpu"):
    """q, k, v as (B, L, H, D) storage seen as (B, H, L, D): the non-contiguous views the processors pass."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, D, generator=g) for L in (Lq, Lk, Lk))
    return [t.to(device=device, dtype=dtype).transpose(1, 2) for t in (q, k, v)]


def _ama_extra(B, H, Lk, D, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1)
    v_ref = torch.randn(B, Lk, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    flow = torch.randint(0, Lk, (B, Lk), generator=g).to(device)  # random: duplicates and unmatched rows
    mask = torch.rand(B, Lk, generator=g).to(device)  # soft, as DreamMatcher uses it
    return v_ref, flow, mask


def _torch_same_precision(q, k, v, scale=None):
    """Attention computed by PyTorch in the inputs' precision (flash-attention's `upcast=False` reference)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def _assert_within_2x(out, same_precision, oracle, atol):
    err = (out.double() - oracle.double()).abs().max().item()
    ref_err = (same_precision.double() - oracle.double()).abs().max().item()
    assert err <= 2 * ref_err + atol, f"kernel err {err:.3g} > 2 x torch same-precision err {ref_err:.3g} + {atol}"


def test_interpreter_runs_triton_with_one_pinned_config():
    q, _, _ = _qkv(1, 1, 4, 4, 16, torch.float32)
    assert _common.use_triton(q)  # i.e. these tests exercise the kernel, not attention_reference
    assert len(attn_mod._CONFIGS) == 1


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=DTYPE_IDS)
def test_attention_matches_oracle(shape, dtype, atol):
    q, k, v = _qkv(*shape, dtype)
    out, lse = attention(q, k, v, return_lse=True)
    B, H, Lq, _, _ = shape
    assert out.shape == q.shape and out.dtype == dtype and out.stride() == q.stride()
    assert lse.shape == (B, H, Lq) and lse.dtype == torch.float32
    oracle, oracle_lse = attention_reference(q.double(), k.double(), v.double(), return_lse=True)
    _assert_within_2x(out, _torch_same_precision(q, k, v), oracle, atol)
    # the lse sees only the (exact) products of the rounded inputs, accumulated in fp32
    torch.testing.assert_close(lse.double(), oracle_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "k_v_transposed", "head_dim_strided", "sliced_heads"])
def test_attention_layouts(layout):
    q, k, v = _qkv(2, 2, 19, 45, 40, torch.float32, seed=1)
    if layout == "contiguous":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    elif layout == "k_v_transposed":  # k stored (B, H, D, L): unit stride along L, so D is not unit-stride
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
        v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "head_dim_strided":  # q's D axis has stride 2 -> the one copy the launcher makes
        q = torch.randn(2, 2, 19, 80)[..., ::2]
    elif layout == "sliced_heads":  # every other head of a bigger tensor: non-dense, strides only
        q, k, v = (torch.cat([t, t], dim=1)[:, ::2] for t in (q, k, v))
    out, lse = attention(q, k, v, scale=0.3, return_lse=True)
    want, want_lse = attention_reference(q, k, v, scale=0.3, return_lse=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


# Every order of the four axes in memory: (0, 2, 1, 3) is the processors' (B, L, H, D) buffer, identity the
# contiguous one; the 18 orders with D not innermost exercise the launcher's copy to unit stride along D.
PERMS = list(itertools.permutations(range(4)))


def _stored_as(t: torch.Tensor, perm) -> torch.Tensor:
    """``t``'s values in a dense buffer whose axes, outermost first, are ``t``'s axes ``perm``, seen as t's shape."""
    return t.permute(perm).contiguous().permute([perm.index(i) for i in range(4)])


def _out_strides(q: torch.Tensor):
    """The documented layout of ``out``: q's strides when q has unit stride along D, else contiguous."""
    return q.stride() if q.stride(-1) == 1 else torch.empty(q.shape).stride()


def _ama_args(B, H, Lq, Lk, D, dtype=torch.float32, seed=0):
    q, k, v_tgt = _qkv(B, H, Lq, Lk, D, dtype, seed=seed)
    return [q, k, v_tgt, *_ama_extra(B, H, Lk, D, dtype, seed=seed)]


@pytest.mark.parametrize("op", ["attention", "ama"])
def test_every_dense_layout(op, monkeypatch):
    """q, k, v (and v_ref) each in all 24 memory orders: call i stores q in order i, k in i + 7, v in i + 13 and
    v_ref in i + 19 (mod 24), so every tensor meets every order, next to a different mix of the others. The
    op's reference path and its fake (what torch.compile plans with) must lay out out as the Triton path does."""
    args = _ama_args(2, 2, 33, 20, 24, seed=11)
    n = 3 if op == "attention" else 4  # the (B, H, L, D) arguments
    fn, ref = (attention, attention_reference) if n == 3 else (ama_attention, ama_attention_reference)
    call = lambda *a: fn(*a, scale=0.3, return_lse=True)  # noqa: E731
    for i in range(len(PERMS)):
        perms = [PERMS[(i + shift) % 24] for shift in (0, 7, 13, 19)[:n]]
        a = [_stored_as(t, perm) for t, perm in zip(args, perms)] + (args[4:] if n == 4 else [])
        out, lse = call(*a)
        want, want_lse = ref(*a, scale=0.3, return_lse=True)
        msg = lambda m, perms=perms: f"layouts {perms}: {m}"  # noqa: E731
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=msg)
        torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5, msg=msg)
        with FakeTensorMode() as mode:
            fake_out, fake_lse = call(*(mode.from_tensor(t) for t in a))
        with monkeypatch.context() as m:
            m.setenv("DREAMFUSE_DISABLE_KERNELS", "1")
            ref_out, ref_lse = call(*a)
        assert out.stride() == fake_out.stride() == ref_out.stride() == _out_strides(a[0]), msg("out strides")
        assert lse.stride() == fake_lse.stride() == ref_lse.stride() == (2 * 33, 33, 1), msg("lse strides")


def test_attention_empty_queries():
    q, k, v = _qkv(1, 2, 0, 7, 16, torch.float16)
    out, lse = attention(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


def _bad(make):
    q, k, v = _qkv(2, 2, 8, 8, 16, torch.float32)
    return make(q, k, v)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda q, k, v: (q[0], k, v), "rank 4"),
        (lambda q, k, v: (q, k[:1], v[:1]), "batch, heads, head dim"),
        (lambda q, k, v: (q, k, v[:, :1]), "batch, heads, head dim"),
        (lambda q, k, v: (q, k[..., :8], v), "batch, heads, head dim"),
        (lambda q, k, v: (q, k, v[:, :, :3]), "key lengths differ"),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "no keys"),
        (lambda q, k, v: (q, k.half(), v), "share a dtype"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), "unsupported"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), "unsupported"),
        (lambda q, k, v: (q, k.to("meta"), v), "one device"),
        (lambda q, k, v: tuple(torch.zeros(1, 1, 4, 257) for _ in range(3)), "head dim 257"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), "head dim 0"),
        (lambda q, k, v: (q.numpy(), k, v), "must be a tensor"),
    ],
    ids=["rank", "batch", "heads", "head_dim", "lk", "no_keys", "dtype_mix", "fp64", "int", "device", "d257",
         "d0", "numpy"],
)
def test_attention_rejects_bad_inputs(make, match):
    q, k, v = _bad(make)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v)


def test_head_dim_zero_is_a_value_error():
    """D = 0: ValueError on every path, with or without a scale (the default D ** -0.5 was a ZeroDivisionError)."""
    q, k, v, v_ref, flow, mask = (t[..., :0] if t.dim() == 4 else t for t in _ama_args(1, 2, 5, 7, 16))
    calls = [
        lambda **kw: attention(q, k, v, **kw),
        lambda **kw: ama_attention(q, k, v, v_ref, flow, mask, **kw),
        lambda **kw: attention_reference(q, k, v, **kw),
        lambda **kw: ama_attention_reference(q, k, v, v_ref, flow, mask, **kw),
        lambda **kw: torch.ops.dreamfuse.attention(q, k, v, kw.get("scale", 1.0)),
        lambda **kw: torch.ops.dreamfuse.ama_attention(q, k, v, v_ref, flow, mask, kw.get("scale", 1.0)),
    ]
    for call in calls:
        for kw in ({}, {"scale": 0.5}):
            with pytest.raises(ValueError, match="head dim 0"):
                call(**kw)


@pytest.mark.parametrize("layout", ["BLHD", "permuted"])
def test_attention_opcheck(layout):
    q, k, v = _qkv(1, 2, 9, 11, 24, torch.float32)
    if layout == "permuted":  # q's D axis outermost: the launcher copies q, out is contiguous
        q, k, v = _stored_as(q, (3, 0, 2, 1)), _stored_as(k, (2, 3, 1, 0)), _stored_as(v, (0, 1, 3, 2))
    torch.library.opcheck(torch.ops.dreamfuse.attention.default, (q, k, v, 0.25))


def test_attention_compiles_as_one_op():
    q, k, v = _qkv(1, 1, 8, 12, 16, torch.float32)
    f = torch.compile(lambda q, k, v: attention(q, k, v) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(q, k, v), attention_reference(q, k, v) * 2, atol=1e-5, rtol=1e-5)


def test_attention_gradients_match_reference_autograd():
    q, k, v = (t.detach().requires_grad_(True) for t in _qkv(1, 2, 13, 21, 40, torch.float32, seed=3))
    g = torch.Generator().manual_seed(7)
    w_out, w_lse = torch.randn(1, 2, 13, 40, generator=g), torch.randn(1, 2, 13, generator=g)

    def loss(fn, q, k, v):  # through both outputs, so d lse is tested too
        out, lse = fn(q, k, v, return_lse=True)
        return (out * w_out).sum() + (lse * w_lse).sum()

    got = torch.autograd.grad(loss(attention, q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(attention_reference, q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the out-only path (lse unused) and the row-chunked backward agree with the same reference
    q2 = q.detach().requires_grad_(True)
    (g_only,) = torch.autograd.grad((attention(q2, k, v) * w_out).sum(), q2)
    (g_ref,) = torch.autograd.grad((attention_reference(q2, k, v) * w_out).sum(), q2)
    torch.testing.assert_close(g_only, g_ref, atol=1e-5, rtol=1e-4)
    _, lse = attention_reference(q, k, v, return_lse=True)
    full = attn_mod._attention_bwd_torch(q, k, v, lse, w_out, w_lse, 40**-0.5)
    chunked = attn_mod._attention_bwd_torch(q, k, v, lse, w_out, w_lse, 40**-0.5, chunk_elems=2 * 21 * 5)
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_kernels_can_be_switched_off(monkeypatch):
    q, k, v = _qkv(1, 2, 6, 9, 16, torch.float16)
    monkeypatch.setenv("DREAMFUSE_DISABLE_KERNELS", "1")
    assert not _common.use_triton(q)
    out, lse = attention(q, k, v, return_lse=True)  # the reference path, with the op's layout contract
    want, want_lse = attention_reference(q, k, v, return_lse=True)
    assert out.stride() == q.stride()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)


# ---------------------------------------------------------------------------------------------- AMA
AMA_SHAPES = [(2, 2, 30, 50, 40), (1, 1, 64, 100, 80), (1, 2, 17, 33, 160)]


@pytest.mark.parametrize("shape", AMA_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=DTYPE_IDS)
def test_ama_matches_oracle(shape, dtype, atol):
    B, H, Lq, Lk, D = shape
    q, k, v_tgt = _qkv(*shape, dtype)
    v_ref, flow, mask = _ama_extra(B, H, Lk, D, dtype)
    out, lse = ama_attention(q, k, v_tgt, v_ref, flow, mask, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    d = lambda t: t.double()
    oracle = ama_attention_reference(d(q), d(k), d(v_tgt), d(v_ref), flow, d(mask))
    m = mask[:, None, :, None]
    v_w = (m * attn_mod._gather_rows(v_ref.float(), flow) + (1 - m) * v_tgt.float()).to(dtype)
    _assert_within_2x(out, _torch_same_precision(q, k, v_w), oracle, atol)
    assert torch.equal(lse, attention(q, k, v_tgt, return_lse=True)[1])  # the lse does not see the values


def test_ama_limits_are_plain_attention():
    q, k, v_tgt = _qkv(1, 2, 21, 37, 40, torch.float16, seed=5)
    v_ref, flow, mask = _ama_extra(1, 2, 37, 40, torch.float16, seed=5)
    ident = torch.arange(37)[None]
    # exact: the blend of a 0/1 mask reproduces the chosen value bit for bit
    assert torch.equal(ama_attention(q, k, v_tgt, v_ref, flow, torch.zeros_like(mask)), attention(q, k, v_tgt))
    assert torch.equal(ama_attention(q, k, v_tgt, v_ref, ident, torch.ones_like(mask)), attention(q, k, v_ref))


def test_ama_flow_and_mask_dtypes_and_strides():
    q, k, v_tgt = _qkv(2, 1, 12, 29, 24, torch.float32, seed=2)
    v_ref, flow, mask = _ama_extra(2, 1, 29, 24, torch.float32, seed=2)
    want = ama_attention_reference(q, k, v_tgt, v_ref, flow, mask)
    # int32 flow and a half mask, both as transposed (non-contiguous) views
    flow32 = flow.int().t().contiguous().t()
    mask16 = mask.half().t().contiguous().t()
    got = ama_attention(q, k, v_tgt, v_ref, flow32, mask16)
    torch.testing.assert_close(got, ama_attention_reference(q, k, v_tgt, v_ref, flow, mask16.float()),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ama_attention(q, k, v_tgt, v_ref, flow, mask), want, atol=1e-5, rtol=1e-5)


def test_ama_gradients_match_reference_autograd():
    q, k, v_tgt = _qkv(1, 2, 11, 19, 24, torch.float32, seed=4)
    v_ref, flow, mask = _ama_extra(1, 2, 19, 24, torch.float32, seed=4)
    mask[0, :3], mask[0, 3:6] = 0.0, 1.0  # exact weights read one value alone, yet d out / d mask is the blend's
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v_tgt, v_ref, mask)]
    w = torch.randn(1, 2, 11, 24, generator=torch.Generator().manual_seed(9))

    def grads(fn):
        q, k, v_tgt, v_ref, mask = leaves
        out, lse = fn(q, k, v_tgt, v_ref, flow, mask, return_lse=True)
        return torch.autograd.grad((out * w).sum() + lse.sum(), leaves)

    for a, b in zip(grads(ama_attention), grads(ama_attention_reference)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_ama_rejects_bad_inputs():
    q, k, v_tgt = _qkv(1, 1, 6, 10, 16, torch.float32)
    v_ref, flow, mask = _ama_extra(1, 1, 10, 16, torch.float32)
    cases = [
        ((q, k, v_tgt, v_ref[..., :8], flow, mask), "v_ref must have"),
        ((q, k, v_tgt, v_ref.half(), flow, mask), "v_ref dtype"),
        ((q, k, v_tgt, v_ref, flow.float(), mask), "flow must be int32 or int64"),
        ((q, k, v_tgt, v_ref, flow[:, :5], mask), r"flow must have shape \(B, Lk\)"),
        ((q, k, v_tgt, v_ref, flow, mask[:, :5]), r"mask must have shape \(B, Lk\)"),
        ((q, k, v_tgt, v_ref, flow, (mask > 0.5).int()), "mask must be a float"),
        ((q, k, v_tgt, v_ref, flow, mask.to("meta")), "mask is on meta"),
        ((q, k[:, :, :5], v_tgt, v_ref, flow, mask), "key lengths differ"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            ama_attention(*args)
    with pytest.raises(ValueError, match=r"flow values must lie in \[0, 10\)"):
        ama_attention_reference(q, k, v_tgt, v_ref, flow + 10, mask)


@pytest.mark.parametrize("layout", ["BLHD", "permuted"])
def test_ama_opcheck(layout):
    q, k, v_tgt = _qkv(1, 1, 6, 10, 16, torch.float32)
    v_ref, flow, mask = _ama_extra(1, 1, 10, 16, torch.float32)
    if layout == "permuted":
        q, v_ref = _stored_as(q, (0, 3, 1, 2)), _stored_as(v_ref, (3, 2, 1, 0))
    torch.library.opcheck(torch.ops.dreamfuse.ama_attention.default, (q, k, v_tgt, v_ref, flow, mask, 0.25))


# ---------------------------------------------------------------------------------------------- non-finite input
# The documented contract (module docstring): IEEE propagation, no exception, no check, on every path, matching
# attention_reference value for value (NaN where it has NaN, the same infinities, finite entries close).
NONFINITE = [float("nan"), float("inf"), float("-inf")]
NONFINITE_IDS = ["nan", "inf", "-inf"]
# (path, dtype, atol/rtol of out): the Triton kernel (interpreted) and the op's reference path. No fp16, to keep
# the interpreter's time down: its kernel code is fp32's plus the casts that bf16 runs too (with, on top, the
# interpreter-only rounding of P, V_w and out).
PATHS = [("triton", torch.float32, 1e-5), ("triton", torch.bfloat16, 1e-2), ("reference", torch.float32, 1e-5)]
PATH_IDS = ["triton-fp32", "triton-bf16", "reference"]
# q[0, h, i, 0] has these signs, so that an infinity in column 0 of k gives row i a score of +inf or -inf
SIGNS = torch.tensor([[1, 1, -1, 1, -1, -1], [-1, 1, 1, -1, 1, -1]])


def _finite_inputs(dtype, path, monkeypatch):
    """(B, H, Lq, Lk, D) = (1, 2, 6, 40, 16): two key blocks of the pinned BLOCK_N=32, the second ragged."""
    if path == "reference":
        monkeypatch.setenv("DREAMFUSE_DISABLE_KERNELS", "1")
    args = _ama_args(1, 2, 6, 40, 16, dtype, seed=21)
    q, k = args[:2]
    q[..., 0] = SIGNS * (q[..., 0].abs() + 0.5)
    k[..., 0] = k[..., 0].abs() + 0.5  # column 0 of k > 0: an infinity in q[..., 0] fills its row's scores
    args[4] = torch.randperm(40, generator=torch.Generator().manual_seed(0))[None]  # one key per v_ref row
    args[5] = 0.05 + 0.9 * args[5]  # soft weights: the exact 0 and 1 are placed on purpose below
    return args


def _plant_in_q_or_k(q, k, where, value):
    """q: row 1 of head 0 (scores all ``value``) and row 3 (mixed signs: NaN or both infinities). k: the whole
    first key block of head 0 (rows see all +inf or all -inf there) and key 35 of head 1 (second block)."""
    if where == "q":
        q[0, 0, 1, 0] = value
        q[0, 0, 3, 1] = value
    else:
        k[0, 0, :32, 0] = value
        k[0, 1, 35, 0] = value


def _check_q_or_k(out, lse, q, k, v, where, value, atol):
    """The outcomes of _plant_in_q_or_k that the contract fixes row by row."""
    nan = value != value
    if where == "q":
        assert out[0, 0, [1, 3]].isnan().all() and out[0, 0, [0, 2, 4, 5]].isfinite().all()
        assert out[0, 1].isfinite().all()
        # row 1: every score is `value` -> lse = value (softmax over all -inf is NaN, logsumexp -inf);
        # row 3: +inf and -inf scores -> lse = +inf
        assert lse[0, 0, 1].isnan() if nan else lse[0, 0, 1] == value
        assert lse[0, 0, 3].isnan() if nan else lse[0, 0, 3] == float("inf")
        return
    if nan:  # a NaN key poisons every row that attends to it
        assert out[0].isnan().all() and lse[0].isnan().all()
        return
    for h, keep in ((0, slice(32, 40)), (1, [j for j in range(40) if j != 35])):
        pos = SIGNS[h] * value > 0  # these rows score +inf on the planted keys: NaN output, lse = +inf
        assert out[0, h, pos].isnan().all() and (lse[0, h, pos] == float("inf")).all()
        # the others score -inf there: weight 0, exactly attention over the remaining keys
        want, want_lse = attention_reference(q[0:1, h:h + 1, ~pos], k[0:1, h:h + 1, keep], v[0:1, h:h + 1, keep],
                                             return_lse=True)
        torch.testing.assert_close(out[0, h, ~pos], want[0, 0], atol=atol, rtol=atol)
        torch.testing.assert_close(lse[0, h, ~pos], want_lse[0, 0], atol=1e-4, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy reports inf - inf, 0 * inf, 0 / 0
@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("path, dtype, atol", PATHS, ids=PATH_IDS)
def test_attention_nonfinite_inputs_propagate(path, dtype, atol, where, value, monkeypatch):
    q, k, v = _finite_inputs(dtype, path, monkeypatch)[:3]
    if where == "v":  # key 5 (first block) in feature 2, key 37 (second block) in feature 3
        v[0, 0, 5, 2] = v[0, 0, 37, 3] = value
    else:
        _plant_in_q_or_k(q, k, where, value)
    out, lse = attention(q, k, v, return_lse=True)
    want, want_lse = attention_reference(q, k, v, return_lse=True)
    torch.testing.assert_close(out, want, atol=atol, rtol=atol, equal_nan=True)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5, equal_nan=True)
    if where == "v":  # every row gives keys 5 and 37 weight > 0; the lse never sees v
        assert out[0, 0, :, 2:4].isnan().all() if value != value else (out[0, 0, :, 2:4] == value).all()
        assert out[..., :2].isfinite().all() and out[..., 4:].isfinite().all() and out[:, 1].isfinite().all()
        assert lse.isfinite().all()
    else:
        _check_q_or_k(out, lse, q, k, v, where, value, atol)


# bf16 q/k: the softmax code is the plain kernel's, which test_attention_nonfinite_inputs_propagate runs in bf16
AMA_CASES = [pytest.param(*p, w, id=f"{i}-{w}") for p, i in zip(PATHS, PATH_IDS)
             for w in ("q", "k", "v_tgt", "v_ref", "mask") if not (p[1] == torch.bfloat16 and w in ("q", "k"))]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
@pytest.mark.parametrize("path, dtype, atol, where", AMA_CASES)
def test_ama_nonfinite_inputs_propagate(path, dtype, atol, where, value, monkeypatch):
    q, k, v_tgt, v_ref, flow, mask = args = _finite_inputs(dtype, path, monkeypatch)
    f = flow[0]
    if where in ("q", "k"):
        _plant_in_q_or_k(q, k, where, value)
    elif where == "v_tgt":  # read at key 5 (weight 0.5); not at key 7, whose weight 1 takes v_ref alone
        mask[0, 5], mask[0, 7] = 0.5, 1.0
        v_tgt[0, 0, 5, 2] = v_tgt[0, 0, 7, 3] = value
    elif where == "v_ref":  # read through key 5 (weight 0.5); not through key 7, whose weight 0 takes v_tgt alone
        mask[0, 5], mask[0, 7] = 0.5, 0.0
        v_ref[0, 0, f[5], 2] = v_ref[0, 0, f[7], 3] = value
    else:
        mask[0, 5] = value
    out, lse = ama_attention(*args, return_lse=True)
    want, want_lse = ama_attention_reference(*args, return_lse=True)
    torch.testing.assert_close(out, want, atol=atol, rtol=atol, equal_nan=True)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5, equal_nan=True)
    if where in ("q", "k"):
        m = mask[:, None, :, None].float()
        v_w = (m * attn_mod._gather_rows(v_ref.float(), flow) + (1 - m) * v_tgt.float()).to(dtype)
        _check_q_or_k(out, lse, q, k, v_w, where, value, atol)
    elif where == "mask":  # V_w[0, :, 5] = value * v_ref[flow] + (1 - value) * v_tgt: never finite
        assert out.isnan().all() if value != value else not out.isfinite().any()
        assert lse.isfinite().all()
    else:
        assert out[0, 0, :, 2].isnan().all() if value != value else (out[0, 0, :, 2] == value).all()
        assert out[0, 0, :, :2].isfinite().all() and out[0, 0, :, 3:].isfinite().all() and out[0, 1].isfinite().all()


# ---------------------------------------------------------------------------------------------- CUDA, SD sizes
GPU_SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 256, 93, 160),
              (2, 8, 64, 64, 160), (2, 10, 1024, 77, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype, atol", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_attention_cuda_sd_sizes(shape, dtype, atol):
    q, k, v = _qkv(*shape, dtype, device="cuda")
    out, lse = attention(q, k, v, return_lse=True)
    oracle, oracle_lse = attention_reference(q.float(), k.float(), v.float(), return_lse=True)
    _assert_within_2x(out, _torch_same_precision(q, k, v), oracle, atol)
    torch.testing.assert_close(lse, oracle_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 8, 4096, 4096, 40), (2, 8, 1024, 1024, 80)], ids=shape_id)
def test_ama_cuda_sd_sizes(shape):
    B, H, _, Lk, D = shape
    q, k, v_tgt = _qkv(*shape, torch.float16, device="cuda")
    v_ref, flow, mask = _ama_extra(B, H, Lk, D, torch.float16, device="cuda")
    out = ama_attention(q, k, v_tgt, v_ref, flow, mask)
    f = lambda t: t.float()
    oracle = ama_attention_reference(f(q), f(k), f(v_tgt), f(v_ref), flow, mask)
    m = mask[:, None, :, None]
    v_w = (m * attn_mod._gather_rows(v_ref.float(), flow) + (1 - m) * v_tgt.float()).half()
    _assert_within_2x(out, _torch_same_precision(q, k, v_w), oracle, 1e-4)
    ident = torch.arange(Lk, device="cuda").expand(B, Lk)
    torch.testing.assert_close(ama_attention(q, k, v_tgt, v_ref, ident, torch.ones_like(mask)), attention(q, k, v_ref))


@pytest.mark.gpu
def test_attention_cuda_gradients():
    q, k, v = (t.detach().requires_grad_(True) for t in _qkv(2, 8, 1024, 77, 40, torch.float32, device="cuda"))
    got = torch.autograd.grad(attention(q, k, v).square().sum(), (q, k, v))
    want = torch.autograd.grad(attention_reference(q, k, v).square().sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
