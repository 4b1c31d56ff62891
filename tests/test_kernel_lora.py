"""lora_delta (grouped multi-LoRA shrink/expand) vs its references (Triton interpreter on CPU; `-m gpu` on CUDA).

Oracle: :func:`lora_delta_reference` in fp64 on the same (rounded) inputs; a precision passes when
``err(kernel) <= 2 * err(the per-segment torch matmuls at that precision) + atol``. The adapter pools hold NaN past
each adapter's rank (and, in one test, inf there and NaN in a whole unused slot): the kernels must never let what
lies there reach the output.
"""

import math

import pytest
import torch
from dreamfuse.kernels import lora as lora_mod
from dreamfuse.kernels._common import use_triton
from dreamfuse.kernels.lora import lora_delta, lora_delta_reference, lora_segments

DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)]  # (dtype, atol)
DTYPE_IDS = ["fp32", "fp16", "bf16"]
TRITON = use_triton(torch.empty(0))  # the interpreter here (tests/conftest.py)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pool(ranks, r_max, d_in, d_out, dtype, seed=0, device="cpu", garbage=float("nan")):
    """A stacked pool ``(A (N, r_max, d_in), B (N, d_out, r_max), ranks (N,) int32)`` with deltas of order 1; the
    lanes past each rank hold ``garbage`` (a pool slot reused by a lower-rank adapter is not zeroed)."""
    g = _gen(seed)
    N = len(ranks)
    A = torch.randn(N, r_max, d_in, generator=g) / math.sqrt(d_in)
    B = torch.randn(N, d_out, r_max, generator=g) / math.sqrt(r_max)
    for n, r in enumerate(ranks):
        A[n, r:] = garbage
        B[n, :, r:] = garbage
    rk = torch.tensor(ranks, dtype=torch.int32)
    return A.to(device, dtype), B.to(device, dtype), rk.to(device)


def _x(T, d, dtype, seed=1, device="cpu"):
    return torch.randn(T, d, generator=_gen(seed)).to(device, dtype)


def _torch_same_precision(x, A, B, ranks, starts, adapter, scale, base=None):
    """What a user writes at the inputs' precision: per segment and slot, ``scale * (x @ A^T) @ B^T`` added up."""
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    st, ad, sc, rk = starts.tolist(), adapter.tolist(), scale.tolist(), ranks.tolist()
    for s, (lo, hi) in enumerate(zip(st, st[1:])):
        for a, w in zip(ad[s], sc[s]):
            if a >= 0 and w != 0 and rk[a] > 0 and hi > lo:
                r = rk[a]
                out[lo:hi] += w * ((x[lo:hi] @ A[a, :r].T) @ B[a, :, :r].T)
    return out if base is None else out + base


def _oracle(x, A, B, ranks, starts, adapter, scale, base=None):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return lora_delta_reference(d(x), d(A), d(B), ranks, starts, adapter, scale, d(base))


def _assert_within(got, want64, naive, atol):
    assert torch.isfinite(got).all(), "non-finite output (pool garbage leaked?)"
    err = (got.double() - want64).abs().max().item() if got.numel() else 0.0
    err_torch = (naive.double() - want64).abs().max().item() if got.numel() else 0.0
    assert err <= 2 * err_torch + atol, f"kernel err {err:.3g} vs torch err {err_torch:.3g} (+ atol {atol})"


# Segment layouts: (rows as (adapter, scale) pairs, tokens per row). The interpreter's token tile is 16 tokens,
# so these cut tiles at odd places: segments of 0, 1 and 2 tokens, segments straddling tiles, a tile holding 4.
LAYOUTS = {
    # three rows, three adapters of different ranks
    "rows": ([[(0, 1.0)], [(1, 0.7)], [(2, 1.3)]], 13),
    # no-adapter rows interleaved, empty rows, a one-token row, several adapters on one row (the same adapter
    # twice: scales add), scale 0 (an adapter switched off), negative scale
    "edges": ([[(1, 1.0)], [], [(0, 0.5), (2, -1.5)], [(3, 0.0)], [(2, 1.0)], [], [(1, 0.6), (1, 0.4), (3, 2.0)],
               [(0, 1.0)]],
              [5, 0, 1, 17, 0, 2, 9, 11]),
    "one-token": ([[(2, 0.8)]], 1),
    "no-adapter": ([[], [], []], 7),
}


