"""pytest-benchmark versions of the kernel benchmarks: baseline and dreamfuse in one group, side by side.

    python -m pytest bench --benchmark-only -q                                   # CUDA if present, else tiny CPU shapes
    python -m pytest bench --benchmark-only --benchmark-json=out.json            # compare across commits:
    python -m pytest bench --benchmark-only --benchmark-autosave && pytest-benchmark compare

Not collected by the default ``python -m pytest`` (its testpaths is ``tests``). Each round is timed with a CUDA
synchronization before (``setup``) and after (inside the target), so a round is the kernel's wall time, not its
launch. ``DREAMFUSE_BENCH_DEVICE=cpu`` forces CPU. On CPU the ops run their PyTorch references (as in
``bench/attention.py``): the figures then show only that the harness works.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import torch.nn.functional as F  # noqa: E402
from dreamfuse.kernels.attention import attention  # noqa: E402
from dreamfuse.kernels.composite import composite_blend  # noqa: E402

DEVICE = os.environ.get("DREAMFUSE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.startswith("cuda")
DTYPE = torch.float16 if CUDA else torch.float32
ROUNDS = 50 if CUDA else 5


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _pedantic(benchmark, fn, group: str, **info) -> None:
    """Time ``fn`` with a synchronized timer: sync before each round (setup, untimed) and at its end (timed)."""
    benchmark.group = group
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE).removeprefix("torch."), **info)

    def target():
        fn()
        _sync()

    benchmark.pedantic(target, setup=_sync, rounds=ROUNDS, iterations=1, warmup_rounds=2 if CUDA else 1)


# (B, H, L, D): SD1.5 512² self-attention levels on CUDA; one small shape on CPU
ATTN_SHAPES = [(2, 8, 4096, 40), (2, 8, 1024, 80), (2, 8, 256, 160)] if CUDA else [(1, 8, 256, 40)]


def _qkv(B, H, L, D):
    g = torch.Generator().manual_seed(0)
    # the processors' layout: (B, L, H, D) memory seen as (B, H, L, D)
    return [torch.randn(B, L, H, D, generator=g).to(DEVICE, DTYPE).transpose(1, 2) for _ in range(3)]


@pytest.mark.parametrize("impl", ["sdpa", "dreamfuse"])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}H{}L{}D{}".format(*s))
def test_attention(benchmark, shape, impl):
    q, k, v = _qkv(*shape)
    fn = (lambda: attention(q, k, v)) if impl == "dreamfuse" else (lambda: F.scaled_dot_product_attention(q, k, v))
    if impl == "dreamfuse":  # a fast wrong kernel is no result
        tol = 2e-2 if CUDA else 1e-4
        torch.testing.assert_close(fn(), F.scaled_dot_product_attention(q, k, v), atol=tol, rtol=tol)
    _pedantic(benchmark, fn, f"attention {'x'.join(map(str, shape))}", impl=impl)


# (B, S, C, hw): 512² latents with 2 and 8 segments on CUDA; one small shape on CPU
BLEND_SHAPES = [(1, 2, 4, 64), (4, 8, 4, 64)] if CUDA else [(1, 2, 4, 32)]


def _blend_torch(u, c, m, g):  # the expression a user would write (bench/composite_blend.py's baseline)
    return (m[:, :, None] * (u + g[:, :, None, None, None] * (c - u))).sum(1) / m.sum(1).clamp_min(1e-6)[:, None]


@pytest.mark.parametrize("impl", ["torch", "dreamfuse"])
@pytest.mark.parametrize("shape", BLEND_SHAPES, ids=lambda s: "B{}S{}C{}hw{}".format(*s))
def test_composite_blend(benchmark, shape, impl):
    B, S, C, hw = shape
    gen = torch.Generator().manual_seed(0)
    u, c = (torch.randn(B, S, C, hw, hw, generator=gen).to(DEVICE, DTYPE) for _ in range(2))
    m = torch.rand(B, S, hw, hw, generator=gen).to(DEVICE, DTYPE)
    g = torch.full((B, S), 7.5, device=DEVICE, dtype=torch.float32)
    fn = (lambda: composite_blend(u, c, m, g)) if impl == "dreamfuse" else (lambda: _blend_torch(u, c, m, g.to(DTYPE)))
    if impl == "dreamfuse":
        tol = 2e-2 if CUDA else 1e-4
        torch.testing.assert_close(fn(), _blend_torch(u.float(), c.float(), m.float(), g).to(DTYPE), atol=tol, rtol=tol)
    _pedantic(benchmark, fn, f"composite_blend {'x'.join(map(str, shape))}", impl=impl)
