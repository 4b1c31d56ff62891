"""A DreamMatcher step vs a plain CFG text2img step on the same batch of targets: the overhead ratio.

    python -m bench.personalize_step                      # tiny model, CPU-sized
    python -m bench.personalize_step --model ./sd15 --size 512 --targets 1 4 --steps 20   # on a GPU

Both generate the same targets with the same steps in one process. A DreamMatcher step evaluates the
reference rows too (2 extra UNet rows per step), reads the matching features, runs PCA, matching, the
cycle mask and the fused AMA attention; guidance (``--lambda-g``) adds a UNet backward on guided steps.
The reference's DDIM inversion is cached per image and excluded (warm-up fills the cache); VAE decoding is
excluded from both. The text2img call and the DreamMatcher calls (one per ``--lambda-g``) are timed interleaved,
call by call; cells read ``median / min``.
"""

from __future__ import annotations

import argparse

import torch
from dreamfuse.engine import Engine, EngineConfig

from bench._util import compare, hardware, print_table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32")
    ap.add_argument("--backend", default=None, choices=("triton", "torch"))
    ap.add_argument("--size", type=int, default=128, help="image size in pixels (default 128 for tiny)")
    ap.add_argument("--targets", type=int, nargs="+", default=[1, 2], help="targets per reference (default 1 2)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lambda-g", type=float, nargs="+", default=[0.0, 50.0],
                    help="guidance strengths to measure (default 0 and 50)")
    ap.add_argument("--iters", type=int, default=5,
                    help="timed calls per configuration, interleaved (median and min; default 5)")
    args = ap.parse_args(argv)

    eng = Engine.from_pretrained(args.model, EngineConfig(device=args.device, dtype=args.dtype,
                                                           backend=args.backend, progress=False))
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(3, args.size, args.size, generator=g)
    rows = []
    for n in args.targets:
        prompts = ["a photo of a sks dog"] * n
        common = dict(steps=args.steps, seed=0, height=args.size, width=args.size, output_type="latent")

        def plain(prompts=prompts, common=common):
            eng.text2img(prompts, guidance_scale=10.0, **common)

        def dm(lg, prompts=prompts, common=common):
            eng.personalize(prompts, reference, subject_token="sks", lambda_g=lg, **common)

        fns = {"plain": plain, **{lg: (lambda lg=lg: dm(lg)) for lg in args.lambda_g}}
        t = compare(fns, device=eng.device, warmup=1, iters=args.iters)
        t_plain = t["plain"] / args.steps
        for lg in args.lambda_g:
            t_dm = t[lg] / args.steps
            rows.append([n, 2 * n, 2 * n + 2, lg, t_plain, t_dm, t_dm / t_plain])
    print(f"# DreamMatcher step overhead — {hardware(eng.device)}")
    print(f"model={args.model} {args.size}x{args.size} dtype={str(eng.dtype).removeprefix('torch.')} "
          f"backend={eng.config.backend} steps={args.steps} (AMA from step round(4/50*steps))")
    print_table("ms per denoising step", ["targets", "text2img rows", "DreamMatcher rows", "lambda_g",
                                          "text2img ms", "DreamMatcher ms", "overhead x"], rows)


if __name__ == "__main__":
    main()
