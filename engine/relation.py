"""Learned tokens at inference: ReVersion relation tokens and textual inversions, loaded into an engine.

Files read (``torch.load(weights_only=True)``: a pickle that would run code is refused, never executed):

* ReVersion's / diffusers' textual-inversion format, ``torch.save({"<R>": tensor})`` (``learned_embeds.bin``), or a
  ``.safetensors`` file with the same single-key layout;
* AUTOMATIC1111 textual inversions: a ``.pt`` holding ``string_to_param["*"]`` and ``name`` (the token is ``name``
  unless ``token=`` is given, as in diffusers' ``load_textual_inversion``), and a ``.safetensors`` holding
  ``emb_params`` (no name inside: the token is ``token=``, else the file's stem, as AUTOMATIC1111 names it).

An embedding is ``(D,)``, ``(1, D)`` or ``(n, D)`` with ``D`` the text encoder's hidden size (768 for SD 1.x). A
multi-vector embedding (``n > 1``) becomes the tokens ``T``, ``T_1``, ..., ``T_{n-1}``, and ``T`` in a prompt is
read as all ``n`` of them, as diffusers does. Loading adds the token(s) to the tokenizer, grows the text encoder's
token-embedding table and writes the rows there; nothing else in the model changes.

Every embedding must be finite with an L2 norm (per vector) of at most :data:`MAX_EMBEDDING_NORM`, and a token may
not be anything the tokenizer already knows -- a word of its vocabulary or a special token such as
``<|endoftext|>`` -- unless this engine learned it before (loading it again replaces it): anything else is refused
with a ``ValueError`` naming the file, instead of silently changing every prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import torch

from .concurrency import changes_model
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


MAX_VECTORS = 75
"""Most vectors one learned token may expand to: CLIP reads 77 tokens, BOS and EOS included."""


def _read_file(path: Path) -> dict:
    from .files import check_file

    check_file(path, "relation")  # a folder or a FIFO is refused by name, never opened (a FIFO would block)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: name the file, not the unpickler's internals
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"relation: cannot read {str(path)!r} as a learned-embedding file ({type(e).__name__}: "
                         f"{first})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"relation: {str(path)!r} holds a {type(data).__name__}, expected a dict "
                         "{token: embedding} (the official learned_embeds.bin format)")
    return dict(data)


def _pick(embeds: dict, token: str | None, source: str, stem: str | None = None) -> tuple[str, torch.Tensor]:
    """``(token, (n, D) embedding)`` from what a file or dict holds (the formats of the module docstring)."""
    if not embeds:
        raise ValueError(f"relation: {source} holds no embedding")
    if "string_to_param" in embeds:  # AUTOMATIC1111 / the original textual-inversion code's .pt
        params = embeds["string_to_param"]
        if not isinstance(params, Mapping) or not params:
            raise ValueError(f"relation: {source}: string_to_param is not a non-empty dict (a damaged "
                             "textual-inversion file?)")
        if "*" in params:
            value = params["*"]
        elif len(params) == 1:
            value = next(iter(params.values()))
        else:
            raise ValueError(f"relation: {source}: string_to_param holds several embeddings "
                             f"{sorted(map(str, params))} and no '*'")
        name = token if token is not None else embeds.get("name")
        if name is None:
            raise ValueError(f"relation: {source} names no token (no 'name'): give one with token=")
    elif "emb_params" in embeds and len(embeds) == 1:  # AUTOMATIC1111's .safetensors: no name inside
        name = token if token is not None else stem
        if name is None:
            raise ValueError(f"relation: {source} (an AUTOMATIC1111 embedding, emb_params) names no token: give "
                             "one with token=")
        value = embeds["emb_params"]
    elif {"clip_l", "clip_g"} <= set(embeds):
        raise ValueError(f"relation: {source} is an SDXL textual inversion (clip_l/clip_g): learned tokens are "
                         "for SD 1.x/2.x models (one text encoder)")
    elif token is not None and token in embeds:
        name, value = token, embeds[token]
    elif len(embeds) == 1:
        (name, value), = embeds.items()
        name = token or name
    else:
        raise ValueError(f"relation: {source} holds several embeddings {sorted(map(str, embeds))[:8]}; "
                         "pick one with token=")
    check_token_name(name)
    value = _as_rows(value, name, source)
    for i, row in enumerate(value):
        check_embedding(row, name if len(value) == 1 else f"{name}[{i}]", source)
    return name, value


def check_token_name(name) -> str:
    """A token name: a non-empty string without whitespace, at most 64 characters; ValueError otherwise."""
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name) or len(name) > 64:
        raise ValueError(f"relation: token must be a non-empty string without spaces (at most 64 characters), "
                         f"got {name!r}")
    return name


def _as_rows(value, name: str, source: str) -> torch.Tensor:
    """``(D,)``, ``(1, D)`` or ``(n, D)`` floating-point -> ``(n, D)``; ValueError otherwise."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"relation: the embedding of {name!r} in {source} is not a floating-point tensor")
    if value.dim() == 1:
        value = value[None]
    if value.dim() != 2 or value.shape[1] == 0 or not 1 <= value.shape[0] <= MAX_VECTORS:
        raise ValueError(f"relation: the embedding of {name!r} in {source} has shape {tuple(value.shape)}, "
                         f"expected (D,) or (n, D) with 1 <= n <= {MAX_VECTORS}")
    return value.detach()


