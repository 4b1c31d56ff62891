"""Random-weight models with the real Stable Diffusion 1.5 and SDXL architectures, for benchmarks.

Nothing can be downloaded on the machines dreamfuse is developed and benchmarked on, yet kernel and pipeline
figures only mean something at SD scale. ``random-sd15`` and ``random-sdxl`` build the published architectures
(UNet, VAE and text encoders with the real widths, depths and head layouts) with seeded random weights:

* ``random-sd15``: UNet 859.5M parameters (320/640/1280/1280, 2 layers per block, 8 heads, cross 768), the SD VAE
  (128/256/512/512), a CLIP ViT-L/14-sized text encoder;
* ``random-sdxl``: UNet 2.57B parameters (320/640/1280, transformer depths 1/2/10, head dim 64, cross 2048,
  ``text_time`` conditioning with 256-d time embeddings), the SDXL VAE, CLIP ViT-L/14 and OpenCLIP
  ViT-bigG/14-sized text encoders.

The text encoders' token tables are sized to the embedded tiny tokenizer (the only tokenizer that ships), not to
CLIP's 49408 tokens; everything the UNet sees has the real shapes. Images are noise: use these for timing and
memory, never for quality. Building happens directly on the target device (``device``), so a GPU machine does not
spend minutes in CPU random init.
"""

from __future__ import annotations

import torch

from . import tiny
from .validation import SYNTHETIC_NAMES  # noqa: F401 (defined where the CLI reads it without torch)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu")
OPEN_CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       hidden_act="gelu", projection_dim=1280)


def build(name: str, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """Components of ``random-sd15`` / ``random-sdxl`` (fp32, on ``device``), keys as ``tiny.build``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name not in SYNTHETIC_NAMES:
        raise ValueError(f"model: unknown synthetic model {name!r} (one of {', '.join(SYNTHETIC_NAMES)})")
    device = torch.device(device)
    xl = name == "random-sdxl"
    tokenizer = tiny.load_tokenizer()

    def text_config(**kw) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **kw)

    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), device:
        torch.manual_seed(seed)
        comps = {
            "unet": UNet2DConditionModel(**(SDXL_UNET if xl else SD15_UNET)),
            "vae": AutoencoderKL(**SD_VAE, sample_size=1024 if xl else 512, scaling_factor=0.13025 if xl else 0.18215),
            "text_encoder": CLIPTextModel(text_config(**CLIP_L)),
            "tokenizer": tokenizer,
            "scheduler": tiny._ddim_scheduler(),
        }
        if xl:
            comps.update(text_encoder_2=CLIPTextModelWithProjection(text_config(**OPEN_CLIP_BIG_G)),
                         tokenizer_2=tiny.load_tokenizer(), force_zeros_for_empty_prompt=True)
    for key in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if key in comps:
            comps[key].eval().requires_grad_(False)
    return comps
