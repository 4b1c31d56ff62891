"""dreamfuse text2img vs diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline on the same modules, steps
and batch.

    python -m bench.text2img                         # tiny model, CPU-sized
    python -m bench.text2img --model tiny-xl         # the SDXL-layout tiny model against StableDiffusionXLPipeline
    python -m bench.text2img --model random-sd15 --height 512 --width 512 --steps 20   # SD 1.5-sized, random weights
    python -m bench.text2img --model random-sdxl --batch 1 --steps 20                   # SDXL-sized (GPU)
    python -m bench.text2img --model ./sd15 --batch 1 4 --steps 20 --height 512 --width 512   # on a GPU
    python -m bench.text2img --sampler all           # each sampler at its usual step count vs DDIM at 50
    python -m bench.text2img --model random-sd15 --compile --cuda-graphs --diffusers-compile --batch 1   # compiled

One model in memory: diffusers' pipeline is built from the engine's own modules (UNet, VAE, text encoders,
tokenizers; no copy) and runs with diffusers' stock attention processors swapped in for its calls
(``Engine.stock_attention``; measured bit-identical to a separately loaded stock pipeline). CFG 7.5 with the
default (empty) negative prompt on both sides; VAE decoding is excluded from both (output_type "latent").

Two dreamfuse columns, because dreamfuse caches prompt embeddings and diffusers does not:

* "warm cache": the same prompts every call, so after warm-up dreamfuse never runs the text encoder; its
  per-step figure is the denoising loop alone (CFG, scheduler, UNet), while diffusers encodes every call;
* "cold": the prompt cache is cleared (``engine.clear_prompt_cache()``) before every call, as with distinct
  prompts: text encoding is in the figure, the same work the diffusers pipeline does. This is the like-for-like
  ratio; the warm one adds what the cache saves.

The three are timed interleaved, call by call (dreamfuse warm, dreamfuse cold, diffusers, again ...), ``--iters``
timed calls each after one warm-up round; every cell is ``median / min`` seconds per denoising step (the whole
call divided by ``--steps``), ratios are diffusers / dreamfuse (> 1: dreamfuse is faster).

``--compile`` compiles the dreamfuse UNet call (``EngineConfig(compile=True)``: ``torch.compile(unet,
dynamic=False)``), ``--cuda-graphs`` with mode ``"reduce-overhead"`` (CUDA graphs; ``EngineConfig.cuda_graphs``);
``--diffusers-compile`` gives diffusers' pipeline the same treatment (``pipe.unet = torch.compile(unet, mode=...,
dynamic=False)``, the recipe of diffusers' docs), so the two compiled sides are compared like for like. The
compiles happen in the warm-up round (each batch size compiles its own graph: ``dynamic=False``).

``--sampler NAME ... | all`` times dreamfuse alone instead: seconds per image with each sampler at its usual step
count (the ``steps`` of ``dreamfuse.engine.samplers.SAMPLERS``: DPM-Solver++ 25, UniPC 20, LCM 4, ...) against
DDIM at 50 steps, interleaved in the same run; the ratio is the speed-up over DDIM 50 (what a user gets by
switching, at the step counts these samplers are used at; image quality at those counts is the samplers' own
claim, not measured here).
"""

from __future__ import annotations

import argparse

import torch
from dreamfuse.engine import Engine, EngineConfig

from bench._util import add_model_args, compare, hardware, print_table


