"""Inputs the img2img / inpainting tests share: smooth random pictures, box masks, a 9-channel UNet."""

import numpy as np
import torch
from PIL import Image

SIZE = 64


def nine_channel(components: dict, seed: int = 1) -> dict:
    """``components`` with its UNet rebuilt from the same config with 9 input channels (4 latent + 1 mask + 4
    masked-image latent: an inpainting UNet's layout), seeded random weights."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9})
    components["unet"] = unet.eval().requires_grad_(False)
    return components


def picture(seed: int = 0, h: int = SIZE, w: int = SIZE) -> Image.Image:
    """A smooth random picture (blobs of colour), a plausible input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bilinear")
    return Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def box_mask(h: int = SIZE, w: int = SIZE, box=(16, 48, 8, 40)) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[box[0]:box[1], box[2]:box[3]] = 255
    return Image.fromarray(m)
