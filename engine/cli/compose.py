"""``dreamfuse compose``: MSP / Composite Diffusion from a colour layout."""

from __future__ import annotations

import argparse

from ..samplers import STATELESS_SAMPLERS
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
SEGMENTS.json maps each layout colour to a prompt, or to an object:
  {"#ff0000": "a red car",
   "#0000ff": {"prompt": "a sks dog", "negative_prompt": "blurry", "guidance": 9, "subject": true},
   "background": "a city street"}
  "background"  the prompt of every pixel whose colour is not listed (default: the global --prompt)
  "guidance"    this segment's CFG scale (default --guidance)
  "subject"     true: subject-aware guidance works on this segment (with --sal-model); when no segment says
                "subject", every colour segment (not the background) is guided

subject-aware guidance ("sal", MSP-Diffusion): a segmentation model scores the predicted image inside each subject
segment; the gradient of its entropy sharpens the subject there. --sal-model is a TorchScript file, i.e. a program:
loading it runs its code with your permissions. Load only files you trust, as you would run a script.

example:
  dreamfuse compose --layout layout.png --segments segments.json --prompt "a dog next to a car in a street" \\
      --seed 0 --out street.png
"""


def register(sub, name: str, help_: str, rest: list[str]) -> None:
    from ..layout import DEFAULT_TOLERANCE
    from ..pipelines.composite import GLOBAL_STEPS, GLOBAL_STEPS_SCAFFOLD, HARMONIZE, SCAFFOLD_FRACTION

    p = sub.add_parser(
        name, help=help_, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Composite generation: every colour of the layout image is a segment with its own prompt "
                    "(SEGMENTS.json maps colours to prompts); a global diffuser, per-segment scaffolding and "
                    "harmonization over the shared latent (MSP-Diffusion).")
    p.add_argument("--layout", required=True, help="layout image: one flat colour per segment (PNG recommended)")
    p.add_argument("--segments", required=True, help="SEGMENTS.json mapping colours ('#rrggbb') to prompts")
    p.add_argument("--prompt", required=True, help="the global prompt")
    p.add_argument("--out", default="dreamfuse.png", help=out_image_help())
    g = p.add_argument_group("composite")
    g.add_argument("--scaffold-image", default=None,
                   help="scaffolding image (changes the default --global-steps to 8)")
    g.add_argument("--global-steps", type=non_negative_int("--global-steps"), default=None,
                   help=f"global diffuser steps (default {GLOBAL_STEPS}, {GLOBAL_STEPS_SCAFFOLD} with a scaffold)")
    g.add_argument("--scaffold-fraction", type=finite_float("--scaffold-fraction", low=0, high=1),
                   default=SCAFFOLD_FRACTION,
                   help=f"scaffolding steps as a fraction of --steps (default {SCAFFOLD_FRACTION}; our choice)")
    g.add_argument("--harmonize", choices=HARMONIZE, default="blend",
                   help="harmonization: blend the segments' predictions (default) or use the global prompt")
    g.add_argument("--tolerance", type=finite_float("--tolerance", low=0), default=DEFAULT_TOLERANCE,
                   help="colour matching: a pixel joins the nearest layout colour within this RGB distance "
                        "(0-441), so anti-aliased edges and JPEG noise still land in a segment; farther pixels "
                        f"go to the background (default {DEFAULT_TOLERANCE:g})")
    g.add_argument("--blur", type=finite_float("--blur", low=0), default=0.0,
                   help="mask edge softening, radius in latent pixels (default 0)")
    g.add_argument("--sal-model", default=None, metavar="FILE",
                   help="subject-aware guidance: a TorchScript segmentation model (a program: load only trusted "
                        "files); see below")
    g.add_argument("--sal-scale", type=finite_float("--sal-scale", low=0), default=0.0,
                   help="subject-aware guidance strength (default 0 = off)")
    add_sampling_args(p, steps=80, guidance=7.5, size_default="the layout's; it must match",
                      samplers=STATELESS_SAMPLERS,
                      sampler_note=" (multistep and second-order samplers cannot follow segments merging)")
    add_adapter_args(p)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from ..layout import load_layout_image, parse_segments

    check_call_limits(args, 1, "--prompt")
    check_prompt_args([args.prompt], args)
    output_paths(args.out, 1)  # fail on bad input before any model work
    check_file("--segments", args.segments)
    parse_segments(args.segments, "--segments")
    check_file("--layout", args.layout)
    load_layout_image(args.layout, "--layout")
    check_file("--scaffold-image", args.scaffold_image)
    if args.sal_scale > 0 and args.sal_model is None:
        raise CLIError("--sal-model: needed with --sal-scale > 0")
    check_file("--sal-model", args.sal_model)
    seed = seed_for(args, 1)
    check_adapter_cli(args)
    engine = load_engine(args)
    sal_model = None
    if args.sal_model is not None and args.sal_scale > 0:
        from ..pipelines.composite import load_sal_model

        sal_model = load_sal_model(args.sal_model, engine.device)  # the user's own file, named on the command line
    images = engine.compose(
        args.layout, args.segments, prompt=args.prompt, negative_prompt=args.negative_prompt,
        scaffold_image=args.scaffold_image, steps=args.steps, guidance_scale=args.guidance, height=args.height,
        width=args.width, seed=seed, global_steps=args.global_steps, scaffold_fraction=args.scaffold_fraction,
        harmonize=args.harmonize, tolerance=args.tolerance, blur=args.blur, sal_model=sal_model,
        sal_scale=args.sal_scale, sampler=args.sampler, **adapter_kwargs(engine, args))
    save_images(images, args.out)
