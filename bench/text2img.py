"""dreamfuse text2img vs diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline on the same model, steps
and batch.

    python -m bench.text2img                         # tiny model, CPU-sized
    python -m bench.text2img --model tiny-xl         # the SDXL-layout tiny model against StableDiffusionXLPipeline
    python -m bench.text2img --model ./sd15 --batch 1 4 --steps 20 --height 512 --width 512   # on a GPU

Both run side by side in one process on the same weights; prints seconds per denoising step and the ratio
diffusers / dreamfuse (> 1 means dreamfuse is faster). The dreamfuse figure includes its whole loop
(text encoding, CFG, scheduler), the same work the diffusers pipeline does; VAE decoding is excluded from
both (output_type "latent").
"""

from __future__ import annotations

import argparse

import torch
from dreamfuse.engine import Engine, EngineConfig

from bench._util import hardware, print_table, sync, timeit


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny', 'tiny-xl' or a diffusers SD/SDXL folder (default tiny)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--backend", default=None, choices=("triton", "torch"), help="dreamfuse attention backend")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="prompts per call (default 1 4)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per call (default 10)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the dreamfuse UNet")
    ap.add_argument("--iters", type=int, default=3, help="timed calls per configuration (median)")
    args = ap.parse_args(argv)

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cfg = EngineConfig(device=args.device, dtype=args.dtype, backend=args.backend, compile=args.compile,
                       progress=False)
    eng = Engine.from_pretrained(args.model, cfg)
    device = eng.device
    # diffusers' pipeline on a *separate* copy of the weights with its stock attention processors.
    ref = Engine.from_pretrained(args.model, EngineConfig(device=str(device), dtype=eng.dtype, backend="torch"))
    from diffusers.models.attention_processor import AttnProcessor2_0

    ref.unet.set_attn_processor(AttnProcessor2_0())
    common = dict(unet=ref.unet, vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer,
                  scheduler=ref.new_scheduler(args.steps))
    if ref.is_xl:
        pipe = StableDiffusionXLPipeline(**common, text_encoder_2=ref.text_encoder_2, tokenizer_2=ref.tokenizer_2,
                                         force_zeros_for_empty_prompt=ref.force_zeros_for_empty_prompt)
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    h = args.height or eng.default_size
    w = args.width or eng.default_size

    rows = []
    for b in args.batch:
        prompts = ["a photo of a cat"] * b

        def run_ours(prompts=prompts):
            eng.text2img(prompts, steps=args.steps, height=h, width=w, seed=0, output_type="latent")

        def run_diffusers(prompts=prompts):
            g = torch.Generator("cpu").manual_seed(0)
            pipe(prompts, num_inference_steps=args.steps, height=h, width=w, guidance_scale=7.5, generator=g,
                 output_type="latent")

        ours = timeit(run_ours, device=device, warmup=1, iters=args.iters) / 1e3 / args.steps
        theirs = timeit(run_diffusers, device=device, warmup=1, iters=args.iters) / 1e3 / args.steps
        sync(device)
        rows.append([b, f"{h}x{w}", args.steps, f"{ours:.4f}", f"{theirs:.4f}", theirs / ours])
    print(f"# text2img: dreamfuse vs diffusers {type(pipe).__name__} — {hardware(device)}")
    print(f"model={args.model} dtype={str(eng.dtype).removeprefix('torch.')} backend={eng.config.backend} "
          f"compile={args.compile} CFG 7.5 (2 UNet rows per prompt)")
    print_table("seconds per denoising step", ["batch", "size", "steps", "dreamfuse s/step", "diffusers s/step",
                                               "diffusers/dreamfuse"], rows)


if __name__ == "__main__":
    main()
