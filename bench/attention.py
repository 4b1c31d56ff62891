"""dreamfuse's fused attention vs PyTorch SDPA (and xformers when installed) at SD1.5 attention shapes.

    python -m bench.attention                          # CUDA if present: fp16, batch 2 and 8, 512² and 768²
    python -m bench.attention --batch 2 --quick        # fewer shapes, shorter timing
    python -m bench.attention --device cpu             # CPU: small shapes, fp32 (see below)

Shapes are the UNet's: self-attention over the latent tokens of each resolution level (512²: 4096, 1024,
256, 64 tokens; 768²: 9216, 2304, 576, 144) with 8 heads of 40/80/160/160 channels, and cross-attention
from the same queries to 77 text tokens. Inputs are the processors' layout, ``(B, L, H, D)`` memory seen as
``(B, H, L, D)``. TFLOP/s counts the two matmuls, ``4·B·H·Lq·Lk·D / t``; ``SDPA/kernel`` > 1 means the
kernel is faster. They run side by side in one process, interleaved call by call; cells read ``median / min``:
only these ratios mean anything on a shared machine, and absolute times only on a GPU.

On CPU (no CUDA) the Triton kernel does not run (the interpreter is a correctness tool, not a speed
path): the "kernel" column is then ``attention_reference``, the torch backend that the op dispatches to
on CPU, at batch 1, fp32 and the 512² shapes up to 1024 tokens.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
import torch.nn.functional as F
from dreamfuse.kernels.attention import attention, attention_reference

from bench._util import compare, hardware, print_table

HEADS = 8
# (tokens, head dim) per UNet level, SD1.5: 320/640/1280/1280 channels over 8 heads
LEVELS = {512: [(4096, 40), (1024, 80), (256, 160), (64, 160)], 768: [(9216, 40), (2304, 80), (576, 160), (144, 160)]}
TEXT_TOKENS = 77
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _shapes(cuda: bool, quick: bool) -> list[tuple[int, int, int, int, str]]:
    """(resolution, Lq, Lk, D, kind) to measure."""
    out = []
    for res, levels in LEVELS.items():
        if not cuda and res != 512:
            continue
        for L, D in levels:
            if not cuda and L > 1024:
                continue
            if quick and L not in (4096, 1024, 64):
                continue
            out += [(res, L, L, D, "self"), (res, L, TEXT_TOKENS, D, "cross")]
    return out


def _xformers():
    if importlib.util.find_spec("xformers") is None:
        return None
    try:
        from xformers.ops import memory_efficient_attention
    except Exception:  # a broken install (ABI mismatch with torch) just drops the column
        return None
    return memory_efficient_attention


def _measure(B, res, Lq, Lk, D, kind, kernel, xf, dtype, timing) -> list:
    g = torch.Generator().manual_seed(0)
    device = timing["device"]
    qb, kb, vb = (torch.randn(B, L, HEADS, D, generator=g).to(device, dtype) for L in (Lq, Lk, Lk))
    q, k, v = (t.transpose(1, 2) for t in (qb, kb, vb))
    fns = {"kernel": lambda: kernel(q, k, v), "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    if xf is not None:
        fns["xformers"] = lambda: xf(qb, kb, vb)
    t = compare(fns, **timing)
    t_kernel, t_sdpa = t["kernel"], t["sdpa"]
    t_xf = [t["xformers"]] if xf is not None else []
    err = (kernel(q, k, v).float() - F.scaled_dot_product_attention(q, k, v).float()).abs().max().item()
    tflops = 4 * B * HEADS * Lq * Lk * D / (t_kernel * 1e-3) / 1e12
    return [f"{res}² {kind} B{B} {Lq}x{Lk} d{D}", t_kernel, t_sdpa, *t_xf, tflops, t_sdpa / t_kernel, err]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=tuple(_DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 2 8 on CUDA, 1 on CPU)")
    ap.add_argument("--quick", action="store_true", help="4096/1024/64-token levels only, fewer timing iterations")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = _DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    batches = args.batch or ([2, 8] if cuda else [1])
    kernel = attention if cuda else attention_reference
    xf = _xformers() if cuda else None
    timing = dict(device=device, warmup=3, iters=5 if args.quick else 20, min_time_s=0.0 if args.quick else 0.2)

    rows = [_measure(B, res, Lq, Lk, D, kind, kernel, xf, dtype, timing)
            for B in batches for res, Lq, Lk, D, kind in _shapes(cuda, args.quick)]

    what = "dreamfuse Triton kernel" if cuda else "attention_reference (torch backend; Triton runs on CUDA only)"
    print(f"# attention: {what} vs SDPA — {hardware(device)}")
    print(f"dtype={str(dtype).removeprefix('torch.')} heads={HEADS} batch={batches} layout=(B,L,H,D) views")
    header = ["shape", "ms kernel", "ms SDPA"] + (["ms xformers"] if xf is not None else [])
    header += ["TFLOP/s kernel", "SDPA/kernel", "max abs diff vs SDPA"]
    title = "fused attention vs SDPA" if cuda else "CPU: torch backend (attention_reference) vs SDPA, small shapes"
    print_table(title, header, rows)


if __name__ == "__main__":
    main()
