"""A composite (MSP) harmonization step with S segments vs a text2img step with the same UNet rows.

    python -m bench.compose_step                                  # tiny model, CPU-sized
    python -m bench.compose_step --model ./sd15 --size 512 --segments 2 4 --steps 20    # on a GPU

A harmonization step (``harmonize="blend"``) evaluates every segment's prompt on the shared latent: 2·S UNet
rows (uncond + cond per segment), then blends the S CFG predictions by the masks (``composite_blend``).
text2img with a batch of S prompts runs the same 2·S rows. Both are timed as whole calls at ``--steps`` and
at 1 step; the per-step figure is the difference divided by ``steps − 1`` (so the fixed costs — text encoding,
layout parsing, latents — drop out; they are reported apart as "fixed ms"). The four calls are timed
interleaved, call by call; cells read ``median / min`` (the per-step figures are the difference of the medians,
resp. of the mins). VAE decoding is excluded
(``output_type="latent"``). The compose/text2img ratio is the per-step overhead of blending and bookkeeping;
"blend ms" times the ``composite_blend`` op alone on the step's tensors.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.ops import ops_for

from bench._util import compare, hardware, print_table, timeit


def stripes(s: int, size: int) -> tuple[np.ndarray, dict]:
    """A layout of ``s`` vertical stripes in distinct colours, and its segments mapping."""
    rng = np.random.default_rng(0)
    colors = [tuple(int(v) for v in c) for c in rng.choice(256, size=(s, 3), replace=True)]
    colors = [(255 * (i & 1), 255 * ((i >> 1) & 1), 255 * ((i >> 2) & 1)) if i < 8 else c
              for i, c in enumerate(colors)]
    img = np.zeros((size, size, 3), np.uint8)
    edges = np.linspace(0, size, s + 1).round().astype(int)
    for c, a, b in zip(colors, edges[:-1], edges[1:]):
        img[:, a:b] = c
    return img, {"#{:02x}{:02x}{:02x}".format(*c): f"a photo of a cat number {i}" for i, c in enumerate(colors)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' or a diffusers SD folder (default tiny)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--backend", default=None, choices=("triton", "torch"), help="kernel backend")
    ap.add_argument("--size", type=int, default=128, help="image size in pixels (default 128 for tiny)")
    ap.add_argument("--segments", type=int, nargs="+", default=[2, 4], help="segment counts S (default 2 4)")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per timed call, >= 2 (default 8)")
    ap.add_argument("--iters", type=int, default=5,
                    help="timed calls per configuration, interleaved (median and min; default 5)")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the per-step time is a difference against a 1-step call)")

    eng = Engine.from_pretrained(args.model, EngineConfig(device=args.device, dtype=args.dtype,
                                                           backend=args.backend, progress=False))
    dev, size = eng.device, args.size
    ops = ops_for(eng.config.backend)
    rows = []
    for s in args.segments:
        layout, segments = stripes(s, size)
        prompts = list(segments.values())
        common = dict(seed=0, height=size, width=size, output_type="latent")

        def run_compose(steps, layout=layout, segments=segments, common=common):
            eng.compose(layout, segments, prompt="a photo of cats", steps=steps, global_steps=0,
                        scaffold_fraction=0.0, harmonize="blend", **common)

        def run_text2img(steps, prompts=prompts, common=common):
            eng.text2img(prompts, steps=steps, **common)

        def per_step(full, one):
            step = (full - one) / (args.steps - 1)
            return step, one - step

        t = compare({"t2i": lambda f=run_text2img: f(args.steps), "t2i 1": lambda f=run_text2img: f(1),
                     "compose": lambda f=run_compose: f(args.steps), "compose 1": lambda f=run_compose: f(1)},
                    device=dev, warmup=1, iters=args.iters)
        t2i_step, t2i_fixed = per_step(t["t2i"], t["t2i 1"])
        cmp_step, cmp_fixed = per_step(t["compose"], t["compose 1"])
        h = size // eng.vae_scale_factor
        c = eng.unet.config.in_channels
        g = torch.Generator().manual_seed(0)
        u, cnd = (torch.randn(1, s, c, h, h, generator=g).to(dev, eng.dtype) for _ in range(2))
        m = torch.rand(1, s, h, h, generator=g).to(dev, eng.dtype)
        blend = timeit(lambda u=u, cnd=cnd, m=m: ops.composite_blend(u, cnd, m, 7.5), device=dev, warmup=3, iters=20)
        rows.append([s, 2 * s, t2i_step / 1e3, cmp_step / 1e3, cmp_step / t2i_step, t2i_fixed, cmp_fixed, blend])

    print(f"# compose harmonization step vs text2img step (same UNet rows) — {hardware(dev)}")
    print(f"model={args.model} {size}x{size} dtype={str(eng.dtype).removeprefix('torch.')} "
          f"backend={eng.config.backend} steps={args.steps} CFG 7.5, per step = (T(steps) - T(1)) / (steps - 1)")
    print_table("seconds per denoising step", ["segments S", "UNet rows", "text2img s/step", "compose s/step",
                                               "compose/text2img", "text2img fixed ms", "compose fixed ms",
                                               "blend ms"], rows)


if __name__ == "__main__":
    main()