def _layout(name, device="cpu"):
    rows, tokens = LAYOUTS[name]
    return lora_segments(rows, tokens, device=device)


# ----------------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_base", [False, True], ids=["delta", "base"])
def test_matches_oracle(layout, dtype, atol, with_base):
    starts, adapter, scale = _layout(layout)
    T, d_in, d_out = int(starts[-1]), 40, 50  # T: 45, 1 or 21 -- never a multiple of the 16-token tile
    A, B, ranks = _pool([16, 3, 1, 7], 16, d_in, d_out, dtype)
    x = _x(T, d_in, dtype)
    base = _x(T, d_out, dtype, seed=2) if with_base else None
    got = lora_delta(x, A, B, ranks, starts, adapter, scale, base=base)
    assert got.shape == (T, d_out) and got.dtype == dtype and got.is_contiguous()
    want = _oracle(x, A, B, ranks, starts, adapter, scale, base)
    _assert_within(got, want, _torch_same_precision(x, A, B, ranks, starts, adapter, scale, base), atol)


@pytest.mark.parametrize("r_max, ranks", [(1, [1, 0]), (5, [5, 1, 3]), (16, [16, 4]), (64, [64, 8]),
                                          (128, [128, 1, 17])], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype, atol", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_ranks(r_max, ranks, dtype, atol):
    """rank 1, ranks that are not powers of two, r_max up to 128, rank 0 (an empty adapter: no delta)."""
    rows = [[(n, 1.0)] for n in range(len(ranks))] + [[(n, 0.5) for n in range(len(ranks))]]
    starts, adapter, scale = lora_segments(rows, 6)
    A, B, rk = _pool(ranks, r_max, 33, 20, dtype, seed=r_max)
    x = _x(int(starts[-1]), 33, dtype, seed=3)
    got = lora_delta(x, A, B, rk, starts, adapter, scale)
    want = _oracle(x, A, B, rk, starts, adapter, scale)
    _assert_within(got, want, _torch_same_precision(x, A, B, rk, starts, adapter, scale), atol)
    if 0 in ranks:
        row = ranks.index(0)
        assert torch.equal(got[6 * row:6 * row + 6], torch.zeros_like(got[:6]))


def test_three_rows_three_adapters_equal_three_separate_calls_exactly():
    """The server's contract at kernel level: a row's delta does not depend on what else is in the batch. One call
    with three rows carrying three different adapters equals, bit for bit in fp32, three calls each computing one
    row with its own adapter alone -- on the op's path and on the reference's."""
    L, d_in, d_out = 13, 40, 50  # 13 tokens a row: rows start mid-tile, so the batch's tiles differ from solo ones
    A, B, ranks = _pool([16, 5, 9], 16, d_in, d_out, torch.float32, seed=4)
    x = _x(3 * L, d_in, torch.float32, seed=5)
    scales = [1.0, 0.7, -1.3]
    starts, adapter, scale = lora_segments([[(n, scales[n])] for n in range(3)], L)
    for fn in (lora_delta, lora_delta_reference):
        batched = fn(x, A, B, ranks, starts, adapter, scale)
        for n in range(3):
            s1, a1, w1 = lora_segments([[(n, scales[n])]], L)
            solo = fn(x[n * L:(n + 1) * L], A, B, ranks, s1, a1, w1)
            assert torch.equal(batched[n * L:(n + 1) * L], solo), f"{fn.__name__}: row {n} differs from its solo call"
    # and each equals the plain per-adapter torch computation it stands for
    want = lora_delta_reference(x.double(), A.double(), B.double(), ranks, starts, adapter, scale)
    for n in range(3):
        r = ranks[n].item()
        plain = scale[n, 0].item() * (x[n * L:(n + 1) * L].double() @ A[n, :r].double().T) @ B[n, :, :r].double().T
        torch.testing.assert_close(want[n * L:(n + 1) * L], plain, atol=1e-12, rtol=1e-12)


def test_several_adapters_on_a_row_add_up():
    A, B, ranks = _pool([8, 4, 16], 16, 40, 24, torch.float32, seed=6)
    x = _x(21, 40, torch.float32, seed=7)
    both = lora_segments([[(0, 0.9), (2, -0.4)]], 21)
    one, two = lora_segments([[(0, 0.9)]], 21), lora_segments([[(2, -0.4)]], 21)
    got = lora_delta(x, A, B, ranks, *both)
    torch.testing.assert_close(got, lora_delta(x, A, B, ranks, *one) + lora_delta(x, A, B, ranks, *two),
                               atol=1e-6, rtol=1e-5)
    # the same adapter in two slots: the scales add
    twice = lora_segments([[(1, 0.25), (1, 0.5)]], 21)
    torch.testing.assert_close(lora_delta(x, A, B, ranks, *twice),
                               lora_delta(x, A, B, ranks, *lora_segments([[(1, 0.75)]], 21)), atol=1e-6, rtol=1e-5)


def test_rows_without_a_live_slot_are_base_exactly():
    """-1 slots, scale 0, rank 0 and tokens outside every segment: exactly ``base`` (0 without it), and x there is
    not read (NaN in those rows stays out of the output)."""
    A, B, ranks = _pool([8, 0], 8, 40, 24, torch.float16, seed=8)
    T = 40
    starts = torch.tensor([3, 10, 18, 25, 33], dtype=torch.int32)  # tokens 0-2 and 33-39 in no segment
    adapter = torch.tensor([[0], [-1], [0], [1]], dtype=torch.int32)
    scale = torch.tensor([[1.0], [1.0], [0.0], [1.0]])  # live, -1, scale 0, rank 0
    x = _x(T, 40, torch.float16, seed=9)
    idle = torch.ones(T, dtype=torch.bool)
    idle[3:10] = False
    x[idle] = float("nan")
    base = _x(T, 24, torch.float16, seed=10)
    out = lora_delta(x, A, B, ranks, starts, adapter, scale, base=base)
    assert torch.equal(out[idle], base[idle])
    assert torch.isfinite(out).all() and not torch.equal(out[3:10], base[3:10])
    delta = lora_delta(x, A, B, ranks, starts, adapter, scale)
    assert torch.equal(delta[idle], torch.zeros_like(delta[idle]))
    # every row without adapter, and no segment at all
    none = lora_segments([[], []], 20)
    assert torch.equal(lora_delta(x, A, B, ranks, *none, base=base), base)
    empty = (torch.zeros(1, dtype=torch.int32), torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, 1))
    assert torch.equal(lora_delta(x, A, B, ranks, *empty), torch.zeros(T, 24, dtype=torch.float16))


