"""``dreamfuse generate``: text-to-image, optionally with an IP-Adapter image prompt or a ReVersion relation."""

from __future__ import annotations

import argparse

from .common import (
    CLIError,
    adapter_kwargs,
    add_adapter_args,
    add_model_args,
    add_sampling_args,
    check_adapter_cli,
    check_call_limits,
    check_file,
    check_prompt_args,
    finite_float,
    load_engine,
    out_image_help,
    output_paths,
    positive_int,
    save_images,
    seed_for,
    token_file_spec,
)

EXAMPLES = """\
examples:
  dreamfuse generate --prompt "a photo of a cat" --steps 4 --out cat.png       # embedded tiny model
  dreamfuse generate --model ./stable-diffusion-v1-5 --prompt "a red car" --seed 7 --num-images 4 --out car.png
  dreamfuse generate --model sd15.safetensors --config ./stable-diffusion-v1-5 --prompt "..."  # single file
  dreamfuse generate --model ./stable-diffusion-xl-base-1.0 --prompt "a red car" --steps 30     # SDXL
  dreamfuse generate --model ./sd15 --prompt "a red car" --sampler dpmpp-2m-karras --steps 25    # faster sampler
  dreamfuse generate --model ./sd15 --prompt "a dog" --ip-adapter ip-adapter-plus_sd15.safetensors \\
      --image-encoder ./image_encoder --image ref.png --ip-scale 0.6                  # image prompt
  dreamfuse generate --ip-adapter tiny --image-encoder tiny --image ref.png --prompt "a dog"   # tiny adapter
  dreamfuse generate --relation ./out/learned_embeds.bin --prompt "cat <R> box"       # ReVersion relation
  dreamfuse generate --model ./sd15 --textual-inversion charturner.pt --prompt "charturner, a knight"  # A1111 .pt
  dreamfuse generate --model ./sd15 --textual-inversion style.safetensors:<style> --prompt "a cat, <style>"
"""


def register(sub, name: str, help_: str, rest: list[str]) -> None:
    from ..limits import DEFAULT_LIMITS

    p = sub.add_parser(name, help=help_, epilog=EXAMPLES,
                       description="Generate images from text prompts (DDIM or another --sampler, classifier-free "
                                   "guidance, one batched UNet call per step).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", required=True,
                   help="text prompt; repeat the flag for a batch of different prompts")
    p.add_argument("--num-images", type=positive_int("--num-images", DEFAULT_LIMITS.max_images, "limits.max_images"),
                   default=1, help=f"images per prompt (default 1); at most {DEFAULT_LIMITS.max_images} images "
                                   "in all (prompts x images)")
    p.add_argument("--out", default="dreamfuse.png", help=out_image_help())
    p.add_argument("--relation", default=None, metavar="FILE",
                   help="a ReVersion learned_embeds.bin: its relation token (e.g. <R>) becomes usable in prompts "
                        "(SD 1.x/2.x)")
    p.add_argument("--textual-inversion", action="append", type=token_file_spec, default=None,
                   metavar="FILE[:TOKEN]",
                   help="a textual inversion (diffusers learned_embeds.bin/.safetensors, AUTOMATIC1111 .pt or "
                        ".safetensors; one or several vectors) whose token prompts may use; TOKEN names it (default: "
                        "the file's own name for it, an AUTOMATIC1111 .safetensors' file stem); repeat for several "
                        "(SD 1.x/2.x)")
    ipa = p.add_argument_group("image prompt (IP-Adapter / IP-Adapter-Plus; SD 1.x/2.x and SDXL)")
    ipa.add_argument("--ip-adapter", default=None, metavar="WEIGHTS",
                     help="IP-Adapter weights in the standard layout (.bin or .safetensors; base vs Plus is "
                          "detected), or 'tiny' / 'tiny-base' for the embedded tiny adapters (with --model tiny or "
                          "tiny-xl)")
    ipa.add_argument("--image-encoder", default=None, metavar="DIR",
                     help="the adapter's CLIP image encoder (a local transformers folder), or 'tiny' with a tiny "
                          "adapter")
    ipa.add_argument("--image", default=None, metavar="REF", help="reference image (the image prompt)")
    ipa.add_argument("--ip-scale", type=finite_float("--ip-scale", low=0), default=0.6,
                     help="weight of the image prompt's attention (default 0.6; 0 = text only)")
    add_sampling_args(p)
    add_adapter_args(p)
    add_model_args(p)
    p.set_defaults(func=run)


