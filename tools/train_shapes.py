"""Train an SD-layout model on the shapes world (:mod:`dreamfuse.engine.shapes_world`) from scratch, on a CPU.

    python -m tools.train_shapes --out shapes-model                  # the recipe below (~63 min on 2 CPU cores)
    python -m tools.train_shapes --out /tmp/s --n-data 64 --vae-steps 5 --unet-steps 5 --eval 4   # a smoke run
    dreamfuse generate --model shapes-model --prompt "a striped red circle on the left on grass" --out c.png

The recipe, seeded end to end (``--seed``): ``--n-data`` scenes of the world (their images rendered once); an
``AutoencoderKL`` (4 latent channels, x8: 64² images -> 8² latents) trained on 32-pixel crops of them (a quarter of
the pixels per step) with an MSE reconstruction loss and a small KL term; the training latents encoded once
(posterior means) and the VAE's ``scaling_factor`` set to 1 / their standard deviation; then a
``UNet2DConditionModel`` with SD 1.x's block layout (so every layer the pipelines hook exists) and a small
``CLIPTextModel`` trained together on the epsilon objective of diffusers' DDPM schedule (the DDIM config of
``tiny``), with 10 % of the captions dropped to "" for classifier-free guidance and an exponential moving average of
the UNet and text-encoder weights (what is saved); then the VAE's decoder alone is refined on whole images with L1 +
MSE (the encoder, hence the latents the UNet learned, unchanged). The tokenizer is the one dreamfuse ships. The
bundled ``shapes`` model (``engine/assets/shapes``) is this recipe's output (run as two invocations: its record's
note says how) with the default arguments; its ``shapes_training.json`` is the record this script writes.

The output is a diffusers folder that ``--model DIR`` loads (weights stored fp16: ``--save-dtype``); ``--eval N``
generates N images of new scenes' captions and reads them back with the world's reader (per-attribute accuracy
against ground truth); the record also holds the VAE's round-trip accuracy (the ceiling of the generated images).
Each stage prints its steps per second; everything trains on the CPU in fp32.
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


def _crops(x: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    """A random ``crop``-pixel square of each image, on the latent grid (multiples of 8) so the VAE's phase is kept."""
    if crop >= x.shape[-1]:
        return x
    cells = (x.shape[-1] - crop) // 8 + 1
    ys, xs = (torch.randint(cells, (len(x),), generator=gen) * 8 for _ in range(2))
    return torch.stack([im[:, y:y + crop, x0:x0 + crop] for im, y, x0 in zip(x, ys.tolist(), xs.tolist())])


