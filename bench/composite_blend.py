"""dreamfuse's composite ops vs the PyTorch expressions a user would write, at composite-diffusion shapes.

    python -m bench.composite_blend                     # CUDA if present: fp16
    python -m bench.composite_blend --quick             # fewer shapes, shorter timing
    python -m bench.composite_blend --device cpu        # CPU: fp32 (see below)

Shapes: S = 2, 4, 8 segments, 64×64 and 96×96 latents (512² and 768² images), C = 4, batch 1 and 4.

* ``composite_blend(u, c, m, g)`` (harmonization: blended per-segment CFG, per-segment scales ``g (B, S)``) vs
  ``(m[:, :, None] * (u + g * (c - u))).sum(1) / m.sum(1).clamp_min(1e-6)[:, None]``.
* ``composite_latents(x, m, fill)`` (scaffolding: segments back into one latent, with and without the noised
  scaffolding latent as fill) vs ``num / Σm.clamp_min(1e-6)``, or
  ``num / Σm.clamp_min(1) + (1 - Σm.clamp_max(1)) * fill`` with ``num = (m[:, :, None] * x).sum(1)``.

Masks (``--masks``): ``bands`` (default) is a layout of S vertical bands with soft 8-pixel seams, so each pixel
is covered by one or two segments, as in real layouts (the kernels skip reading segments where their mask is
0); ``dense`` gives every segment a random mask over every pixel (the kernels' worst case). ``GB/s`` counts the
bytes the op must touch at least once (inputs + output), over the kernel's time. ``torch/kernel`` > 1 means
the kernel is faster. Both run side by side in one process, alternately call by call, 60 timed calls each (5
with ``--quick``); cells read ``median / min``: only the ratios mean anything on a shared machine, and absolute
times only on a GPU.

On CPU (no CUDA) the Triton kernels do not run (the interpreter is a correctness tool, not a speed path): the
"kernel" column is then the ops' PyTorch references (the CPU path the ops dispatch to), in fp32.
"""

from __future__ import annotations

import argparse

import torch
from dreamfuse.kernels.composite import (
    composite_blend,
    composite_blend_reference,
    composite_latents,
    composite_latents_reference,
)

from bench._util import compare, hardware, print_table

C = 4
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _masks(B: int, S: int, hw: int, kind: str, device, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "dense":
        return torch.rand(B, S, hw, hw, generator=g).to(device, dtype)
    # S vertical bands with linear 8-px seams: each pixel is covered by one or two segments
    x = torch.arange(hw, dtype=torch.float32) + 0.5
    edges = torch.linspace(0, hw, S + 1)
    m = torch.stack([((x - edges[s] + 4) / 8).clamp(0, 1) * ((edges[s + 1] + 4 - x) / 8).clamp(0, 1)
                     for s in range(S)])
    m[0, x < edges[1]] = 1.0  # the outer bands reach the image border
    m[-1, x > edges[-2]] = 1.0
    return m[None, :, None, :].expand(B, S, hw, hw).contiguous().to(device, dtype)


def _naive_blend(u, c, m, g):
    return (m[:, :, None] * (u + g[:, :, None, None, None] * (c - u))).sum(1) / m.sum(1).clamp_min(1e-6)[:, None]


def _naive_latents(x, m, fill):
    num = (m[:, :, None] * x).sum(1)
    ms = m.sum(1)[:, None]
    if fill is None:
        return num / ms.clamp_min(1e-6)
    return num / ms.clamp_min(1) + (1 - ms.clamp_max(1)) * fill


def _side_by_side(fn_kernel, fn_torch, **timing):
    """(kernel, torch) Timings, the two measured alternately call by call (:func:`bench._util.compare`), so that a
    burst of load from other processes on a shared machine hits both rather than one side."""
    t = compare({"kernel": fn_kernel, "torch": fn_torch}, **timing)
    return t["kernel"], t["torch"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=tuple(_DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--masks", default="bands", choices=("bands", "dense"), help="mask layout (default bands)")
    ap.add_argument("--quick", action="store_true", help="S = 2, 8 at batch 1 only, fewer timing iterations")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's); 1 avoids multi-ms stalls of multi-threaded ops "
                         "when other processes load a shared machine")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = _DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    blend = composite_blend if cuda else composite_blend_reference
    latents = composite_latents if cuda else composite_latents_reference
    timing = dict(device=device, warmup=3, iters=5 if args.quick else 60, min_time_s=0.0 if args.quick else 0.3)
    segs = (2, 8) if args.quick else (2, 4, 8)
    batches = (1,) if args.quick else (1, 4)
    es = torch.empty((), dtype=dtype).element_size()

    blend_rows, lat_rows = [], []
    for B in batches:
        for hw in (64, 96):
            for S in segs:
                g = torch.Generator().manual_seed(0)
                u, c = (torch.randn(B, S, C, hw, hw, generator=g).to(device, dtype) for _ in range(2))
                m = _masks(B, S, hw, args.masks, device, dtype)
                gs = (torch.rand(B, S, generator=g) * 8 + 1).to(device, dtype)
                fill = torch.randn(B, C, hw, hw, generator=g).to(device, dtype)
                shape = f"B{B} S{S} {hw}x{hw}"
                seg_bytes, px_bytes = B * S * C * hw * hw * es, B * C * hw * hw * es
                mask_bytes = B * S * hw * hw * es

                args_ = (u, c, m, gs)
                t_k, t_t = _side_by_side(lambda a=args_: blend(*a), lambda a=args_: _naive_blend(*a), **timing)
                err = (blend(*args_).float() - _naive_blend(*args_).float()).abs().max().item()
                gbs = (2 * seg_bytes + mask_bytes + px_bytes) / (t_k * 1e-3) / 1e9
                blend_rows.append([shape, t_k, t_t, gbs, t_t / t_k, err])

                for f in (None, fill):
                    args_ = (u, m, f)
                    t_k, t_t = _side_by_side(lambda a=args_: latents(*a), lambda a=args_: _naive_latents(*a),
                                             **timing)
                    err = (latents(*args_).float() - _naive_latents(*args_).float()).abs().max().item()
                    gbs = (seg_bytes + mask_bytes + px_bytes * (1 if f is None else 2)) / (t_k * 1e-3) / 1e9
                    lat_rows.append([shape, "no" if f is None else "yes", t_k, t_t, gbs, t_t / t_k, err])

    what = "dreamfuse Triton kernels" if cuda else "the ops' PyTorch references (CPU path; Triton runs on CUDA only)"
    print(f"# composite ops: {what} vs naive PyTorch — {hardware(device)}")
    dt = str(dtype).removeprefix("torch.")
    print(f"dtype={dt} C={C} masks={args.masks} guidance=per-segment (B, S) tensor")
    cpu = "" if cuda else f"CPU {dt}: composite_blend_reference vs naive expression — "
    print_table(f"{cpu}composite_blend (ms)", ["shape", "ms kernel", "ms torch", "GB/s kernel", "torch/kernel",
                                                "max abs diff"], blend_rows)
    cpu = "" if cuda else f"CPU {dt}: composite_latents_reference vs naive expression — "
    print_table(f"{cpu}composite_latents (ms)", ["shape", "fill", "ms kernel", "ms torch", "GB/s kernel",
                                                  "torch/kernel", "max abs diff"], lat_rows)


if __name__ == "__main__":
    main()