def check_adapter_args(ip_adapter, image_encoder) -> None:
    """``--ip-adapter`` and ``--image-encoder`` go together and must exist (before any model work); the embedded
    tiny adapters go with ``--image-encoder tiny``. Shared with ``dreamfuse serve``."""
    from ..tiny_adapters import TINY_ADAPTERS

    if not ip_adapter and not image_encoder:
        return
    for flag, value in (("--ip-adapter", ip_adapter), ("--image-encoder", image_encoder)):
        if not value:
            raise CLIError(f"{flag} is required: --ip-adapter and --image-encoder go together")
    if ip_adapter in TINY_ADAPTERS:
        if image_encoder != "tiny":
            raise CLIError(f"--image-encoder: the embedded adapter {ip_adapter!r} comes with its own encoder; "
                           "pass --image-encoder tiny")
    else:
        check_file("--ip-adapter", ip_adapter)
        if image_encoder == "tiny":
            raise CLIError("--image-encoder: 'tiny' goes with --ip-adapter tiny or tiny-base")
        from ..ip_adapter import check_image_encoder_folder

        check_image_encoder_folder(image_encoder, "--image-encoder")


def load_adapter(engine, ip_adapter, image_encoder) -> None:
    """Load the IP-Adapter the (checked) options name, the embedded tiny ones included."""
    from ..tiny_adapters import TINY_ADAPTERS, build_tiny_ip_adapter

    if ip_adapter in TINY_ADAPTERS:
        engine.load_ip_adapter(build_tiny_ip_adapter(engine, plus=ip_adapter == "tiny"))
    else:
        engine.load_ip_adapter(ip_adapter, image_encoder)


def check_ip_adapter_args(args) -> None:
    """``--ip-adapter``, ``--image-encoder`` and ``--image`` go together and must exist (before any model work)."""
    if not (args.ip_adapter or args.image_encoder or args.image):
        return
    if not args.ip_adapter:
        raise CLIError("--image needs --ip-adapter (an IP-Adapter weights file) and --image-encoder")
    if not args.image:
        raise CLIError("--image is required with --ip-adapter")
    check_adapter_args(args.ip_adapter, args.image_encoder)
    check_file("--image", args.image)


def run(args) -> None:
    check_call_limits(args, len(args.prompt) * args.num_images, "--num-images" if args.num_images > 1 else "--prompt")
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    check_prompt_args(prompts, args)
    output_paths(args.out, len(prompts))  # every check on the output before any model work
    check_ip_adapter_args(args)
    check_file("--relation", args.relation)
    for path, _ in args.textual_inversion or ():
        check_file("--textual-inversion", path)
    seed = seed_for(args, len(prompts))
    check_adapter_cli(args)
    engine = load_engine(args)
    if args.relation:
        engine.load_relation(args.relation)
    for path, token in args.textual_inversion or ():
        try:
            engine.load_textual_inversion(path, token=token)
        except ValueError as e:
            raise CLIError(f"--textual-inversion: {str(e).removeprefix('relation: ')}") from None
    ip = {}
    if args.ip_adapter:
        load_adapter(engine, args.ip_adapter, args.image_encoder)
        ip = {"ip_image": args.image, "ip_scale": args.ip_scale}
    images = engine.text2img(prompts, negative_prompt=args.negative_prompt, steps=args.steps,
                             guidance_scale=args.guidance, height=args.height, width=args.width, seed=seed,
                             sampler=args.sampler, **ip, **adapter_kwargs(engine, args))
    save_images(images, args.out)