def check_relation_model(engine) -> None:
    """ReVersion relation tokens live in one text encoder's embedding table: SD 1.x/2.x only (ValueError for
    SDXL, whose second text encoder would not know the token)."""
    if getattr(engine, "is_xl", False):
        raise ValueError("model: ReVersion relation tokens are for SD 1.x/2.x models (one text encoder); this is an "
                         "SDXL model, whose second text encoder would not know the token")


@torch.no_grad()
def add_token(engine, token: str, embedding: torch.Tensor) -> int:
    """Add ``token`` to the engine's tokenizer and text encoder with ``embedding`` (``(D,)``) as its row (or
    overwrite the row when this engine added ``token`` before), clear the prompt cache, and return the token id.
    ``(n, D)`` embeddings: :func:`add_tokens`.

    Raises ``ValueError`` when the embedding is not a ``(D,)`` floating-point tensor of the text encoder's hidden
    size, holds NaN/inf or is absurdly large (:data:`MAX_EMBEDDING_NORM`), or when ``token`` is something the
    tokenizer already knows (a word of its vocabulary, a special or added token it was given elsewhere):
    overwriting it would change every prompt that uses it.
    """
    if isinstance(embedding, torch.Tensor) and embedding.dim() == 2 and embedding.shape[0] == 1:
        embedding = embedding[0]
    if not isinstance(embedding, torch.Tensor) or not embedding.is_floating_point() or embedding.dim() != 1:
        raise ValueError(f"relation: the embedding of {token!r} must be a (D,) floating-point tensor, got "
                         f"{type(embedding).__name__} {tuple(getattr(embedding, 'shape', ()))}")
    return add_tokens(engine, token, embedding[None], source="the embedding given")[0]


def _learned(engine) -> dict[str, list[str]]:
    """The tokens this engine learned (``load_relation``, ``add_token``, ReVersion training): ``{token: its n
    token names}``; kept on the engine, read by :meth:`Engine.tokenize` to expand multi-vector tokens."""
    learned = getattr(engine, "learned_tokens", None)
    if learned is None:
        learned = engine.learned_tokens = {}
    return learned


@changes_model("add_tokens")
@torch.no_grad()
def add_tokens(engine, token: str, embeddings: torch.Tensor, *, source: str = "the embedding given") -> list[int]:
    """Add a learned token with ``embeddings`` ``(n, D)`` as its ``n`` vectors: the tokens ``token``,
    ``token_1``, ..., ``token_{n-1}`` (diffusers' names), ``token`` in a prompt then reads all ``n``. Replaces a token
    this engine learned before. Returns the token ids. Checks as :func:`add_token`, all before anything changes."""
    check_relation_model(engine)
    check_token_name(token)
    table = engine.text_encoder.get_input_embeddings()
    dim = table.weight.shape[1]
    rows = _as_rows(embeddings, token, source)
    for i, row in enumerate(rows):
        check_embedding(row, token if len(rows) == 1 else f"{token}[{i}]", source)
    if rows.shape[1] != dim:
        raise ValueError(f"relation: the embedding of {token!r} has size {rows.shape[1]} but this text "
                         f"encoder's hidden size is {dim} (a file trained for another model?)")
    names = token_names(token, len(rows))
    learned = _learned(engine)
    check_token_names(engine, names)
    tok = engine.tokenizer
    new = [n for n in names if n not in tok.get_added_vocab()]
    if new:
        tok.add_tokens(new)
    ids = [tok.convert_tokens_to_ids(n) for n in names]
    if max(ids) >= table.weight.shape[0]:
        engine.text_encoder.resize_token_embeddings(len(tok), mean_resizing=False)
        table = engine.text_encoder.get_input_embeddings()
        table.weight.requires_grad_(False)  # the resized table is a fresh Parameter; the model stays frozen
    for i, row in zip(ids, rows):
        table.weight[i] = row.to(device=table.weight.device, dtype=table.weight.dtype)
    learned[token] = names
    engine.clear_prompt_cache()
    return ids


