"""ReVersion relation tokens at inference: load a learned ``<R>`` into an engine, and build relation prompts.

A relation file is the official ReVersion / textual-inversion format, ``torch.save({"<R>": tensor})`` with a
``(D,)`` (or ``(1, D)``) tensor, ``D`` the text encoder's hidden size (768 for SD 1.x). ``.safetensors`` files
with the same single-key layout are read too. Loading adds the token to the tokenizer, grows the text
encoder's token-embedding table by one row and writes the embedding there; nothing else in the model changes.

An embedding must be finite with an L2 norm of at most :data:`MAX_EMBEDDING_NORM`: anything else is refused
(``ValueError`` naming the file) instead of silently turning every prompt that uses the token into NaN or noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .relation_prompts import DEFAULT_TEMPLATE, DEFAULT_TOKEN, relation_prompts  # noqa: F401 (public API)

MAX_EMBEDDING_NORM = 1000.0
"""Largest L2 norm of a relation embedding. transformers initializes CLIP's token-embedding rows with std 0.02
(norm about 0.55 at D = 768), and trained rows, like the embeddings learned next to them by textual inversion or
ReVersion, stay of order 1. 1000 is three orders of magnitude beyond that, so no working file is refused, while a
corrupt file or a diverged run (1e30, a float read from garbage) is."""


def check_embedding(value: torch.Tensor, name: str, source: str) -> None:
    """``ValueError`` naming ``source`` when the embedding holds NaN/inf or its norm exceeds
    :data:`MAX_EMBEDDING_NORM`."""
    v = value.detach().float()
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"relation: the embedding of {name!r} in {source} holds NaN or inf")
    norm = float(v.norm())
    if norm > MAX_EMBEDDING_NORM:
        raise ValueError(f"relation: the embedding of {name!r} in {source} has norm {norm:.4g}, beyond "
                         f"{MAX_EMBEDDING_NORM:g} (CLIP token embeddings have norms below a few units); a "
                         "corrupt or diverged file?")


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"relation: file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: name the file, not the unpickler's internals
        raise ValueError(f"relation: cannot read {str(path)!r} as a learned_embeds file ({type(e).__name__}: {e})"
                         ) from None
    if not isinstance(data, Mapping):
        raise ValueError(f"relation: {str(path)!r} holds a {type(data).__name__}, expected a dict "
                         "{token: embedding} (the official learned_embeds.bin format)")
    return dict(data)


def _pick(embeds: dict, token: str | None, source: str) -> tuple[str, torch.Tensor]:
    if not embeds:
        raise ValueError(f"relation: {source} holds no embedding")
    if token is not None and token in embeds:
        name, value = token, embeds[token]
    elif len(embeds) == 1:
        (name, value), = embeds.items()
        name = token or name
    else:
        raise ValueError(f"relation: {source} holds several embeddings {sorted(map(str, embeds))}; "
                         "pick one with token=")
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        raise ValueError(f"relation: token must be a non-empty string without spaces, got {name!r}")
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"relation: the embedding of {name!r} in {source} is not a floating-point tensor")
    if value.dim() == 2 and value.shape[0] == 1:
        value = value[0]
    if value.dim() != 1:
        raise ValueError(f"relation: the embedding of {name!r} in {source} has shape {tuple(value.shape)}, "
                         "expected (D,) or (1, D)")
    check_embedding(value, name, source)
    return name, value


def check_relation_model(engine) -> None:
    """ReVersion relation tokens live in one text encoder's embedding table: SD 1.x/2.x only (ValueError for
    SDXL, whose second text encoder would not know the token)."""
    if getattr(engine, "is_xl", False):
        raise ValueError("model: ReVersion relation tokens are for SD 1.x/2.x models (one text encoder); this is an "
                         "SDXL model, whose second text encoder would not know the token")


@torch.no_grad()
def add_token(engine, token: str, embedding: torch.Tensor) -> int:
    """Add ``token`` to the engine's tokenizer and text encoder with ``embedding`` as its row (or overwrite
    the row when ``token`` was added before), clear the prompt cache, and return the token id.

    Raises ``ValueError`` when the embedding is not a ``(D,)`` floating-point tensor of the text encoder's hidden
    size, holds NaN/inf or is absurdly large (:data:`MAX_EMBEDDING_NORM`), or when ``token`` is a word of the base
    vocabulary (overwriting it would change every prompt that uses the word).
    """
    check_relation_model(engine)
    table = engine.text_encoder.get_input_embeddings()
    dim = table.weight.shape[1]
    if isinstance(embedding, torch.Tensor) and embedding.dim() == 2 and embedding.shape[0] == 1:
        embedding = embedding[0]
    if not isinstance(embedding, torch.Tensor) or not embedding.is_floating_point() or embedding.dim() != 1:
        raise ValueError(f"relation: the embedding of {token!r} must be a (D,) floating-point tensor, got "
                         f"{type(embedding).__name__} {tuple(getattr(embedding, 'shape', ()))}")
    check_embedding(embedding, token, "the embedding given")
    if embedding.shape[-1] != dim:
        raise ValueError(f"relation: the embedding of {token!r} has size {embedding.shape[-1]} but this text "
                         f"encoder's hidden size is {dim} (a file trained for another model?)")
    tok = engine.tokenizer
    added = tok.get_added_vocab()
    if token not in added and (token in tok.get_vocab() or len(tok(token, add_special_tokens=False).input_ids) == 1):
        raise ValueError(f"relation: {token!r} is already a word of the model's vocabulary; choose another "
                         "token name (e.g. '<R>')")
    if token not in added:
        tok.add_tokens([token])
    token_id = tok.convert_tokens_to_ids(token)
    if token_id >= table.weight.shape[0]:
        engine.text_encoder.resize_token_embeddings(len(tok), mean_resizing=False)
        table = engine.text_encoder.get_input_embeddings()
        table.weight.requires_grad_(False)  # the resized table is a fresh Parameter; the model stays frozen
    table.weight[token_id] = embedding.to(device=table.weight.device, dtype=table.weight.dtype)
    engine.clear_prompt_cache()
    return token_id


def load_relation(engine, path_or_embeds, *, token: str | None = None) -> str:
    """Make a learned relation token usable in the engine's prompts; return the token.

    Args:
        engine: a :class:`~dreamfuse.engine.engine.Engine`.
        path_or_embeds: a ``learned_embeds.bin`` (official format ``{"<R>": tensor}``) or ``.safetensors``
            path, a dict ``{token: tensor}``, or a bare ``(D,)`` tensor.
        token: the name the token gets in prompts. Default: the file's key (``"<R>"`` for a bare tensor).
            With a file holding several embeddings, it selects one.

    Loading a relation under a token that was loaded before replaces it. Example::

        engine.load_relation("out/learned_embeds.bin")
        engine.text2img("cat <R> box")
    """
    if isinstance(path_or_embeds, torch.Tensor):
        embeds, source = {token or DEFAULT_TOKEN: path_or_embeds}, "the tensor"
    elif isinstance(path_or_embeds, Mapping):
        embeds, source = dict(path_or_embeds), "the dict"
    elif isinstance(path_or_embeds, (str, Path)):
        path = Path(path_or_embeds).expanduser()
        embeds, source = _read_file(path), repr(str(path))
    else:
        raise ValueError(f"relation: expected a path, a dict or a tensor, got {type(path_or_embeds).__name__}")
    name, value = _pick(embeds, token, source)
    add_token(engine, name, value)
    return name
