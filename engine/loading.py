"""Model loading: the embedded ``tiny`` model, a local diffusers folder, or a single checkpoint file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import tiny

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def load_components(name_or_path: str | Path, *, dtype: torch.dtype, config_dir: str | Path | None = None) -> dict:
    """Return ``{"unet", "vae", "text_encoder", "tokenizer", "scheduler"}`` on CPU in ``dtype``.

    * ``"tiny"``: the embedded model (built from a seed, nothing downloaded).
    * a folder with ``model_index.json``: a diffusers Stable Diffusion 1.x/2.x pipeline folder.
    * a ``.safetensors`` (or ``.ckpt``) file: an original-format SD checkpoint. diffusers needs the
      architecture's configs to convert it; offline they come from ``config_dir`` (a diffusers folder of the
      same architecture, e.g. your SD1.5 folder), or a ``model_index.json`` folder next to the file.
    """
    if str(name_or_path) == "tiny":
        comps = tiny.build_components()
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model: {str(name_or_path)!r} does not exist (give 'tiny', a diffusers folder "
                                    f"with model_index.json, or a .safetensors checkpoint)")
        if path.is_dir():
            comps = _load_folder(path, dtype)
        elif path.suffix in _SINGLE_FILE_SUFFIXES:
            comps = _load_single_file(path, config_dir, dtype)
        else:
            raise ValueError(f"model: {str(path)!r} is neither a diffusers folder nor a .safetensors/.ckpt file")
    for key in ("unet", "vae", "text_encoder"):
        module = comps[key]
        if module.dtype != dtype:  # cast only when needed: diffusers warns on every .to(dtype)
            module = module.to(dtype=dtype)
        comps[key] = module.eval().requires_grad_(False)
    return comps


def _from_pipe(pipe) -> dict:
    from diffusers import DDIMScheduler

    return {
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        # The pipelines are written for DDIM (deterministic, invertible for DreamMatcher); the folder's
        # scheduler config carries the model's beta schedule and prediction type.
        "scheduler": DDIMScheduler.from_config(pipe.scheduler.config),
    }


def _load_folder(path: Path, dtype: torch.dtype) -> dict:
    from diffusers import StableDiffusionPipeline

    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"model: folder {str(path)!r} has no model_index.json (not a diffusers pipeline folder)")
    cls = json.loads(index.read_text()).get("_class_name", "")
    if "XL" in cls:
        raise ValueError(f"model: {cls} is not supported yet (SD 1.x/2.x pipelines only)")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True,
        dtype=dtype,
    )
    return _from_pipe(pipe)


def _load_single_file(path: Path, config_dir: str | Path | None, dtype: torch.dtype) -> dict:
    from diffusers import StableDiffusionPipeline

    if config_dir is None and (path.parent / "model_index.json").is_file():
        config_dir = path.parent
    if config_dir is None:
        raise ValueError(
            f"model: loading the single file {path.name!r} needs the architecture's configs and tokenizer, and "
            "nothing can be downloaded: pass config=DIR (CLI: --config DIR), a diffusers folder of the same "
            "architecture (e.g. a local SD1.5 or SD2.1 folder)"
        )
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_dir), local_files_only=True, safety_checker=None, requires_safety_checker=False,
        dtype=dtype,
    )
    return _from_pipe(pipe)
