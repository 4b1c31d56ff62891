"""dreamfuse's streamed bidirectional cosine argmax vs the materialized PyTorch cost volume.

    python -m bench.match_argmax                       # CUDA if present: N = M = 1024, 4096, 9216, D = 512, batch 2
    python -m bench.match_argmax --quick               # fewer sizes, shorter timing
    python -m bench.match_argmax --device cpu          # CPU: N = 256, 1024 (see below)

N = M is the number of latent positions a DreamMatcher AMA layer matches: 32² = 1024 and 64² = 4096 at 512²
output, 96² = 9216 at 768². The baseline is what the official code does: normalize, ``bmm`` the full
``(B, N, M)`` fp32 cost volume, ``max`` along both axes. ``materialized/kernel`` > 1 means the kernel is faster;
TFLOP/s counts the score matmul, ``2·B·N·M·D / t``. The two are timed interleaved, call by call; time cells
read ``median / min``. "t2r agree" is the fraction of target positions where the two pick the same reference
position (rounding may flip genuine near-ties, so slightly below 100% is fine).

On CUDA, memory is the measured peak allocated during one call (``bench._util.peak_memory_mb``), outputs
included. On CPU the Triton kernel does not run (the interpreter is a correctness tool, not a speed path): the
"kernel" column is then ``match_argmax_reference``, the torch backend the op dispatches to on CPU, and the
memory columns are *theoretical*: the fp32 cost volume ``4·B·N·M`` bytes vs the GPU kernel's scratch (partial
max/argmax buffers + inverse norms) as the launcher would size them on an H100 (132 SMs).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from dreamfuse.kernels import matching
from dreamfuse.kernels.matching import match_argmax, match_argmax_reference

from bench._util import compare, hardware, peak_memory_mb, print_table

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_H100_SMS = 132


def materialized(f_tgt: torch.Tensor, f_ref: torch.Tensor):
    """The baseline: the whole cosine matrix in fp32, then max both ways."""
    sim = torch.bmm(F.normalize(f_tgt.float(), dim=-1), F.normalize(f_ref.float(), dim=-1).transpose(1, 2))
    t2r_sim, t2r = sim.max(dim=2)
    r2t_sim, r2t = sim.max(dim=1)
    return t2r, r2t, t2r_sim, r2t_sim


def kernel_scratch_bytes(B: int, N: int, M: int, num_sms: int) -> int:
    """Bytes the launcher allocates besides the outputs: partial buffers sized for the smallest BLOCK_M of the
    autotune configs (fp32 max + int32 argmax per cell), column splits as its occupancy rule picks them, and
    the two fp32 inverse-norm vectors."""
    P = triton.cdiv(N, matching._MIN_BLOCK_M)
    S = triton.cdiv(M, matching._col_chunk(B, N, M, num_sms))
    return B * (P * M + S * N) * 8 + B * (N + M) * 4


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, choices=tuple(_DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch", type=int, default=2, help="batch B (default 2: uncond + cond target)")
    ap.add_argument("--dim", type=int, default=512, help="feature channels D (default 512)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="N = M values (default 1024 4096 9216 on CUDA, 256 1024 on CPU)")
    ap.add_argument("--quick", action="store_true", help="two sizes (one on CPU) and fewer timed calls")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = _DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    sizes = args.sizes or ([1024, 4096, 9216] if cuda else [256, 1024])
    if args.quick and not args.sizes:
        sizes = sizes[:2] if cuda else sizes[:1]
    iters, warmup = (5, 2) if args.quick else (20, 3)
    ours = match_argmax if cuda else match_argmax_reference
    B, D = args.batch, args.dim

    def measure(n: int) -> list:
        g = torch.Generator().manual_seed(0)
        ft = torch.randn(B, n, D, generator=g).to(device, dtype)
        fr = torch.randn(B, n, D, generator=g).to(device, dtype)
        run_ours, run_mat = (lambda: ours(ft, fr)), (lambda: materialized(ft, fr))
        t = compare({"kernel": run_ours, "materialized": run_mat}, device=device, warmup=warmup, iters=iters,
                    min_time_s=0.2 if cuda else 0.0)
        t_kernel, t_mat = t["kernel"], t["materialized"]
        agree = (run_ours()[0] == run_mat()[0]).float().mean().item()
        if cuda:
            mem_k, mem_m = peak_memory_mb(run_ours, device), peak_memory_mb(run_mat, device)
        else:
            mem_k, mem_m = kernel_scratch_bytes(B, n, n, _H100_SMS) / 2**20, 4 * B * n * n / 2**20
        tflops = 2 * B * n * n * D / (t_kernel * 1e-3) / 1e12
        return [n, t_kernel, t_mat, t_mat / t_kernel, tflops, mem_k, mem_m, mem_m / mem_k, f"{100 * agree:.2f}%"]

    rows = [measure(n) for n in sizes]

    dt = str(dtype).removeprefix("torch.")
    print(f"# match_argmax: streamed kernel vs materialized cost volume — {hardware(device)}")
    print(f"dtype={dt} batch={B} D={D}; {'Triton kernel' if cuda else 'CPU: torch reference (no Triton)'}")
    kernel = "kernel" if cuda else "reference"
    if cuda:
        title = f"match_argmax vs materialized, {dt}, B={B}, D={D}"
        mem_cols = ["kernel peak MiB", "materialized peak MiB", "memory ratio"]
    else:
        title = f"match_argmax on CPU (torch reference; small N), {dt}, B={B}, D={D}"
        mem_cols = ["H100 kernel scratch MiB (theory)", "fp32 cost volume MiB (theory)", "memory ratio (theory)"]
    print_table(title, ["N=M", f"{kernel} ms", "materialized ms", f"materialized/{kernel}", f"{kernel} TFLOP/s",
                        *mem_cols, "t2r agree"], rows)


if __name__ == "__main__":
    main()