def token_names(token: str, n: int) -> list[str]:
    """The names of a learned token's ``n`` vectors: ``token``, ``token_1``, ..., ``token_{n-1}`` (diffusers')."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def check_token_names(engine, names) -> None:
    """``ValueError`` when one of ``names`` is something the engine's tokenizer already knows -- a word of its
    vocabulary, a special token, or a token added elsewhere -- and not a token this engine learned (those may be
    loaded again): a learned token under such a name would change every prompt that uses the word."""
    mine = {n for ns in _learned(engine).values() for n in ns}
    tok = engine.tokenizer
    vocab = tok.get_vocab()
    special = {str(t) for t in getattr(tok, "all_special_tokens", ())}
    for name in names:
        if name in mine:
            continue
        if name in special or name in tok.get_added_vocab():
            raise ValueError(f"relation: {name!r} is a special or added token of this tokenizer; choose another "
                             "token name (e.g. '<R>')")
        with getattr(engine, "_tokenizer_lock", None) or contextlib.nullcontext():  # padding state is shared
            pieces = len(tok(name, add_special_tokens=False).input_ids)
        if name in vocab or pieces == 1:
            raise ValueError(f"relation: {name!r} is already a word of the model's vocabulary; choose another "
                             "token name (e.g. '<R>')")


def expand_tokens(engine, text):
    """``text`` (a string or a list of them) with every multi-vector learned token replaced by its ``n`` token
    names (``"a <cat> toy"`` -> ``"a <cat> <cat>_1 <cat>_2 toy"``), as diffusers' ``maybe_convert_prompt``; the
    text unchanged when no such token is loaded."""
    import re

    learned = getattr(engine, "learned_tokens", None) or {}
    multi = {t: " ".join(ns) for t, ns in learned.items() if len(ns) > 1}
    if not multi:
        return text
    names = sorted({n for ns in learned.values() for n in ns}, key=len, reverse=True)  # longest first, as the
    pattern = re.compile("|".join(map(re.escape, names)))  # tokenizer's added-token matching

    def one(t):
        return t if not isinstance(t, str) else pattern.sub(lambda m: multi.get(m.group(0), m.group(0)), t)

    return one(text) if isinstance(text, str) else [one(t) for t in text]


@changes_model("load_relation")
def load_relation(engine, path_or_embeds, *, token: str | None = None) -> str:
    """Make a learned token -- a ReVersion relation or a textual inversion -- usable in the engine's prompts; return
    the token.

    Args:
        engine: a :class:`~dreamfuse.engine.engine.Engine`.
        path_or_embeds: a ``learned_embeds.bin`` (official format ``{"<R>": tensor}``), an AUTOMATIC1111 ``.pt``
            (``string_to_param``) or ``.safetensors`` (``emb_params``), a diffusers ``.safetensors``, a dict
            ``{token: tensor}``, or a bare ``(D,)`` / ``(n, D)`` tensor.
        token: the name the token gets in prompts. Default: the file's key, an AUTOMATIC1111 ``.pt``'s ``name``, an
            AUTOMATIC1111 ``.safetensors``' file stem (``"<R>"`` for a bare tensor). With a file holding several
            embeddings, it selects one.

    Loading a token that this engine loaded before replaces it. Example::

        engine.load_relation("out/learned_embeds.bin")
        engine.text2img("cat <R> box")
        engine.load_textual_inversion("charturnerv2.pt")   # the same loader
    """
    stem = None
    if isinstance(path_or_embeds, torch.Tensor):
        embeds, source = {token or DEFAULT_TOKEN: path_or_embeds}, "the tensor"
    elif isinstance(path_or_embeds, Mapping):
        embeds, source = dict(path_or_embeds), "the dict"
    elif isinstance(path_or_embeds, (str, Path)):
        path = Path(path_or_embeds).expanduser()
        embeds, source, stem = _read_file(path), repr(str(path)), path.stem
    else:
        raise ValueError(f"relation: expected a path, a dict or a tensor, got {type(path_or_embeds).__name__}")
    if token is not None:
        check_token_name(token)
    name, value = _pick(embeds, token, source, stem)
    add_tokens(engine, name, value, source=source)
    return name
