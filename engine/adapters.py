"""Per-request adapters: LoRAs and learned tokens chosen by each request and applied to its own batch rows, never to
the shared model.

**Registry.** ``engine.adapters`` (an :class:`AdapterRegistry`, made on first use) knows adapters by name: the files
of an adapters folder (``dreamfuse serve --adapters DIR``; a LoRA ``.safetensors`` or a learned-token file, named
by its file stem) and those registered from a path or bytes (:meth:`AdapterRegistry.register`). Requests name them:
``engine.text2img(..., loras=[("sks-dog", 0.8)], learned_tokens=["cat-toy"])`` (every pipeline), the HTTP fields
``loras`` / ``learned_tokens``, the CLI's ``--adapter NAME[:SCALE]``. Files are read as ``engine.load_lora`` and
``load_relation`` read them (diffusers and kohya LoRAs, safetensors only; ``learned_embeds.bin`` with
``weights_only=True``) and checked against the model by the same code (:func:`~dreamfuse.engine.lora.read_lora`)
before any weight is used: a request naming an adapter that does not exist, does not fit or does not load fails
with a ``ValueError`` naming the field and the adapter, and only that request.

**Pool** (S-LoRA style). A loaded LoRA owns one *slot* of the pool: for every ``nn.Linear`` any loaded LoRA
targets, the pool holds ``lora_a (N, r_l, d_in)``, ``lora_b (N, d_out, r_l)`` and ``ranks (N,)`` -- the tensors
``dreamfuse::lora_delta`` takes -- with ``N`` slots and ``r_l`` the largest rank loaded for that layer; a slot's
rank is 0 in the layers its LoRA does not target. Conv layers (LoCon, SD 1.x's ``proj_in``) keep their A/B per
adapter. The pool lives under a memory budget (``cache_mb``): loading evicts least recently used adapters that no
request holds; an adapter a running request holds is never evicted (when the held ones alone pass the budget, the
pool grows past it for as long as they run). The pool's tensors are replaced, never resized in place, when it grows
or is compacted: a call already running keeps the state it bound, so loading never disturbs another thread's call.

**Per-row application.** Every ``nn.Linear`` / ``nn.Conv2d`` of the UNet and text encoder(s) gets one forward hook
when the registry is made (``_install``, once per module; the layers peft wraps for an engine-wide LoRA are hooked
under the wrapper, so the two add up). A hook does nothing unless the running call bound adapters: a UNet call's
rows carry their adapters (``UNetCall.adapters`` -> ``Engine.unet_call(adapters=...)``, one entry per row, which the
step scheduler concatenates when it merges calls), and ``unet_call`` binds them to its own thread for the duration
of that forward -- the only way to reach layers that take no per-call arguments (``to_q`` inside the attention,
``ff``, resnet convs, the CLIP encoder). Calls in other threads never see it. A bound Linear returns
``lora_delta(x, pool..., segments, base=out)``: per row, the base output plus ``Σ scale·B(A·x)`` over that row's
adapters, rows with none left exact. Text encoders run the same way, per prompt; the prompt cache keys include the
adapters that change the text encoder.

**Learned tokens** (SD 1.x/2.x). A token adapter's token (``<cat-toy>`` in its file) is written into the prompts of
the requests that name it as reserved placeholder tokens of a private copy of the tokenizer; the text encoder's
token embedding is hooked to put the adapter's vectors at those positions. The shared tokenizer and embedding table
never change, so other requests read ``<cat-toy>`` as plain text.

Thread safety: the registry's own lock guards names, slots and eviction; any number of threads may resolve, load
and run adapters while calls run. Exported UNet backends (ONNX, TensorRT, AOTInductor) refuse per-request adapters.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import tempfile
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from dreamfuse.kernels.lora import lora_delta, lora_delta_reference, lora_segments
from torch import nn

from .validation import shown

KINDS = ("lora", "token")
SUFFIXES = (".safetensors", ".bin", ".pt")
"""Adapter files: LoRAs are ``.safetensors`` only (a pickle can run code); learned tokens any of these."""
MAX_PER_REQUEST = 8
"""Most LoRAs (and, separately, learned tokens) one request may name."""
DEFAULT_CACHE_MB = 1024.0
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
_SLOT = "<dreamfuse-slot-{}>"
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_local = threading.local()  # .binding: the _Binding of the forward this thread runs (see the module docstring)


def check_name(name, field: str = "name") -> str:
    """An adapter name: a plain file stem (letters, digits, ``_ - . +``, at most 128 characters, not starting with a
    dot, no ``..``): it can never reach outside the adapters folder."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{field}: adapter names are plain file stems (letters, digits, '_', '-', '.', '+'; at most "
                         f"128 characters; no '/' or '..'), got {shown(name)}")
    return name


# ------------------------------------------------------------------------------------------------ records
@dataclass(eq=False)
class _Loaded:
    """An adapter's weights on the engine's device."""

    slot: int | None = None
    """Its pool slot (a LoRA with Linear layers), else None."""
    linear: dict[str, int] = field(default_factory=dict)
    """Layer key -> rank, of the Linear layers it holds in the pool."""
    conv: dict[str, tuple] = field(default_factory=dict)
    """Layer key -> (A, B, scaling) of its Conv2d layers."""
    scaling: float = 1.0
    """peft's ``alpha / r`` common to its Linear layers (a layer with another one has it folded into its B)."""
    vectors: torch.Tensor | None = None
    """A learned token's ``(n, D)`` vectors."""
    nbytes: int = 0


