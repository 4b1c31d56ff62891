"""Model loading: the embedded ``tiny`` model, a local diffusers folder, or a single checkpoint file."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from . import synthetic, tiny

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


_MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")


def load_components(name_or_path: str | Path, *, dtype: torch.dtype, config_dir: str | Path | None = None,
                    device: str | torch.device = "cpu", variant: str | None = None) -> dict:
    """Return ``{"unet", "vae", "text_encoder", "tokenizer", "scheduler"}`` on CPU in ``dtype``; SDXL models add
    ``"text_encoder_2"``, ``"tokenizer_2"`` and ``"force_zeros_for_empty_prompt"``.

    * ``"tiny"`` / ``"tiny-xl"``: the embedded SD 1.x-layout / SDXL-layout models (built from a seed).
    * ``"shapes"``: the trained model of the shapes world (:mod:`~dreamfuse.engine.shapes_world`), a diffusers
      folder shipped as package data (:func:`bundled_path`).
    * ``"random-sd15"`` / ``"random-sdxl"``: random weights in the real SD 1.5 / SDXL architectures, for
      benchmarks (see ``synthetic.py``); built directly on ``device`` (the only case that is not on CPU).
    * a folder with ``model_index.json``: a diffusers Stable Diffusion 1.x/2.x or SDXL (base) pipeline folder.
    * a ``.safetensors`` (or ``.ckpt``) file: an original-format SD 1.x/2.x or SDXL checkpoint. diffusers needs
      the architecture's configs to convert it; offline they come from ``config_dir`` (a diffusers folder of the
      same architecture, e.g. your SD1.5 or SDXL folder, whose ``model_index.json`` also says which
      architecture the file is), or a ``model_index.json`` folder next to the file.

    ``variant`` (a diffusers folder only): the weight files' variant, as diffusers' ``from_pretrained(variant=)``
    reads it -- ``"fp16"`` loads ``diffusion_pytorch_model.fp16.safetensors`` and its siblings, the files
    ``save_pretrained(variant="fp16")`` writes.
    """
    from .validation import BUNDLED_NAMES

    if name_or_path is None or not isinstance(name_or_path, (str, Path)):
        raise ValueError(f"model: expected a model name or a path, got {type(name_or_path).__name__}")
    if variant is not None:
        check_variant(variant)
        if not Path(name_or_path).expanduser().is_dir() or str(name_or_path) in BUNDLED_NAMES:
            raise ValueError(f"variant: only for a diffusers folder; {str(name_or_path)!r} is not one")
    if config_dir is not None and (str(name_or_path) in tiny.TINY_NAMES + synthetic.SYNTHETIC_NAMES + BUNDLED_NAMES
                                   or Path(name_or_path).expanduser().is_dir()):
        raise ValueError(f"config: only for a single-file checkpoint; {str(name_or_path)!r} brings its own configs")
    if str(name_or_path) in tiny.TINY_NAMES:
        comps = tiny.build(str(name_or_path))
    elif str(name_or_path) in synthetic.SYNTHETIC_NAMES:
        comps = synthetic.build(str(name_or_path), device)
    else:
        name = str(name_or_path)
        path = bundled_path(name) if name in BUNDLED_NAMES else Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model: {str(name_or_path)!r} does not exist (give 'tiny', 'tiny-xl', "
                                    f"'shapes', 'random-sd15', 'random-sdxl', a diffusers folder with "
                                    f"model_index.json, or a .safetensors checkpoint)")
        if not path.is_dir() and path.suffix not in _SINGLE_FILE_SUFFIXES:
            raise ValueError(f"model: {str(path)!r} is neither a diffusers folder nor a .safetensors/.ckpt file")
        try:
            comps = (_load_folder(path, dtype, variant) if path.is_dir()
                     else _load_single_file(path, config_dir, dtype))
        except ValueError:
            raise
        except Exception as e:  # corrupt or truncated weights, a broken config: one line naming the model
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"model: cannot load {str(path)!r} ({type(e).__name__}: {first})") from None
    for key in _MODULES:
        if key not in comps:
            continue
        module = comps[key]
        if key == "vae" and vae_upcast(comps, dtype):
            continue  # stays fp32 (see vae_upcast)
        if module.dtype != dtype:  # cast only when needed: diffusers warns on every .to(dtype)
            module = module.to(dtype=dtype)
        comps[key] = module.eval().requires_grad_(False)
    return comps


def bundled_path(name: str) -> Path:
    """The package-data folder of a bundled model (``"shapes"``); FileNotFoundError when this install lacks it."""
    from .validation import BUNDLED_NAMES

    if name not in BUNDLED_NAMES:
        raise ValueError(f"model: {name!r} is not a bundled model ({', '.join(BUNDLED_NAMES)})")
    path = Path(__file__).resolve().parent / "assets" / name
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"model: the bundled {name!r} weights are missing from this install ({path}); "
                                f"reinstall dreamfuse or rebuild them with python -m tools.train_{name}")
    return path


def vae_upcast(comps: dict, dtype: torch.dtype) -> bool:
    """SDXL's VAE overflows in fp16: an fp16 SDXL model whose VAE config says ``force_upcast`` keeps it fp32
    (diffusers' SDXL pipeline upcasts it at every decode instead)."""
    return ("text_encoder_2" in comps and dtype == torch.float16
            and bool(getattr(comps["vae"].config, "force_upcast", False)))


def _from_pipe(pipe) -> dict:
    from diffusers import DDIMScheduler

    comps = {
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        # The pipelines are written for DDIM (deterministic, invertible for DreamMatcher); the folder's
        # scheduler config carries the model's beta schedule and prediction type.
        "scheduler": DDIMScheduler.from_config(pipe.scheduler.config),
    }
    if hasattr(pipe, "text_encoder_2"):
        comps.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                     force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)))
    return comps


