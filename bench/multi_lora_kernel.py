"""dreamfuse's grouped multi-LoRA op (``lora_delta``) on one linear layer, against the base GEMM alone and the loop
of per-adapter torch matmuls a server would otherwise run.

    python -m bench.multi_lora_kernel                      # CUDA if present: fp16, SD 1.5 shapes
    python -m bench.multi_lora_kernel --rank 64 --rows 32  # other ranks / batch rows
    python -m bench.multi_lora_kernel --device cpu         # CPU: fp32, small shapes, the reference path

One UNet linear layer (an attention projection, d_in = d_out = C, or CLIP-L's 768) over ``--rows`` batch rows of L
tokens each, flattened into x ``(rows · L, C)``; a pool of ``--adapters`` rank-``--rank`` LoRAs. Columns, timed
interleaved call by call (``bench._util.compare``), ``--iters`` calls each:

* ``base``: ``F.linear(x, W)`` -- no adapter;
* ``+1 adapter``: ``lora_delta(x, ..., base=F.linear(x, W))`` with every row on one adapter (one segment);
* ``+mixed``: the same call with row i on adapter ``i % adapters`` (16 adapters over 16 rows by default);
* ``+torch loop``: ``F.linear(x, W)`` then, per adapter, ``y[rows].addmm_((x[rows] @ A.T), B.T, alpha=scale)`` over
  its rows (rows are grouped by adapter, so each adapter's rows are one slice: the loop's best case);
* ``delta GB/s``: ``lora_delta`` of the mixed batch alone (base precomputed), as bytes it must move (x, base and out
  once, the pool's used part, the shrink's intermediate written and read) over its time.

Ratios: ``mixed/base`` is what a mixed-adapter batch costs over no adapter; ``mixed/1`` what mixing costs over one
shared adapter; ``loop/mixed`` > 1 means the op beats the torch loop. Cells read ``median / min``; only ratios
measured side by side mean anything on a shared machine, absolute times only on a GPU.

On CPU (no CUDA) the Triton kernels do not run (the interpreter is a correctness tool): ``lora_delta`` is then
the op's PyTorch reference (one matmul pair per segment, the CPU path it dispatches to), in fp32.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from dreamfuse.kernels.lora import _block_r, lora_delta, lora_segments

from bench._util import compare, hardware, print_table

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (what, tokens a row, channels): SD 1.5 at 512² -- self-attention projections at each UNet level, CLIP-L's
# 77-token projections; CPU: small shapes of the same kinds
GPU_SHAPES = [("64² level", 4096, 320), ("32² level", 1024, 640), ("16² level", 256, 1280), ("8² level", 64, 1280),
              ("text encoder", 77, 768)]
_SCALE = 0.8  # every slot's scale (PEFT's alpha / r times a user weight)
CPU_SHAPES = [("16² level @320", 256, 320), ("8² level @640", 64, 640), ("text encoder", 77, 768)]


def _setup(rows: int, L: int, C: int, n_adapters: int, rank: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows * L, C, generator=g).to(device, dtype)
    W = (torch.randn(C, C, generator=g) / C**0.5).to(device, dtype)
    A = (torch.randn(n_adapters, rank, C, generator=g) / C**0.5).to(device, dtype)
    B = (torch.randn(n_adapters, C, rank, generator=g) / rank**0.5).to(device, dtype)
    ranks = torch.full((n_adapters,), rank, dtype=torch.int32, device=device)
    return x, W, A, B, ranks


def _torch_loop(x, W, A, B, groups, scale):
    """Base GEMM, then one shrink and one expand matmul per adapter over its (contiguous) rows."""
    y = F.linear(x, W)
    for a, lo, hi in groups:
        y[lo:hi].addmm_(x[lo:hi] @ A[a].T, B[a].T, alpha=scale)
    return y


def _groups(adapters_of_rows, L):
    """(adapter, first token, end token) for each run of consecutive rows on one adapter."""
    out = []
    for i, a in enumerate(adapters_of_rows):
        if out and out[-1][0] == a:
            out[-1][2] += L
        else:
            out.append([a, i * L, (i + 1) * L])
    return [tuple(g) for g in out]


def _measure(what: str, L: int, C: int, args, device, dtype, timing) -> list:
    """One table row: the five functions of the module docstring, timed interleaved, and the derived columns."""
    scale = _SCALE
    x, W, A, B, ranks = _setup(args.rows, L, C, args.adapters, args.rank, device, dtype)
    T = x.shape[0]
    mixed_rows = [i % args.adapters for i in range(args.rows)]
    single = lora_segments([[(0, scale)]] * args.rows, L, device=device)
    mixed = lora_segments([[(a, scale)] for a in mixed_rows], L, device=device)
    groups = _groups(mixed_rows, L)
    base = F.linear(x, W)
    fns = {
        "base": lambda: F.linear(x, W),
        "single": lambda: lora_delta(x, A, B, ranks, *single, base=F.linear(x, W)),
        "mixed": lambda: lora_delta(x, A, B, ranks, *mixed, base=F.linear(x, W)),
        "loop": lambda: _torch_loop(x, W, A, B, groups, scale),
        "delta": lambda: lora_delta(x, A, B, ranks, *mixed, base=base),
    }
    t = compare(fns, **timing)
    err = (fns["mixed"]().float() - fns["loop"]().float()).abs().max().item()
    es = x.element_size()
    used = min(args.adapters, args.rows)
    moved = (T * C * 3 + used * 2 * args.rank * C + 2 * T * _block_r(args.rank)) * es  # x, base, out; pool; v
    gbs = moved / (t["delta"] * 1e-3) / 1e9
    return [what, f"{args.rows}x{L} x {C}", t["base"], t["single"], t["mixed"], t["loop"], gbs,
            t["mixed"] / t["base"], t["mixed"] / t["single"], t["loop"] / t["mixed"], err]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=tuple(_DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--rows", type=int, default=16, help="batch rows of the UNet call (default 16)")
    ap.add_argument("--adapters", type=int, default=16, help="adapters in the pool and in the mixed batch (16)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter (default 16)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls each (default 50 on CUDA, 10 on CPU)")
    ap.add_argument("--quick", action="store_true", help="two shapes, 3 timed calls")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = _DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    if args.quick:
        shapes = shapes[:2]
    iters = 3 if args.quick else args.iters or (50 if cuda else 10)
    timing = dict(device=device, warmup=3, iters=iters, min_time_s=0.0 if args.quick or not cuda else 0.2)

    rows_out = [_measure(what, L, C, args, device, dtype, timing) for what, L, C in shapes]
    path = "dreamfuse Triton kernels" if cuda else "the op's PyTorch reference (CPU path; Triton runs on CUDA only)"
    print(f"# multi-LoRA linear layer: lora_delta ({path}) vs base GEMM and a per-adapter torch loop — "
          f"{hardware(device)}")
    dt = str(dtype).removeprefix("torch.")
    print(f"dtype={dt} rows={args.rows} adapters={args.adapters} rank={args.rank} scale={_SCALE}; "
          f"mixed: row i on adapter i % {args.adapters}")
    cpu = "" if cuda else f"CPU {dt}: "
    print_table(f"{cpu}one linear layer (ms)",
                ["layer", "rows x L x C", "ms base", "ms +1 adapter", "ms +mixed", "ms +torch loop", "delta GB/s",
                 "mixed/base", "mixed/1", "loop/mixed", "max abs diff"], rows_out)


if __name__ == "__main__":
    main()
