"""Write a diffusers SD 1.x or SDXL pipeline as one original-format (LDM / SGM) checkpoint, for testing
single-file loading.

The key layout of the original Stable Diffusion checkpoints is a published fact (``model.diffusion_model.``,
``first_stage_model.``, ``cond_stage_model.transformer.`` prefixes; ``input_blocks``/``middle_block``/
``output_blocks``; resnet ``in_layers``/``emb_layers``/``out_layers``); this maps the tiny models onto it.
SDXL's checkpoints add ``label_emb.0.{0,2}`` (the added-conditioning MLP), keep CLIP-L under
``conditioner.embedders.0.transformer.`` and the second encoder in OpenCLIP's layout under
``conditioner.embedders.1.model.`` (``resblocks`` with fused ``in_proj`` q/k/v, ``text_projection`` as D x P).
"""

from __future__ import annotations

import torch

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _sub(key: str, pairs) -> str:
    for a, b in pairs:
        key = key.replace(f".{a}.", f".{b}.")
    return key


def unet_to_ldm(sd: dict, layers: int, n_blocks: int) -> dict:
    out = {}
    for k, v in sd.items():
        n = k
        if k.startswith("time_embedding."):
            n = k.replace("time_embedding.linear_1", "time_embed.0").replace("time_embedding.linear_2", "time_embed.2")
        elif k.startswith("add_embedding."):
            n = k.replace("add_embedding.linear_1", "label_emb.0.0").replace("add_embedding.linear_2", "label_emb.0.2")
        elif k.startswith("conv_in."):
            n = k.replace("conv_in", "input_blocks.0.0")
        elif k.startswith("conv_norm_out."):
            n = k.replace("conv_norm_out", "out.0")
        elif k.startswith("conv_out."):
            n = k.replace("conv_out", "out.2")
        elif k.startswith("down_blocks."):
            _, i, kind, j, rest = k.split(".", 4)
            i, j = int(i), int(j)
            if kind == "resnets":
                n = f"input_blocks.{1 + i * (layers + 1) + j}.0.{rest}"
                n = _sub(n, _RESNET)
            elif kind == "attentions":
                n = f"input_blocks.{1 + i * (layers + 1) + j}.1.{rest}"
            else:  # downsamplers.0.conv.*
                n = f"input_blocks.{1 + i * (layers + 1) + layers}.0.op.{rest.split('.', 1)[1]}"
        elif k.startswith("mid_block."):
            _, kind, j, rest = k.split(".", 3)
            n = f"middle_block.{2 * int(j) if kind == 'resnets' else 1}.{rest}"
            n = _sub(n, _RESNET) if kind == "resnets" else n
        elif k.startswith("up_blocks."):
            _, i, kind, j, rest = k.split(".", 4)
            i, j = int(i), int(j)
            if kind == "resnets":
                n = _sub(f"output_blocks.{i * (layers + 1) + j}.0.{rest}", _RESNET)
            elif kind == "attentions":
                n = f"output_blocks.{i * (layers + 1) + j}.1.{rest}"
            else:  # upsamplers.0.conv.*: after the attention when the block has one
                has_attn = any(x.startswith(f"up_blocks.{i}.attentions.") for x in sd)
                n = f"output_blocks.{i * (layers + 1) + layers}.{2 if has_attn else 1}.{rest}"
        out["model.diffusion_model." + n] = v
    return out


def vae_to_ldm(sd: dict, n_blocks: int) -> dict:
    out = {}
    for k, v in sd.items():
        n = k
        if ".down_blocks." in k:
            _, _, i, kind, j, rest = k.split(".", 5)
            n = (f"encoder.down.{i}.downsample.{rest}" if kind == "downsamplers"
                 else _sub(f"encoder.down.{i}.block.{j}.{rest}", _VAE_RESNET))
        elif ".up_blocks." in k:
            _, _, i, kind, j, rest = k.split(".", 5)
            i = n_blocks - 1 - int(i)
            n = (f"decoder.up.{i}.upsample.{rest}" if kind == "upsamplers"
                 else _sub(f"decoder.up.{i}.block.{j}.{rest}", _VAE_RESNET))
        elif ".mid_block." in k:
            part, _, kind, j, rest = k.split(".", 4)
            if kind == "resnets":
                n = _sub(f"{part}.mid.block_{int(j) + 1}.{rest}", _VAE_RESNET)
            else:
                n = _sub(f"{part}.mid.attn_1.{rest}", _VAE_ATTN)
                if v.ndim == 2:  # LDM keeps the attention projections as 1x1 convolutions
                    v = v[:, :, None, None]
        elif ".conv_norm_out." in k:
            n = k.replace("conv_norm_out", "norm_out")
        out["first_stage_model." + n] = v
    return out


def pipeline_to_ldm(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    sd = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, len(unet.config.block_out_channels))
    sd.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    sd.update({"cond_stage_model.transformer." + k: v for k, v in _text_model_keys(text_encoder.state_dict()).items()})
    return {k: v.contiguous() for k, v in sd.items()}


def _text_model_keys(sd: dict) -> dict:
    # Original checkpoints nest CLIP under `text_model.`; transformers >= 5.6 flattened CLIPTextModel's keys.
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


def open_clip_text(sd: dict, prefix: str) -> dict:
    """A transformers CLIPTextModelWithProjection state dict in OpenCLIP's layout under ``prefix``."""
    sd = _text_model_keys(sd)
    out = {
        prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        prefix + "text_projection": sd["text_projection.weight"].T,
    }
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")}
    names = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
             ("self_attn.out_proj", "attn.out_proj")]
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for a, b in names:
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([sd[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"])
    return out


def xl_pipeline_to_ldm(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    sd = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, len(unet.config.block_out_channels))
    sd.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    sd.update({"conditioner.embedders.0.transformer." + k: v
               for k, v in _text_model_keys(text_encoder.state_dict()).items()})
    sd.update(open_clip_text(text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return {k: v.contiguous() for k, v in sd.items()}
