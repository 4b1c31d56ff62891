"""``dreamfuse train patchdpo``: PatchDPO fine-tuning of an IP-Adapter(-Plus)."""

from __future__ import annotations

import argparse

from .common import CLIError, add_model_args, check_file, finite_float, int_at_least, output_folder
from .train import add_checkpoint_args, add_optimization_args

EPILOG = """\
DATA folder:
  DATA/<sample>/ref.png       the reference image
  DATA/<sample>/gen*.png      images generated for it (each (ref, gen) pair is one training item)
  DATA/<sample>/prompt.txt    the prompt they were generated with

outputs:
  OUT/ip_adapter.bin                standard IP-Adapter file (loads with --ip-adapter / engine.load_ip_adapter)
  OUT/quality_cache/                patch-quality maps (computed once)
  OUT/checkpoints/step-NNNNNNN.pt   resumable state (--checkpoint-every, --resume latest)

SD 1.x/2.x and SDXL (per-image SDXL time ids: original size, crop 0 0, training size). Training runs in fp32
(mixed precision on CUDA through --mixed-precision, or accelerate launch's --mixed_precision with the default auto).

several GPUs / machines: run the same command under torchrun or accelerate launch (one process per GPU);
--batch-size is per process, the effective batch (printed at start) is batch x accumulation x processes; rank 0
writes OUT (put it on a filesystem every machine sees).

examples:
  dreamfuse train patchdpo --model ./sd15 --ip-adapter ip-adapter-plus_sd15.bin --image-encoder ./image_encoder \\
      --data ./patchdpo-data --backbone ./dinov2-base --out ./patchdpo-out
  dreamfuse train patchdpo --ip-adapter tiny --image-encoder tiny --backbone tiny --data ./pairs --out ./pdpo \\
      --max-steps 5                                          # embedded tiny model, adapter and backbone
  torchrun --nproc_per_node 8 -m dreamfuse.engine.cli train patchdpo --model ./sdxl \\
      --ip-adapter ip-adapter-plus_sdxl_vit-h.bin --image-encoder ./image_encoder --backbone ./dinov2-base \\
      --data ./patchdpo-data --out ./patchdpo-out --batch-size 4 --steps 30000   # 8 GPUs x 4 pairs (the paper's)
"""


def register(sub, name: str, help_: str) -> None:
    from ..train.patchdpo import MAX_BATCH, SAVE_FORMATS, PatchDPOConfig

    d = PatchDPOConfig()
    p = sub.add_parser(
        name, help=help_, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune IP-Adapter(-Plus) weights with PatchDPO: a reconstruction loss on reference and "
                    "generated images (same noise and timestep per pair, IP tokens of the reference), weighted per "
                    "latent patch by 1 - quality (reference) and quality (generated). Only to_k_ip/to_v_ip train "
                    "(plus image_proj with --train-projection). SD 1.x/2.x and SDXL.")
    p.add_argument("--ip-adapter", required=True, metavar="W",
                   help="IP-Adapter weights (.bin/.safetensors), or 'tiny' / 'tiny-base' (embedded tiny adapters)")
    p.add_argument("--image-encoder", required=True, metavar="DIR",
                   help="its CLIP image encoder folder ('tiny' with a tiny adapter)")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder (see below)")
    p.add_argument("--backbone", required=True, metavar="DIR",
                   help="patch-quality vision backbone (ViT / DINOv2 / CLIP vision folder, or 'tiny')")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    g = add_optimization_args(p, d, batch_help="(ref, gen) pairs per micro-batch", max_batch=MAX_BATCH)
    g.add_argument("--weight-power", type=int_at_least("--weight-power", 1, 2), default=d.weight_power, metavar="{1,2}",
                   help="1: mean((e'-e)^2 * w) (official code, default); 2: w inside the squared norm "
                        "(supplementary)")
    g.add_argument("--train-projection", action="store_true", help="also train the image projection")
    g.add_argument("--ip-scale", type=finite_float("--ip-scale", low=0), default=d.ip_scale,
                   help=f"IP-Adapter scale (default {d.ip_scale})")
    g.add_argument("--save-format", choices=SAVE_FORMATS, default=d.save_format,
                   help=f"output file format (default {d.save_format})")
    add_checkpoint_args(p, d)
    add_model_args(p, compile_option=False, dtype_option=False,
                   backend_default="torch (training runs PyTorch SDPA)")
    p.set_defaults(func=run)


def run(args) -> None:
    from ..train.distributed import env_context, shutdown

    try:
        _run(args, env_context())
    finally:
        shutdown()


def _run(args, env) -> None:
    from ..tiny_adapters import TINY_ADAPTERS
    from ..train.distributed import rank_device
    from ..train.patchdpo import PatchDPOConfig, check_dataset, check_resume, train
    from .common import load_engine
    from .patch_quality import check_backbone_arg, make_estimator

    cfg = PatchDPOConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        weight_decay=args.weight_decay, weight_power=args.weight_power, train_projection=args.train_projection,
        ip_scale=args.ip_scale, resolution=args.resolution, mixed_precision=args.mixed_precision, seed=args.seed,
        checkpoint_every=args.checkpoint_every, resume=args.resume, save_format=args.save_format,
        progress=False if args.no_progress else None).validate()
    if not env.is_main:  # under torchrun / accelerate launch: rank 0 alone shows progress and prints
        args.no_progress = True
    args.device = rank_device(args.device, env)  # one GPU per process
    output_folder(args.out)
    check_dataset(args.data)  # fail on bad data before loading any model
    check_resume(cfg, args.out, env.world_size)  # and on a bad checkpoint (train() reads it again)
    if args.ip_adapter in TINY_ADAPTERS or args.image_encoder == "tiny":
        if args.ip_adapter not in TINY_ADAPTERS or args.image_encoder != "tiny":
            raise CLIError("--ip-adapter/--image-encoder: the tiny adapter and its encoder go together "
                           "(--ip-adapter tiny --image-encoder tiny)")
    else:
        from ..ip_adapter import check_image_encoder_folder

        check_file("--ip-adapter", args.ip_adapter)
        check_image_encoder_folder(args.image_encoder, "--image-encoder")
    check_backbone_arg(args.backbone)
    estimator = make_estimator(args.backbone)
    engine = load_engine(args, dtype="fp32", backend=args.backend or "torch")
    estimator.backbone.to(engine.device)
    if args.ip_adapter in TINY_ADAPTERS:
        from ..tiny_adapters import build_tiny_ip_adapter

        adapter, encoder = build_tiny_ip_adapter(engine, plus=args.ip_adapter == "tiny"), None
    else:
        adapter, encoder = args.ip_adapter, args.image_encoder
    result = train(engine, adapter, encoder, args.data, out=args.out, config=cfg, estimator=estimator,
                   log=lambda line: print(line, flush=True))
    last = result.losses[-1]["loss"] if result.losses else float("nan")
    if env.is_main:
        print(f"wrote {result.path} after {cfg.steps} steps (final loss {last:.4f})")