def test_pool_contents_past_ranks_and_in_unused_slots_are_ignored():
    A, B, ranks = _pool([4, 9, 16], 16, 40, 24, torch.float32, seed=11, garbage=0.0)
    A2, B2, _ = _pool([4, 9, 16], 16, 40, 24, torch.float32, seed=11, garbage=float("inf"))
    A2[1], B2[1] = float("nan"), float("nan")  # adapter 1 unused below
    segs = lora_segments([[(0, 1.0)], [(2, 0.5)], [], [(0, 0.3), (2, 0.3)]], 9)
    x = _x(36, 40, torch.float32, seed=12)
    assert torch.equal(lora_delta(x, A2, B2, ranks, *segs), lora_delta(x, A, B, ranks, *segs))


def test_leading_axes_and_strided_inputs():
    """x (B, L, C) as a processor holds it, base likewise; row-strided x (a column slice) and a pool whose last
    axis is not unit-stride (copied by the launcher) give the same result."""
    Bsz, L, d_in, d_out = 3, 11, 40, 24
    A, B, ranks = _pool([8, 5], 8, d_in, d_out, torch.float32, seed=13)
    segs = lora_segments([[(0, 1.0)], [], [(1, 2.0), (0, 0.5)]], L)
    wide = _x(Bsz * L, d_in + 9, torch.float32, seed=14)
    x = wide[:, 4:4 + d_in]  # row stride d_in + 9
    base = _x(Bsz * L, d_out, torch.float32, seed=15)
    want = lora_delta_reference(x.contiguous(), A, B, ranks, *segs, base)
    out = lora_delta(x.reshape(Bsz, L, d_in), A, B, ranks, *segs, base=base.view(Bsz, L, d_out))
    assert out.shape == (Bsz, L, d_out)
    torch.testing.assert_close(out.reshape(-1, d_out), want, atol=1e-5, rtol=1e-5)
    At = A.transpose(1, 2).contiguous().transpose(1, 2)  # (N, r_max, d_in) with d_in strided
    assert At.stride(-1) != 1
    torch.testing.assert_close(lora_delta(x, At, B, ranks, *segs, base=base), want, atol=1e-5, rtol=1e-5)
    # 1-D seg_adapter / seg_scale: one slot a segment
    starts, ad, sc = lora_segments([[(1, 0.5)], [(0, 1.0)]], L)
    torch.testing.assert_close(lora_delta(x[:2 * L], A, B, ranks, starts, ad[:, 0], sc[:, 0]),
                               lora_delta(x[:2 * L], A, B, ranks, starts, ad, sc))