def diffusers_pipeline(eng: Engine, steps: int):
    """diffusers' text-to-image pipeline for the engine's model, on the engine's modules (no second copy of the
    weights) and a fresh scheduler of the engine's type and config. Run it inside ``eng.stock_attention()``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = dict(unet=eng.unet, vae=eng.vae, text_encoder=eng.text_encoder, tokenizer=eng.tokenizer,
                  scheduler=eng.new_scheduler(steps))
    if eng.is_xl:
        pipe = StableDiffusionXLPipeline(**common, text_encoder_2=eng.text_encoder_2, tokenizer_2=eng.tokenizer_2,
                                         force_zeros_for_empty_prompt=eng.force_zeros_for_empty_prompt)
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--backend", default=None, choices=("triton", "torch"), help="dreamfuse attention backend")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="prompts per call (default 1 4)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per call (default 10)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the dreamfuse UNet")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="with --compile (and --diffusers-compile): mode reduce-overhead, CUDA graphs (CUDA only)")
    ap.add_argument("--diffusers-compile", action="store_true",
                    help="torch.compile diffusers' UNet too (same mode as dreamfuse's), the compiled peer")
    ap.add_argument("--iters", type=int, default=10,
                    help="timed calls per column, interleaved (default 10; median and min are reported)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's); 1 avoids multi-ms stalls of multi-threaded ops "
                         "when other processes load a shared machine")
    ap.add_argument("--sampler", nargs="+", default=None, metavar="NAME",
                    help="time these samplers (or 'all') at their usual step counts against DDIM at 50 steps, "
                         "dreamfuse only (see the module docs)")
    args = ap.parse_args(argv)
    if args.iters < 1:
        ap.error("--iters must be >= 1")
    if args.cuda_graphs and not (args.compile or args.diffusers_compile):
        ap.error("--cuda-graphs needs --compile or --diffusers-compile")
    if args.sampler is not None:
        from dreamfuse.engine.samplers import SAMPLERS

        names = list(SAMPLERS) if args.sampler == ["all"] else args.sampler
        unknown = [n for n in names if n not in SAMPLERS]
        if unknown:
            ap.error(f"--sampler: unknown {', '.join(unknown)}; choose from {', '.join(SAMPLERS)} or 'all'")
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = EngineConfig(device=args.device, dtype=args.dtype, backend=args.backend, compile=args.compile,
                       cuda_graphs=args.cuda_graphs, progress=False)
    eng = Engine.from_pretrained(args.model, cfg)
    device = eng.device
    h = args.height or eng.default_size
    w = args.width or eng.default_size
    if args.sampler is not None:
        return sampler_table(eng, names, args, h, w)
    pipe = diffusers_pipeline(eng, args.steps)
    graphs = args.cuda_graphs and device.type == "cuda"
    if args.diffusers_compile:
        # a second compiled wrapper of the same module: dynamo guards on the (stock) processors, so it compiles its
        # own graph and never runs dreamfuse's
        pipe.unet = torch.compile(eng.unet, mode="reduce-overhead" if graphs else None, dynamic=False)

    rows = []
    for b in args.batch:
        prompts = ["a photo of a cat"] * b

        def run_warm(prompts=prompts):
            eng.text2img(prompts, steps=args.steps, height=h, width=w, seed=0, output_type="latent")

        def run_cold(prompts=prompts):
            eng.clear_prompt_cache()
            eng.text2img(prompts, steps=args.steps, height=h, width=w, seed=0, output_type="latent")

        def run_diffusers(prompts=prompts):
            g = torch.Generator("cpu").manual_seed(0)
            pipe(prompts, num_inference_steps=args.steps, height=h, width=w, guidance_scale=7.5, generator=g,
                 output_type="latent")

        t = compare({"warm": run_warm, "cold": run_cold, "diffusers": run_diffusers}, device=device, warmup=1,
                    iters=args.iters, around={"diffusers": eng.stock_attention})
        warm, cold, theirs = (t[k] / 1e3 / args.steps for k in ("warm", "cold", "diffusers"))
        rows.append([b, f"{h}x{w}", args.steps, warm, cold, theirs, theirs / warm, theirs / cold])
    print(f"# text2img: dreamfuse vs diffusers {type(pipe).__name__} on the same modules — {hardware(device)}")
    print(f"model={args.model} dtype={str(eng.dtype).removeprefix('torch.')} backend={eng.config.backend} "
          f"compile={args.compile} cuda_graphs={graphs} diffusers_compile={args.diffusers_compile} CFG 7.5 (2 UNet "
          f"rows per prompt); diffusers with its stock attention processors; {args.iters} interleaved calls per "
          "column")
    print_table("seconds per denoising step (whole call / steps)",
                ["batch", "size", "steps", "dreamfuse s/step, warm prompt cache",
                 "dreamfuse s/step, cold (cache cleared)", "diffusers s/step", "diffusers/dreamfuse warm",
                 "diffusers/dreamfuse cold"], rows)


def sampler_table(eng: Engine, names: list[str], args, h: int, w: int) -> None:
    from dreamfuse.engine.samplers import SAMPLERS

    rows = []
    for b in args.batch:
        prompts = ["a photo of a cat"] * b
        fns = {"ddim-50": lambda prompts=prompts: eng.text2img(prompts, steps=50, height=h, width=w, seed=0,
                                                               output_type="latent")}
        for name in names:
            fns[name] = (lambda prompts=prompts, name=name: eng.text2img(
                prompts, steps=SAMPLERS[name].steps, height=h, width=w, seed=0, output_type="latent", sampler=name))
        t = compare(fns, device=eng.device, warmup=1, iters=args.iters)
        base = t["ddim-50"] / 1e3 / b
        for name in names:
            per_image = t[name] / 1e3 / b
            rows.append([b, name, SAMPLERS[name].scheduler, SAMPLERS[name].steps, per_image, base, base / per_image])
    print(f"# text2img samplers: each at its usual step count vs DDIM 50 — {hardware(eng.device)}")
    print(f"model={args.model} {h}x{w} dtype={str(eng.dtype).removeprefix('torch.')} backend={eng.config.backend} "
          f"CFG 7.5; {args.iters} interleaved calls per column; warm prompt cache on all")
    print_table("seconds per image", ["batch", "sampler", "diffusers class", "steps", "s/image", "DDIM 50 s/image",
                                      "speed-up vs DDIM 50"], rows)


if __name__ == "__main__":
    main()
