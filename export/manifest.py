"""``dreamfuse.json``: what an exported folder holds and what it accepts, checked before anything runs.

Every export folder (ONNX graphs from :mod:`dreamfuse.export.onnx`, TensorRT plans from
:mod:`dreamfuse.export.tensorrt`) carries one manifest:

* ``model``: the UNet's weight hash (:func:`weights_hash`), SD or SDXL, channels, the text length and widths the
  graphs were traced with;
* ``ip_adapter``: ``null``, or the hash and token count of the IP-Adapter whose image layers are baked into the
  UNet graph (the image tokens are then a graph input);
* ``profile``: the UNet batch rows and latent height/width ranges the graphs accept (``static``: one shape);
* ``dtype``, ``opset``, the dreamfuse/torch versions, and per graph its file, inputs and outputs;
* ``plugins``: ``null``, or the dreamfuse plugin nodes the graphs hold (``--plugins``: custom-domain nodes that need
  TensorRT's plugin library or onnxruntime's custom ops, :mod:`dreamfuse.export.plugins`): their domain, namespace,
  version and op types; each graph lists its own under ``graphs.<name>.plugins``;
* ``tensorrt`` (plan folders only): the module and version that built the plans, the compute capability, the
  optimization profiles and the cache key.

:func:`read_manifest` refuses a folder whose manifest is missing, of another format, or names files that are
absent; :func:`check_model` refuses an engine whose UNet (or IP-Adapter) is not the one exported;
:func:`check_request` refuses a UNet call outside the profile with a ``ValueError`` naming the field. Never run
an off-profile shape: TensorRT gives NaN or black images there rather than an error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from dreamfuse.engine.files import atomic_path

MANIFEST = "dreamfuse.json"
FORMAT = 1
LATENT_MULTIPLE = 8
"""Exported latents are ``8·k`` high and wide (diffusers' down/upsamplers guard on it when the size is dynamic):
images in multiples of 64 pixels with the SD VAE."""


PLUGIN_OPS = ("AmaAttention", "MatchArgmax", "CycleMask", "CompositeBlend")
"""The plugin op types this dreamfuse runs (:data:`dreamfuse.export.plugins.PLUGINS`)."""


def plugins_entry(graphs: dict) -> dict | None:
    """The manifest's top-level ``plugins``: None when no graph lists plugin nodes."""
    ops = sorted({op for g in graphs.values() for op in g.get("plugins") or ()})
    if not ops:
        return None
    return {"domain": "dreamfuse", "plugin_namespace": "dreamfuse", "plugin_version": "1", "ops": ops,
            "graphs": sorted(name for name, g in graphs.items() if g.get("plugins"))}


def graph_plugins(manifest: dict, graph: str) -> list[str]:
    """The plugin op types graph ``graph`` of ``manifest`` holds ([] for none, or for an export made before
    plugins existed)."""
    return list(manifest["graphs"].get(graph, {}).get("plugins") or [])


def dreamfuse_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dreamfuse")
    except PackageNotFoundError:
        return "unknown"


def weights_hash(*modules: torch.nn.Module | None) -> str:
    """SHA-256 over the names, shapes and values of the modules' state dicts, floats rounded to fp16 first, so that
    the same checkpoint loaded in fp32 or fp16 hashes alike (a bf16 load rounds differently and hashes differently).
    ``None`` entries are skipped. About 1 s per GB of weights on CPU."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        if module is None:
            continue
        h.update(f"module {i}\n".encode())
        for name, t in module.state_dict().items():
            t = t.detach()
            if t.is_floating_point():
                t = t.to(torch.float16)
            h.update(f"{name} {tuple(t.shape)} {t.dtype}\n".encode())
            h.update(t.contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write ``folder/dreamfuse.json`` atomically (a temporary file renamed into place)."""
    folder = Path(folder)
    path = folder / MANIFEST
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(folder: str | Path, field: str = "unet_path") -> dict:
    """The manifest of an export folder, checked: format, dreamfuse's graph kinds, and every listed file present.
    Raises ``ValueError``/``FileNotFoundError`` naming ``field``."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{field}: {str(folder)!r} has no {MANIFEST} (not a dreamfuse export folder; "
                                "make one with `dreamfuse export onnx`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{field}: {str(path)!r} is not a readable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{field}: {str(path)!r} has manifest format {got!r}; this dreamfuse reads format {FORMAT} "
                         "(export again)")
    for key in ("model", "profile", "graphs", "dtype"):
        if key not in manifest:
            raise ValueError(f"{field}: {str(path)!r} lacks {key!r} (export again)")
    for name, graph in manifest["graphs"].items():
        for key in ("file", "plan"):
            if graph.get(key) and not (folder / graph[key]).is_file():
                raise FileNotFoundError(f"{field}: {str(folder)!r} lists {graph[key]!r} for {name} but the file is "
                                        "missing")
        unknown = sorted(set(graph.get("plugins") or ()) - set(PLUGIN_OPS))
        if unknown:
            raise ValueError(f"{field}: {name} needs plugin nodes {unknown} this dreamfuse does not know (export "
                             "again, or update dreamfuse)")
    return manifest


def check_model(manifest: dict, unet, ip_adapter=None, field: str = "unet_path") -> None:
    """Refuse an engine whose UNet or IP-Adapter is not the one the graphs were exported from."""
    model = manifest["model"]
    is_xl = unet.config.addition_embed_type == "text_time"
    if bool(model.get("is_xl")) != is_xl:
        raise ValueError(f"{field}: the export is of an {'SDXL' if model.get('is_xl') else 'SD 1.x/2.x'} UNet, the "
                         f"engine's is {'SDXL' if is_xl else 'SD 1.x/2.x'}")
    got = weights_hash(unet)
    if got != model["hash"]:
        raise ValueError(f"{field}: the exported UNet's weights (hash {model['hash'][:12]}) are not the engine's "
                         f"({got[:12]}): export this model (with the same LoRAs loaded), or load the model it was "
                         f"exported from ({model.get('name', '?')!r})")
    exported = manifest.get("ip_adapter")
    if ip_adapter is None:
        return
    if exported is None:
        raise ValueError(f"{field}: an IP-Adapter is loaded but the export has no image-prompt layers (export with "
                         "the adapter loaded: `dreamfuse export onnx --ip-adapter ...`)")
    got = weights_hash(ip_adapter.layers)
    if got != exported["hash"]:
        raise ValueError(f"{field}: the loaded IP-Adapter (hash {got[:12]}) is not the one exported "
                         f"({exported['hash'][:12]})")


def _check_range(field: str, value: int, lo_hi, unit: str, what: str) -> None:
    lo, hi = lo_hi
    if not lo <= value <= hi:
        raise ValueError(f"{field}: {value}{unit} is outside the exported profile [{lo}, {hi}]{unit} ({what}; export "
                         "or build again with a wider range)")


def check_request(manifest: dict, sample: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  check_batch: bool = True) -> None:
    """Refuse a UNet call outside the exported profile (``ValueError`` naming the field): batch rows (unless
    ``check_batch`` is false: the caller splits and pads rows into the range), latent height and width (multiples
    of 8 within the ranges, in latent pixels: image pixels / 8), text length."""
    prof = manifest["profile"]
    rows, _, h, w = sample.shape
    if check_batch:
        _check_range("batch", rows, prof["batch"], " rows", "UNet rows: CFG doubles the prompts")
    scale = int(manifest["model"].get("vae_scale_factor", 8))
    for field, v, key in (("height", h, "latent_height"), ("width", w, "latent_width")):
        lo, hi = prof[key]
        if v % LATENT_MULTIPLE and lo != hi:
            raise ValueError(f"{field}: {v * scale} px ({v} latent) is not a multiple of {LATENT_MULTIPLE * scale} px, "
                             "which the exported UNet needs (dynamic sizes are 8·k latent pixels)")
        if not lo <= v <= hi:
            raise ValueError(f"{field}: {v * scale} px is outside the exported profile [{lo * scale}, {hi * scale}] px "
                             "(export or build again with a wider range)")
    text = int(manifest["model"]["text_len"])
    if encoder_hidden_states.shape[1] != text:
        raise ValueError(f"encoder_hidden_states: {encoder_hidden_states.shape[1]} tokens, the export takes {text}")
