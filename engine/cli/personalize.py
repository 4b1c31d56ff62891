"""``dreamfuse personalize``: DreamMatcher appearance matching of a reference subject."""

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
    non_negative_int,
    out_image_help,
    output_paths,
    save_images,
    seed_for,
)

EPILOG = """\
examples:
  dreamfuse personalize --model ./dreambooth-dog --reference dog.png --prompt "a photo of a sks dog on the beach" \\
      --subject-token sks --seed 0 --out dog.png
  dreamfuse personalize --reference dog.png --prompt "a sks dog" --subject-token sks --lambda-g 50   # + guidance
  dreamfuse personalize --reference dog.png --prompt "a dog" --no-ama      # the baseline: no appearance matching
"""


def register(sub, name: str, help_: str, rest: list[str]) -> None:
    p = sub.add_parser(
        name, help=help_, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="DreamMatcher personalization (appearance-matching self-attention). The reference image is "
                    "DDIM-inverted and denoised beside the targets; the targets' self-attention takes values "
                    "warped from it by semantic matching, where the subject's cross-attention says the subject is.")
    p.add_argument("--reference", required=True, help="reference image of the subject")
    p.add_argument("--prompt", action="append", required=True, help="target prompt (repeat for several targets)")
    p.add_argument("--subject-token", default=None,
                   help="the word naming the subject in every prompt (e.g. sks); required unless --no-ama and "
                        "--lambda-g 0")
    p.add_argument("--reference-prompt", default="", help="prompt of the reference branch (default empty)")
    p.add_argument("--out", default="dreamfuse.png", help=out_image_help())
    g = p.add_argument_group("DreamMatcher")
    g.add_argument("--no-ama", action="store_true", help="switch appearance-matching self-attention off")
    g.add_argument("--ama-start", type=non_negative_int("--ama-start"), default=None,
                   help="first AMA step (default round(4/50·steps), >= 1)")
    g.add_argument("--ama-end", type=non_negative_int("--ama-end"), default=None,
                   help="AMA stops before this step (default: all steps)")
    g.add_argument("--ama-blocks", type=non_negative_int("--ama-blocks"), nargs="+", default=None,
                   help="up_blocks with AMA, after the foreground block (default: 2 3 for SD, 1 for SDXL)")
    g.add_argument("--lambda-c", type=finite_float("--lambda-c", low=0, low_open=True), default=0.4,
                   help="cycle-consistency threshold factor λc: a match is kept when going target -> reference -> "
                        "target lands within λc · H · (foreground ratio) of where it started (default 0.4)")
    g.add_argument("--ama-mask", choices=("consistent", "foreground", "none"), default="consistent",
                   help="target positions that take the reference's warped values: 'consistent' (default) "
                        "DreamMatcher's foreground x cycle-consistency mask, 'foreground' the foreground mask alone, "
                        "'none' every position (the paper's semantic-matching ablation)")
    g.add_argument("--lambda-g", type=finite_float("--lambda-g", low=0), default=0.0,
                   help="semantic matching guidance strength (default 0 = off; the paper uses 50-75; costs a UNet "
                        "backward per step)")
    add_sampling_args(p, steps=50, guidance=10.0, samplers=("ddim",))
    add_adapter_args(p)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from ..pipelines.common import check_prompts

    check_call_limits(args, len(args.prompt), "--prompt")
    check_prompt_args(args.prompt, args)
    check_prompts([args.reference_prompt], "--reference-prompt")
    if args.subject_token is None and (not args.no_ama or args.lambda_g > 0):
        raise CLIError("--subject-token: required for appearance matching and guidance (or pass --no-ama)")
    output_paths(args.out, len(args.prompt))
    check_file("--reference", args.reference)
    seed = seed_for(args, len(args.prompt))
    check_adapter_cli(args)
    engine = load_engine(args)
    images = engine.personalize(
        args.prompt, args.reference, subject_token=args.subject_token, reference_prompt=args.reference_prompt,
        negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance, height=args.height,
        width=args.width, seed=seed, ama=not args.no_ama, ama_start=args.ama_start, ama_end=args.ama_end,
        ama_blocks=args.ama_blocks, lambda_c=args.lambda_c, lambda_g=args.lambda_g, ama_mask=args.ama_mask,
        **adapter_kwargs(engine, args))
    save_images(images, args.out)
