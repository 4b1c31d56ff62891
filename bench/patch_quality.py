"""Throughput of PatchDPO's patch-quality estimator (``dreamfuse.engine.patch_quality``).

    python -m bench.patch_quality                  # CUDA if present, else CPU; batch 1 and 8
    python -m bench.patch_quality --quick          # fewer timed calls
    python -m bench.patch_quality --batches 1 8 32 --image-size 224 --hidden 384 --layers 12   # a ViT-S shape

No weights are downloaded: the backbone is a randomly initialised transformers ``ViTModel`` of the given shape
(default a small ViT: 224², patch 16 -> 14×14 patches, width 192, 4 layers), which costs the same as trained
weights of that shape. One call is ``estimate(ref, gen, latent_hw=64)`` on B (reference, generated) pairs:
preprocessing (resize + normalize), one backbone forward over the 2B images, the bidirectional patch matching
and the bilinear resampling to the 64×64 latent grid. "pairs/s" counts pairs (2B images go through the
backbone). The breakdown columns time the backbone forward and the matching alone, in the same run and
interleaved call by call with the whole call, so their share of the call is a ratio that holds on a noisy
machine (cells read ``median / min``); "other" is the rest (mostly the antialiased
bicubic resize of the 512² inputs, then the latent resampling). On CUDA both matching backends are timed
(``triton``: the streamed kernel; ``torch``: the reference); on CPU only ``torch`` (the Triton interpreter is a
correctness tool, not a speed path).
"""

from __future__ import annotations

import argparse

import torch
from dreamfuse.engine.patch_quality import PatchQualityEstimator
from transformers import ViTConfig, ViTModel

from bench._util import compare, hardware, print_table

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, choices=tuple(_DTYPES), help="backbone dtype (default fp16 on CUDA, "
                                                                          "fp32 on CPU)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="pairs per call (default 1 8)")
    ap.add_argument("--image-size", type=int, default=224, help="backbone input size (default 224)")
    ap.add_argument("--patch", type=int, default=16, help="patch size (default 16)")
    ap.add_argument("--hidden", type=int, default=192, help="ViT width (default 192)")
    ap.add_argument("--layers", type=int, default=4, help="ViT depth (default 4)")
    ap.add_argument("--heads", type=int, default=3, help="attention heads (default 3)")
    ap.add_argument("--latent", type=int, default=64, help="latent grid the maps are resampled to (default 64)")
    ap.add_argument("--quick", action="store_true", help="fewer timed calls")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = _DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    iters, warmup = (3, 1) if args.quick else (10, 2)
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=args.image_size, patch_size=args.patch, hidden_size=args.hidden,
                    num_hidden_layers=args.layers, num_attention_heads=args.heads, intermediate_size=4 * args.hidden)
    model = ViTModel(cfg, add_pooling_layer=False).eval().to(device, dtype)
    backends = ("triton", "torch") if cuda else ("torch",)
    grid = args.image_size // args.patch

    def measure(est: PatchQualityEstimator, B: int) -> list:
        g = torch.Generator().manual_seed(B)
        ref = torch.rand(B, 3, 512, 512, generator=g).to(device)  # SD 1.5 images; resized to the input
        gen = torch.rand(B, 3, 512, 512, generator=g).to(device)
        x = est.preprocess(torch.cat([ref, gen]))
        with torch.no_grad():
            f = est.patch_features(x)
        f_ref, f_gen = f[:B].contiguous(), f[B:].contiguous()

        def backbone():
            with torch.no_grad():
                est.patch_features(x)

        t = compare({"call": lambda: est.estimate(ref, gen, latent_hw=args.latent), "backbone": backbone,
                     "match": lambda: est.ops.match_argmax(f_gen, f_ref)}, device=device, warmup=warmup, iters=iters)
        t_call, t_backbone, t_match = t["call"], t["backbone"], t["match"]
        t_other = (t_call - t_backbone - t_match).map(lambda ms: max(ms, 0.0))
        return [est.backend, B, t_call, B / (t_call * 1e-3), t_backbone, t_match, t_other,
                f"{100 * t_backbone / t_call:.0f}%", f"{100 * t_match / t_call:.0f}%"]

    rows = [measure(PatchQualityEstimator(model, backend=backend), B) for backend in backends for B in args.batches]

    dt = str(dtype).removeprefix("torch.")
    print(f"# patch-quality estimator — {hardware(device)}")
    print(f"random ViT {args.image_size}² patch {args.patch} ({grid}×{grid} patches), width {args.hidden}, "
          f"{args.layers} layers, {dt}; 512² inputs, maps resampled to {args.latent}×{args.latent}")
    print_table(f"PatchQualityEstimator.estimate, ViT {args.image_size}/{args.patch} w{args.hidden} d{args.layers}, "
                f"{dt}, {device.type}",
                ["matching", "pairs/call", "ms/call", "pairs/s", "backbone ms", "matching ms", "other ms",
                 "backbone share", "matching share"], rows)


if __name__ == "__main__":
    main()
