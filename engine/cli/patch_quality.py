"""``dreamfuse patch-quality``: PatchDPO's patch-quality map of a generated image against its reference."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CLIError, check_dir, check_file, finite_float, positive_int, quiet_libraries

DESCRIPTION = """\
Estimate PatchDPO's patch quality of a generated image against a reference: patch features
of a vision backbone (ViT / DINOv2 / CLIP vision, a local transformers folder), the cosine
similarity of each generated patch to its best-matching reference patch, mapped to [0, 1]
by clamp((s - floor) / (1 - floor)) (identical patches = 1). Writes the generated image and
its heat map (blue = 0, red = 1) side by side and prints the mean quality."""

EPILOG = """\
examples:
  dreamfuse patch-quality --backbone ./dinov2-base --ref dog.png --gen dog_gen.png --out dog_quality.png \\
      --latent-size 64
  dreamfuse patch-quality --backbone tiny --ref ref.png --gen gen.png --out map.png   # embedded tiny ViT
"""


def register(sub, name: str, help_: str, rest: list[str]) -> None:
    from ..limits import DEFAULT_LIMITS

    p = sub.add_parser(name, help=help_, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, metavar="DIR",
                   help="local transformers vision model folder, or 'tiny' (an embedded seeded ViT: runs anywhere, "
                        "meaningless scores)")
    p.add_argument("--ref", required=True, help="reference image")
    p.add_argument("--gen", required=True, help="generated image")
    p.add_argument("--out", required=True, help="output PNG: generated image | heat map")
    most = DEFAULT_LIMITS.max_side // 8
    p.add_argument("--latent-size", type=positive_int("--latent-size", most, "the latent grid of limits.max_side"),
                   default=None, help=f"resample the map to this square latent grid, at most {most} (e.g. 64 for "
                                      "SD 1.5 at 512); default: the backbone's patch grid")
    p.add_argument("--image-size", type=positive_int("--image-size", DEFAULT_LIMITS.max_side, "limits.max_side"),
                   default=None, help="backbone input size, a multiple of its patch size giving at most 64x64 "
                                      "patches (default: the config's image_size)")
    p.add_argument("--floor", type=finite_float("--floor", low=-1, high=0.999), default=0.0,
                   help="cosine similarity mapped to quality 0, in [-1, 1) (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--backend", default=None, choices=("triton", "torch"),
                   help="matching backend (default: triton on CUDA, torch on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no loading messages")
    p.set_defaults(func=run)


def check_backbone_arg(value: str, flag: str = "--backbone") -> None:
    if value == "tiny":
        return
    path = check_dir(flag, value)
    if not (path / "config.json").is_file():
        raise CLIError(f"{flag}: {value!r} is not a transformers model folder (no config.json)")


def check_image_size_arg(backbone: str, image_size: int | None, flag: str = "--image-size") -> None:
    """``--image-size`` against the patch size in the backbone folder's ``config.json`` (read as JSON, before the
    model loads); the estimator checks it again (and the embedded ``tiny`` one) when it is built."""
    import json

    if image_size is None or backbone == "tiny":
        return
    try:
        cfg = json.loads((Path(backbone).expanduser() / "config.json").read_text(encoding="utf-8"))
        patch = cfg.get("vision_config", cfg).get("patch_size")
    except (OSError, ValueError, AttributeError, RecursionError):
        return  # loading the backbone says what is wrong with it
    if isinstance(patch, int) and not isinstance(patch, bool) and patch > 0:
        from ..patch_quality import check_image_size

        try:
            check_image_size(image_size, patch, flag)
        except ValueError as e:
            raise CLIError(str(e)) from None


_ESTIMATOR_OPTIONS = {"image_size: ": "--image-size: ", "floor: ": "--floor: "}


def make_estimator(value: str, flag: str = "--backbone", **kwargs):
    """A :class:`PatchQualityEstimator` for ``--backbone`` (a folder or ``tiny``); loading errors become one line."""
    from ..patch_quality import PatchQualityEstimator

    backbone = value
    if value == "tiny":
        from ..tiny_adapters import build_tiny_backbone

        backbone = build_tiny_backbone()
    try:
        return PatchQualityEstimator(backbone, **kwargs)
    except Exception as e:  # noqa: BLE001 - an unknown, corrupt or unsuitable model folder, whatever raised
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if first.startswith("backbone: "):  # the library's message already names the folder
            raise CLIError(flag + first.removeprefix("backbone")) from None
        for field, option in _ESTIMATOR_OPTIONS.items():  # an option the user typed
            if first.startswith(field) and kwargs.get(field[:-2]) is not None:
                raise CLIError(option + first.removeprefix(field)) from None
        raise CLIError(f"{flag} {value!r}: {first}") from None


def run(args) -> None:
    from ..files import save_image_atomic
    from ..images import open_image
    from ..validation import check_device

    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out: {args.out!r} must be a .png file")
    if not out.parent.is_dir():
        raise CLIError(f"--out: folder {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise CLIError(f"--out: {args.out!r} is a folder, not an image file")
    check_backbone_arg(args.backbone)
    check_image_size_arg(args.backbone, args.image_size)
    device = check_device(args.device, "--device")
    check_file("--ref", args.ref)
    check_file("--gen", args.gen)
    ref, gen = open_image(args.ref, "--ref"), open_image(args.gen, "--gen")
    quiet_libraries(args.no_progress or not __import__("sys").stderr.isatty())
    import torch

    from ..patch_quality import quality_figure

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = args.backend or ("triton" if device.type == "cuda" else "torch")
    estimator = make_estimator(args.backbone, backend=backend, image_size=args.image_size, floor=args.floor)
    estimator.backbone.to(device)
    q_gen, q_ref = estimator.estimate(ref, gen, latent_hw=args.latent_size)
    save_image_atomic(quality_figure(gen, q_gen[0]), out)
    print(f"wrote {out} ({q_gen.shape[-1]}x{q_gen.shape[-2]} map)")
    print(f"mean quality: generated {q_gen.mean().item():.4f}, reference {q_ref.mean().item():.4f}")