@dataclass(eq=False)
class _Entry:
    """A registered adapter (one version of one file)."""

    name: str
    kind: str
    path: Path
    uid: int
    origin: str  # "folder", "path" or "bytes"
    sig: tuple | None = None  # the file's (size, mtime_ns, inode) when registered: a changed file is a new version
    rank: int | None = None
    components: tuple[str, ...] = ()
    token: str | None = None
    numel: int | None = None  # its weights' element count (from the file's header until it is read)
    loaded: _Loaded | None = None
    pins: int = 0
    retired: bool = False

    def info(self, element_size: int) -> dict:
        if self.kind == "lora" and self.rank is None:
            self.rank, self.numel = _header_info(self.path)
        memory = (self.loaded.nbytes if self.loaded is not None
                  else None if self.numel is None else self.numel * element_size)
        return {"name": self.name, "kind": self.kind, "rank": self.rank, "components": list(self.components),
                "token": self.token, "size_bytes": _size(self.path), "loaded": self.loaded is not None,
                "memory_bytes": memory, "in_use": self.pins > 0}


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _sig(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True, eq=False)
class AdapterSet:
    """The adapters one request uses, resolved and checked (:meth:`AdapterRegistry.request`): ``loras`` as
    ``(entry, scale)``, ``tokens`` as entries. Pipelines pass it to ``encode_text(adapters=)`` and in their
    ``UNetCall.adapters``; :meth:`held` keeps its weights loaded while the request runs."""

    registry: AdapterRegistry
    loras: tuple[tuple[_Entry, float], ...]
    tokens: tuple[_Entry, ...]

    @property
    def entries(self) -> tuple[_Entry, ...]:
        return tuple(e for e, _ in self.loras) + self.tokens

    @property
    def text_key(self) -> tuple | None:
        """What changes this request's text embeddings (the prompt cache's key), or None."""
        key = tuple((e.uid, s) for e, s in self.loras if any(c.startswith("text_encoder") for c in e.components))
        key += tuple(e.uid for e in self.tokens)
        return key or None

    @property
    def unet_key(self) -> tuple | None:
        """What changes this request's UNet (e.g. personalize's inversion cache key), or None."""
        return tuple((e.uid, s) for e, s in self.loras if "unet" in e.components) or None

    def describe(self) -> str:
        parts = [f"{e.name}:{s:g}" for e, s in self.loras] + [e.name for e in self.tokens]
        return ", ".join(parts)

    @contextmanager
    def held(self):
        """Keep the adapters loaded (never evicted) inside the block: a request's whole run."""
        entries = self.entries
        self.registry._pin(entries, start=True)
        try:
            yield self
        finally:
            self.registry._unpin(entries)


def holding(adapters: AdapterSet | None, program):
    """``program`` run with ``adapters`` held (:meth:`AdapterSet.held`) from its first step to its end or close; the
    program itself when there are none. A program closed before it started holds nothing."""
    if adapters is None:
        return program

    def run():
        with adapters.held():
            return (yield from program)

    return run()


def row_adapters(parts: Sequence[tuple[object, int]]) -> tuple | None:
    """One adapter entry per row for calls merged in this order: ``parts`` = ``(adapters, rows)`` of each call, its
    ``adapters`` an :class:`AdapterSet` for all its rows, a per-row sequence, or None. None when no row has any."""
    if all(a is None for a, _ in parts):
        return None
    rows: list = []
    for a, n in parts:
        if a is None or isinstance(a, AdapterSet):
            rows += [a] * n
        else:
            a = tuple(a)
            if len(a) != n:
                raise ValueError(f"adapters: {len(a)} entries for {n} rows")
            rows += a
    return tuple(rows)


def rows_slice(adapters, a: int, b: int):
    """Rows ``a:b`` of a call's adapters (an :class:`AdapterSet` or None stands for every row)."""
    return adapters if adapters is None or isinstance(adapters, AdapterSet) else tuple(adapters)[a:b]


# ------------------------------------------------------------------------------------------------ pool
@dataclass(frozen=True, eq=False)
class _Layer:
    module: nn.Module
    conv: bool
    d_in: int
    d_out: int


class _Slots:
    """One Linear layer's pool tensors, as ``lora_delta`` takes them."""

    __slots__ = ("a", "b", "ranks")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor):
        self.a, self.b, self.ranks = a, b, ranks


@dataclass(frozen=True, eq=False)
class _PoolState:
    """The pool at one moment; replaced (never resized in place) when it grows or is compacted."""

    cap: int = 0
    layers: dict = field(default_factory=dict)  # key -> _Slots
    ranks_host: dict = field(default_factory=dict)  # key -> (cap,) int32 CPU mirror of _Slots.ranks

    @property
    def nbytes(self) -> int:
        return sum(s.a.numel() * s.a.element_size() + s.b.numel() * s.b.element_size() for s in self.layers.values())


def _geometry_bytes(layers: dict[str, _Layer], ranks: dict[str, int], cap: int) -> int:
    return sum(cap * r * (layers[k].d_in + layers[k].d_out) * layers[k].module.weight.element_size()
               for k, r in ranks.items())


