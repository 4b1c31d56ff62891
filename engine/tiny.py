"""The embedded ``tiny`` model: SD-shaped, small, seeded random weights, shipped tokenizer.

Nothing here downloads anything. The weights are rebuilt from a fixed seed on every load
(deterministic for a given torch version), and the tokenizer files under
``engine/assets/tiny_tokenizer`` were generated once by ``python -m dreamfuse.engine.tiny``
and are shipped as package data.

``tiny`` has Stable Diffusion 1.x's block layout (3 cross-attention down blocks + 1 plain,
1 plain up block + 3 cross-attention up blocks, a cross-attention mid block) so that every
layer name the pipelines hook (``up_blocks.2.attentions.*.attn1`` ...) exists, with
channels 40/80/160/160 and 2 heads, i.e. head dims 20/40/80: not powers of two on purpose.

``tiny-xl`` has SDXL's: two text encoders (a CLIPTextModel and a CLIPTextModelWithProjection whose
projected output is the pooled embedding), cross-attention on their concatenated penultimate hidden
states, ``text_time`` added conditioning (pooled text embedding + the six micro-conditioning ids), down
blocks plain / cross / cross (2 transformer layers in the last), linear projections in the transformers,
head dim 64 everywhere as in SDXL, and SDXL's VAE scaling factor.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from .validation import TINY_NAMES  # noqa: F401 (defined where the CLI reads it without torch)

TOKENIZER_DIR = "tiny_tokenizer"
TINY_SEED = 0
TINY_RESOLUTION = 64

# Words that become whole BPE tokens. Everything else still tokenizes (byte-level fallback),
# only into several tokens: that is how multi-token subject words are exercised in tests.
_WORDS = """
a an the of and with in on at to for from by as is are photo picture painting image render drawing
sketch portrait style art realistic high quality detailed best sharp blurry low bad ugly deformed
cat dog person man woman boy girl child baby bird horse cow sheep bear lion tiger fox wolf rabbit mouse
car bus bike train plane boat ship house building city street road tree forest flower garden grass
mountain river lake sea ocean beach sky cloud sun moon star night day morning evening snow rain
table chair bed sofa cup bowl box bag hat shoe shirt dress glasses book lamp window door wall floor
red green blue yellow orange purple pink black white gray brown golden silver
big small large tiny little old young new happy sad cute beautiful
sks ytz toy teddy backpack sunglasses vase clock robot cartoon male female subject
sitting standing running lying holding wearing looking next behind under above below near inside outside
over beside between into onto against across along around among through toward towards within without
upon beneath underneath off out up down after before during past via per than like unlike
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte-to-printable-unicode table (a published fact of the byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tokenizer_files(out_dir: str | Path) -> Path:
    """Generate a small CLIP BPE vocabulary (``vocab.json``, ``merges.txt``) in ``out_dir``.

    Vocabulary = the 256 byte symbols, the same with the end-of-word marker ``</w>``, one token per
    merge, then the two special tokens (CLIP's layout). Each listed word gets a left-to-right
    merge chain, so most become single tokens.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    seen = set(vocab)
    # Longer words first: their merge chains get the lower ranks, so a short word's merge
    # ("a t</w>" from "at") does not pre-empt a longer word's chain ("c a" of "cat").
    for word in sorted(dict.fromkeys(w.lower() for w in _WORDS), key=len, reverse=True):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            merged = left + right
            if merged not in seen:
                merges.append((left, right))
                vocab.append(merged)
                seen.add(merged)
            left = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return out


def tokenizer_path() -> Path:
    return Path(str(resources.files("dreamfuse.engine") / "assets" / TOKENIZER_DIR))


def load_tokenizer():
    from transformers import CLIPTokenizer

    path = tokenizer_path()
    return CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), model_max_length=77)


def build_components(seed: int = TINY_SEED) -> dict:
    """UNet, VAE, text encoder, tokenizer and DDIM scheduler of the tiny model (fp32, CPU)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_tokenizer()
    devices = []  # fork_rng needs an explicit (empty) device list to stay CPU-only and quiet
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(40, 80, 160, 160),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=64,
            attention_head_dim=2,  # diffusers' legacy name: this is the number of heads (SD1.x: 8)
            norm_num_groups=8,
        )
        vae = _tiny_vae(0.18215)
    scheduler = _ddim_scheduler()
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def _tiny_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def _ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_xl_components(seed: int = TINY_SEED) -> dict:
    """The ``tiny-xl`` model (SDXL layout, fp32, CPU): the keys of :func:`build_components` plus
    ``text_encoder_2``, ``tokenizer_2`` and ``force_zeros_for_empty_prompt`` (True, as SDXL base)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = load_tokenizer(), load_tokenizer()

    def text_config(hidden: int, **kw) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **kw)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # not the SD1.x tiny's weights
        text_encoder = CLIPTextModel(text_config(32))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(64, projection_dim=48))
        time_dim = 8  # SDXL: 256
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(1, 1, 2),  # heads per level: head dim 64 (the first level has no attention)
            cross_attention_dim=32 + 64,  # the two encoders' hidden states, concatenated
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=48 + 6 * time_dim,  # pooled text embedding + 6 time ids
            norm_num_groups=8,
        )
        vae = _tiny_vae(0.13025)
    comps = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
             "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": _ddim_scheduler(),
             "force_zeros_for_empty_prompt": True}
    for key in ("unet", "vae", "text_encoder", "text_encoder_2"):
        comps[key].eval().requires_grad_(False)
    return comps


def build(name: str, seed: int = TINY_SEED) -> dict:
    """Components of the embedded model ``name`` (``"tiny"`` or ``"tiny-xl"``)."""
    if name == "tiny":
        return build_components(seed)
    if name == "tiny-xl":
        return build_xl_components(seed)
    raise ValueError(f"model: unknown embedded model {name!r} (one of {', '.join(TINY_NAMES)})")


def save_tiny(path: str | Path, seed: int = TINY_SEED, name: str = "tiny") -> Path:
    """Write the embedded model ``name`` as a diffusers folder (``model_index.json`` ...) at ``path``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    c = build(name, seed)
    if name == "tiny-xl":
        c.pop("force_zeros_for_empty_prompt")
        pipe = StableDiffusionXLPipeline(**c, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


if __name__ == "__main__":  # regenerate the shipped tokenizer files
    here = Path(__file__).parent / "assets" / TOKENIZER_DIR
    print(build_tokenizer_files(here))