def test_empty_shapes():
    A, B, ranks = _pool([4], 4, 40, 24, torch.float32)
    segs = lora_segments([[(0, 1.0)]], 0)
    assert lora_delta(torch.zeros(0, 40), A, B, ranks, *segs).shape == (0, 24)
    A0, B0, _ = _pool([4], 4, 40, 0, torch.float32)
    assert lora_delta(_x(5, 40, torch.float32), A0, B0, ranks, *lora_segments([[(0, 1.0)]], 5)).shape == (5, 0)
    # d_in = 0: A x = 0
    Ae, Be, _ = _pool([4], 4, 0, 24, torch.float32)
    out = lora_delta(torch.zeros(5, 0), Ae, Be, ranks, *lora_segments([[(0, 1.0)]], 5))
    assert torch.equal(out, torch.zeros(5, 24))


# ----------------------------------------------------------------------------------------------- the segments
def test_lora_segments_format():
    starts, adapter, scale = lora_segments([[(3, 1.0)], [(3, 1.0)], [], [(1, 0.5), (2, 0.25)], []], [4, 4, 7, 1, 2])
    assert starts.dtype == torch.int32 and adapter.dtype == torch.int32 and scale.dtype == torch.float32
    assert starts.tolist() == [0, 8, 15, 16, 18]  # rows 0-1 merged (identical pairs)
    assert adapter.tolist() == [[3, -1], [-1, -1], [1, 2], [-1, -1]]
    assert scale.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.5, 0.25], [0.0, 0.0]]
    starts, adapter, scale = lora_segments([[], []], 77)
    assert starts.tolist() == [0, 154] and adapter.tolist() == [[-1]] and scale.shape == (1, 1)
    starts, adapter, _ = lora_segments([], 5)
    assert starts.tolist() == [0] and adapter.shape == (0, 1)
    with pytest.raises(ValueError, match="token counts"):
        lora_segments([[], []], [3])
    with pytest.raises(ValueError, match="adapter"):
        lora_segments([[(-2, 1.0)]], 3)


# ----------------------------------------------------------------------------------------------- the traced path
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dense_formulation_matches_reference(layout):
    """The op's body off CUDA (what torch.compile / torch.export trace: no value read on the host)."""
    starts, adapter, scale = _layout(layout)
    A, B, ranks = _pool([16, 3, 1, 7], 16, 40, 50, torch.float64)
    x = _x(int(starts[-1]), 40, torch.float64)
    base = _x(int(starts[-1]), 50, torch.float64, seed=2)
    for b in (None, base):
        got = lora_mod._lora_delta_dense(x, A, B, ranks, starts, adapter, scale, b)
        torch.testing.assert_close(got, lora_delta_reference(x, A, B, ranks, starts, adapter, scale, b),
                                   atol=1e-12, rtol=1e-12)