# ------------------------------------------------------------------------------------------------ binding
class _Binding:
    """The adapters of one forward (a UNet call, or one text-encoder batch), bound to the running thread."""

    def __init__(self, registry: AdapterRegistry, state: _PoolState, rows: list[list[tuple[_Entry, float]]],
                 components: tuple[str, ...], entries: tuple[_Entry, ...], tokens=None):
        self.registry, self.state, self.rows, self.entries = registry, state, len(rows), entries
        pairs = [[(e.loaded.slot, s * e.loaded.scaling) for e, s in row if e.loaded.slot is not None] for row in rows]
        device = registry.engine.device
        self._starts, self.adapters, self.scales = lora_segments(pairs, 1, device=device)
        self._segs: dict[int, tuple] = {}
        self.keys = {k for e in entries if e.loaded is not None
                     for k in (*e.loaded.linear, *e.loaded.conv) if k.split(":")[0] in components}
        runs: list[tuple[int, int, list]] = []  # (first row, end row, pairs): conv layers go run by run
        for i, row in enumerate(rows):
            if runs and runs[-1][2] == row and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1, row)
            else:
                runs.append((i, i + 1, row))
        self.runs = [r for r in runs if r[2]]
        self.tokens = tokens  # (placeholder id of slot 0, (n, D) vectors) for a text-encoder binding, or None
        self._where = None
        self._previous = None

    def __enter__(self):
        self._previous = getattr(_local, "binding", None)
        _local.binding = self
        return self

    def __exit__(self, *exc):
        _local.binding = self._previous
        self.registry._unpin(self.entries)

    def segments(self, tokens_per_row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seg = self._segs.get(tokens_per_row)
        if seg is None:
            seg = self._segs[tokens_per_row] = (self._starts * tokens_per_row, self.adapters, self.scales)
        return seg

    def linear(self, key: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        slots = self.state.layers[key]
        tokens = x.numel() // max(x.shape[-1], 1)
        if tokens % self.rows:
            raise RuntimeError(f"adapters: layer {key} saw {tokens} tokens for a call of {self.rows} rows")
        starts, adapters, scales = self.segments(tokens // self.rows)
        a, b = slots.a, slots.b
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
            # a guided step backpropagates through the UNet: the op has no autograd, its PyTorch reference does
            y = lora_delta_reference(x.reshape(tokens, -1), a, b, slots.ranks, starts, adapters, scales,
                                     out.reshape(tokens, -1))
            return y.view(out.shape)
        return lora_delta(x, a, b, slots.ranks, starts, adapters, scales, base=out)

    def conv(self, key: str, module: nn.Conv2d, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """peft's Conv2d LoRA per run of rows: ``B(A(x)) · scaling``, A a conv with the base layer's kernel, stride and
        padding, B a 1x1 conv."""
        if x.shape[0] != self.rows:
            raise RuntimeError(f"adapters: layer {key} saw {x.shape[0]} rows for a call of {self.rows}")
        result = None
        for lo, hi, row in self.runs:
            delta = None
            for e, s in row:
                w = e.loaded.conv.get(key)
                if w is None:
                    continue
                a, b, scaling = w
                h = F.conv2d(x[lo:hi], a.to(x.dtype), None, module.stride, module.padding)
                d = F.conv2d(h, b.to(x.dtype)) * (s * scaling)
                delta = d if delta is None else delta + d
            if delta is not None:
                if result is None:
                    result = out.clone()
                result[lo:hi] = result[lo:hi] + delta
        return out if result is None else result


def _linear_hook(key: str):
    def hook(module, args, out):
        b = getattr(_local, "binding", None)
        if b is None or key not in b.keys:
            return None
        return b.linear(key, args[0], out)
    return hook


def _conv_hook(key: str):
    def hook(module, args, out):
        b = getattr(_local, "binding", None)
        if b is None or key not in b.keys:
            return None
        return b.conv(key, module, args[0], out)
    return hook


def _embedding_pre_hook(module, args):
    """Placeholder ids (ids of the private tokenizer, past the table) read row 0; the hook below overwrites them."""
    b = getattr(_local, "binding", None)
    if b is None or b.tokens is None:
        return None
    first, vectors = b.tokens
    ids = args[0]
    idx = ids - first
    is_slot = (idx >= 0) & (idx < vectors.shape[0])
    b._where = (is_slot, idx.clamp(0, vectors.shape[0] - 1))
    return (torch.where(is_slot, torch.zeros_like(ids), ids), *args[1:])


def _embedding_hook(module, args, out):
    b = getattr(_local, "binding", None)
    if b is None or b.tokens is None or b._where is None:
        return None
    is_slot, idx = b._where
    b._where = None
    return torch.where(is_slot[..., None], b.tokens[1][idx].to(out.dtype), out)


def _is_peft_part(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def _install(engine) -> dict[str, _Layer]:
    """Hook every Linear and Conv2d of the UNet and text encoder(s) (and SD's token embedding), once per module (the
    hooks read only the thread's binding, so engines sharing modules share them). Returns the layers by key
    ``"<component>:<module path>"`` (peft-free paths: a layer peft wraps is hooked as its base layer)."""
    layers: dict[str, _Layer] = {}
    for comp in _COMPONENTS:
        model = getattr(engine, comp, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if _is_peft_part(name) or type(module) not in (nn.Linear, nn.Conv2d):
                continue
            key = f"{comp}:{name.removesuffix('.base_layer')}"
            conv = isinstance(module, nn.Conv2d)
            d_in, d_out = ((module.in_channels, module.out_channels) if conv
                           else (module.in_features, module.out_features))
            layers[key] = _Layer(module, conv, d_in, d_out)
            if getattr(module, "_dreamfuse_adapter_hook", None) != key:
                module.register_forward_hook(_conv_hook(key) if conv else _linear_hook(key))
                module._dreamfuse_adapter_hook = key
    if not engine.is_xl:
        table = engine.text_encoder.get_input_embeddings()
        if not getattr(table, "_dreamfuse_adapter_hook", None):
            table.register_forward_pre_hook(_embedding_pre_hook)
            table.register_forward_hook(_embedding_hook)
            table._dreamfuse_adapter_hook = "tokens"
    return layers


# ------------------------------------------------------------------------------------------------ registry
class AdapterRegistry:
    """Adapters known by name, loaded on first use into an LRU pool under a memory budget (see the module docs).

    Args:
        engine: the engine whose model the adapters are for.
        folder: an adapters folder (LoRA ``.safetensors`` and learned-token files; names are file stems). Files added
            later are found when a request names them; a file changed on disk is a new version (requests running
            keep the weights they started with).
        cache_mb: the pool's memory budget in MiB (device memory of the loaded adapters' weights).
    """

    def __init__(self, engine, folder=None, cache_mb: float = DEFAULT_CACHE_MB):
        self.engine = engine
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._hidden: set[str] = set()  # folder adapters unregistered by name
        self._loaded: OrderedDict[int, _Entry] = OrderedDict()  # uid -> entry, least recently used first
        self._uids = itertools.count(1)
        self._state = _PoolState()
        self._owners: list[_Entry | None] = []
        self._tmp: Path | None = None
        self._tokenizer = None  # the private tokenizer with placeholder tokens, and the shared one's length then
        self._layers = _install(engine)
        self._element_size = torch.empty(0, dtype=engine.dtype).element_size()
        self.folder: Path | None = None
        self.cache_bytes = 0
        self.set_budget(cache_mb)
        if folder is not None:
            self.set_folder(folder)

    # ------------------------------------------------------------------------------------------- configuration
    def set_budget(self, cache_mb: float) -> None:
        from .validation import check_number

        cache_mb = check_number(cache_mb, "cache_mb", low=0, low_open=True)
        with self._lock:
            self.cache_bytes = int(cache_mb * 2**20)

    def set_folder(self, folder) -> None:
        """Serve the adapters of ``folder`` (its files are listed now, read when first used)."""
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ValueError(f"adapters: {str(folder)!r} is not a folder" if path.exists()
                             else f"adapters: folder {str(folder)!r} does not exist")
        with self._lock:
            if self.folder is not None and self.folder != path.resolve():  # the old folder's adapters go
                for name in [n for n, e in self._entries.items() if e.origin == "folder"]:
                    self._retire(self._entries.pop(name))
                self._hidden.clear()
            self.folder = path.resolve()
            self._scan()

    def _scan(self) -> list[str]:
        """Register the folder's adapter files not known yet; returns the names of files skipped (bad names)."""
        skipped = []
        if self.folder is None:
            return skipped
        try:
            files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in SUFFIXES)
        except OSError:
            return skipped
        for p in files:
            if not _NAME.fullmatch(p.stem) or ".." in p.stem:
                skipped.append(p.name)
                continue
            if p.stem not in self._entries and p.stem not in self._hidden:
                try:
                    self._from_folder(p.stem, "adapters")
                except ValueError:
                    skipped.append(p.name)
        return skipped

    def _from_folder(self, name: str, field: str) -> _Entry | None:
        """The folder's file for ``name`` registered as an entry (None if there is none)."""
        if self.folder is None:
            return None
        found = [self.folder / f"{name}{s}" for s in SUFFIXES if (self.folder / f"{name}{s}").exists()
                 or (self.folder / f"{name}{s}").is_symlink()]
        if not found:
            return None
        if len(found) > 1:
            raise ValueError(f"{field}: adapter {name!r} is ambiguous: the adapters folder holds "
                             f"{', '.join(p.name for p in found)}")
        p = found[0]
        try:
            real = p.resolve(strict=True)
        except (OSError, RuntimeError):
            raise ValueError(f"{field}: adapter {name!r}: its file cannot be resolved (a broken link?)") from None
        if not real.is_relative_to(self.folder):
            raise ValueError(f"{field}: adapter {name!r} links outside the adapters folder; refused")
        from .files import not_a_file

        problem = not_a_file(real)
        if problem is not None:
            raise ValueError(f"{field}: adapter {name!r}: not a regular file")
        entry = _Entry(name, _kind_of(real, field, name), real, next(self._uids), "folder", _sig(real))
        self._entries[name] = entry
        return entry

    # ------------------------------------------------------------------------------------------- public API
    def register(self, source, name: str | None = None, *, replace: bool = False) -> str:
        """Register an adapter from a path (a LoRA ``.safetensors``, a learned-token ``.bin`` / ``.pt`` /
        ``.safetensors``) or from the bytes of such a file, as ``name`` (default: the file's stem; required for
        bytes). The file is read and checked against the model now (``ValueError`` naming the problem); loaded into
        the pool when there is room. ``replace``: take over a name in use (requests running keep the old one)."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            if name is None:
                raise ValueError("name: required when registering an adapter from bytes")
            check_name(name)
            data = bytes(source)
            suffix = ".safetensors" if _looks_like_safetensors(data) else ".bin"
            with self._lock:
                if self._tmp is None:
                    self._tmp = Path(tempfile.mkdtemp(prefix="dreamfuse-adapters-"))
                    weakref.finalize(self, shutil.rmtree, self._tmp, True)
                path = self._tmp / f"{next(self._uids)}-{name}{suffix}"
            path.write_bytes(data)
            origin = "bytes"
        elif isinstance(source, (str, Path)):
            from .files import check_file

            path = check_file(Path(source).expanduser(), "adapter").resolve()
            if path.suffix.lower() not in SUFFIXES:
                raise ValueError(f"adapter: {str(source)!r} is not an adapter file ({', '.join(SUFFIXES)})")
            name = check_name(path.stem if name is None else name)
            origin = "path"
        else:
            raise ValueError(f"adapter: expected a path or bytes, got {type(source).__name__}")
        try:
            if not replace and name in self.names():
                raise ValueError(f"name: an adapter named {name!r} is registered (unregister it, or replace=True)")
            entry = _Entry(name, _kind_of(path, "adapter", name), path, next(self._uids), origin, _sig(path))
            self._check(entry, "adapter")
            with self._lock:
                old = self._entries.get(name)
                if old is not None and not replace:  # registered meanwhile by another thread
                    self._retire(entry)
                    raise ValueError(f"name: an adapter named {name!r} is registered (unregister it, or "
                                     "replace=True)")
                if old is not None:
                    self._retire(old)
                self._entries[name] = entry
                self._hidden.discard(name)
        except ValueError:
            if origin == "bytes":
                path.unlink(missing_ok=True)
            raise
        return name

    def unregister(self, name: str) -> None:
        """Forget ``name``: new requests naming it fail; requests running with it keep it until they end, then its
        weights leave the pool. A folder adapter stays unregistered until registered again."""
        with self._lock:
            entry = self._entries.pop(check_name(name), None)
            if entry is None:
                raise ValueError(f"name: no adapter named {name!r} is registered")
            self._retire(entry)
            if entry.origin == "folder":
                self._hidden.add(name)

    def names(self) -> list[str]:
        with self._lock:
            self._scan()
            return sorted(self._entries)

    def list(self) -> list[dict]:
        """Every adapter: ``name``, ``kind`` (lora / token), ``rank`` (a LoRA's largest; None until known), ``token``
        (a learned token's text), ``components``, ``size_bytes`` (the file), ``loaded``, ``memory_bytes`` (its weights
        on the device: measured when loaded, else from the file's header), ``in_use`` (held by a running request).
        Nothing is read but headers."""
        with self._lock:
            self._scan()
            return [self._entries[n].info(self._element_size) for n in sorted(self._entries)]

    def info(self, name: str) -> dict:
        """One adapter's :meth:`list` entry (a folder's file is found by name)."""
        with self._lock:
            entry = self._entries.get(check_name(name))
            if entry is None and name not in self._hidden:
                entry = self._from_folder(name, "name")
            if entry is None:
                raise ValueError(f"name: no adapter named {name!r}")
            return entry.info(self._element_size)

    def pool_info(self) -> dict:
        """The pool: ``slots`` (its capacity), ``loaded``, ``held``, ``pool_bytes`` (its Linear slot tensors),
        ``bytes`` (everything loaded: pool, conv layers, token vectors), ``budget_bytes``, ``over_budget``."""
        with self._lock:
            extra = sum(e.loaded.nbytes for e in self._loaded.values() if e.loaded.slot is None
                        ) + sum(_conv_bytes(e.loaded) for e in self._loaded.values() if e.loaded.slot is not None)
            pool = self._state.nbytes
            return {"slots": self._state.cap, "loaded": len(self._loaded),
                    "held": sum(e.pins > 0 for e in self._loaded.values()), "pool_bytes": pool,
                    "bytes": pool + extra, "budget_bytes": self.cache_bytes,
                    "over_budget": pool + extra > self.cache_bytes}

    def request(self, loras=None, learned_tokens=None) -> AdapterSet | None:
        """Resolve and check what one request names: ``loras`` a list of ``(name, scale)`` pairs, ``{"name", "scale"}``
        dicts or names (scale 1.0), ``learned_tokens`` a list of names. Every adapter is read and checked against the
        model now (``ValueError`` naming ``loras`` / ``learned_tokens`` and the adapter); None when both are empty."""
        specs = _lora_specs(loras)
        tokens = _token_specs(learned_tokens)
        if not specs and not tokens:
            return None
        backend = getattr(self.engine, "unet_backend", "torch")
        if backend != "torch":
            field_ = "loras" if specs else "learned_tokens"
            raise ValueError(f"{field_}: per-request adapters need the PyTorch UNet; this engine runs an exported "
                             f"{backend} UNet (exports take no adapters; use engine.load_lora before exporting)")
        entries = [(self._resolve(n, f"loras[{i}]" if len(specs) > 1 else "loras", "lora"), s)
                   for i, (n, s) in enumerate(specs)]
        toks = [self._resolve(n, f"learned_tokens[{i}]" if len(tokens) > 1 else "learned_tokens", "token")
                for i, n in enumerate(tokens)]
        for e, _ in entries:
            self._check(e, "loras")
        for e in toks:
            self._check(e, "learned_tokens")
        seen: dict[str, str] = {}
        vectors = 0
        for e in toks:
            if e.token in seen:
                raise ValueError(f"learned_tokens: {seen[e.token]!r} and {e.name!r} both define {e.token!r}")
            seen[e.token] = e.name
            vectors += e.rank or 1
        from .relation import MAX_VECTORS

        if vectors > MAX_VECTORS:
            raise ValueError(f"learned_tokens: {vectors} vectors in all, the text encoder reads at most {MAX_VECTORS}")
        return AdapterSet(self, tuple(entries), tuple(toks))

    # ------------------------------------------------------------------------------------------- resolving
    def _resolve(self, name, field: str, kind: str) -> _Entry:
        check_name(name, field)
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.origin == "folder" and _sig(entry.path) != entry.sig:
                self._retire(self._entries.pop(name))  # the file changed or went: a new version, or none
                entry = None
            if entry is None and name not in self._hidden:
                entry = self._from_folder(name, field)
            if entry is None:
                known = sorted(self._entries)
                listed = ", ".join(known[:10]) + (f", ... ({len(known)} in all)" if len(known) > 10 else "")
                raise ValueError(f"{field}: no adapter named {name!r} (registered: {listed or 'none'})")
        if entry.kind != kind:
            other = "learned_tokens" if entry.kind == "token" else "loras"
            raise ValueError(f"{field}: adapter {name!r} is a {'learned token' if entry.kind == 'token' else 'LoRA'}; "
                             f"name it in {other}")
        return entry

    def _check(self, entry: _Entry, field: str) -> None:
        """Read and check ``entry`` once (then cached by file version); load it if the pool has room for it."""
        with self._lock:
            if entry.loaded is not None:
                self._loaded.move_to_end(entry.uid)
                return
        host = self._read(entry, field)  # outside the lock: file reading (again after an eviction: a prefetch)
        with self._lock:
            if entry.loaded is None and not entry.retired:
                self._place(entry, host, force=False)

    def _read(self, entry: _Entry, field: str) -> dict:
        """The adapter's weights on the host, checked against the model (``ValueError`` naming ``field`` and the
        adapter; the server's paths never appear in it)."""
        try:
            return _read_token(self.engine, entry, field) if entry.kind == "token" else _read_lora(self, entry, field)
        except ValueError as e:
            if entry.retired:  # unregistered (a registered copy of bytes deleted) while this request was reading it
                raise ValueError(f"{field}: adapter {entry.name!r} was unregistered (or replaced) while this request "
                                 "was being accepted") from None
            text = str(e).replace(repr(str(entry.path)), f"adapter {entry.name!r}").replace(str(entry.path), entry.name)
            text = text.removeprefix("relation: ").removeprefix(f"{field}: ")
            named = f"adapter {entry.name!r}"
            text = text if text.startswith(named) else f"{named}: {text}"
            raise ValueError(text if field == "adapter" else f"{field}: {text}") from None

    # ------------------------------------------------------------------------------------------- pinning
    def _pin(self, entries: Sequence[_Entry], start: bool = False) -> None:
        """Hold ``entries`` loaded (loading what is not; ``ValueError`` for one whose file no longer reads). A request
        ``start``-ing refuses an adapter unregistered since it was accepted; a call of a running request keeps one it
        holds. Every pin is undone by :meth:`_unpin`."""
        done: list[_Entry] = []
        try:
            for e in entries:
                field_ = "learned_tokens" if e.kind == "token" else "loras"
                with self._lock:
                    if e.retired and (start or e.loaded is None):
                        raise ValueError(f"{field_}: adapter {e.name!r} was unregistered (or its file changed) after "
                                         "this request was accepted")
                    loaded = e.loaded is not None
                if not loaded:
                    host = self._read(e, field_)  # outside the lock: file reading
                with self._lock:
                    if e.loaded is None:
                        self._place(e, host, force=True)
                    e.pins += 1
                    self._loaded.move_to_end(e.uid)
                done.append(e)
        except BaseException:
            self._unpin(done)
            raise

    def _unpin(self, entries: Sequence[_Entry]) -> None:
        with self._lock:
            for e in entries:
                e.pins -= 1
                if e.pins == 0 and e.retired:
                    self._evict(e)
            if self._bytes() > self.cache_bytes:
                self._shrink()

    def _shrink(self) -> None:
        """Under the lock, past the budget (held adapters took the pool past it, and some were released): evict
        least recently used unheld adapters until the live ones fit, and compact the pool to them."""
        while True:
            live = [e for e in self._loaded.values() if e.loaded.slot is not None]
            need: dict[str, int] = {}
            for e in live:
                for k, r in e.loaded.linear.items():
                    need[k] = max(need.get(k, 0), r)
            fixed = self._bytes() - self._state.nbytes
            if _geometry_bytes(self._layers, need, len(live)) + fixed <= self.cache_bytes:
                self._realloc(need, len(live))
                return
            victim = next((e for e in self._loaded.values() if e.pins == 0), None)
            if victim is None:
                return
            self._evict(victim)

    @property
    def over_budget(self) -> bool:
        """Whether held adapters keep the pool past the budget now."""
        with self._lock:
            return self._bytes() > self.cache_bytes

    def bind(self, adapters, rows: int, padded: int | None = None, components: tuple[str, ...] = ("unet",),
             tokens: bool = False) -> _Binding | None:
        """The binding of one forward of ``rows`` rows (``padded`` with rows without adapters), or None when no row
        has a LoRA (nor, with ``tokens``, a learned token). Pins its adapters until the binding's block ends."""
        per_row = list(row_adapters([(adapters, rows)]) or [None] * rows)
        sets = [a for a in dict.fromkeys(per_row) if a is not None]
        lora_entries = list(dict.fromkeys(e for a in sets for e, _ in a.loras))
        token_set = sets[0] if tokens and len(sets) == 1 and sets[0].tokens and per_row.count(sets[0]) == rows else None
        if tokens and any(a.tokens for a in sets) and token_set is None:
            raise ValueError("learned_tokens: a text-encoder batch takes one request's learned tokens for all rows")
        if not lora_entries and token_set is None:
            return None
        entries = tuple(lora_entries) + (token_set.tokens if token_set is not None else ())
        self._pin(entries)
        try:
            with self._lock:
                state = self._state
                row_pairs = [list(a.loras) if a is not None else [] for a in per_row]
                row_pairs += [[] for _ in range((padded or rows) - rows)]
                vectors = None
                if token_set is not None:
                    first, _ = self._private_tokenizer()
                    vectors = (first, torch.cat([e.loaded.vectors for e in token_set.tokens]))
                return _Binding(self, state, row_pairs, components, entries, vectors)
        except BaseException:
            self._unpin(entries)
            raise

    # ------------------------------------------------------------------------------------------- learned tokens
    def _private_tokenizer(self):
        """(id of placeholder 0, the private tokenizer): a copy of the engine's tokenizer with ``MAX_VECTORS``
        placeholder tokens, remade when the shared one gains tokens (an engine-wide ``load_relation``)."""
        import copy

        from .relation import MAX_VECTORS

        shared = self.engine.tokenizer
        with self._lock:
            if self._tokenizer is None or self._tokenizer[2] != len(shared):
                with self.engine._tokenizer_lock:
                    tok = copy.deepcopy(shared)
                names = [_SLOT.format(i) for i in range(MAX_VECTORS)]
                tok.add_tokens(names)
                ids = tok.convert_tokens_to_ids(names)
                if ids != list(range(ids[0], ids[0] + MAX_VECTORS)):
                    raise RuntimeError("adapters: the tokenizer did not number its placeholder tokens consecutively")
                self._tokenizer = (ids[0], tok, len(shared))
            return self._tokenizer[:2]

    def rewrite(self, adapters: AdapterSet, texts: list[str]):
        """``(texts, tokenizer)`` for encoding with ``adapters``' learned tokens: each token replaced by its
        placeholders (longest first, as the tokenizer matches added tokens), then the engine-wide multi-vector
        tokens expanded, for the private tokenizer."""
        from .relation import expand_tokens

        if not adapters.tokens:
            return expand_tokens(self.engine, list(texts)), self.engine.tokenizer
        _, tok = self._private_tokenizer()
        slots, k = {}, 0
        for e in adapters.tokens:
            n = int(e.loaded.vectors.shape[0]) if e.loaded is not None else int(e.rank or 1)
            slots[e.token] = " ".join(_SLOT.format(i) for i in range(k, k + n))
            k += n
        pattern = re.compile("|".join(re.escape(t) for t in sorted(slots, key=len, reverse=True)))
        out = []
        for t in texts:
            if "<dreamfuse-slot-" in t:
                raise ValueError("prompt: '<dreamfuse-slot-' is reserved (dreamfuse's learned-token placeholders)")
            out.append(pattern.sub(lambda m: slots[m.group(0)], t))
        return expand_tokens(self.engine, out), tok

    # ------------------------------------------------------------------------------------------- the pool
    def _bytes(self) -> int:
        return self._state.nbytes + sum(e.loaded.nbytes for e in self._loaded.values() if e.loaded.slot is None
                                        ) + sum(_conv_bytes(e.loaded) for e in self._loaded.values()
                                                if e.loaded.slot is not None)

    def _place(self, entry: _Entry, host: dict, force: bool) -> bool:
        """Under the lock: put ``host`` (from :meth:`_read`) in the pool, evicting least recently used adapters no
        request holds while it does not fit the budget. ``force`` (a request needs it now): past the budget if the
        held adapters leave no room. Returns whether it was loaded."""
        linear = host.get("linear", {})
        extra = host["nbytes"] - sum(a.numel() * _elem(self._layers[k]) + b.numel() * _elem(self._layers[k])
                                     for k, (a, b) in linear.items())
        while True:
            live = [e for e in self._loaded.values() if e.loaded.slot is not None]
            need = dict.fromkeys(self._state.layers, 0)
            for e in live:
                for k, r in e.loaded.linear.items():
                    need[k] = max(need[k], r)
            for k, (a, _) in linear.items():
                need[k] = max(need.get(k, 0), int(a.shape[0]))
            fixed = self._bytes() - self._state.nbytes + extra
            free = self._free_slot() if linear else None
            st = self._state
            in_place = (not linear or (free is not None and all(k in st.layers and st.layers[k].a.shape[1] >= r
                                                                 for k, r in need.items())))
            if in_place and st.nbytes + fixed <= self.cache_bytes:
                break
            slots = len(live) + (1 if linear else 0)
            per_slot = _geometry_bytes(self._layers, {k: r for k, r in need.items() if r}, 1)
            if slots * per_slot + fixed <= self.cache_bytes:
                fit = (self.cache_bytes - fixed) // per_slot if per_slot else slots
                self._realloc(need, max(slots, min(max(2 * st.cap, 1), fit)) if linear else slots)
                break
            victim = next((e for e in self._loaded.values() if e.pins == 0 and e is not entry), None)
            if victim is not None:
                self._evict(victim)
                continue
            if not force:
                return False
            if not in_place:
                self._realloc(need, slots)
            break
        loaded = _Loaded(scaling=host.get("scaling", 1.0), vectors=host.get("vectors"), nbytes=host["nbytes"])
        dev = self.engine.device
        for k, (a, b, s) in host.get("conv", {}).items():
            dt = self._layers[k].module.weight.dtype
            loaded.conv[k] = (a.to(dev, dt), b.to(dev, dt), s)
        if loaded.vectors is not None:
            table = self.engine.text_encoder.get_input_embeddings().weight
            loaded.vectors = loaded.vectors.to(table.device, table.dtype)
        if linear:
            slot = self._free_slot()
            st = self._state
            for k, slots in st.layers.items():
                w = linear.get(k)
                r = 0 if w is None else int(w[0].shape[0])
                if w is not None:
                    slots.a[slot, :r].copy_(w[0])
                    slots.b[slot, :, :r].copy_(w[1])
                    loaded.linear[k] = r
                st.ranks_host[k][slot] = r
                slots.ranks.copy_(st.ranks_host[k])
            loaded.slot = slot
            self._owners[slot] = entry
        entry.loaded = loaded
        self._loaded[entry.uid] = entry
        return True

    def _free_slot(self) -> int | None:
        return next((i for i, o in enumerate(self._owners) if o is None), None)

    def _realloc(self, ranks: dict[str, int], cap: int) -> None:
        """A new pool state of ``cap`` slots with these per-layer ranks, the live slots copied (compacted to the
        front). The old state stays intact for calls that bound it."""
        old = self._state
        live = [o for o in self._owners if o is not None]
        dev = self.engine.device
        layers, ranks_host = {}, {}
        for k, r in ranks.items():
            if r == 0:
                continue
            lay = self._layers[k]
            dt = lay.module.weight.dtype
            a = torch.zeros(cap, r, lay.d_in, dtype=dt, device=dev)
            b = torch.zeros(cap, lay.d_out, r, dtype=dt, device=dev)
            host = torch.zeros(cap, dtype=torch.int32)
            prev = old.layers.get(k)
            for j, e in enumerate(live):
                rk = e.loaded.linear.get(k, 0)
                if rk and prev is not None:
                    a[j, :rk].copy_(prev.a[e.loaded.slot, :rk])
                    b[j, :, :rk].copy_(prev.b[e.loaded.slot, :, :rk])
                host[j] = rk
            layers[k] = _Slots(a, b, host.to(dev))
            ranks_host[k] = host
        for j, e in enumerate(live):
            e.loaded.slot = j
        self._owners = live + [None] * (cap - len(live))
        self._state = _PoolState(cap, layers, ranks_host)

    def _evict(self, entry: _Entry) -> None:
        """Under the lock: drop ``entry``'s weights (its slot becomes free; its data is overwritten when reused)."""
        loaded, entry.loaded = entry.loaded, None
        self._loaded.pop(entry.uid, None)
        if loaded is not None and loaded.slot is not None:
            self._owners[loaded.slot] = None

    def _retire(self, entry: _Entry) -> None:
        entry.retired = True
        if entry.pins == 0:
            self._evict(entry)
        if entry.origin == "bytes":
            entry.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Drop the private copies of adapters registered from bytes."""
        with self._lock:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None


# ------------------------------------------------------------------------------------------------ reading files
def _elem(layer: _Layer) -> int:
    return layer.module.weight.element_size()


def _conv_bytes(loaded: _Loaded) -> int:
    return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in loaded.conv.values())


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _kind_of(path: Path, field: str, name: str) -> str:
    """``lora`` for a safetensors file whose header names LoRA tensors, else ``token`` (read as a learned token)."""
    if path.suffix.lower() != ".safetensors":
        return "token"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 2 <= n <= 100 * 2**20:
                return "lora"  # not a safetensors file: read_lora's checks say so
            names = [k for k in json.loads(f.read(n).decode("utf-8")) if k != "__metadata__"]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, TypeError):
        return "lora"
    # a learned token's safetensors holds one embedding (A1111's emb_params, diffusers' {token: ...}; an SDXL one
    # clip_l and clip_g); anything else is read as a LoRA, whose checks then say what it is
    return "token" if len(names) <= 2 and not any("lora" in k.lower() for k in names) else "lora"


def _header_info(path: Path) -> tuple[int | None, int | None]:
    """A LoRA file's largest rank and its A/B weights' element count, from its safetensors header (no tensor read)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(n, 100 * 2**20)).decode("utf-8"))
        shapes = {k: [int(d) for d in v["shape"]] for k, v in header.items() if k != "__metadata__"}
        downs = [s for k, s in shapes.items() if any(t in k for t in ("lora_A", "lora_down", "lora.down", ".down."))]
        numel = sum(math.prod(s) for k, s in shapes.items() if not k.endswith(".alpha"))
        return (max(s[0] for s in downs if s) if downs else None), numel
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, TypeError, AttributeError, IndexError, KeyError):
        return None, None


def _read_lora(registry: AdapterRegistry, entry: _Entry, field: str) -> dict:
    """A LoRA's Linear layers ``{key: (A, B)}`` (B with the layer's scaling relative to the adapter's folded in),
    Conv2d layers ``{key: (A, B, scaling)}``, the common scaling and the bytes it takes."""
    from .lora import layer_scalings, read_lora

    engine = registry.engine
    sd, alphas, metadata, fits = read_lora(engine, entry.path, field)
    odd = [k for k in sd if "magnitude_vector" in k or (k.endswith(".bias") and any(
        t in k for t in ("lora_B", "lora_up", "lora.up", ".up.")))]
    if odd:
        raise ValueError(f"{field}: a DoRA or a LoRA with biases ({odd[0]!r}): per-request adapters take plain LoRA "
                         "layers; load it engine-wide with load_lora")
    scalings = {}
    for comp, layers in fits.items():
        try:
            found = layer_scalings(engine, comp, sd, alphas, metadata, layers)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
        for name, (a, _) in layers.items():
            s, r = found[name]
            if r != a.shape[0]:
                raise ValueError(f"{field}: layer {comp}.{name}: its config says rank {r}, its weights have rank "
                                 f"{a.shape[0]}")
            scalings[f"{comp}:{name}"] = s
    del sd
    linear_scalings = [s for k, s in scalings.items() if not registry._layers[k].conv]
    base = Counter(linear_scalings).most_common(1)[0][0] if linear_scalings else 1.0
    out = {"linear": {}, "conv": {}, "scaling": base, "nbytes": 0}
    from dreamfuse.kernels.lora import _MAX_RANK

    ranks = []
    for comp, layers in fits.items():
        for name, (a, b) in layers.items():
            key = f"{comp}:{name}"
            layer = registry._layers.get(key)
            if layer is None:
                raise ValueError(f"{field}: layer {comp}.{name} cannot take a per-request LoRA")
            es = _elem(layer)
            ranks.append(int(a.shape[0]))
            if layer.conv:
                m = layer.module
                if m.groups != 1 or tuple(a.shape[2:]) != tuple(m.kernel_size):
                    raise ValueError(f"{field}: layer {comp}.{name}: a LoRA for a grouped conv or another kernel size")
                out["conv"][key] = (a.detach(), b.detach(), scalings[key])
            else:
                if a.shape[0] > _MAX_RANK:
                    raise ValueError(f"{field}: rank {a.shape[0]} at layer {comp}.{name}; per-request LoRAs go up to "
                                     f"rank {_MAX_RANK}")
                ratio = scalings[key] / base
                out["linear"][key] = (a.detach(), b.detach() if ratio == 1.0 else b.detach() * ratio)
            out["nbytes"] += (a.numel() + b.numel()) * es
    entry.rank, entry.components, entry.numel = max(ranks), tuple(fits), out["nbytes"] // max(es, 1)
    return out


def _read_token(engine, entry: _Entry, field: str) -> dict:
    from .relation import _pick, _read_file, check_embedding, check_relation_model, check_token_names, token_names

    check_relation_model(engine)
    source = f"adapter {entry.name!r}"
    data = _read_file(entry.path)
    token, vectors = _pick(data, None, source, entry.name)
    if "<dreamfuse-slot-" in token:  # the private tokenizer's placeholders: prompts holding them are refused
        raise ValueError(f"{field}: adapter {entry.name!r}: its token {token!r} uses dreamfuse's reserved "
                         "'<dreamfuse-slot-' prefix")
    table = engine.text_encoder.get_input_embeddings().weight
    if vectors.shape[1] != table.shape[1]:
        raise ValueError(f"{field}: adapter {entry.name!r}: the embedding of {token!r} has size {vectors.shape[1]}, "
                         f"this text encoder's hidden size is {table.shape[1]} (a file for another model?)")
    for i, row in enumerate(vectors):
        check_embedding(row, token if len(vectors) == 1 else f"{token}[{i}]", source)
    check_token_names(engine, token_names(token, len(vectors)))
    entry.token, entry.rank, entry.components = token, int(vectors.shape[0]), ("text_encoder",)
    entry.numel = vectors.numel()
    return {"vectors": vectors.float(), "nbytes": vectors.numel() * table.element_size()}


# ------------------------------------------------------------------------------------------------ request fields
def _lora_specs(loras) -> list[tuple[str, float]]:
    from .lora import check_scale

    if loras is None:
        return []
    if isinstance(loras, (str, dict)) or (isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[0], str)
                                          and not isinstance(loras[1], (str, tuple, dict))):
        loras = [loras]
    if not isinstance(loras, Sequence):
        raise ValueError(f"loras: a list of (name, scale) pairs, {{'name', 'scale'}} objects or names, got "
                         f"{type(loras).__name__}")
    if len(loras) > MAX_PER_REQUEST:
        raise ValueError(f"loras: {len(loras)} LoRAs, at most {MAX_PER_REQUEST} per request")
    out = []
    for i, item in enumerate(loras):
        where = f"loras[{i}]" if len(loras) > 1 else "loras"
        if isinstance(item, str):
            name, scale = item, 1.0
        elif isinstance(item, dict):
            unknown = set(item) - {"name", "scale"}
            if unknown or "name" not in item:
                raise ValueError(f"{where}: an object with 'name' and optional 'scale', got keys {sorted(item)}"[:200])
            name, scale = item["name"], item.get("scale", 1.0)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            name, scale = item
        else:
            raise ValueError(f"{where}: a (name, scale) pair, {{'name', 'scale'}} or a name, got {shown(item)}")
        check_name(name, where)
        out.append((name, check_scale(1.0 if scale is None else scale, f"{where}.scale")))
    names = [n for n, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"loras: {dup!r} named twice")
    return out


def _token_specs(tokens) -> list[str]:
    if tokens is None:
        return []
    if isinstance(tokens, str):
        tokens = [tokens]
    if not isinstance(tokens, Sequence):
        raise ValueError(f"learned_tokens: a list of adapter names, got {type(tokens).__name__}")
    if len(tokens) > MAX_PER_REQUEST:
        raise ValueError(f"learned_tokens: {len(tokens)} tokens, at most {MAX_PER_REQUEST} per request")
    for i, t in enumerate(tokens):
        check_name(t, f"learned_tokens[{i}]" if len(tokens) > 1 else "learned_tokens")
    dup = next((t for t in tokens if list(tokens).count(t) > 1), None)
    if dup is not None:
        raise ValueError(f"learned_tokens: {dup!r} named twice")
    return list(tokens)


def request_adapters(engine, loras=None, learned_tokens=None) -> AdapterSet | None:
    """What a pipeline call's ``loras`` / ``learned_tokens`` arguments name, resolved and checked (None for none);
    an :class:`AdapterSet` passes through. Makes ``engine.adapters`` only when something is named."""
    if isinstance(loras, AdapterSet) and learned_tokens is None:
        return loras
    if not loras and not learned_tokens:
        if loras is not None and not isinstance(loras, (list, tuple)):
            _lora_specs(loras)  # a wrong type is still an error
        return None
    if getattr(engine, "_adapters", None) is None:
        # nothing registered: say so without making the registry (it hooks every layer of the model)
        specs, tokens = _lora_specs(loras), _token_specs(learned_tokens)
        field_, name = ("loras", specs[0][0]) if specs else ("learned_tokens", tokens[0])
        raise ValueError(f"{field_}: no adapter named {name!r} (no adapters are registered: engine.adapters."
                         "register(...) or set_folder(...); dreamfuse serve --adapters DIR)")
    return engine.adapters.request(loras, learned_tokens)


__all__ = ["AdapterRegistry", "AdapterSet", "DEFAULT_CACHE_MB", "KINDS", "MAX_PER_REQUEST", "check_name", "holding",
           "request_adapters", "row_adapters", "rows_slice"]
