"""dreamfuse's fused attention vs PyTorch SDPA (each backend), FlexAttention and xformers at SD attention shapes.

    python -m bench.attention                          # CUDA if present: fp16, batch 2 and 8, 512², 768², SDXL 1024²
    python -m bench.attention --res 512 1024 --batch 2 8    # what the GPU suite runs
    python -m bench.attention --batch 2 --quick        # fewer shapes, shorter timing
    python -m bench.attention --peers sdpa flash       # fewer peers
    python -m bench.attention --device cpu             # CPU: small shapes, fp32 (see below)

Shapes are the UNets': self-attention over the latent tokens of each resolution level and cross-attention from
the same queries to 77 text tokens. SD 1.5 (``--res 512``, ``768``): 8 heads of 40/80/160/160 channels over 4096,
1024, 256, 64 tokens at 512² (9216, 2304, 576, 144 at 768²). SDXL at 1024² (``--res 1024``): 10 heads of 64 over
4096 tokens and 20 heads of 64 over 1024 (its attention runs at the 64² and 32² levels only). Inputs are the
processors' layout, ``(B, L, H, D)`` memory seen as ``(B, H, L, D)``.

Peers (``--peers``), each timed interleaved with the kernel, call by call, in one process:

* ``sdpa``: ``F.scaled_dot_product_attention`` with PyTorch's own backend choice (what diffusers' stock
  processors run): the baseline of the ``SDPA/kernel`` ratio;
* ``flash`` / ``efficient`` / ``cudnn`` / ``math``: SDPA pinned to one backend (``torch.nn.attention.sdpa_kernel``,
  entered outside the timed region);
* ``flex``: ``torch.compile(flex_attention)`` with no score_mod (compiled per shape, so it is timed on the
  self-attention shapes of the first ``--batch`` only, to bound compile time);
* ``xformers``: ``memory_efficient_attention`` on the ``(B, L, H, D)`` tensors, when installed.

A peer that refuses a shape (a head dim its kernel lacks, ...) shows ``n/a`` and its error is printed under the
table. TFLOP/s counts the two matmuls, ``4·B·H·Lq·Lk·D / t``; ``SDPA/kernel`` > 1 means the kernel is faster;
``best peer/kernel`` divides by the fastest peer of the row. Cells read ``median / min``: only these ratios mean
anything on a shared machine, and absolute times only on a GPU.

On CPU (no CUDA) the Triton kernel does not run (the interpreter is a correctness tool, not a speed
path): the "kernel" column is then ``attention_reference``, the torch backend that the op dispatches to
on CPU, at batch 1, fp32 and the 512² shapes up to 1024 tokens; the CUDA-only SDPA backends are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util

import torch
import torch.nn.functional as F
from dreamfuse.kernels.attention import attention, attention_reference

from bench._util import compare, hardware, print_table

# per resolution: (tokens, head dim, heads) of each attention level; SD1.5 320/640/1280/1280 channels over 8 heads,
# SDXL 640/1280 channels in heads of 64 (its 128² level has no attention)
LEVELS = {
    512: [(4096, 40, 8), (1024, 80, 8), (256, 160, 8), (64, 160, 8)],
    768: [(9216, 40, 8), (2304, 80, 8), (576, 160, 8), (144, 160, 8)],
    1024: [(4096, 64, 10), (1024, 64, 20)],
}
MODEL = {512: "SD1.5 512²", 768: "SD1.5 768²", 1024: "SDXL 1024²"}
TEXT_TOKENS = 77
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PEERS = ("sdpa", "flash", "efficient", "cudnn", "math", "flex", "xformers")
_CUDA_ONLY = {"flash", "efficient", "cudnn", "xformers"}


def _shapes(cuda: bool, quick: bool, res: list[int]) -> list[tuple[int, int, int, int, int, str]]:
    """(resolution, Lq, Lk, D, heads, kind) to measure."""
    out = []
    for r in res:
        if not cuda and r != 512:
            continue
        for L, D, H in LEVELS[r]:
            if not cuda and L > 1024:
                continue
            if quick and L not in (4096, 1024, 64):
                continue
            out += [(r, L, L, D, H, "self"), (r, L, TEXT_TOKENS, D, H, "cross")]
    return out


def _xformers():
    if importlib.util.find_spec("xformers") is None:
        return None
    try:
        from xformers.ops import memory_efficient_attention
    except Exception:  # a broken install (ABI mismatch with torch) just drops the column
        return None
    return memory_efficient_attention


def _sdpa_backend(name: str):
    """A context manager pinning SDPA to one backend (entered outside the timed region)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return lambda: sdpa_kernel([backend])


class _Flex:
    """``flex_attention`` compiled once per shape on CUDA (eager on CPU, where it is only a functional check)."""

    def __init__(self, cuda: bool):
        from torch.nn.attention.flex_attention import flex_attention

        self.fn = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention

    def __call__(self, q, k, v):
        return self.fn(q, k, v)