def _fit(stage: str, params, loss_of, steps: int, lr: float, log_every: int) -> float:
    """AdamW (no weight decay) with a cosine decay to 0 over ``steps`` steps of ``loss_of()``; the last loss."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    t0, loss = time.perf_counter(), float("nan")
    for step in range(1, steps + 1):
        loss_t = loss_of()
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        opt.step()
        sched.step()
        loss = float(loss_t.detach())
        if step % log_every == 0 or step == steps:
            _log(stage, step, steps, loss, t0)
    return loss


def train_vae(vae, images: np.ndarray, steps: int, batch: int, lr: float, gen: torch.Generator,
              log_every: int = 100, crop: int = W.SIZE) -> float:
    vae.train().requires_grad_(True)

    def loss_of() -> torch.Tensor:
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = _crops(_to_pixels(images[idx.numpy()]), crop, gen)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        return F.mse_loss(vae.decode(z).sample, x) + KL_WEIGHT * post.kl().mean()

    loss = _fit("vae", vae.parameters(), loss_of, steps, lr, log_every)
    vae.eval().requires_grad_(False)
    return loss


def refine_decoder(vae, images: np.ndarray, steps: int, batch: int, lr: float, seed: int,
                   log_every: int = 100) -> float:
    """Fine-tune the VAE's decoder alone on whole images from the frozen encoder's posterior means (the latents the
    UNet learned are unchanged), with L1 + MSE: sharper edges and textures than the first stage's crops give.
    Seeded on its own (``seed``), so it gives the same decoder whether it runs in the recipe or on a saved folder
    (``--refine-decoder-of``)."""
    gen = torch.Generator().manual_seed(seed + 7)
    vae.eval().requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    vae.decoder.train()

    def loss_of() -> torch.Tensor:
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = _to_pixels(images[idx.numpy()])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        return F.l1_loss(rec, x) + F.mse_loss(rec, x)

    loss = _fit("decoder", params, loss_of, steps, lr, log_every)
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
    # linear warm-up, then a cosine decay to a tenth of the rate (a short run converges instead of hovering)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(max(i - warm, 0), steps) / max(steps - warm, 1)))))
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


def save(out: Path, comps: dict, dtype: torch.dtype = torch.float16) -> Path:
    """The diffusers folder; weights stored in ``dtype`` (fp16 halves the files; loading in fp32 upcasts them)."""
    from diffusers import StableDiffusionPipeline

    comps = {k: (copy.deepcopy(v).to(dtype) if isinstance(v, torch.nn.Module) else v) for k, v in comps.items()}
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def _accuracy(pairs) -> dict[str, float]:
    """Per-attribute accuracy over ``(scene, image)`` pairs; an attribute of either object (``shape_0``,
    ``shape_1``) counts as one (``shape``)."""
    right: dict[str, list[bool]] = {}
    for scene, image in pairs:
        for k, ok in W.score(scene, W.read_image(image)).items():
            right.setdefault(k.rstrip("_01"), []).append(ok)
    return {k: float(np.mean(v)) for k, v in right.items()}


@torch.no_grad()
def vae_roundtrip_accuracy(vae, n: int, seed: int) -> dict[str, float]:
    """Per-attribute read-back accuracy of ``n`` new scenes passed through the VAE (encode, decode): the ceiling
    the generated images can reach."""
    scenes = W.sample_scenes(seed + 2_000_003, n, caption_dropout=False)
    images = []
    for i in range(0, n, 64):
        x = _to_pixels(np.stack([W.render(s) for s in scenes[i:i + 64]]))
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        images += list(rec.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return _accuracy(zip(scenes, images))


def evaluate(folder: Path, n: int, seed: int, steps: int, guidance: float) -> dict[str, float]:
    """Accuracy of each attribute read back from ``n`` generated images of new scenes' full captions."""
    from dreamfuse.engine import Engine, EngineConfig

    engine = Engine.from_pretrained(str(folder), EngineConfig(device="cpu", backend="torch", progress=False))
    scenes = W.sample_scenes(seed + 1_000_003, n, caption_dropout=False)  # seeds disjoint from training's
    images = []
    for i in range(0, n, 8):
        images += engine.text2img([s.caption for s in scenes[i:i + 8]], seed=seed + i, steps=steps,
                                  guidance_scale=guidance, height=W.SIZE, width=W.SIZE)
    return _accuracy(zip(scenes, images))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.train_shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="the diffusers folder to write (required unless --refine-decoder-of)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the weights and the training (default 0)")
    p.add_argument("--n-data", type=int, default=20000, help="training scenes (default 20000)")
    p.add_argument("--vae-steps", type=int, default=4000, help="VAE steps (default 4000)")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-crop", type=int, default=32, help="the VAE trains on random crops of this side, a multiple "
                   "of 8 (default 32: a quarter of the pixels per step; 64: whole images)")
    p.add_argument("--decoder-steps", type=int, default=1500, help="decoder refinement steps on whole images "
                   "after the UNet stage (default 1500; 0: none)")
    p.add_argument("--decoder-batch", type=int, default=16)
    p.add_argument("--decoder-lr", type=float, default=3e-4)
    p.add_argument("--refine-decoder-of", type=Path, default=None, metavar="DIR",
                   help="run only the decoder stage on DIR, a folder this recipe wrote with --decoder-steps 0, and "
                        "rewrite its VAE (the same data and seed as the recipe: the result is the full recipe's)")
    p.add_argument("--unet-steps", type=int, default=10000, help="UNet + text-encoder steps (default 10000)")
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (default 0.999)")
    p.add_argument("--eval", type=int, default=128, metavar="N", help="generated images read back (0: none)")
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--eval-guidance", type=float, default=4.0)
    p.add_argument("--save-dtype", choices=("fp16", "fp32"), default="fp16",
                   help="weights' storage type (default fp16: ~15 MB, the shipped model's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    for name in ("n_data", "vae_steps", "vae_batch", "unet_steps", "unet_batch", "eval_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be at least 1")
    if args.vae_crop % 8 or not 8 <= args.vae_crop <= W.SIZE:
        p.error(f"--vae-crop: must be a multiple of 8 in [8, {W.SIZE}]")
    if not 0 < args.ema < 1:
        p.error("--ema: must lie in (0, 1)")
    if args.decoder_steps < 0:
        p.error("--decoder-steps: must be at least 0")
    if (args.out is None) == (args.refine_decoder_of is None):
        p.error("--out: give exactly one of --out (a new folder) or --refine-decoder-of (a saved one)")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out: {str(args.out)!r} exists and is not empty")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.refine_decoder_of is not None:
        return _refine_folder(args, p)
    gen = torch.Generator().manual_seed(args.seed)
    timings = {}
    t = time.perf_counter()
    images, captions = make_data(args.n_data, args.seed)
    timings["data_s"] = time.perf_counter() - t
    print(f"data: {len(images)} scenes in {timings['data_s']:.1f} s", flush=True)
    comps = build(args.seed)
    t = time.perf_counter()
    vae_loss = train_vae(comps["vae"], images, args.vae_steps, args.vae_batch, args.vae_lr, gen,
                         crop=args.vae_crop)
    latents = encode(comps["vae"], images)
    timings["vae_s"] = time.perf_counter() - t
    vae_acc = vae_roundtrip_accuracy(comps["vae"], min(256, args.n_data), args.seed)
    print("vae round trip: " + ", ".join(f"{k} {v:.2f}" for k, v in vae_acc.items()), flush=True)
    t = time.perf_counter()
    unet, text_encoder, unet_loss = train_unet(comps["unet"], comps["text_encoder"], comps["tokenizer"],
                                               comps["scheduler"], latents, captions, args.unet_steps,
                                               args.unet_batch, args.unet_lr, args.ema, gen)
    timings["unet_s"] = time.perf_counter() - t
    comps.update(unet=unet, text_encoder=text_encoder)
    decoder_loss = None
    if args.decoder_steps:
        t = time.perf_counter()
        decoder_loss = refine_decoder(comps["vae"], images, args.decoder_steps, args.decoder_batch, args.decoder_lr,
                                      args.seed)
        timings["decoder_s"] = time.perf_counter() - t
        vae_acc = vae_roundtrip_accuracy(comps["vae"], min(256, args.n_data), args.seed)
        print("vae round trip (refined decoder): " + ", ".join(f"{k} {v:.2f}" for k, v in vae_acc.items()),
              flush=True)
    save(args.out, comps, torch.float16 if args.save_dtype == "fp16" else torch.float32)
    record = {"recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "vae_loss": vae_loss, "vae_roundtrip_accuracy": vae_acc, "decoder_loss": decoder_loss,
              "unet_loss": unet_loss, "timings_s": timings, "torch": torch.__version__}
    if args.eval:
        record["eval_accuracy"] = evaluate(args.out, args.eval, args.seed, args.eval_steps, args.eval_guidance)
        print("eval: " + ", ".join(f"{k} {v:.2f}" for k, v in record["eval_accuracy"].items()), flush=True)
    (args.out / "shapes_training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


def _resave(folder: Path, dtype: torch.dtype) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    for sub, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        model = cls.from_pretrained(str(folder / sub))
        if next(model.parameters()).dtype != dtype:
            model.to(dtype).save_pretrained(str(folder / sub), safe_serialization=True)


def _refine_folder(args, p) -> int:
    """``--refine-decoder-of DIR``: the decoder stage on a saved folder (its record says it had none)."""
    from diffusers import AutoencoderKL

    folder = args.refine_decoder_of
    record_path = folder / "shapes_training.json"
    if not record_path.is_file():
        p.error(f"--refine-decoder-of: {str(folder)!r} has no shapes_training.json (not written by this recipe)")
    record = json.loads(record_path.read_text())
    if record["recipe"].get("decoder_steps"):
        p.error(f"--refine-decoder-of: {str(folder)!r} already had its decoder stage")
    for key in ("seed", "n_data"):
        if record["recipe"][key] != getattr(args, key):
            p.error(f"--{key.replace('_', '-')}: the folder was trained with {record['recipe'][key]}")
    images, _ = make_data(args.n_data, args.seed)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32)
    t = time.perf_counter()
    record["decoder_loss"] = refine_decoder(vae, images, args.decoder_steps, args.decoder_batch, args.decoder_lr,
                                            args.seed)
    record["timings_s"]["decoder_s"] = time.perf_counter() - t
    record["vae_roundtrip_accuracy_first_stage"] = record.get("vae_roundtrip_accuracy")
    record["vae_roundtrip_accuracy"] = vae_roundtrip_accuracy(vae, min(256, args.n_data), args.seed)
    print("vae round trip (refined decoder): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                           record["vae_roundtrip_accuracy"].items()), flush=True)
    for k in ("decoder_steps", "decoder_batch", "decoder_lr", "save_dtype"):
        record["recipe"][k] = getattr(args, k)
    dtype = torch.float16 if args.save_dtype == "fp16" else torch.float32
    vae.to(dtype).save_pretrained(str(folder / "vae"), safe_serialization=True)
    _resave(folder, dtype)  # the other weights in --save-dtype too, as the full recipe writes them
    if args.eval:
        record["eval_accuracy_first_stage"] = record.get("eval_accuracy")
        record["eval_accuracy"] = evaluate(folder, args.eval, args.seed, args.eval_steps, args.eval_guidance)
        print("eval: " + ", ".join(f"{k} {v:.2f}" for k, v in record["eval_accuracy"].items()), flush=True)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"rewrote {folder / 'vae'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
