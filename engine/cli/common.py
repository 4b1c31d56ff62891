"""What the subcommands share: argument types, the model/runtime and sampling options, engine loading, output
paths checked before any model work, and atomic image writing. Imports nothing heavy at module level."""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


_USER_ERRORS = (CLIError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def user_error_message(e: BaseException) -> str | None:
    """The one-line message of a user error (bad input, a missing or unwritable file), None for anything else."""
    if not isinstance(e, _USER_ERRORS):
        return None
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename is not None:
        return f"{e.strerror or type(e).__name__}: {e.filename!r}"
    text = str(e).strip() or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# ------------------------------------------------------------------------------------------------ argument types
def shown(s: str, limit: int = 40) -> str:
    """``repr(s)`` for a message, cut after ``limit`` characters: a 100,000-character argument is not echoed."""
    return repr(s) if len(s) <= limit else f"{s[:limit]!r}... ({len(s)} characters)"


def shown_int(v: int) -> str:
    from ..validation import shown_int as shown

    return shown(v)


def parse_int(name: str, s: str, base: int = 10) -> int:
    """``int(s, base)`` or ``argparse.ArgumentTypeError`` naming ``name``; a decimal number past Python's
    int-from-text limit (``sys.get_int_max_str_digits()``, 4300 digits) is said to be too long, not echoed."""
    import sys

    try:
        return int(s, base)
    except ValueError:
        digits = s.strip().lstrip("+-").replace("_", "")
        limit = sys.get_int_max_str_digits()
        if digits.isdigit() and limit and len(digits) > limit:
            raise argparse.ArgumentTypeError(f"{name} must be an integer of at most {limit} digits, got a "
                                             f"{len(digits)}-digit number") from None
        raise argparse.ArgumentTypeError(f"{name} must be an integer, got {shown(s)}") from None


def int_at_least(name: str, low: int, high: int | None = None, limit: str | None = None):
    """An integer ``>= low`` (and ``<= high``; ``limit`` names where that bound comes from, e.g.
    ``limits.max_images``)."""
    def parse(s: str) -> int:
        v = parse_int(name, s)
        if v < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {shown_int(v)}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"{name} must be <= {high}{f' ({limit})' if limit else ''}, got "
                                             f"{shown_int(v)}")
        return v
    return parse


def positive_int(name: str, high: int | None = None, limit: str | None = None):
    return int_at_least(name, 1, high, limit)


def non_negative_int(name: str, high: int | None = None, limit: str | None = None):
    return int_at_least(name, 0, high, limit)


def multiple_of_8(name: str, high: int | None = None, limit: str | None = None):
    def parse(s: str) -> int:
        v = positive_int(name, high, limit)(s)
        if v % 8:
            raise argparse.ArgumentTypeError(f"{name} must be a multiple of 8, got {v}")
        return v
    return parse


def image_side(name: str):
    """An image height or width: a multiple of 8 within the engine's ``limits.max_side``."""
    from ..limits import DEFAULT_LIMITS

    return multiple_of_8(name, DEFAULT_LIMITS.max_side, "limits.max_side")