def _small_case(dtype=torch.float32):
    A, B, ranks = _pool([8, 3], 8, 24, 20, dtype, seed=16)
    segs = lora_segments([[(0, 1.0)], [], [(1, 0.5), (0, 0.25)]], 7)
    x = _x(21, 24, dtype, seed=17)
    base = _x(21, 20, dtype, seed=18)
    return x, A, B, ranks, segs, base


def test_opcheck():
    x, A, B, ranks, segs, base = _small_case()
    op = torch.ops.dreamfuse.lora_delta.default
    torch.library.opcheck(op, (x, A, B, ranks, *segs, None))
    torch.library.opcheck(op, (x, A, B, ranks, *segs, base))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiles_fullgraph(backend):
    """One op in the graph; aot_eager decomposes it into its body (the dense formulation on CPU)."""
    x, A, B, ranks, segs, base = _small_case()
    f = torch.compile(lambda x, base: lora_delta(x, A, B, ranks, *segs, base=base) * 2, fullgraph=True,
                      backend=backend)
    torch.testing.assert_close(f(x, base), lora_delta_reference(x, A, B, ranks, *segs, base) * 2, atol=1e-5,
                               rtol=1e-5)


def test_exports_as_one_op():
    x, A, B, ranks, (starts, adapter, scale), base = _small_case()

    class Layer(torch.nn.Module):
        def forward(self, x, starts, adapter, scale, base):
            return lora_delta(x, A, B, ranks, starts, adapter, scale, base=base)

    S, K = torch.export.Dim("segments", max=1024), torch.export.Dim("slots", max=16)  # not "S": sympy's
    dynamic = dict(x=None, starts={0: S + 1}, adapter={0: S, 1: K}, scale={0: S, 1: K}, base=None)
    ep = torch.export.export(Layer(), (x, starts, adapter, scale, base), dynamic_shapes=dynamic)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.dreamfuse.lora_delta.default) == 1
    # the segment layout is data: another batch composition (other S and K) runs through the same program
    segs2 = lora_segments([[(1, 2.0)], [(0, 1.0)], [], [(1, 0.5), (0, 0.5), (1, 1.0)]], [7, 3, 4, 7])
    for segs in ((starts, adapter, scale), segs2):
        torch.testing.assert_close(ep.module()(x, *segs, base), lora_delta_reference(x, A, B, ranks, *segs, base),
                                   atol=1e-5, rtol=1e-5)


def test_kernels_can_be_switched_off(monkeypatch):
    x, A, B, ranks, segs, base = _small_case(torch.float16)
    monkeypatch.setenv("DREAMFUSE_DISABLE_KERNELS", "1")
    assert torch.equal(lora_delta(x, A, B, ranks, *segs, base=base), lora_delta_reference(x, A, B, ranks, *segs, base))


