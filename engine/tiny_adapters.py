"""Embedded tiny models for the image-prompt paths, like ``tiny``: seeded random weights, built on first use,
nothing downloaded. They make every IP-Adapter, patch-quality and PatchDPO command runnable on a fresh machine
(``--ip-adapter tiny --image-encoder tiny``, ``--backbone tiny``); the images and scores they give mean
nothing, the code paths they run are the real ones.

- ``tiny`` / ``tiny-base``: an IP-Adapter-Plus / IP-Adapter for the engine's UNet (whatever its layout: ``tiny``,
  ``tiny-xl``, or a real model) with a tiny CLIP vision encoder (image 32, patch 8, hidden 32, 2 layers);
  :func:`dreamfuse.engine.ip_adapter.build_tiny_ip_adapter`.
- the tiny patch-quality backbone: a ViT (image 32, patch 8, hidden 32, 2 layers, no pooler) whose patch grid
  is 4x4.
"""

from __future__ import annotations

TINY_ADAPTERS = ("tiny", "tiny-base")
"""``--ip-adapter`` names of the embedded adapters: ``tiny`` = IP-Adapter-Plus, ``tiny-base`` = IP-Adapter."""
TINY_BACKBONE = "tiny"


def build_tiny_ip_adapter(engine, plus: bool = True, seed: int = 0):
    """The tiny IP-Adapter(-Plus) for ``engine``'s UNet (see :mod:`dreamfuse.engine.ip_adapter`)."""
    from .ip_adapter import build_tiny_ip_adapter as build

    return build(engine, plus=plus, seed=seed)


def build_tiny_backbone(seed: int = 0):
    """A seeded tiny ``ViTModel`` for :class:`~dreamfuse.engine.patch_quality.PatchQualityEstimator`."""
    import torch
    from transformers import ViTConfig, ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    return model.eval().requires_grad_(False)


def build_tiny_lora(engine, path, *, seed: int = 0, rank: int = 4, text_encoder: bool = True,
                    format: str = "diffusers"):
    """Write a seeded tiny LoRA ``.safetensors`` for ``engine``'s model (diffusers or kohya format) and return its
    path; see :func:`dreamfuse.engine.lora.build_tiny_lora`."""
    from .lora import build_tiny_lora as build

    return build(engine, path, seed=seed, rank=rank, text_encoder=text_encoder, format=format)
