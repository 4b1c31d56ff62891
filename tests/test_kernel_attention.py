"""Fused attention and AMA kernels vs their fp64 oracle (Triton interpreter on CPU; `-m gpu` on CUDA)."""

import pytest
import torch
from dreamfuse.kernels import _common
from dreamfuse.kernels.attention import ama_attention, ama_attention_reference, attention, attention_reference

# (B, H, Lq, Lk, D): Lq != Lk, 77 text keys, 93 = 77 + 16 image-prompt keys, lengths off the block grid,
# head dims 40/80/160 (padded in-kernel) and 24 (< 32), 64.
SHAPES = [(1, 2, 33, 77, 40), (2, 1, 100, 67, 80), (1, 1, 20, 93, 160), (1, 2, 17, 17, 64), (1, 1, 5, 130, 24)]
DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)]


def _inputs(B, H, Lq, Lk, D, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    # q as a transposed (B, L, H, D) view: the layout the attention processors pass
    q = torch.randn(B, Lq, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, H, Lk, D, generator=g)
    v = torch.randn(B, H, Lk, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _assert_close_to_oracle(out, same_precision, oracle, atol):
    """flash-attention's criterion: the kernel is at most twice as far from the fp64 oracle as PyTorch in the
    same precision, plus atol."""
    err = (out.double() - oracle).abs().max().item()
    ref_err = (same_precision.double() - oracle).abs().max().item()
    assert err <= 2 * ref_err + atol, f"kernel err {err:.3g} vs torch err {ref_err:.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_attention_matches_oracle(shape, dtype, atol):
    q, k, v = _inputs(*shape, dtype)
    assert _common.use_triton(q)  # the Triton code runs (interpreted), not the reference
    out, lse = attention(q, k, v, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == shape[:2] + (shape[2],)
    assert lse.dtype == torch.float32
    oracle, oracle_lse = attention_reference(q.double(), k.double(), v.double(), return_lse=True)
    same = torch.nn.functional.scaled_dot_product_attention(q, k, v) if dtype != torch.float32 else oracle
    _assert_close_to_oracle(out, same, oracle, atol)
    torch.testing.assert_close(lse.double(), oracle_lse, atol=1e-4, rtol=1e-5)


def test_custom_scale_and_strided_kv():
    q, k, v = _inputs(2, 2, 19, 45, 40, torch.float32, seed=1)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, D) storage for k and v too
    v = v.transpose(1, 2).contiguous().transpose(1, 2)
    out = attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, attention_reference(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda q, k, v: (q[0], k, v), "rank"),
        (lambda q, k, v: (q, k[:1], v), "batch"),
        (lambda q, k, v: (q, k, v[:, :1]), "heads"),
        (lambda q, k, v: (q, k[..., :8], v), "head_dim"),
        (lambda q, k, v: (q, k, v[:, :, :3]), "keys"),
        (lambda q, k, v: (q, k.half(), v), "dtype"),
        (lambda q, k, v: (q.int(), k, v), "dtype"),
        (lambda q, k, v: (torch.zeros(1, 1, 4, 300), torch.zeros(1, 1, 4, 300), torch.zeros(1, 1, 4, 300)), "256"),
    ],
)
def test_bad_inputs_raise_value_error(make, field):
    q, k, v = _inputs(2, 2, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=field):
        attention(*make(q, k, v))


def test_opcheck_attention():
    q, k, v = _inputs(1, 1, 9, 11, 16, torch.float32)
    torch.library.opcheck(torch.ops.dreamfuse.attention.default, (q, k, v, 0.25))