# ----------------------------------------------------------------------------------------------- validation
def _bad_cases():
    x, A, B, ranks, (st, ad, sc), base = _small_case()
    return [
        ((x[0, 0], A, B, ranks, st, ad, sc), "x must be a tensor"),
        ((x[:, :5], A, B, ranks, st, ad, sc), "lora_a shape"),
        ((x.int(), A, B, ranks, st, ad, sc), "x dtype"),
        ((x, A[0], B, ranks, st, ad, sc), "lora_a"),
        ((x, A[:, :, :5], B, ranks, st, ad, sc), "lora_a shape"),
        ((x, A.half(), B, ranks, st, ad, sc), "lora_a dtype"),
        ((x, A, B[:, :, :3], ranks, st, ad, sc), "lora_b"),
        ((x, A, B[:1], ranks, st, ad, sc), "lora_b"),
        ((x, torch.zeros(2, 129, 24), torch.zeros(2, 20, 129), ranks, st, ad, sc), "r_max"),
        ((x, A, B, ranks[:1], st, ad, sc), "ranks"),
        ((x, A, B, ranks.long(), st, ad, sc), "ranks must be int32"),
        ((x, A, B, ranks, st.long(), ad, sc), "seg_starts must be int32"),
        ((x, A, B, ranks, st[None], ad, sc), "seg_starts"),
        ((x, A, B, ranks, st[:-1], ad, sc), "seg_adapter"),
        ((x, A, B, ranks, st, ad.long(), sc), "seg_adapter must be int32"),
        ((x, A, B, ranks, st, ad, sc[:, :1]), "seg_scale shape"),
        ((x, A, B, ranks, st, ad, sc.double()), "seg_scale must be float32"),
        ((x, A, B, ranks, st, ad[:, :0], sc[:, :0]), "seg_adapter"),
        ((x, A, B, ranks, st, ad, sc, base[:, :3]), "base"),
        ((x, A, B, ranks, st, ad, sc, base.half()), "base dtype"),
        ((x, A, B, ranks, st, ad, sc, "base"), "base must be a tensor"),
        ((x, A, B, [8, 3], st, ad, sc), "ranks must be a tensor"),
    ]


