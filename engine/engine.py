"""The Engine: loaded model components plus the primitives every pipeline is built from."""

from __future__ import annotations

import contextlib
import random
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .cache import LRUCache
from .concurrency import ModelLock, changes_model
from .config import EngineConfig
from .loading import load_components, vae_upcast
from .processors import CallContext, install_feature_hooks, install_processors
from .samplers import Sampler

_PROMPT_CACHE_SIZE = 64
_INVERSION_CACHE_SIZE = 8


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than the text encoder reads (77 tokens for CLIP): the rest is dropped."""


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning ``(6,)``: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``, the
    order SDXL was trained with (each pair height first). ``original_size``: the source image's size before any
    resize; ``crop_top_left``: where the training crop started in the resized image; ``target_size``: the size
    the model works at. Text-to-image uses ``(H, W), (0, 0), (H, W)``."""
    values = [*original_size, *crop_top_left, *target_size]
    for name, pair in (("original_size", original_size), ("crop_top_left", crop_top_left),
                       ("target_size", target_size)):
        if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in pair):
            raise ValueError(f"{name}: must be two numbers >= 0 (height first), got {pair!r}")
    return torch.tensor(values, dtype=torch.float32)


class Engine:
    """A Stable Diffusion 1.x/2.x or SDXL model ready for dreamfuse's pipelines.

    Build it with :meth:`from_pretrained`; then call a pipeline, e.g. :meth:`text2img`.

    SDXL (``is_xl``): prompts go through both text encoders (:meth:`encode_prompts` gives the concatenated
    penultimate hidden states, :meth:`encode_pooled` the second encoder's projected pooled embedding,
    :meth:`encode_text` both from one cache lookup) and every
    UNet call carries the pooled embedding and the six time ids (:func:`sdxl_time_ids`) per row. With
    ``force_zeros_for_empty_prompt`` (SDXL base) an *absent* negative prompt (``None`` in :meth:`encode_text`)
    encodes to zeros, SDXL's unconditional embedding, as in diffusers; an explicit ``""`` is encoded as text.
    An fp16 SDXL VAE whose config says ``force_upcast`` runs in fp32 (SDXL's VAE overflows in fp16).

    Thread safety: any number of threads may run pipelines (text2img, IP-Adapter, personalize, compose) on one
    engine at once; every UNet call carries its own :class:`~dreamfuse.engine.processors.CallContext`, and the
    prompt and inversion caches are locked around their dictionaries only. Loading or unloading an IP-Adapter or
    a learned token, a LoRA (load, unload, fuse, scale), a UNet backend, and training change the shared model: such a
    change waits for the running calls to end and holds new ones until it is done (:attr:`model_lock`, see
    :mod:`~dreamfuse.engine.concurrency`), so a call never mixes two models.
    """

    def __init__(self, components: dict, config: EngineConfig | None = None):
        self.config = (config or EngineConfig()).resolved()
        self.device = torch.device(self.config.device)
        self.dtype = self.config.dtype
        self.unet = components["unet"].to(self.device)
        self.vae = components["vae"].to(self.device)
        self.text_encoder = components["text_encoder"].to(self.device)
        self.tokenizer = components["tokenizer"]
        self.text_encoder_2 = components.get("text_encoder_2")
        self.tokenizer_2 = components.get("tokenizer_2")
        self.model_lock = ModelLock()
        """Pipeline calls share the model; LoRA/adapter/token/backend changes and training wait for them (see
        :mod:`~dreamfuse.engine.concurrency`)."""
        self._tokenizer_lock = threading.Lock()
        """Held around every tokenizer call: a fast (Rust) tokenizer stores its padding/truncation settings in
        itself, so two threads tokenizing with different settings would get each other's padding."""
        self.learned_tokens: dict[str, list[str]] = {}
        """Tokens loaded by :meth:`load_relation` / :meth:`load_textual_inversion` (or learned by ReVersion training):
        ``{token: its token names}``, several for a multi-vector embedding."""
        self.is_xl = self.unet.config.addition_embed_type == "text_time"
        """SDXL: two text encoders, pooled text embedding and time ids in every UNet call."""
        self.force_zeros_for_empty_prompt = bool(components.get("force_zeros_for_empty_prompt", False))
        if self.is_xl:
            self._check_xl()
            self.text_encoder_2 = self.text_encoder_2.to(self.device)
            if vae_upcast(components, self.dtype) and self.vae.dtype != torch.float32:
                self.vae = self.vae.to(torch.float32)
        elif self.text_encoder_2 is not None:
            raise ValueError("model: a second text encoder was given but the UNet has no SDXL text_time conditioning")
        self.scheduler = components["scheduler"]
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.processors = install_processors(self.unet, self.config.backend)
        self._feature_hooks = install_feature_hooks(self.unet)
        self._unet_fn = self.unet
        self.unet_backend = "torch"  # what runs the UNet calls: see set_unet_backend
        if self.config.compile:
            mode = "reduce-overhead" if (self.config.cuda_graphs and self.device.type == "cuda") else None
            self._unet_fn = torch.compile(self.unet, mode=mode, dynamic=False)
        self._prompt_cache = LRUCache(_PROMPT_CACHE_SIZE)
        """prompt -> (hidden states, pooled or None), LRU (thread-safe)."""
        self.inversion_cache = LRUCache(_INVERSION_CACHE_SIZE)
        """DDIM inversions of reference images (personalize), LRU (thread-safe), keyed by image content, size,
        steps, dtype."""
        self.ip_adapter = None  # the loaded IPAdapter (see load_ip_adapter), owner of the IP layers' weights
        self._adapters = None
        self._adapters_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "tiny", config: EngineConfig | None = None, *,
                        config_dir: str | Path | None = None, variant: str | None = None, unet_backend="torch",
                        unet_path: str | Path | None = None) -> Engine:
        """Load ``"tiny"`` / ``"tiny-xl"`` (the embedded SD 1.x- and SDXL-layout models), ``"shapes"`` (the trained
        shapes-world model, package data), ``"random-sd15"`` /
        ``"random-sdxl"`` (random weights, real architectures: for benchmarks), a local diffusers folder
        (``model_index.json``), or a single ``.safetensors`` SD/SDXL checkpoint (its architecture configs from
        ``config_dir``; see ``loading.py``). ``unet_backend``/``unet_path``: what runs the UNet calls; see
        :meth:`set_unet_backend`. ``variant``: a diffusers folder's weight variant (``"fp16"`` reads the
        ``*.fp16.safetensors`` files ``save_pretrained(variant="fp16")`` writes), as diffusers' ``variant=``.

        ``config`` is the :class:`EngineConfig` (device, dtype, backend, ...); a single-file checkpoint's
        architecture folder is ``config_dir``."""
        if config is not None and not isinstance(config, EngineConfig):
            hint = (" (a single-file checkpoint's architecture folder is config_dir=)"
                    if isinstance(config, (str, Path)) else "")
            raise TypeError(f"config: expected an EngineConfig, got {type(config).__name__}{hint}")
        config = (config or EngineConfig()).resolved()
        engine = cls(load_components(name_or_path, dtype=config.dtype, config_dir=config_dir, device=config.device,
                                     variant=variant), config)
        if unet_backend != "torch" or unet_path is not None:
            engine.set_unet_backend(unet_backend, unet_path)
        return engine

    @changes_model("set_unet_backend")
    def set_unet_backend(self, backend="torch", path: str | Path | None = None, **options) -> None:
        """What runs the UNet calls of every pipeline: ``"torch"`` (the engine's PyTorch UNet, compiled with
        ``config.compile``), ``"onnxruntime"`` (``path``: a ``dreamfuse export onnx`` folder), ``"tensorrt"``
        (``path``: a ``dreamfuse export tensorrt`` folder or ``.plan``), ``"aoti"`` (``path``: a ``dreamfuse export
        aoti`` folder, an AOTInductor package compiled for this engine's device and dtype), or a backend object (see
        ``dreamfuse.export.runtime.UNetBackend``); ``options`` go to the backend (e.g. ``providers=["cuda"]``).
        An exported backend is checked against this engine's UNet weights (and IP-Adapter) before use, and refuses
        calls outside its exported profile. Clears the inversion cache (made with the previous UNet). Changes
        shared state: call it while no pipeline runs."""
        if isinstance(backend, str) and backend == "torch":
            if path is not None:
                raise ValueError("unet_path: only for an exported backend (onnxruntime, tensorrt, aoti)")
            fn = self.unet
            if self.config.compile:
                mode = "reduce-overhead" if (self.config.cuda_graphs and self.device.type == "cuda") else None
                fn = torch.compile(self.unet, mode=mode, dynamic=False)
        else:
            if isinstance(backend, str):  # loaded lazily by name: the core does not import export/ otherwise
                import importlib

                runtime = importlib.import_module("dreamfuse.export.runtime")
                if path is None:
                    raise ValueError(f"unet_path: the {backend} backend needs an export folder")
                backend = runtime.load_unet_backend(backend, path, **options)
            backend.bind(self)
            fn = backend
        self._unet_fn = fn
        self.unet_backend = "torch" if fn is self.unet or not hasattr(fn, "bind") else getattr(fn, "name", "?")
        self.inversion_cache.clear()

    # ----------------------------------------------------------------------------------------- defaults
    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def _check_xl(self) -> None:
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            raise ValueError("model: an SDXL UNet (text_time conditioning) needs text_encoder_2 and tokenizer_2")
        cfg = self.unet.config
        pooled = int(getattr(self.text_encoder_2.config, "projection_dim", 0) or 0)
        ids = (int(cfg.projection_class_embeddings_input_dim) - pooled) / int(cfg.addition_time_embed_dim)
        if ids != 6:
            raise ValueError(f"model: the UNet's added conditioning takes {ids:g} time ids besides the {pooled}-d "
                             "pooled text embedding; only SDXL base (6 ids) is supported (the refiner's aesthetic "
                             "score is not)")
        width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        if width != cfg.cross_attention_dim:
            raise ValueError(f"model: the text encoders give {width} channels, the UNet's cross_attention_dim is "
                             f"{cfg.cross_attention_dim}")

    # ----------------------------------------------------------------------------------------- text
    def tokenize(self, text, tokenizer=None, **kwargs):
        """``tokenizer(text, **kwargs)`` (the engine's first tokenizer unless another is given) under the engine's
        tokenizer lock. Use this rather than calling ``engine.tokenizer`` directly while other threads run
        pipelines: a fast tokenizer's padding and truncation settings are state shared by all callers."""
        if self.learned_tokens and (tokenizer is None or tokenizer is self.tokenizer):
            from .relation import expand_tokens

            text = expand_tokens(self, text)  # a multi-vector learned token reads as all its vectors
        with self._tokenizer_lock:
            return (tokenizer or self.tokenizer)(text, **kwargs)

    def _warn_truncated(self, prompts: list[str | None], tokenizer=None) -> None:
        prompts = ["" if p is None else p for p in prompts]
        tok = tokenizer or self.tokenizer
        limit = tok.model_max_length
        for p, ids in zip(prompts, self.tokenize(prompts, tok, truncation=False, verbose=False).input_ids):
            if len(ids) > limit:
                dropped = tok.decode(ids[limit - 1:-1]).strip()
                head = p if len(p) <= 40 else p[:37] + "..."
                warnings.warn(f"prompt {head!r}: {len(ids)} tokens, the text encoder reads {limit}; dropped "
                              f"{dropped!r}", PromptTruncatedWarning, stacklevel=4)

    def _encode(self, prompts: list[str | None], adapters=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        texts = ["" if p is None else p for p in prompts]
        tokenizer = self.tokenizer
        binding = contextlib.nullcontext()
        if adapters is not None:  # a request's LoRAs and learned tokens, for these rows only (see adapters.py)
            if adapters.tokens:
                texts, tokenizer = self.adapters.rewrite(adapters, texts)
            binding = self.adapters.bind(adapters, len(texts), components=("text_encoder", "text_encoder_2"),
                                         tokens=True) or binding

        def ids(tok):
            return self.tokenize(texts, tok, padding="max_length", max_length=tok.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)

        self._warn_truncated(texts, tokenizer)

        if not self.is_xl:
            with binding:
                return self.text_encoder(ids(tokenizer))[0].to(self.dtype), None
        # SDXL: the penultimate hidden states of both encoders, concatenated; pooled = encoder 2's projection.
        with binding:
            out1 = self.text_encoder(ids(tokenizer), output_hidden_states=True)
            out2 = self.text_encoder_2(ids(self.tokenizer_2), output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1).to(self.dtype)
        pooled = out2.text_embeds.to(self.dtype)
        if self.force_zeros_for_empty_prompt:  # diffusers: zeros for an absent negative prompt only
            absent = torch.tensor([p is None for p in prompts], device=self.device)
            hidden = torch.where(absent[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(absent[:, None], torch.zeros_like(pooled), pooled)
        return hidden, pooled

    @torch.no_grad()
    def _lookup(self, prompts: Sequence[str], adapters=None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        text_key = None if adapters is None else adapters.text_key
        if text_key is None:
            adapters = None  # nothing of them reaches the text encoder (UNet-only LoRAs)

        def key(p):
            return p if text_key is None else (p, text_key)

        found = {p: self._prompt_cache.get(key(p)) for p in dict.fromkeys(prompts)}
        missing = [p for p, v in found.items() if v is None]
        if missing:  # encoded outside the cache's lock; another thread may encode the same prompt meanwhile
            hidden, pooled = self._encode(missing, adapters)
            for i, p in enumerate(missing):
                found[p] = (hidden[i], None if pooled is None else pooled[i])
                self._prompt_cache.put(key(p), found[p])
        return [found[p] for p in prompts]

    def clear_prompt_cache(self) -> None:
        """Forget every cached prompt embedding (after the tokenizer or text encoder changed)."""
        self._prompt_cache.clear()

    def encode_text(self, prompts: Sequence[str | None], adapters=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(encode_prompts(prompts), encode_pooled(prompts))`` from one cache lookup: what a pipeline passes to
        :meth:`unet_call` as ``embeddings`` and ``pooled``. ``None`` is an absent negative prompt: the zero
        embedding on SDXL base (``force_zeros_for_empty_prompt``), ``""`` encoded everywhere else, as diffusers.
        ``adapters``: one request's :class:`~dreamfuse.engine.adapters.AdapterSet`, applied to these prompts only
        (its text-encoder LoRA layers and learned tokens; cached apart from the plain prompts)."""
        found = self._lookup(prompts, adapters)
        hidden = torch.stack([h for h, _ in found])
        return hidden, (torch.stack([p for _, p in found]) if self.is_xl else None)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(len(prompts), 77, D)`` in the engine dtype (SDXL: both encoders' penultimate hidden
        states, ``D = 768 + 1280``). Recent prompts are cached (the empty negative prompt of CFG is encoded once,
        not once per request)."""
        return self.encode_text(prompts)[0]

    def encode_pooled(self, prompts: Sequence[str]) -> torch.Tensor | None:
        """SDXL: the pooled text embeddings ``(len(prompts), P)`` the UNet's added conditioning takes (pass them to
        :meth:`unet_call` as ``pooled``); ``None`` for SD 1.x/2.x. Shares :meth:`encode_prompts`' cache."""
        return self.encode_text(prompts)[1]

    def time_ids(self, height: int, width: int, original_size: tuple[int, int] | None = None,
                 crop_top_left: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """SDXL time ids ``(6,)`` (engine dtype, device) for an image generated at ``height x width``; see
        :func:`sdxl_time_ids`. ``original_size`` defaults to the target size (diffusers' default)."""
        ids = sdxl_time_ids(original_size or (height, width), crop_top_left, (height, width))
        return ids.to(self.device, self.dtype)

    # ----------------------------------------------------------------------------------------- sampling
    def new_scheduler(self, steps: int):
        """A fresh DDIM scheduler set to ``steps`` (per call: concurrent calls never share state)."""
        sched = type(self.scheduler).from_config(self.scheduler.config)
        sched.set_timesteps(steps, device=self.device)
        return sched

    def new_sampler(self, name: str, steps: int, seeds: Sequence[int] = ()) -> Sampler:
        """A fresh :class:`~dreamfuse.engine.samplers.Sampler` (``name`` from
        :data:`~dreamfuse.engine.samplers.SAMPLERS`) set to ``steps``, with one generator per seed: per call or per
        request, never shared between concurrent calls."""
        return Sampler(name, self.scheduler.config, steps, self.device, seeds)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent for an image of ``height x width`` pixels."""
        return (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def initial_latents(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """Gaussian latents, one CPU generator per seed: an image depends only on its own seed, whatever
        the batch it is generated in, and on no device's RNG."""
        shape = (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        latents = torch.stack(noise).to(self.device, self.dtype)
        return latents * self.scheduler.init_noise_sigma

    def unet_call(self, latents: torch.Tensor, t: torch.Tensor | int, embeddings: torch.Tensor,
                  ip_tokens: torch.Tensor | None = None, ip_scale: float = 1.0, *, pooled: torch.Tensor | None = None,
                  time_ids: torch.Tensor | None = None, ctx: CallContext | None = None,
                  adapters=None) -> torch.Tensor:
        """One UNet evaluation for the whole batch. With ``compile``, rows are padded to the next batch bucket
        so a few compiled graphs serve all request sizes. ``ip_tokens`` ``(rows, T, cross_dim)``: IP-Adapter
        image tokens, one row per batch row, read by the IP layers for this call only (with ``ip_scale``).
        ``ctx``: this call's :class:`~dreamfuse.engine.processors.CallContext` (layer handlers, features to
        capture), seen by this call only; its ``latent_hw`` is set here. ``t``: one timestep for every row, or one
        per row ``(rows,)`` (diffusers' UNet embeds each row's own: the server batches requests at different
        steps this way).

        SDXL only: ``pooled`` ``(rows, P)`` (:meth:`encode_pooled` of each row's prompt; required) and
        ``time_ids`` ``(rows, 6)`` or ``(6,)`` for all rows (default: :meth:`time_ids` of the latents' size).

        ``adapters``: per-request LoRAs of the rows: one :class:`~dreamfuse.engine.adapters.AdapterSet` for every
        row, or one entry (an AdapterSet or None) per row; each row gets its own adapters' deltas in this call only
        (``dreamfuse::lora_delta`` over the rows; see :mod:`~dreamfuse.engine.adapters`). Such a call runs the
        eager UNet (a compiled graph would recompile for every batch composition); an exported backend refuses it."""
        rows = latents.shape[0]
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 1 and t.shape[0] != rows:
            raise ValueError(f"t: one timestep for all rows or one per row ({rows}), got {tuple(t.shape)}")
        added = None
        if self.is_xl:
            added = self._added_cond(latents, pooled, time_ids)
        elif pooled is not None or time_ids is not None:
            raise ValueError("pooled/time_ids: only SDXL UNets take added conditioning")
        if self.config.compile:
            bucket = next((b for b in self.config.batch_buckets if b >= rows), rows)
            if bucket > rows:
                pad = bucket - rows

                def grow(x):
                    return None if x is None else torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])

                latents, embeddings, ip_tokens = grow(latents), grow(embeddings), grow(ip_tokens)
                if t.ndim == 1:
                    t = grow(t)
                if added is not None:
                    added = {k: grow(v) for k, v in added.items()}
        binding, fn = contextlib.nullcontext(), self._unet_fn
        if adapters is not None:
            found = self.adapters.bind(adapters, rows, latents.shape[0])
            if found is not None:
                if self.unet_backend != "torch":
                    raise ValueError(f"loras: per-request adapters need the PyTorch UNet; this engine runs an exported "
                                     f"{self.unet_backend} UNet")
                binding, fn = found, self.unet
        kwargs = {}  # nothing for a plain call: the (compiled) UNet then sees exactly the stock call
        if ctx is not None:
            ctx.latent_hw = (latents.shape[-2], latents.shape[-1])
            kwargs["dreamfuse_ctx"] = ctx
        if ip_tokens is not None:
            kwargs["ip_tokens"], kwargs["ip_scale"] = ip_tokens, float(ip_scale)
        extra = {"cross_attention_kwargs": kwargs} if kwargs else {}
        with binding:
            eps = fn(latents, t, encoder_hidden_states=embeddings, added_cond_kwargs=added, return_dict=False,
                     **extra)[0]
        return eps[:rows]

    def stock_attention(self):
        """A context manager: inside it the engine's UNet runs diffusers' stock attention processors, dreamfuse's
        come back on exit (also on an exception). For comparing against diffusers on the *same* modules, e.g.
        a ``StableDiffusionPipeline`` built from ``engine.unet``, ``engine.vae``, ... (no second copy of the
        weights). Dreamfuse's per-call handlers and IP-Adapter tokens do nothing inside; refused while an
        IP-Adapter is loaded; not while other threads run calls. See
        :func:`~dreamfuse.engine.processors.stock_attention`."""
        from .processors import stock_attention

        return stock_attention(self.unet)

    def _added_cond(self, latents: torch.Tensor, pooled, time_ids) -> dict:
        rows = latents.shape[0]
        if pooled is None:
            raise ValueError("pooled: an SDXL UNet needs the pooled text embedding of every row "
                             "(engine.encode_pooled(prompts))")
        if pooled.ndim != 2 or pooled.shape[0] != rows:
            raise ValueError(f"pooled: expected ({rows}, P) for {rows} rows, got {tuple(pooled.shape)}")
        if time_ids is None:
            h, w = (s * self.vae_scale_factor for s in latents.shape[-2:])
            time_ids = self.time_ids(h, w)
        time_ids = torch.as_tensor(time_ids).to(self.device, self.dtype)
        if time_ids.ndim == 1:
            time_ids = time_ids.expand(rows, -1)
        if time_ids.shape != (rows, 6):
            raise ValueError(f"time_ids: expected (6,) or ({rows}, 6), got {tuple(time_ids.shape)}")
        return {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids}

    def progress(self, total: int, desc: str, enabled: bool | None = None):
        on = self.config.progress if enabled is None else enabled
        return tqdm(total=total, desc=desc, disable=not on, leave=False, dynamic_ncols=True)

    # ----------------------------------------------------------------------------------------- images
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images ``(B, 3, H, W)`` float32 in [0, 1] on CPU."""
        x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> scaled latents (the VAE posterior's mean, deterministic)."""
        x = images.to(self.device, self.vae.dtype) * 2 - 1
        return (self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor).to(self.dtype)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arr]

    # ----------------------------------------------------------------------------------------- adapters
    @property
    def adapters(self):
        """The per-request adapter registry (:class:`~dreamfuse.engine.adapters.AdapterRegistry`), made on first use:
        ``engine.adapters.register("sks-dog.safetensors")``, ``.set_folder(dir)``, ``.list()``; then
        ``engine.text2img(..., loras=[("sks-dog", 0.8)])``. Making it hooks the model's layers once (a model change:
        it waits for running calls)."""
        registry = self._adapters
        if registry is None:
            from .adapters import AdapterRegistry

            with self._adapters_lock:
                if self._adapters is None:
                    with self.model_lock.changing("adapters"):
                        self._adapters = AdapterRegistry(self)
                registry = self._adapters
        return registry

    # ----------------------------------------------------------------------------------------- pipelines
    def text2img(self, prompts: str | Sequence[str], **kwargs):
        """Text-to-image; see :func:`dreamfuse.engine.pipelines.text2img.text2img`."""
        from .pipelines.text2img import text2img

        return text2img(self, prompts, **kwargs)

    def img2img(self, prompts: str | Sequence[str], image, **kwargs):
        """Image-to-image (``strength``, prompt, sampler, ...); see
        :func:`dreamfuse.engine.pipelines.img2img.img2img`."""
        from .pipelines.img2img import img2img

        return img2img(self, prompts, image, **kwargs)

    def inpaint(self, prompts: str | Sequence[str], image, mask, **kwargs):
        """Inpainting: repaint the white region of ``mask``; a regular or a 9-channel inpainting UNet; see
        :func:`dreamfuse.engine.pipelines.inpaint.inpaint`."""
        from .pipelines.inpaint import inpaint

        return inpaint(self, prompts, image, mask, **kwargs)

    def load_relation(self, path_or_embeds, **kwargs) -> str:
        """Add a ReVersion relation token to the tokenizer and text encoder; see
        :func:`dreamfuse.engine.relation.load_relation`. Returns the token."""
        from .relation import load_relation

        return load_relation(self, path_or_embeds, **kwargs)

    def load_textual_inversion(self, path_or_embeds, token: str | None = None) -> str:
        """Load a textual inversion (diffusers' ``learned_embeds.bin``/``.safetensors``, AUTOMATIC1111's ``.pt`` or
        ``.safetensors``; one or several vectors) as diffusers' ``load_textual_inversion`` does; returns the token
        prompts use. The same loader as :meth:`load_relation`: see :func:`dreamfuse.engine.relation.load_relation`."""
        from .relation import load_relation

        return load_relation(self, path_or_embeds, token=token)

    def load_ip_adapter(self, weights, image_encoder=None):
        """Load an IP-Adapter / IP-Adapter-Plus (standard ``.bin``/``.safetensors`` file + CLIP image encoder folder,
        or an :class:`~dreamfuse.engine.ip_adapter.IPAdapter`) into the attention layers; then pass ``ip_image`` to
        :meth:`text2img`. See :func:`dreamfuse.engine.ip_adapter.load_ip_adapter`."""
        from .ip_adapter import load_ip_adapter

        return load_ip_adapter(self, weights, image_encoder)

    def unload_ip_adapter(self) -> None:
        """Remove the loaded IP-Adapter: every layer runs plain cross-attention again."""
        from .ip_adapter import unload_ip_adapter

        unload_ip_adapter(self)

    # LoRA (see dreamfuse.engine.lora). Thread safety: loading, unloading, fusing and scale changes mutate the
    # shared model; they wait for running calls and hold new ones (model_lock).
    @property
    def loras(self):
        """name -> scale of the loaded LoRAs, in load order (a read-only snapshot)."""
        from .lora import loras

        return loras(self)

    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Load a LoRA ``.safetensors`` (diffusers or kohya format; UNet and text encoder(s)) next to any loaded
        ones, at ``scale`` (>= 0), as ``name`` (default: the file's stem); returns the name. Mutates the shared
        model: waits for running calls. See :func:`dreamfuse.engine.lora.load_lora`."""
        from .lora import load_lora

        return load_lora(self, path, scale, name)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove the LoRA ``name`` (default: all; then the model is bit-identical to the base). Mutates the shared
        model: waits for running calls. See :func:`dreamfuse.engine.lora.unload_lora`."""
        from .lora import unload_lora

        unload_lora(self, name)

    def set_lora_scale(self, name_or_scales, scale: float | None = None) -> None:
        """``set_lora_scale("style", 0.5)`` or ``set_lora_scale({"style": 0.5, "subject": 1.0})``. Mutates the shared
        model: waits for running calls. See :func:`dreamfuse.engine.lora.set_lora_scale`."""
        from .lora import set_lora_scale

        set_lora_scale(self, name_or_scales, scale)

    def fuse_lora(self) -> None:
        """Merge the loaded LoRAs into the base weights (no per-call LoRA cost; :meth:`unfuse_lora` restores the
        base exactly). Mutates the shared model: waits for running calls. See
        :func:`dreamfuse.engine.lora.fuse_lora`."""
        from .lora import fuse_lora

        fuse_lora(self)

    def unfuse_lora(self) -> None:
        """Undo :meth:`fuse_lora`: the LoRAs run as separate, hot-swappable layers again. Mutates the shared
        model: waits for running calls. See :func:`dreamfuse.engine.lora.unfuse_lora`."""
        from .lora import unfuse_lora

        unfuse_lora(self)

    def personalize(self, prompts, reference_image, **kwargs):
        """DreamMatcher personalization; see :func:`dreamfuse.engine.pipelines.personalize.personalize`."""
        from .pipelines.personalize import personalize

        return personalize(self, prompts, reference_image, **kwargs)

    def compose(self, layout, segments, **kwargs):
        """Composite (MSP) generation from a segment layout; see
        :func:`dreamfuse.engine.pipelines.composite.compose`."""
        from .pipelines.composite import compose

        return compose(self, layout, segments, **kwargs)


def random_seed() -> int:
    return random.SystemRandom().randrange(2**31)