def test_gradients_match_reference_autograd():
    q, k, v = (t.detach().requires_grad_(True) for t in _inputs(1, 2, 13, 21, 24, torch.float32, seed=3))
    out, lse = attention(q, k, v, return_lse=True)
    (out.square().sum() + lse.sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o2, l2 = attention_reference(q2, k2, v2, return_lse=True)
    (o2.square().sum() + l2.sum()).backward()
    for got, want in zip(grads, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_traces_as_one_op_under_torch_compile():
    q, k, v = _inputs(1, 1, 8, 8, 16, torch.float32)
    f = torch.compile(lambda q, k, v: attention(q, k, v) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(q, k, v), attention_reference(q, k, v) * 2, atol=1e-5, rtol=1e-5)


def test_env_switch_disables_kernels(monkeypatch):
    q, _, _ = _inputs(1, 1, 4, 4, 16, torch.float32)
    monkeypatch.setenv("DREAMFUSE_DISABLE_KERNELS", "1")
    assert not _common.use_triton(q)


# ---------------------------------------------------------------------------------------------- AMA
def _ama_inputs(B, H, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, vt = _inputs(B, H, Lq, Lk, D, dtype, seed)
    vr = torch.randn(B, H, Lk, D, generator=g).to(dtype)
    flow = torch.randint(0, Lk, (B, Lk), generator=g)
    mask = torch.rand(B, Lk, generator=g)
    return q, k, vt, vr, flow, mask


@pytest.mark.parametrize("shape", [(2, 2, 30, 50, 40), (1, 1, 64, 64, 80), (1, 2, 17, 33, 20)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_ama_matches_oracle(shape, dtype, atol):
    q, k, vt, vr, flow, mask = _ama_inputs(*shape, dtype)
    out = ama_attention(q, k, vt, vr, flow, mask)
    oracle = ama_attention_reference(q.double(), k.double(), vt.double(), vr.double(), flow, mask.double())
    same = ama_attention_reference(q, k, vt, vr, flow, mask)
    _assert_close_to_oracle(out, same, oracle, atol)


def test_ama_limits():
    q, k, vt, vr, flow, mask = _ama_inputs(1, 2, 21, 37, 40, torch.float32, seed=5)
    ident = torch.arange(37)[None]
    torch.testing.assert_close(ama_attention(q, k, vt, vr, flow, torch.zeros_like(mask)), attention(q, k, vt),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ama_attention(q, k, vt, vr, ident, torch.ones_like(mask)), attention(q, k, vr),
                               atol=1e-5, rtol=1e-5)
    out32 = ama_attention(q, k, vt, vr, flow.int(), mask.half(), return_lse=True)
    torch.testing.assert_close(out32[1], attention(q, k, vt, return_lse=True)[1])  # lse does not see values


def test_ama_bad_inputs_and_opcheck():
    q, k, vt, vr, flow, mask = _ama_inputs(1, 1, 6, 10, 16, torch.float32)
    with pytest.raises(ValueError, match="flow"):
        ama_attention(q, k, vt, vr, flow.float(), mask)
    with pytest.raises(ValueError, match="mask"):
        ama_attention(q, k, vt, vr, flow, mask[:, :5])
    with pytest.raises(ValueError, match="v_ref"):
        ama_attention(q, k, vt, vr[..., :8], flow, mask)
    with pytest.raises(ValueError, match="flow"):
        ama_attention_reference(q, k, vt, vr, flow + 100, mask)
    torch.library.opcheck(torch.ops.dreamfuse.ama_attention.default, (q, k, vt, vr, flow, mask, 0.25))


# ---------------------------------------------------------------------------------------------- CUDA, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("Lq, Lk, D", [(4096, 4096, 40), (1024, 1024, 80), (256, 77, 160), (4096, 77, 40)])
@pytest.mark.parametrize("dtype, atol", DTYPES[1:], ids=["fp16", "bf16"])
def test_attention_cuda_real_sizes(Lq, Lk, D, dtype, atol):
    q, k, v = _inputs(2, 8, Lq, Lk, D, dtype, device="cuda")
    out, lse = attention(q, k, v, return_lse=True)
    oracle, oracle_lse = attention_reference(q.float(), k.float(), v.float(), return_lse=True)
    same = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    _assert_close_to_oracle(out, same, oracle.double(), atol)
    torch.testing.assert_close(lse, oracle_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
def test_ama_cuda_real_size():
    q, k, vt, vr, flow, mask = (t.cuda() for t in _ama_inputs(2, 8, 4096, 4096, 40, torch.float16))
    out = ama_attention(q, k, vt, vr, flow, mask)
    oracle = ama_attention_reference(q.float(), k.float(), vt.float(), vr.float(), flow, mask)
    same = ama_attention_reference(q, k, vt, vr, flow, mask)
    _assert_close_to_oracle(out, same, oracle.double(), 1e-3)