def finite_float(name: str, *, low: float | None = None, low_open: bool = False, high: float | None = None):
    """A finite float (``nan``/``inf`` refused), optionally ``>= low`` (``> low`` with ``low_open``), ``<= high``."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {shown(s)}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {shown(s)}")
        if low is not None and (v <= low if low_open else v < low):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {shown(s)}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"{name} must be <= {high:g}, got {shown(s)}")
        return v
    return parse


def seed_int(name: str = "--seed"):
    def parse(s: str) -> int:
        v = parse_int(name, s, 0)
        if not 0 <= v < 2**64:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 2**64), got {shown_int(v)}")
        return v
    return parse


# ------------------------------------------------------------------------------------------------ shared options
def add_model_args(p: argparse.ArgumentParser, *, compile_option: bool = True, dtype_option: bool = True,
                   lora_option: bool = True, backend_default: str = "triton on CUDA, torch on CPU",
                   unet_option: bool | None = None) -> None:
    """Options shared by every subcommand that loads a model. Trainers leave out what they cannot honour
    (``unet_option``, an exported UNet instead of the PyTorch one, follows ``compile_option`` unless given)."""
    g = p.add_argument_group("model and runtime")
    g.add_argument("--model", default="tiny",
                   help="'tiny' (embedded random-weight SD-layout model, the default), 'tiny-xl' (its SDXL-layout "
                        "sibling), 'shapes' (the trained 64x64 shapes-world model: prompts such as 'a striped red "
                        "circle above a blue square on grass'), 'random-sd15' / 'random-sdxl' (random weights in "
                        "the real architectures, for benchmarks), a diffusers SD 1.x/2.x/SDXL folder with "
                        "model_index.json, or a .safetensors checkpoint (with --config)")
    g.add_argument("--config", default=None, metavar="DIR",
                   help="for a single-file checkpoint only: a diffusers folder of the same architecture giving the "
                        "configs and tokenizer (nothing is downloaded)")
    g.add_argument("--variant", default=None, metavar="NAME",
                   help="for a diffusers folder only: the weight files' variant, as diffusers names them (fp16 "
                        "reads unet/diffusion_pytorch_model.fp16.safetensors and its siblings, what "
                        "save_pretrained(variant='fp16') writes)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    if dtype_option:
        g.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default: fp16 on CUDA, fp32 on CPU)")
    g.add_argument("--backend", default=None, choices=("triton", "torch"),
                   help=f"attention backend (default: {backend_default})")
    if compile_option:
        g.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first call)")
    if compile_option if unet_option is None else unet_option:
        g.add_argument("--unet", default=None, metavar="DIR|FILE.plan",
                       help="run the UNet from an export instead of PyTorch: a `dreamfuse export onnx` folder "
                            "(onnxruntime), a `dreamfuse export tensorrt` folder / .plan file (TensorRT) or a "
                            "`dreamfuse export aoti` folder (AOTInductor package). An export folder is a program: "
                            "a package's compiled library and a plan folder's plugin libraries run with your "
                            "permissions, and any graph decides the image; use only folders you trust, as you would "
                            "run a script. Before anything loads, every file must match the sha256 its manifest "
                            "records (this catches changed or swapped files, not a hostile folder); the export must "
                            "be of --model's weights, and calls outside its exported sizes are refused")
    if lora_option:
        g.add_argument("--lora", action="append", type=lora_spec, default=None, metavar="FILE[:SCALE]",
                       help="a LoRA .safetensors (diffusers or kohya format; UNet and text encoder layers) applied "
                            "to the model, at SCALE >= 0 (default 1.0); repeat for several at once. A path holding "
                            "':' is read as a path unless what follows the last ':' is a number")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars or loading messages (also the default when stderr is not a terminal)")


def add_sampling_args(p: argparse.ArgumentParser, *, steps: int = 50, guidance: float = 7.5,
                      size_default: str = "the model's native size", samplers=None, sampler_note: str = "") -> None:
    """The sampling options; ``samplers``: the ``--sampler`` names this command accepts (default: all)."""
    from ..limits import DEFAULT_LIMITS
    from ..samplers import DEFAULT_SAMPLER, SAMPLERS

    g = p.add_argument_group("sampling")
    g.add_argument("--negative-prompt", default=None,
                   help="negative prompt (default: none: the empty prompt's embedding, or on SDXL base the zero "
                        "embedding, as diffusers; --negative-prompt \"\" encodes the empty prompt instead)")
    names = list(SAMPLERS) if samplers is None else list(samplers)
    if len(names) > 1:
        usual = ", ".join(f"{n} {SAMPLERS[n].steps}" for n in names)
        g.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=names, metavar="NAME",
                       help=f"sampler (diffusers' scheduler; default {DEFAULT_SAMPLER}): {', '.join(names)}. Usual "
                            f"steps: {usual}. lcm needs an LCM model or LCM-LoRA{sampler_note}")
    else:
        p.set_defaults(sampler=names[0])
    g.add_argument("--steps", type=positive_int("--steps", DEFAULT_LIMITS.max_steps, "limits.max_steps"), default=steps,
                   help=f"sampler steps (default {steps})")
    g.add_argument("--guidance", type=finite_float("--guidance", low=0), default=guidance,
                   help=f"classifier-free guidance scale; <= 1 disables CFG (default {guidance})")
    g.add_argument("--seed", type=seed_int(), default=None,
                   help="seed of the first image, in [0, 2**64); image i uses seed + i (default: random, printed)")
    g.add_argument("--height", type=image_side("--height"), default=None,
                   help=f"image height, a multiple of 8 (default: {size_default})")
    g.add_argument("--width", type=image_side("--width"), default=None,
                   help=f"image width, a multiple of 8 (default: {size_default})")


def out_image_help(default: str = "dreamfuse.png") -> str:
    stem, suffix = os.path.splitext(default)
    return (f"output image (.png, .jpg, .webp; default {default}); with several images {stem}-0{suffix}, "
            f"{stem}-1{suffix}, ...")


# ------------------------------------------------------------------------------------------------ checks
def check_prompt_args(prompts: list[str], args, field: str = "--prompt") -> None:
    """The prompts and ``--negative-prompt`` as text the pipelines accept (UTF-8, within the length limit)."""
    from ..pipelines.common import check_prompts

    check_prompts(prompts, field)
    if getattr(args, "negative_prompt", None) is not None:
        check_prompts([args.negative_prompt], "--negative-prompt")


def check_call_limits(args, images: int, flag: str) -> None:
    """What the engine's limits (:data:`~dreamfuse.engine.limits.DEFAULT_LIMITS`, the CLI's engine's) refuse of one
    call, checked before any model loads and named by the flags typed: ``images`` in one call (``flag`` says which
    option made them), and ``--height`` x ``--width`` when both are given (each side alone is checked as parsed;
    with one missing, the model's native size fills it in and the pipeline checks the product)."""
    from ..limits import DEFAULT_LIMITS, check_size

    if images > DEFAULT_LIMITS.max_images:
        raise CLIError(f"{flag}: {images} images in one call, the limit is {DEFAULT_LIMITS.max_images} "
                       "(limits.max_images)")
    if getattr(args, "height", None) is not None and getattr(args, "width", None) is not None:
        try:
            check_size(args.height, args.width, 8, DEFAULT_LIMITS, fields=("--height", "--width"))
        except ValueError as e:
            raise CLIError(str(e)) from None


def seed_for(args, images: int) -> int:
    """``--seed``, or a fresh random one; image i uses seed + i, which must stay below 2**64."""
    from ..engine import random_seed
    from ..validation import check_seed

    seed = random_seed() if args.seed is None else args.seed
    check_seed(seed + images - 1, "--seed")
    return seed


def check_file(flag: str, value: str | None, what: str = "file") -> Path | None:
    """``value`` must be an existing regular file (``CLIError`` naming ``flag``: it does not exist, is a directory,
    or is a FIFO, socket or device); None passes."""
    from ..files import not_a_file

    if value is None:
        return None
    problem = not_a_file(value, what)
    if problem is not None:
        raise CLIError(f"{flag}: {problem}")
    return Path(value).expanduser()


def check_dir(flag: str, value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise CLIError(f"{flag}: folder {value!r} does not exist" if not path.exists()
                       else f"{flag}: {value!r} is not a folder")
    return path


def output_paths(out: str, n: int, flag: str = "--out") -> list[Path]:
    """``out`` for one image; ``stem-0.png``, ``stem-1.png``... for several. Checked before any model work: an
    image suffix, an existing writable folder, and no folder in the way of a file to write."""
    path = Path(out).expanduser()
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise CLIError(f"{flag}: {out!r} needs an image extension (.png, .jpg, .webp)")
    parent = path.parent
    if not parent.is_dir():
        raise CLIError(f"{flag}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{flag}: folder {str(parent)!r} is not writable")
    paths = [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]
    for p in paths:
        if p.is_dir():
            raise CLIError(f"{flag}: {str(p)!r} is a folder, not an image file")
    return paths


def output_folder(out: str, flag: str = "--out") -> Path:
    """An output folder to create (or reuse): refused when a file is in the way or its parent is missing."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag}: {out!r} exists and is not a folder")
    parent = path.parent if not path.exists() else path
    if not parent.is_dir():
        raise CLIError(f"{flag}: folder {str(path.parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{flag}: {str(parent)!r} is not writable")
    return path


def lora_spec(s: str) -> tuple[str, float]:
    """``--lora FILE[:SCALE]`` -> ``(FILE, SCALE)`` (scale 1.0 by default). The part after the last ``:`` is the
    scale only when it reads as a number and the whole argument is not itself an existing file, so ``dir:x/a.st``
    stays a path; a numeric scale must be finite and >= 0."""
    head, sep, tail = s.rpartition(":")
    if not sep or Path(s).expanduser().is_file():
        return s, 1.0
    try:
        scale = float(tail)
    except ValueError:
        return s, 1.0
    if not head:
        raise argparse.ArgumentTypeError(f"{s!r} has a scale but no file (FILE[:SCALE])")
    if not math.isfinite(scale) or scale < 0:
        raise argparse.ArgumentTypeError(f"--lora scale must be a finite number >= 0, got {tail!r} in {s!r}")
    return head, scale


def adapter_spec(s: str) -> tuple[str, float | None]:
    """``--adapter NAME[:SCALE]`` (or ``PATH[:SCALE]``) -> ``(NAME or PATH, SCALE or None)``, read as
    :func:`lora_spec` reads ``--lora``."""
    head, sep, tail = s.rpartition(":")
    if not sep or Path(s).expanduser().is_file():
        return s, None
    try:
        scale = float(tail)
    except ValueError:
        return s, None
    if not head:
        raise argparse.ArgumentTypeError(f"{s!r} has a scale but no adapter (NAME[:SCALE])")
    if not math.isfinite(scale) or scale < 0:
        raise argparse.ArgumentTypeError(f"--adapter scale must be a finite number >= 0, got {tail!r} in {s!r}")
    return head, scale


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    """``--adapters DIR`` and ``--adapter NAME[:SCALE]``: per-request adapters (the model itself stays as it is)."""
    g = p.add_argument_group("per-request adapters (applied to this call's rows; the model is left unchanged)")
    g.add_argument("--adapters", default=None, metavar="DIR",
                   help="a folder of adapters: LoRA .safetensors and learned-token files (.bin/.pt/.safetensors), "
                        "each named by its file stem")
    g.add_argument("--adapter", action="append", type=adapter_spec, default=None, metavar="NAME[:SCALE]",
                   help="an adapter of --adapters by name, or a file's path (named by its stem): a LoRA at SCALE "
                        ">= 0 (default 1.0), or a learned token (no scale; prompts use its token); repeat for several")


def check_adapter_cli(args) -> None:
    """``--adapters`` / ``--adapter`` before any model work: the folder exists; every ``--adapter`` is a file of it
    or an existing file."""
    folder = check_dir("--adapters", getattr(args, "adapters", None))
    for name, _ in getattr(args, "adapter", None) or ():
        in_folder = folder is not None and "/" not in name and any(
            (folder / f"{name}{s}").exists() for s in (".safetensors", ".bin", ".pt"))
        if not in_folder:
            path = Path(name).expanduser()
            if not path.exists():
                where = f"in {str(folder)!r} nor " if folder is not None else ""
                raise CLIError(f"--adapter: {name!r} is no adapter {where}an existing file"
                               + ("" if folder is not None else " (name adapters of a folder with --adapters DIR)"))
            check_file("--adapter", name)


def adapter_kwargs(engine, args) -> dict:
    """The pipeline arguments ``--adapters`` / ``--adapter`` ask for (``loras=``, already resolved and checked);
    ``{}`` without them. Adapters given by path are registered under their file stems."""
    specs = getattr(args, "adapter", None) or []
    if not specs:
        return {}
    registry = engine.adapters
    try:
        if getattr(args, "adapters", None):
            registry.set_folder(args.adapters)
        names = set(registry.names())
        loras, tokens = [], []
        for name, scale in specs:
            if name not in names:
                name = registry.register(name, replace=True)
                names.add(name)
            if registry.info(name)["kind"] == "token":
                if scale is not None:
                    raise CLIError(f"--adapter: {name!r} is a learned token; it takes no scale")
                tokens.append(name)
            else:
                loras.append((name, 1.0 if scale is None else scale))
        return {"loras": registry.request(loras, tokens)}
    except ValueError as e:
        message = str(e)
        for field in ("loras", "learned_tokens", "adapter", "name"):
            message = re.sub(rf"^{field}(\[\d+\])?: ", "", message)
        raise CLIError(f"--adapter: {message}") from None


def token_file_spec(s: str) -> tuple[str, str | None]:
    """``--textual-inversion FILE[:TOKEN]`` -> ``(FILE, TOKEN or None)``. The part after the last ``:`` is the token
    only when the whole argument is not itself an existing file and the part before it is one."""
    head, sep, tail = s.rpartition(":")
    if not sep or Path(s).expanduser().is_file() or not head or not Path(head).expanduser().is_file():
        return s, None
    if not tail.strip() or any(c.isspace() for c in tail):
        raise argparse.ArgumentTypeError(f"the token after ':' must be a non-empty name without spaces, got {tail!r}")
    return head, tail


def lora_names(specs) -> list[str]:
    """A name per ``--lora`` file: its stem, numbered (``style-2``) when two files share one."""
    names: list[str] = []
    for path, _ in specs:
        stem = Path(path).stem or "lora"
        name, i = stem, 1
        while name in names:
            i += 1
            name = f"{stem}-{i}"
        names.append(name)
    return names


def check_model_args(args) -> None:
    """``--model``/``--config``/``--device``/``--dtype``/``--lora`` before any model work."""
    from ..validation import EMBEDDED_MODELS, check_device

    if args.model not in EMBEDDED_MODELS:
        path = Path(args.model).expanduser()
        if not path.exists():
            raise CLIError(f"--model: {args.model!r} does not exist")
        if not path.is_dir():  # a single-file checkpoint: a regular file (a FIFO would block the loader)
            check_file("--model", args.model, "checkpoint")
    elif args.config is not None:
        raise CLIError(f"--config: only for a single-file checkpoint; {args.model!r} is an embedded model")
    if args.config is not None:
        check_dir("--config", args.config)
        if Path(args.model).expanduser().is_dir():
            raise CLIError(f"--config: only for a single-file checkpoint; {args.model!r} is a diffusers folder")
    if getattr(args, "variant", None) is not None:
        from ..loading import check_variant

        try:
            check_variant(args.variant)
        except ValueError as e:
            raise CLIError(f"--{e}") from None
        if args.model in EMBEDDED_MODELS or not Path(args.model).expanduser().is_dir():
            raise CLIError(f"--variant: only for a diffusers folder; {args.model!r} is not one")
    check_device(args.device, "--device")
    if getattr(args, "dtype", None) is not None:
        from ..validation import DTYPE_NAMES

        if args.dtype.lower() not in DTYPE_NAMES:
            raise CLIError(f"--dtype: unknown dtype {args.dtype!r} (use one of fp16, bf16, fp32)")
    if getattr(args, "lora", None):
        from ..lora import check_lora_file

        for path, _ in args.lora:
            check_lora_file(path, "--lora")  # exists, .safetensors, LoRA tensors (its header only; no torch)


def quiet_libraries(enabled: bool) -> None:
    """Silence the libraries' own loading chatter (transformers/diffusers progress bars and info warnings,
    accelerate's notices) when progress output is off."""
    if not enabled:
        return
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("transformers", "diffusers", "accelerate", "torchvision"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="accelerate")
    warnings.filterwarnings("ignore", module="torchvision")
    try:
        from diffusers.utils import logging as d_logging
        from transformers.utils import logging as t_logging

        t_logging.set_verbosity_error()
        t_logging.disable_progress_bar()
        d_logging.set_verbosity_error()
        d_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def progress_enabled(args) -> bool:
    import sys

    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def load_engine(args, **overrides):
    """The Engine the options describe (checked by :func:`check_model_args` first)."""
    check_model_args(args)
    quiet_libraries(not progress_enabled(args))
    from ..config import EngineConfig
    from ..engine import Engine

    fields = {"device": args.device, "dtype": getattr(args, "dtype", None), "backend": args.backend,
              "compile": getattr(args, "compile", False), "progress": progress_enabled(args)}
    fields.update(overrides)
    unet = None
    if getattr(args, "unet", None):
        if fields.get("compile"):
            raise CLIError("--compile: compiles the PyTorch UNet; --unet runs an exported one (use one or the other)")
        from dreamfuse.export.runtime import backend_for_path

        try:
            unet = backend_for_path(args.unet)
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(f"--unet: {str(e).removeprefix('unet: ')}") from None
    engine = Engine.from_pretrained(args.model, EngineConfig(**fields), config_dir=args.config,
                                    variant=getattr(args, "variant", None))
    if getattr(args, "lora", None):
        from ..lora import load_lora

        for (path, scale), name in zip(args.lora, lora_names(args.lora)):
            load_lora(engine, path, scale, name, field="--lora")
    if unet is not None:  # after the LoRAs: an export made with them loaded hashes like this engine's UNet
        engine.set_unet_backend(unet, Path(args.unet).expanduser(), field="--unet")
    return engine


def save_images(images, out: str) -> None:
    """Write the images to :func:`output_paths` atomically (a temporary file renamed into place: an interrupted
    run never leaves a truncated image), with their ``.info`` as PNG text chunks."""
    from PIL.PngImagePlugin import PngInfo

    from ..files import save_image_atomic

    for img, path in zip(images, output_paths(out, len(images))):
        meta = None
        if path.suffix.lower() == ".png":
            meta = PngInfo()
            for k, v in img.info.items():
                if isinstance(v, str):
                    meta.add_text(k, v)
        save_image_atomic(img, path, pnginfo=meta)
        print(f"wrote {path} (seed {img.info.get('seed', '?')})")
