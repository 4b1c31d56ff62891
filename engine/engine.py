"""The Engine: loaded model components plus the primitives every pipeline is built from."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import EngineConfig
from .loading import load_components
from .processors import CallContext, install_processors

_PROMPT_CACHE_SIZE = 64


class Engine:
    """A Stable Diffusion 1.x/2.x model ready for dreamfuse's pipelines.

    Build it with :meth:`from_pretrained`; then call a pipeline, e.g. :meth:`text2img`.
    """

    def __init__(self, components: dict, config: EngineConfig | None = None):
        self.config = (config or EngineConfig()).resolved()
        self.device = torch.device(self.config.device)
        self.dtype = self.config.dtype
        self.unet = components["unet"].to(self.device)
        self.vae = components["vae"].to(self.device)
        self.text_encoder = components["text_encoder"].to(self.device)
        self.tokenizer = components["tokenizer"]
        self.scheduler = components["scheduler"]
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.ctx = CallContext()
        self.processors = install_processors(self.unet, self.ctx, self.config.backend)
        self._unet_fn = self.unet
        if self.config.compile:
            mode = "reduce-overhead" if (self.config.cuda_graphs and self.device.type == "cuda") else None
            self._unet_fn = torch.compile(self.unet, mode=mode, dynamic=False)
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.inversion_cache: OrderedDict = OrderedDict()
        """DDIM inversions of reference images (personalize), LRU, keyed by image content, size, steps, dtype."""
        self.ip_adapter = None  # the loaded IPAdapter (see load_ip_adapter), owner of the IP layers' weights

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "tiny", config: EngineConfig | None = None, *,
                        config_dir: str | Path | None = None) -> Engine:
        """Load ``"tiny"`` (the embedded model), a local diffusers folder (``model_index.json``), or a single
        ``.safetensors`` SD checkpoint (its architecture configs from ``config_dir``; see ``loading.py``)."""
        config = (config or EngineConfig()).resolved()
        return cls(load_components(name_or_path, dtype=config.dtype, config_dir=config_dir), config)

    # ----------------------------------------------------------------------------------------- defaults
    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # ----------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings ``(len(prompts), 77, D)`` in the engine dtype. Recent prompts are cached
        (the empty negative prompt of CFG is encoded once, not once per request)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            ids = self.tokenizer(list(missing), padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            emb = self.text_encoder(ids)[0].to(self.dtype)
            for p, e in zip(missing, emb):
                self._prompt_cache[p] = e
        out = torch.stack([self._prompt_cache[p] for p in prompts])
        for p in prompts:
            self._prompt_cache.move_to_end(p)
        while len(self._prompt_cache) > _PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return out

    # ----------------------------------------------------------------------------------------- sampling
    def new_scheduler(self, steps: int):
        """A fresh DDIM scheduler set to ``steps`` (per call: concurrent calls never share state)."""
        sched = type(self.scheduler).from_config(self.scheduler.config)
        sched.set_timesteps(steps, device=self.device)
        return sched

    def initial_latents(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """Gaussian latents, one CPU generator per seed: an image depends only on its own seed, whatever
        the batch it is generated in, and on no device's RNG."""
        shape = (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        latents = torch.stack(noise).to(self.device, self.dtype)
        return latents * self.scheduler.init_noise_sigma

    def unet_call(self, latents: torch.Tensor, t: torch.Tensor | int, embeddings: torch.Tensor,
                  ip_tokens: torch.Tensor | None = None, ip_scale: float = 1.0) -> torch.Tensor:
        """One UNet evaluation for the whole batch. With ``compile``, rows are padded to the next batch bucket
        so a few compiled graphs serve all request sizes. ``ip_tokens`` ``(rows, T, cross_dim)``: IP-Adapter
        image tokens, one row per batch row, read by the IP layers for this call only (with ``ip_scale``)."""
        rows = latents.shape[0]
        self.ctx.latent_hw = (latents.shape[-2], latents.shape[-1])
        if self.config.compile:
            bucket = next((b for b in self.config.batch_buckets if b >= rows), rows)
            if bucket > rows:
                pad = bucket - rows
                latents = torch.cat([latents, latents[-1:].expand(pad, *latents.shape[1:])])
                embeddings = torch.cat([embeddings, embeddings[-1:].expand(pad, *embeddings.shape[1:])])
                if ip_tokens is not None:
                    ip_tokens = torch.cat([ip_tokens, ip_tokens[-1:].expand(pad, *ip_tokens.shape[1:])])
        t = torch.as_tensor(t, device=self.device)
        if ip_tokens is None:
            eps = self._unet_fn(latents, t, encoder_hidden_states=embeddings, return_dict=False)[0]
            return eps[:rows]
        self.ctx.data["ip_tokens"], self.ctx.data["ip_scale"] = ip_tokens, float(ip_scale)
        try:
            eps = self._unet_fn(latents, t, encoder_hidden_states=embeddings, return_dict=False)[0]
        finally:
            self.ctx.data.pop("ip_tokens", None)
            self.ctx.data.pop("ip_scale", None)
        return eps[:rows]

    def progress(self, total: int, desc: str, enabled: bool | None = None):
        on = self.config.progress if enabled is None else enabled
        return tqdm(total=total, desc=desc, disable=not on, leave=False, dynamic_ncols=True)

    # ----------------------------------------------------------------------------------------- images
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images ``(B, 3, H, W)`` float32 in [0, 1] on CPU."""
        x = self.vae.decode(latents.to(self.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> scaled latents (the VAE posterior's mean, deterministic)."""
        x = images.to(self.device, self.dtype) * 2 - 1
        return self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arr]

    # ----------------------------------------------------------------------------------------- pipelines
    def text2img(self, prompts: str | Sequence[str], **kwargs):
        """Text-to-image; see :func:`dreamfuse.engine.pipelines.text2img.text2img`."""
        from .pipelines.text2img import text2img

        return text2img(self, prompts, **kwargs)

    def load_relation(self, path_or_embeds, **kwargs) -> str:
        """Add a ReVersion relation token to the tokenizer and text encoder; see
        :func:`dreamfuse.engine.relation.load_relation`. Returns the token."""
        from .relation import load_relation

        return load_relation(self, path_or_embeds, **kwargs)

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