def _pipeline_class(model_index: Path):
    """The diffusers pipeline class a ``model_index.json`` names: SD 1.x/2.x or SDXL base (ValueError otherwise)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        cls = json.loads(model_index.read_text()).get("_class_name", "")
    except (OSError, ValueError) as e:
        raise ValueError(f"model: cannot read {str(model_index)!r} ({e})") from None
    if "XL" in cls:
        if "Img2Img" in cls or "Inpaint" in cls or "Refiner" in cls:
            raise ValueError(f"model: {cls} is not supported (SD 1.x/2.x and SDXL base text-to-image folders)")
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def _pipeline_kwargs(cls) -> dict:
    from diffusers import StableDiffusionPipeline

    if cls is StableDiffusionPipeline:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {}


def _check_xl_base(comps: dict, source: str) -> dict:
    if "text_encoder_2" in comps and comps["text_encoder"] is None:
        raise ValueError(f"model: {source!r} has no first text encoder (an SDXL refiner?): only SDXL base models "
                         "are supported")
    return comps


_VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


def check_variant(variant) -> str:
    """``variant`` as diffusers names weight files (``fp16``, ``bf16``, ``ema``, ``non_ema``): letters, digits, ``_``
    and ``-``, at most 32 characters; ValueError otherwise (it becomes part of file names)."""
    if not isinstance(variant, str) or not _VARIANT.fullmatch(variant):
        raise ValueError(f"variant: expected a name such as 'fp16' (letters, digits, '_' or '-', at most 32), got "
                         f"{variant!r}")
    return variant


def folder_variants(path: Path) -> tuple[set[str], bool]:
    """The weight-file variants a diffusers folder's ``unet`` holds (``{"fp16"}`` for
    ``diffusion_pytorch_model.fp16.safetensors``), and whether it holds plain (no-variant) weights."""
    variants, plain = set(), False
    unet = path / "unet"
    for f in (unet.iterdir() if unet.is_dir() else ()):
        if not f.name.startswith("diffusion_pytorch_model"):
            continue
        # diffusion_pytorch_model[.VARIANT][-00001-of-00002].safetensors, .bin, and a sharded model's
        # diffusion_pytorch_model.safetensors.index[.VARIANT].json
        tokens = [re.sub(r"-\d+-of-\d+$", "", t) for t in f.name[len("diffusion_pytorch_model"):].split(".") if t]
        if not {"safetensors", "bin"} & set(tokens):
            continue
        rest = [t for t in tokens if t and t not in ("safetensors", "bin", "index", "json")]
        if not rest:
            plain = True
        elif len(rest) == 1:
            variants.add(rest[0])
    return variants, plain


def _load_folder(path: Path, dtype: torch.dtype, variant: str | None = None) -> dict:
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"model: folder {str(path)!r} has no model_index.json (not a diffusers pipeline folder)")
    cls = _pipeline_class(index)
    variants, plain = folder_variants(path)
    if variant is None and not plain and variants:
        names = ", ".join(repr(v) for v in sorted(variants))
        raise ValueError(f"variant: {str(path)!r} holds only the {names} variant of its weights (files such as "
                         f"unet/diffusion_pytorch_model.{sorted(variants)[0]}.safetensors): pass "
                         f"variant={sorted(variants)[0]!r} (CLI: --variant {sorted(variants)[0]})")
    if variant is not None and variant not in variants:
        have = ", ".join(repr(v) for v in sorted(variants)) or "none"
        raise ValueError(f"variant: {str(path)!r} holds no {variant!r} weights (unet/diffusion_pytorch_model."
                         f"{variant}.safetensors); its variants: {have}")
    pipe = cls.from_pretrained(str(path), local_files_only=True, dtype=dtype, variant=variant,
                               **_pipeline_kwargs(cls))
    return _check_xl_base(_from_pipe(pipe), str(path))


def _load_single_file(path: Path, config_dir: str | Path | None, dtype: torch.dtype) -> dict:
    if config_dir is None and (path.parent / "model_index.json").is_file():
        config_dir = path.parent
    if config_dir is None:
        raise ValueError(
            f"model: loading the single file {path.name!r} needs the architecture's configs and tokenizer, and "
            "nothing can be downloaded: pass config_dir=DIR (Engine.from_pretrained(path, config_dir=DIR); CLI: "
            "--config DIR), a diffusers folder of the same architecture (e.g. a local SD1.5, SD2.1 or SDXL folder)"
        )
    index = Path(config_dir).expanduser() / "model_index.json"
    if not index.is_file():
        raise ValueError(f"config: {str(config_dir)!r} is not a diffusers pipeline folder (no model_index.json)")
    cls = _pipeline_class(index)
    pipe = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True, dtype=dtype,
                                **_single_file_memory_kwargs(), **_pipeline_kwargs(cls))
    return _check_xl_base(_from_pipe(pipe), str(path))


def _single_file_memory_kwargs() -> dict:
    """Peak memory of single-file loading. diffusers reads the checkpoint once (safetensors: memory-mapped) and
    hands that one state dict to every component. With ``accelerate`` installed it builds each model empty and
    puts the checkpoint's tensors in place: the peak is the folder's (random-sd15 fp32, max RSS: 4.45 GB vs 4.47 GB
    from a folder, 4.1 GB of either the file's memory-mapped pages). Without ``accelerate`` it initializes every
    model with random weights and copies the checkpoint in while the whole file stays mapped: 8.4 GB (4.3 GB of
    it the models' own copy), where a folder still loads in 4.47 GB. Hence the explicit flag, and a warning."""
    from diffusers.utils import is_accelerate_available

    if is_accelerate_available():
        return {"low_cpu_mem_usage": True}
    warnings.warn("model: loading a single-file checkpoint without the `accelerate` package: diffusers builds the "
                  "models with random weights, then copies the checkpoint in, peaking at about twice the model's "
                  "size in memory (pip install accelerate loads it in place)", stacklevel=4)
    return {}
