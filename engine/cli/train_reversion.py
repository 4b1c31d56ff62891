"""``dreamfuse train reversion``: learn a ReVersion relation token."""

from __future__ import annotations

import argparse

from .common import add_model_args, finite_float, output_folder, positive_int
from .train import add_checkpoint_args, add_optimization_args

EPILOG = """\
DATA folder (the ReVersion benchmark layout):
  DATA/1.jpg, DATA/2.jpg, ...
  DATA/text.json   {"1.jpg": ["cat {} box", "an orange cat {} a black box"], "2.jpg": [...]}
                   ({} is where the relation token goes; keys are file names inside DATA)

outputs:
  OUT/learned_embeds.bin            {"<R>": tensor} (official format; loads in the official code too)
  OUT/checkpoints/step-NNNNNNN.pt   resumable state (--checkpoint-every, --resume latest)

examples:
  dreamfuse train reversion --data ./painted_on --out ./painted_on-out --max-steps 20   # tiny model, a minute
  dreamfuse train reversion --model ./stable-diffusion-v1-5 --data ./painted_on --out ./out --resume latest
  dreamfuse generate --relation ./out/learned_embeds.bin --prompt "cat <R> wall" --out cat.png
"""


def register(sub, name: str, help_: str) -> None:
    from ..train.reversion import ReVersionConfig

    d = ReVersionConfig()
    p = sub.add_parser(
        name, help=help_, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Learn a relation prompt <R> (ReVersion): only the token's embedding trains, with the "
                    "denoising loss at relation-focal importance-sampled timesteps plus the relation-steering "
                    "contrastive loss (basis prepositions as positives, caption tokens as negatives).")
    p.add_argument("--data", required=True, metavar="DIR", help="exemplar images + text.json (see below)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    g = p.add_argument_group("relation token")
    g.add_argument("--token", default=d.token, help=f"the token to learn (default {d.token!r})")
    g.add_argument("--init-token", default=d.init_token, help=f"single-token initializer (default {d.init_token!r})")
    g = add_optimization_args(p, d, batch_help="images per micro-batch")
    g.add_argument("--flip-p", type=finite_float("--flip-p", low=0, high=1), default=d.flip_p,
                   help=f"horizontal flip probability (default {d.flip_p}; 0 for left/right relations)")
    g = p.add_argument_group("ReVersion losses")
    g.add_argument("--lambda-steer", type=finite_float("--lambda-steer", low=0), default=d.lambda_steer,
                   help=f"steering loss weight (default {d.lambda_steer}; 0 disables it)")
    g.add_argument("--lambda-denoise", type=finite_float("--lambda-denoise", low=0), default=d.lambda_denoise,
                   help=f"denoising loss weight (default {d.lambda_denoise})")
    g.add_argument("--num-positives", type=positive_int("--num-positives"), default=d.num_positives,
                   help=f"basis prepositions per step as positives (default {d.num_positives})")
    g.add_argument("--temperature", type=finite_float("--temperature", low=0, low_open=True), default=d.temperature,
                   help=f"InfoNCE τ (default {d.temperature})")
    g.add_argument("--alpha", type=finite_float("--alpha", low=0, low_open=True, high=1), default=d.alpha,
                   help=f"importance sampling skew, f(t) ∝ 1 − α·cos(πt/T) (default {d.alpha})")
    g.add_argument("--uniform-timesteps", action="store_true",
                   help="sample timesteps uniformly (ablation of relation-focal importance sampling)")
    add_checkpoint_args(p, d)
    add_model_args(p, compile_option=False, backend_default="torch (training runs PyTorch SDPA)")
    p.set_defaults(func=run)


def run(args) -> None:
    from ..train.reversion import ReVersionConfig, load_exemplars, train
    from .common import load_engine

    cfg = ReVersionConfig(
        token=args.token, init_token=args.init_token, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, weight_decay=args.weight_decay, num_positives=args.num_positives,
        temperature=args.temperature, lambda_steer=args.lambda_steer, lambda_denoise=args.lambda_denoise,
        importance_sampling=not args.uniform_timesteps, alpha=args.alpha, resolution=args.resolution,
        flip_p=args.flip_p, mixed_precision=args.mixed_precision, seed=args.seed,
        checkpoint_every=args.checkpoint_every, resume=args.resume,
        progress=False if args.no_progress else None).validate()
    output_folder(args.out)
    load_exemplars(args.data)  # fail on bad data before loading the model
    engine = load_engine(args, dtype=args.dtype or "fp32", backend=args.backend or "torch")
    result = train(engine, args.data, args.out, cfg)
    last = result.losses[-1] if result.losses else None
    tail = f" (final denoise {last['denoise']:.4f}, steer {last['steer']:.4f})" if last else ""
    if last and not cfg.lambda_steer:
        tail = f" (final denoise {last['denoise']:.4f}, steering off)"
    print(f"wrote {result.path}: {result.token} after {cfg.steps} steps{tail}")
