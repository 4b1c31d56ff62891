"""The ``dreamfuse`` command line. Thin: parses, validates, calls the Python API, saves images.

Bad input exits with status 2 and one line on stderr (``dreamfuse: error: ...``), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_EXAMPLES = """\
examples:
  dreamfuse generate --prompt "a photo of a cat" --steps 4 --out cat.png       # embedded tiny model
  dreamfuse generate --model ./stable-diffusion-v1-5 --prompt "a red car" --seed 7 --num-images 4 --out car.png
  dreamfuse generate --model sd15.safetensors --config ./stable-diffusion-v1-5 --prompt "..."  # single file
  dreamfuse generate --model ./stable-diffusion-xl-base-1.0 --prompt "a red car" --steps 30     # SDXL
  dreamfuse generate --model ./sd15 --prompt "a dog" --ip-adapter ip-adapter-plus_sd15.safetensors \\
      --image-encoder ./image_encoder --image ref.png --ip-scale 0.6                  # image prompt
"""


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _positive_int(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def _multiple_of_8(name: str):
    def parse(s: str) -> int:
        v = _positive_int(name)(s)
        if v % 8:
            raise argparse.ArgumentTypeError(f"{name} must be a multiple of 8, got {v}")
        return v
    return parse


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that loads a model."""
    g = p.add_argument_group("model and runtime")
    g.add_argument("--model", default="tiny",
                   help="'tiny' (embedded random-weight SD-layout model, the default), 'tiny-xl' (its SDXL-layout "
                        "sibling), 'random-sd15' / 'random-sdxl' (random weights in the real architectures, for "
                        "benchmarks), a diffusers SD 1.x/2.x/SDXL folder with model_index.json, or a .safetensors "
                        "checkpoint (with --config)")
    g.add_argument("--config", default=None, metavar="DIR",
                   help="for a single-file checkpoint: a diffusers folder of the same architecture giving the "
                        "configs and tokenizer (nothing is downloaded)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default: fp16 on CUDA, fp32 on CPU)")
    g.add_argument("--backend", default=None, choices=("triton", "torch"),
                   help="attention backend (default: triton on CUDA, torch on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first call)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_sampling_args(p: argparse.ArgumentParser, *, steps: int = 50, guidance: float = 7.5,
                      size_default: str = "the model's native size") -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--negative-prompt", default=None, help="negative prompt (default: empty)")
    g.add_argument("--steps", type=_positive_int("--steps"), default=steps, help=f"DDIM steps (default {steps})")
    g.add_argument("--guidance", type=float, default=guidance,
                   help=f"classifier-free guidance scale; <= 1 disables CFG (default {guidance})")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the first image; image i uses seed + i (default: random, printed)")
    g.add_argument("--height", type=_multiple_of_8("--height"), default=None,
                   help=f"image height, a multiple of 8 (default: {size_default})")
    g.add_argument("--width", type=_multiple_of_8("--width"), default=None,
                   help=f"image width, a multiple of 8 (default: {size_default})")


