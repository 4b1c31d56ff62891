"""Fused AMA attention (values warped inside the kernel) vs the unfused form (materialize V_w, then attention).

    python -m bench.ama_attention                  # CUDA if present: fp16, batch 2, DreamMatcher's AMA layers
    python -m bench.ama_attention --fg 0.3 --quick
    python -m bench.ama_attention --device cpu     # CPU: small, fp32 (see below)

DreamMatcher replaces self-attention in the last six transformer blocks: 32x32 tokens with 8 heads of 80
channels (``up_blocks[2]``) and 64x64 tokens with 8 heads of 40 (``up_blocks[3]``); batch 2 = the uncond and
cond targets. The warp is ``V_w = m * V_ref[flow] + (1 - m) * V_tgt``:

* fused: ``ama_attention(q, k, v_tgt, v_ref, flow, mask)``, V_w formed while V tiles load;
* unfused: ``torch.gather`` + ``torch.lerp`` write V_w, then ``attention(q, k, V_w)``;
* plain: ``attention(q, k, v_tgt)``, the floor (no warp at all).

The mask is soft and zero on a ``1 - fg`` fraction of the keys, as ``m' = M * U`` is on the background (the
kernel skips the reference gather there). The three are timed side by side, interleaved call by call; cells
read ``median / min``. Only the ratios mean anything on a shared machine; absolute times count on a GPU only.

On CPU (no CUDA) every op runs its PyTorch reference (the Triton interpreter is not a speed path), so both
columns materialize V_w and the ratio only shows the cost of the extra pass; shapes are smaller, fp32.
"""

from __future__ import annotations

import argparse

import torch
from dreamfuse.kernels.attention import ama_attention, attention

from bench._util import compare, hardware, print_table

HEADS = 8
# (grid side, head dim): DreamMatcher's AMA layers in SD1.x
CUDA_LEVELS = [(32, 80), (64, 40)]
CPU_LEVELS = [(16, 80), (32, 80)]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _unfused(q, k, v_tgt, v_ref, flow, mask):
    B, H, L, D = v_ref.shape
    idx = flow[:, None, :, None].expand(B, H, L, D)
    v_w = torch.lerp(v_tgt, torch.gather(v_ref, 2, idx), mask[:, None, :, None])
    return attention(q, k, v_w)


def _measure(B, side, D, dtype, fg, timing) -> list:
    L, device = side * side, timing["device"]
    g = torch.Generator().manual_seed(0)
    q, k, v_tgt, v_ref = (torch.randn(B, L, HEADS, D, generator=g).to(device, dtype).transpose(1, 2)
                          for _ in range(4))
    flow = torch.randint(0, L, (B, L), generator=g).to(device)
    mask = (torch.rand(B, L, generator=g) * (torch.rand(B, L, generator=g) < fg)).to(device, dtype)
    args = (q, k, v_tgt, v_ref, flow, mask)
    t = compare({"fused": lambda: ama_attention(*args), "unfused": lambda: _unfused(*args),
                 "plain": lambda: attention(q, k, v_tgt)}, **timing)
    t_fused, t_unfused, t_plain = t["fused"], t["unfused"], t["plain"]
    err = (ama_attention(*args).float() - _unfused(*args).float()).abs().max().item()
    return [f"B{B} {side}x{side} ({L} tok) h{HEADS} d{D}", t_fused, t_unfused, t_plain, t_unfused / t_fused,
            100 * (t_fused / t_plain - 1), err]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=tuple(_DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch", type=int, nargs="+", default=[2], help="batch sizes (default 2: uncond + cond)")
    ap.add_argument("--fg", type=float, default=0.5, help="fraction of keys with a nonzero mask (default 0.5)")
    ap.add_argument("--quick", action="store_true", help="fewer timing iterations")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = _DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    timing = dict(device=device, warmup=3, iters=5 if args.quick else 20, min_time_s=0.0 if args.quick else 0.2)

    rows = [_measure(B, side, D, dtype, args.fg, timing)
            for B in args.batch for side, D in (CUDA_LEVELS if cuda else CPU_LEVELS)]

    backend = "Triton" if cuda else "torch references (Triton runs on CUDA only)"
    print(f"# AMA attention, fused vs unfused: {backend} — {hardware(device)}")
    print(f"dtype={str(dtype).removeprefix('torch.')} heads={HEADS} batch={args.batch} fg={args.fg}")
    title = "fused AMA vs gather+attention" if cuda else "CPU: torch references, small shapes"
    print_table(title, ["shape", "ms fused", "ms unfused", "ms plain attention", "unfused/fused",
                        "warp overhead % vs plain", "max abs diff fused vs unfused"], rows)


if __name__ == "__main__":
    main()
