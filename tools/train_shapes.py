"""Train an SD-layout model on the shapes world (:mod:`dreamfuse.engine.shapes_world`) from scratch, on a CPU.

    python -m tools.train_shapes --out shapes-model                  # the recipe below (hours on 2 CPU cores)
    python -m tools.train_shapes --out /tmp/s --n-data 64 --vae-steps 5 --unet-steps 5 --eval 4   # a smoke run
    dreamfuse generate --model shapes-model --prompt "a striped red circle on the left on grass" --out c.png

The recipe, seeded end to end (``--seed``): ``--n-data`` scenes of the world (their images rendered once); an
``AutoencoderKL`` (4 latent channels, x8: 64² images -> 8² latents) trained on them with an MSE reconstruction
loss and a small KL term; the training latents encoded once (posterior means) and the VAE's ``scaling_factor``
set to 1 / their standard deviation; then a ``UNet2DConditionModel`` with SD 1.x's block layout (so every layer
the pipelines hook exists) and a small ``CLIPTextModel`` trained together on the epsilon objective of diffusers'
DDPM schedule (the DDIM config of ``tiny``), with 10 % of the captions dropped to "" for classifier-free guidance
and an exponential moving average of the UNet and text-encoder weights (what is saved). The tokenizer is the one
dreamfuse ships. The output is a diffusers folder that ``--model DIR`` loads; ``--eval N`` generates N images of
new scenes' captions and reads them back with the world's reader (per-attribute accuracy against ground truth).

Each stage prints its steps per second; everything runs on the CPU in fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dreamfuse.engine import shapes_world as W

VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
           latent_channels=4, norm_num_groups=16, sample_size=W.SIZE)
UNET = dict(sample_size=W.SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 128, 128), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=64,
            attention_head_dim=4, norm_num_groups=16)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77)
CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-6


def build(seed: int) -> dict:
    """Untrained VAE, UNet and text encoder of the recipe, the shipped tokenizer and the DDIM scheduler."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from dreamfuse.engine import tiny
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny.load_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id, **TEXT))
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": tiny._ddim_scheduler()}


def make_data(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    scenes = W.sample_scenes(seed, n)
    return np.stack([W.render(s) for s in scenes]), [s.caption for s in scenes]


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _log(stage: str, step: int, steps: int, loss: float, t0: float) -> None:
    rate = step / max(time.perf_counter() - t0, 1e-9)
    print(f"{stage}: step {step}/{steps} loss {loss:.5f} ({rate:.2f} steps/s)", flush=True)


def train_vae(vae, images: np.ndarray, steps: int, batch: int, lr: float, gen: torch.Generator,
              log_every: int = 100) -> float:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    t0, loss = time.perf_counter(), float("nan")
    for step in range(1, steps + 1):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = _to_pixels(images[idx.numpy()])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss_t = F.mse_loss(rec, x) + KL_WEIGHT * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        opt.step()
        sched.step()
        loss = float(loss_t.detach())
        if step % log_every == 0 or step == steps:
            _log("vae", step, steps, loss, t0)
    vae.eval().requires_grad_(False)
    return loss


@torch.no_grad()
def encode(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means of every image; sets ``vae.config.scaling_factor`` to 1 / their std (as SD's 0.18215)."""
    z = torch.cat([vae.encode(_to_pixels(images[i:i + batch])).latent_dist.mean for i in range(0, len(images), batch)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return z * vae.config.scaling_factor


def train_unet(unet, text_encoder, tokenizer, scheduler, latents: torch.Tensor, captions: list[str], steps: int,
               batch: int, lr: float, ema_decay: float, gen: torch.Generator, log_every: int = 100):
    """Returns the EMA copies of the UNet and the text encoder."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    modules = [unet, text_encoder]
    for m in modules:
        m.train().requires_grad_(True)
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warm = max(1, min(500, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
    alphas = scheduler.alphas_cumprod
    t0, loss = time.perf_counter(), float("nan")
    for step in range(1, steps + 1):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < CAPTION_DROPOUT
        tok[drop] = empty
        t = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text_encoder(tok).last_hidden_state
        loss_t = F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))  # warm-up of the average
            for m, e in zip(modules, ema):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - d)
        loss = float(loss_t.detach())
        if step % log_every == 0 or step == steps:
            _log("unet", step, steps, loss, t0)
    for m in modules:
        m.eval().requires_grad_(False)
    return ema[0], ema[1], loss


def save(out: Path, comps: dict) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def evaluate(folder: Path, n: int, seed: int, steps: int, guidance: float) -> dict[str, float]:
    """Accuracy of each attribute read back from ``n`` generated images of new scenes' full captions."""
    from dreamfuse.engine import Engine, EngineConfig

    engine = Engine.from_pretrained(str(folder), EngineConfig(device="cpu", backend="torch", progress=False))
    scenes = W.sample_scenes(seed + 1_000_003, n, caption_dropout=False)  # seeds disjoint from training's
    right: dict[str, list[bool]] = {}
    for i in range(0, n, 8):
        chunk = scenes[i:i + 8]
        images = engine.text2img([s.caption for s in chunk], seed=seed + i, steps=steps, guidance_scale=guidance,
                                 height=W.SIZE, width=W.SIZE)
        for s, img in zip(chunk, images):
            for k, ok in W.score(s, W.read_image(img)).items():
                right.setdefault(k.rstrip("_01"), []).append(ok)
    return {k: float(np.mean(v)) for k, v in right.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.train_shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="the diffusers folder to write")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the weights and the training (default 0)")
    p.add_argument("--n-data", type=int, default=20000, help="training scenes (default 20000)")
    p.add_argument("--vae-steps", type=int, default=3000, help="VAE steps (default 3000)")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--unet-steps", type=int, default=20000, help="UNet + text-encoder steps (default 20000)")
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (default 0.999)")
    p.add_argument("--eval", type=int, default=64, metavar="N", help="generated images read back (0: none)")
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--eval-guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    for name in ("n_data", "vae_steps", "vae_batch", "unet_steps", "unet_batch", "eval_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be at least 1")
    if not 0 < args.ema < 1:
        p.error("--ema: must lie in (0, 1)")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out: {str(args.out)!r} exists and is not empty")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    timings = {}
    t = time.perf_counter()
    images, captions = make_data(args.n_data, args.seed)
    timings["data_s"] = time.perf_counter() - t
    print(f"data: {len(images)} scenes in {timings['data_s']:.1f} s", flush=True)
    comps = build(args.seed)
    t = time.perf_counter()
    vae_loss = train_vae(comps["vae"], images, args.vae_steps, args.vae_batch, args.vae_lr, gen)
    latents = encode(comps["vae"], images)
    timings["vae_s"] = time.perf_counter() - t
    t = time.perf_counter()
    unet, text_encoder, unet_loss = train_unet(comps["unet"], comps["text_encoder"], comps["tokenizer"],
                                               comps["scheduler"], latents, captions, args.unet_steps,
                                               args.unet_batch, args.unet_lr, args.ema, gen)
    timings["unet_s"] = time.perf_counter() - t
    comps.update(unet=unet, text_encoder=text_encoder)
    save(args.out, comps)
    record = {"recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "vae_loss": vae_loss, "unet_loss": unet_loss, "timings_s": timings, "torch": torch.__version__}
    if args.eval:
        record["eval_accuracy"] = evaluate(args.out, args.eval, args.seed, args.eval_steps, args.eval_guidance)
        print("eval: " + ", ".join(f"{k} {v:.2f}" for k, v in record["eval_accuracy"].items()), flush=True)
    (args.out / "shapes_training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
