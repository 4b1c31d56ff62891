"""dreamfuse::attention and dreamfuse::ama_attention against their fp64 oracle.

On CPU the Triton code runs through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the
`gpu`-marked tests repeat the comparisons on CUDA at SD sizes (`TRITON_INTERPRET=0 pytest -m gpu`).
Accuracy criterion (flash-attention's tests): the kernel is at most twice as far from the fp64 oracle as
PyTorch computing in the same precision, plus a small atol.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from dreamfuse.kernels import _common
from dreamfuse.kernels.attention import ama_attention, ama_attention_reference, attention, attention_reference

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
        (lambda q, k, v: (q.numpy(), k, v), "must be a tensor"),
    ],
    ids=["rank", "batch", "heads", "head_dim", "lk", "no_keys", "dtype_mix", "fp64", "int", "device", "d257",
         "numpy"],
)
def test_attention_rejects_bad_inputs(make, match):
    q, k, v = _bad(make)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v)


def test_attention_opcheck():
    q, k, v = _qkv(1, 2, 9, 11, 24, torch.float32)
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


def test_ama_opcheck():
    q, k, v_tgt = _qkv(1, 1, 6, 10, 16, torch.float32)
    v_ref, flow, mask = _ama_extra(1, 1, 10, 16, torch.float32)
    torch.library.opcheck(torch.ops.dreamfuse.ama_attention.default, (q, k, v_tgt, v_ref, flow, mask, 0.25))


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