def _non_negative_float(name: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not v >= 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {s}")
        return v
    return parse


def check_ip_adapter_args(args) -> None:
    """``--ip-adapter``, ``--image-encoder`` and ``--image`` go together, and must exist (checked before any model
    work)."""
    given = {"--ip-adapter": args.ip_adapter, "--image-encoder": args.image_encoder, "--image": args.image}
    if not any(given.values()):
        return
    if not args.ip_adapter:
        raise CLIError("--image needs --ip-adapter (an IP-Adapter weights file) and --image-encoder")
    for flag, value in given.items():
        if not value:
            raise CLIError(f"{flag} is required with --ip-adapter")
    if not Path(args.ip_adapter).expanduser().is_file():
        raise CLIError(f"--ip-adapter: file {args.ip_adapter!r} does not exist")
    if not Path(args.image_encoder).expanduser().is_dir():
        raise CLIError(f"--image-encoder: folder {args.image_encoder!r} does not exist")
    if not Path(args.image).expanduser().is_file():
        raise CLIError(f"--image: file {args.image!r} does not exist")


def load_engine(args):
    from .config import EngineConfig
    from .engine import Engine
    from .synthetic import SYNTHETIC_NAMES
    from .tiny import TINY_NAMES

    config = EngineConfig(device=args.device, dtype=args.dtype, backend=args.backend, compile=args.compile,
                          progress=False if args.no_progress else None)
    if args.model not in TINY_NAMES + SYNTHETIC_NAMES and not Path(args.model).expanduser().exists():
        raise CLIError(f"--model: {args.model!r} does not exist")
    return Engine.from_pretrained(args.model, config, config_dir=args.config)


def output_paths(out: str, n: int) -> list[Path]:
    """``out`` for one image; ``stem-0.png``, ``stem-1.png``... for several."""
    path = Path(out)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise CLIError(f"--out: {out!r} needs an image extension (.png, .jpg, .webp)")
    if not path.parent.exists():
        raise CLIError(f"--out: folder {str(path.parent)!r} does not exist")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def save_images(images, out: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    for img, path in zip(images, output_paths(out, len(images))):
        meta = PngInfo()
        for k, v in img.info.items():
            if isinstance(v, str):
                meta.add_text(k, v)
        img.save(path, pnginfo=meta if path.suffix.lower() == ".png" else None)
        print(f"wrote {path} (seed {img.info.get('seed', '?')})")


def cmd_generate(args) -> None:
    from .engine import random_seed

    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    output_paths(args.out, len(prompts))  # fail on a bad --out before any model work
    check_ip_adapter_args(args)
    seed = random_seed() if args.seed is None else args.seed
    engine = load_engine(args)
    if args.relation:
        engine.load_relation(args.relation)
    ip = {}
    if args.ip_adapter:
        engine.load_ip_adapter(args.ip_adapter, args.image_encoder)
        ip = {"ip_image": args.image, "ip_scale": args.ip_scale}
    images = engine.text2img(prompts, negative_prompt=args.negative_prompt, steps=args.steps,
                             guidance_scale=args.guidance, height=args.height, width=args.width, seed=seed, **ip)
    save_images(images, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreamfuse",
        description="dreamfuse: a compact inference engine for personalized, relational and compositional "
                    "diffusion on Stable Diffusion UNets, with fused Triton attention kernels.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = sub.add_parser("generate", help="text-to-image", epilog=_EXAMPLES,
                         description="Generate images from text prompts (DDIM + classifier-free guidance, one "
                                     "batched UNet call per step).",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("--prompt", action="append", required=True,
                     help="text prompt; repeat the flag for a batch of different prompts")
    gen.add_argument("--num-images", type=_positive_int("--num-images"), default=1,
                     help="images per prompt (default 1)")
    gen.add_argument("--out", default="dreamfuse.png",
                     help="output image; with several images, OUT-0.png, OUT-1.png, ... (default dreamfuse.png)")
    gen.add_argument("--relation", default=None, metavar="FILE",
                     help="a ReVersion learned_embeds.bin: its relation token (e.g. <R>) becomes usable in prompts")
    ipa = gen.add_argument_group("image prompt (IP-Adapter / IP-Adapter-Plus, SD 1.x)")
    ipa.add_argument("--ip-adapter", default=None, metavar="WEIGHTS",
                     help="IP-Adapter weights in the standard layout (.bin or .safetensors); base vs Plus is detected")
    ipa.add_argument("--image-encoder", default=None, metavar="DIR",
                     help="the adapter's CLIP image encoder (a local transformers folder)")
    ipa.add_argument("--image", default=None, metavar="REF", help="reference image (the image prompt)")
    ipa.add_argument("--ip-scale", type=_non_negative_float("--ip-scale"), default=0.6,
                     help="weight of the image prompt's attention (default 0.6; 0 = text only)")
    add_sampling_args(gen)
    add_model_args(gen)
    gen.set_defaults(func=cmd_generate)

    # Each pipeline module registers its own subcommand with `register_cli(subparsers)`.
    import importlib

    for module in _PIPELINE_CLIS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a broken pipeline must not hide behind a missing one
                raise
            continue
        mod.register_cli(sub)
    return parser


_PIPELINE_CLIS = (
    "dreamfuse.engine.pipelines.personalize",
    "dreamfuse.engine.pipelines.composite",
    "dreamfuse.engine.relation",
    "dreamfuse.engine.patch_quality",
    "dreamfuse.engine.train.cli",
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"dreamfuse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dreamfuse: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