def _measure(B, res, Lq, Lk, D, H, kind, kernel, peers, dtype, timing, notes) -> list:
    g = torch.Generator().manual_seed(0)
    device = timing["device"]
    qb, kb, vb = (torch.randn(B, L, H, D, generator=g).to(device, dtype) for L in (Lq, Lk, Lk))
    q, k, v = (t.transpose(1, 2) for t in (qb, kb, vb))
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    fns, around = {"kernel": lambda: kernel(q, k, v)}, {}
    for name, impl in peers.items():
        if impl is None:
            continue
        if name == "xformers":
            fn = lambda impl=impl: impl(qb, kb, vb)  # noqa: E731
        elif name == "flex":
            fn = lambda impl=impl: impl(q, k, v)  # noqa: E731
        else:
            fn = sdpa
            if name != "sdpa":
                around[name] = _sdpa_backend(name)
        try:  # a peer that refuses this shape is left out of the row (and says why under the table)
            with around[name]() if name in around else contextlib.nullcontext():
                fn()
        except Exception as e:  # noqa: BLE001
            notes.setdefault(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
                             []).append(f"{res} {kind} d{D}")
            around.pop(name, None)
            continue
        fns[name] = fn
    t = compare(fns, around=around, **timing)
    err = (kernel(q, k, v).float() - sdpa().float()).abs().max().item()
    tflops = 4 * B * H * Lq * Lk * D / (t["kernel"] * 1e-3) / 1e12
    timed_peers = [p for p in peers if p in t]
    best = min((t[p] for p in timed_peers), key=lambda x: x.median) if timed_peers else None
    cells = [t.get(p, "n/a" if peers[p] is not None else None) for p in peers]
    return [f"{MODEL[res]} {kind} B{B} H{H} {Lq}x{Lk} d{D}", t["kernel"], *cells, tflops,
            t["sdpa"] / t["kernel"] if "sdpa" in t else None, best / t["kernel"] if best is not None else None, err]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=tuple(_DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 2 8 on CUDA, 1 on CPU)")
    ap.add_argument("--res", type=int, nargs="+", default=None, choices=tuple(LEVELS),
                    help="512, 768 (SD1.5), 1024 (SDXL) (default: all on CUDA, 512 on CPU)")
    ap.add_argument("--peers", nargs="+", default=None, choices=PEERS,
                    help="what the kernel is timed against (default: all on CUDA; sdpa, math, flex on CPU)")
    ap.add_argument("--quick", action="store_true", help="4096/1024/64-token levels only, fewer timing iterations")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = _DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    batches = args.batch or ([2, 8] if cuda else [1])
    res = args.res or (list(LEVELS) if cuda else [512])
    names = args.peers or ([p for p in PEERS if cuda or p not in _CUDA_ONLY])
    if "sdpa" not in names:
        names = ["sdpa", *names]  # the baseline of the goal ratio
    kernel = attention if cuda else attention_reference
    flex = _Flex(cuda) if "flex" in names else None
    xf = _xformers() if cuda and "xformers" in names else None
    timing = dict(device=device, warmup=3, iters=5 if args.quick else 20, min_time_s=0.0 if args.quick else 0.2)

    notes: dict[str, list[str]] = {}
    rows = []
    for B in batches:
        for r, Lq, Lk, D, H, kind in _shapes(cuda, args.quick, res):
            peers = {}
            for name in names:
                if name == "flex":
                    peers[name] = flex if (kind == "self" and B == batches[0]) else None
                elif name == "xformers":
                    peers[name] = xf
                elif name in _CUDA_ONLY and not cuda:
                    peers[name] = None
                else:
                    peers[name] = True
            rows.append(_measure(B, r, Lq, Lk, D, H, kind, kernel, peers, dtype, timing, notes))

    what = "dreamfuse Triton kernel" if cuda else "attention_reference (torch backend; Triton runs on CUDA only)"
    print(f"# attention: {what} vs SDPA and its peers — {hardware(device)}")
    print(f"dtype={str(dtype).removeprefix('torch.')} batch={batches} res={res} layout=(B,L,H,D) views; "
          f"peers: {', '.join(names)} (flex: self-attention at batch {batches[0]} only)")
    peer_cols = [f"ms {n}" if n in ("sdpa", "flex", "xformers") else f"ms sdpa-{n}" for n in names]
    header = ["shape", "ms kernel", *peer_cols, "TFLOP/s kernel", "SDPA/kernel", "best peer/kernel",
              "max abs diff vs SDPA"]
    title = "fused attention vs SDPA" if cuda else "CPU: torch backend (attention_reference) vs SDPA, small shapes"
    print_table(title, header, rows)
    for note, where in notes.items():
        print(f"\nn/a — {note} (at {', '.join(dict.fromkeys(where))})")


if __name__ == "__main__":
    main()
