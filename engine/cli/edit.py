"""``dreamfuse edit``: img2img (an input image and a prompt) and, with ``--mask``, inpainting."""

from __future__ import annotations

import argparse

from .common import (
    CLIError,
    adapter_kwargs,
    add_adapter_args,
    add_model_args,
    add_sampling_args,
    check_adapter_cli,
    check_file,
    check_prompt_args,
    finite_float,
    load_engine,
    out_image_help,
    output_paths,
    positive_int,
    save_images,
    seed_for,
)

EXAMPLES = """\
examples:
  dreamfuse edit --image photo.png --prompt "a watercolor painting" --strength 0.6 --out painted.png   # img2img
  dreamfuse edit --image photo.png --mask mask.png --prompt "a red car" --out car.png   # inpaint: white = repaint
  dreamfuse edit --model ./stable-diffusion-v1-5 --image in.png --prompt "a castle at dusk" --strength 0.5 \\
      --sampler dpmpp-2m-karras --steps 30 --seed 7 --num-images 4 --out castle.png
  dreamfuse edit --model ./sd-v1-5-inpainting --image room.png --mask sofa.png --prompt "a green sofa" \\
      --out room2.png                                         # a 9-channel inpainting UNet is fed the mask
  dreamfuse edit --model ./stable-diffusion-xl-base-1.0 --image in.png --prompt "..." --strength 0.3   # SDXL
  dreamfuse edit --model shapes --image scene.png --mask left.png --prompt "a red circle on the left on grass" \\
      --steps 25 --guidance 4                                 # the shapes world's model

--strength (0, 1]: the last int(steps * strength) of the --steps timesteps run, from the input noised that far
(diffusers' rule): 0.3 keeps the input's layout and colours, 1 keeps next to nothing (img2img) / starts the
masked region from pure noise (inpainting). The output has the input's size unless --height/--width resize it.
"""


def register(sub, name: str, help_: str, rest: list[str]) -> None:
    p = sub.add_parser(
        name, help=help_, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Edit an image with a prompt: img2img (the input noised by --strength, then denoised under the "
                    "prompt) or, with --mask, inpainting (the mask's white region repainted, the rest kept). The "
                    "same results as diffusers' img2img and inpainting pipelines with one generator per image.")
    p.add_argument("--image", required=True, help="the input image (its size must be a multiple of 8 unless "
                                                  "--height/--width are given)")
    p.add_argument("--mask", default=None,
                   help="inpainting mask, the input's size: white = repaint, black = keep (grey levels by luma, "
                        "binarized at 0.5; transparent = keep). Without it: img2img")
    p.add_argument("--prompt", action="append", required=True,
                   help="text prompt; repeat the flag for several prompts on the same input")
    p.add_argument("--strength", type=finite_float("--strength", low=0, low_open=True, high=1), default=None,
                   help="how far the input is noised, in (0, 1] (default 0.8 for img2img, 1.0 for inpainting)")
    p.add_argument("--num-images", type=positive_int("--num-images"), default=1, help="images per prompt (default 1)")
    p.add_argument("--out", default="dreamfuse.png", help=out_image_help())
    ipa = p.add_argument_group("image prompt (IP-Adapter / IP-Adapter-Plus)")
    ipa.add_argument("--ip-adapter", default=None, metavar="WEIGHTS",
                     help="IP-Adapter weights (.bin or .safetensors), or 'tiny' / 'tiny-base' with the tiny models")
    ipa.add_argument("--image-encoder", default=None, metavar="DIR",
                     help="the adapter's CLIP image encoder folder, or 'tiny' with a tiny adapter")
    ipa.add_argument("--ip-image", default=None, metavar="REF", help="the image prompt")
    ipa.add_argument("--ip-scale", type=finite_float("--ip-scale", low=0), default=0.6,
                     help="weight of the image prompt's attention (default 0.6)")
    add_sampling_args(p, size_default="the input image's size; the input is resized to it")
    add_adapter_args(p)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from ..pipelines.img2img import check_strength, read_edit_inputs
    from .generate import check_adapter_args, load_adapter

    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    check_prompt_args(prompts, args)
    output_paths(args.out, len(prompts))  # every check on the output and the inputs before any model work
    inpaint = args.mask is not None
    strength = args.strength if args.strength is not None else (1.0 if inpaint else 0.8)
    check_strength(strength, args.steps, "--strength")
    check_file("--image", args.image)
    check_file("--mask", args.mask)
    # read now: a bad file, a mask of the wrong size or with nothing white is one line before the model loads
    images, _, masks, _, height, width = read_edit_inputs(args.image, args.mask, 1, args.height, args.width, 8,
                                                          inpaint=inpaint, image_field="--image", mask_field="--mask")
    if args.ip_image or args.ip_adapter or args.image_encoder:
        if not args.ip_adapter:
            raise CLIError("--ip-image needs --ip-adapter (an IP-Adapter weights file) and --image-encoder")
        if not args.ip_image:
            raise CLIError("--ip-image is required with --ip-adapter")
        check_adapter_args(args.ip_adapter, args.image_encoder)
        check_file("--ip-image", args.ip_image)
    seed = seed_for(args, len(prompts))
    check_adapter_cli(args)
    engine = load_engine(args)
    ip = {}
    if args.ip_adapter:
        load_adapter(engine, args.ip_adapter, args.image_encoder)
        ip = {"ip_image": args.ip_image, "ip_scale": args.ip_scale}
    kw = dict(strength=strength, negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance,
              height=height, width=width, seed=seed, sampler=args.sampler, **ip, **adapter_kwargs(engine, args))
    if inpaint:
        out = engine.inpaint(prompts, images[0], masks[0], **kw)
    else:
        out = engine.img2img(prompts, images[0], **kw)
    save_images(out, args.out)