@pytest.mark.parametrize("args, field", _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs(args, field):
    *args, = args
    base = args.pop(7) if len(args) > 7 else None
    with pytest.raises(ValueError, match=field):
        lora_delta(*args, base=base)


def test_reference_rejects_bad_values():
    x, A, B, ranks, (st, ad, sc), _ = _small_case()
    cases = [
        (x, A, B, ranks, torch.tensor([0, 9, 7, 21], dtype=torch.int32), ad, sc),  # decreasing
        (x, A, B, ranks, torch.tensor([0, 7, 14, 22], dtype=torch.int32), ad, sc),  # past T
        (x, A, B, ranks, st, torch.tensor([[0, -1], [2, -1], [1, 0]], dtype=torch.int32), sc),  # adapter >= N
        (x, A, B, torch.tensor([9, 3], dtype=torch.int32), st, ad, sc),  # rank > r_max
    ]
    for args, field in zip(cases, ["seg_starts", "seg_starts", "seg_adapter", "ranks"]):
        with pytest.raises(ValueError, match=field):
            lora_delta_reference(*args)


@pytest.mark.skipif(not TRITON, reason="a property of the Triton path")
def test_kernel_skips_out_of_range_values():
    """Unchecked on the Triton path (a check would synchronize the GPU): an adapter index >= N is no adapter, a
    rank past r_max is r_max -- never an out-of-bounds read."""
    x, A, B, ranks, (st, ad, sc), _ = _small_case()
    bad = ad.clone()
    bad[0, 0] = 7
    want = lora_delta(x, A, B, ranks, st, torch.where(bad == 7, -1, bad), sc)
    assert torch.equal(lora_delta(x, A, B, ranks, st, bad, sc), want)
    big = torch.tensor([8, 100], dtype=torch.int32)
    A8, B8, r8 = _pool([8, 8], 8, 24, 20, torch.float32, seed=16, garbage=0.0)
    torch.testing.assert_close(lora_delta(x, A8, B8, big, st, ad, sc), lora_delta(x, A8, B8, r8, st, ad, sc))


def test_bench_script_runs(capsys, monkeypatch):
    from bench import multi_lora_kernel

    monkeypatch.setenv("DREAMFUSE_DISABLE_KERNELS", "1")  # the CPU path it times outside the interpreter
    multi_lora_kernel.main(["--device", "cpu", "--quick", "--rows", "2", "--adapters", "2", "--rank", "4"])
    out = capsys.readouterr().out
    assert "| layer" in out and "loop/mixed" in out and out.count("\n|") >= 4


# ----------------------------------------------------------------------------------------------- GPU, SD sizes
# (rows, tokens a row, d_in, d_out): SD 1.5's attention projections at each level (64² ... 8² latents at 512²),
# the GEGLU projection and its output at 16², the text encoder's 77 tokens (CLIP-L 768), SDXL's 2048-d context.
GPU_SHAPES = [(16, 4096, 320, 320), (16, 1024, 640, 640), (16, 256, 1280, 1280), (16, 64, 1280, 1280),
              (8, 256, 1280, 10240), (8, 256, 5120, 1280), (16, 77, 768, 768), (4, 1024, 2048, 640)]
GPU_RANKS = [4, 8, 16, 64, 128, 1, 32, 16, 8, 4, 64, 16, 128, 8, 16, 4]


def _gpu_layout(rows, L, n_adapters, device):
    """Row i carries adapter i % n_adapters; every fourth row has none, every fifth a second adapter."""
    pairs = []
    for i in range(rows):
        p = [] if i % 4 == 3 else [(i % n_adapters, 0.5 + 0.1 * (i % 7))]
        if i % 5 == 1:
            p.append(((i + 3) % n_adapters, -0.8))
        pairs.append(p)
    return lora_segments(pairs, L, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_cuda_sd_sizes(shape, dtype, atol):
    rows, L, d_in, d_out = shape
    A, B, ranks = _pool(GPU_RANKS, 128, d_in, d_out, dtype, device="cuda")
    segs = _gpu_layout(rows, L, len(GPU_RANKS), "cuda")
    x = _x(rows * L, d_in, dtype, device="cuda")
    base = _x(rows * L, d_out, dtype, seed=2, device="cuda")
    got = lora_delta(x, A, B, ranks, *segs, base=base)
    want = lora_delta_reference(x.float(), A.float(), B.float(), ranks, *segs, base.float())
    _assert_within(got, want.double(), _torch_same_precision(x, A, B, ranks, *segs, base), atol)


@pytest.mark.gpu
@pytest.mark.parametrize("r_max", [16, 5])
def test_cuda_three_rows_equal_solo_calls_exactly(r_max):
    L, d = 1000, 640  # rows start mid-tile: the batched call's token tiles are not the solo calls'
    A, B, ranks = _pool([r_max, 3, 1], r_max, d, d, torch.float16, device="cuda", seed=3)
    x = _x(3 * L, d, torch.float16, device="cuda")
    batched = lora_delta(x, A, B, ranks, *lora_segments([[(n, 1.0)] for n in range(3)], L, device="cuda"))
    for n in range(3):
        solo = lora_delta(x[n * L:(n + 1) * L].clone(), A, B, ranks, *lora_segments([[(n, 1.0)]], L, device="cuda"))
        assert torch.equal(batched[n * L:(n + 1) * L], solo)


@pytest.mark.gpu
def test_cuda_compiles_with_inductor_and_graph_replays():
    """Inductor embeds the two kernels; a CUDA graph of the call replays with a new batch composition written into
    the same segment tensors (no recompilation, no host read)."""
    A, B, ranks = _pool([16, 8, 4], 16, 640, 640, torch.float16, device="cuda")
    x = _x(4 * 1024, 640, torch.float16, device="cuda")
    base = _x(4 * 1024, 640, torch.float16, seed=2, device="cuda")
    segs = lora_segments([[(0, 1.0)], [(1, 0.5)], [], [(2, 1.0), (0, 0.3)]], 1024, device="cuda")
    f = torch.compile(lambda x, b, *s: lora_delta(x, A, B, ranks, *s, base=b), fullgraph=True)
    want = lora_delta_reference(x.float(), A.float(), B.float(), ranks, *segs, base.float())
    _assert_within(f(x, base, *segs), want.double(), _torch_same_precision(x, A, B, ranks, *segs, base), 1e-3)
    static = [t.clone() for t in segs]
    lora_delta(x, A, B, ranks, *static, base=base)  # autotune / compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lora_delta(x, A, B, ranks, *static, base=base)
    new = lora_segments([[(2, 1.0)], [], [(0, 2.0)], [(1, 1.0), (2, 0.5)]], 1024, device="cuda")
    for t, v in zip(static, new):
        t.copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, lora_delta(x, A, B, ranks, *new, base=base))
