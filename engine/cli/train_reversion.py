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

defaults (the official code's run; changed from earlier dreamfuse versions):
  --recipe official   lr 2e-3 (2.5e-4 scaled by batch 2 x accumulation 4), batch 2, accumulation 4:
                      8 images per optimizer step, 3000 steps
  --recipe paper      the paper's literal lr 2.5e-4 (unscaled), batch 2, no accumulation
  --lr/--batch-size/--grad-accum given explicitly override the recipe.
  --flip-p 0          no horizontal flip (official: a flip "might affect the relation"); images are resized
                      whole to the training resolution (no centre crop)
  --num-positives 4   basis prepositions per image (8 per micro-batch of 2, the paper's 8)
  --negatives tokens  steering negatives = caption token ids that are not stop words, prepositions, special
                      tokens or <R> (BPE pieces and punctuation included), as the official code

examples:
  dreamfuse train reversion --data ./painted_on --out ./painted_on-out --max-steps 20   # tiny model, a minute
  dreamfuse train reversion --model ./stable-diffusion-v1-5 --data ./painted_on --out ./out --resume latest
  dreamfuse generate --relation ./out/learned_embeds.bin --prompt "cat <R> wall" --out cat.png
  torchrun --nproc_per_node 2 -m dreamfuse.engine.cli train reversion --model ./stable-diffusion-v1-5 \\
      --data ./painted_on --out ./out --batch-size 1      # 2 GPUs x batch 1 x accumulation 4 = 8 images per step

several GPUs / machines: run the same command under torchrun or accelerate launch (one process per GPU);
--batch-size is per process, the effective batch (printed at start) is batch x accumulation x processes; rank 0
writes OUT (put it on a filesystem every machine sees).
"""


def register(sub, name: str, help_: str) -> None:
    from ..train.reversion import MAX_BATCH, NEGATIVE_MODES, RECIPES, ReVersionConfig

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
    g = add_optimization_args(p, d, batch_help="images per micro-batch", max_batch=MAX_BATCH)
    g.add_argument("--recipe", choices=tuple(RECIPES), default="official",
                   help="lr/batch/accumulation defaults: official = lr 2e-3 (2.5e-4 x batch 2 x accumulation 4), "
                        "batch 2, accumulation 4 (default); paper = lr 2.5e-4, batch 2, accumulation 1. Explicit "
                        "--lr/--batch-size/--grad-accum override it")
    p.set_defaults(**{k: None for k in RECIPES["official"]})  # None = "from the recipe" (config_from_args)
    for action in p._actions:  # the shared options' help states one default; here it comes from the recipe
        if action.dest in RECIPES["official"]:
            official, paper = (RECIPES[r][action.dest] for r in ("official", "paper"))
            action.help = (f"{action.help.split(' (default')[0]} (default from --recipe: official {official:g}, "
                           f"paper {paper:g})")
    g.add_argument("--flip-p", type=finite_float("--flip-p", low=0, high=1), default=d.flip_p,
                   help=f"horizontal flip probability (default {d.flip_p:g}, as the official code: a flip may "
                        "change the relation; images are resized whole, no crop)")
    g = p.add_argument_group("ReVersion losses")
    g.add_argument("--lambda-steer", type=finite_float("--lambda-steer", low=0), default=d.lambda_steer,
                   help=f"steering loss weight (default {d.lambda_steer}; 0 disables it)")
    g.add_argument("--lambda-denoise", type=finite_float("--lambda-denoise", low=0), default=d.lambda_denoise,
                   help=f"denoising loss weight (default {d.lambda_denoise})")
    g.add_argument("--num-positives", type=positive_int("--num-positives"), default=d.num_positives,
                   help=f"basis prepositions drawn per image as steering positives (default {d.num_positives}, "
                        "the official run's: 8 per micro-batch of 2)")
    g.add_argument("--negatives", choices=NEGATIVE_MODES, default=d.negatives,
                   help="steering negatives: tokens = caption token ids that are not stop words, prepositions, "
                        "special tokens or <R>, BPE pieces and punctuation included (official code, default); "
                        "words = content words, each the mean of its token rows")
    g.add_argument("--temperature", type=finite_float("--temperature", low=0, low_open=True), default=d.temperature,
                   help=f"InfoNCE τ (default {d.temperature})")
    g.add_argument("--alpha", type=finite_float("--alpha", low=0, low_open=True, high=1), default=d.alpha,
                   help=f"importance sampling skew, f(t) ∝ 1 − α·cos(πt/T) (default {d.alpha})")
    g.add_argument("--uniform-timesteps", action="store_true",
                   help="sample timesteps uniformly (ablation of relation-focal importance sampling)")
    add_checkpoint_args(p, d)
    add_model_args(p, compile_option=False, backend_default="torch (training runs PyTorch SDPA)")
    p.set_defaults(func=run)


def config_from_args(args):
    """The :class:`ReVersionConfig` the options describe: the ``--recipe``'s lr/batch/accumulation, unless given
    explicitly (validated)."""
    from ..train.reversion import ReVersionConfig

    explicit = {k: getattr(args, k) for k in ("lr", "batch_size", "grad_accum") if getattr(args, k) is not None}
    return ReVersionConfig.from_recipe(
        args.recipe, **explicit, token=args.token, init_token=args.init_token, steps=args.steps,
        weight_decay=args.weight_decay, num_positives=args.num_positives, negatives=args.negatives,
        temperature=args.temperature, lambda_steer=args.lambda_steer, lambda_denoise=args.lambda_denoise,
        importance_sampling=not args.uniform_timesteps, alpha=args.alpha, resolution=args.resolution,
        flip_p=args.flip_p, mixed_precision=args.mixed_precision, seed=args.seed,
        checkpoint_every=args.checkpoint_every, resume=args.resume,
        progress=False if args.no_progress else None).validate()


def run(args) -> None:
    from ..train.distributed import env_context, shutdown

    try:
        _run(args, env_context())
    finally:
        shutdown()


def _run(args, env) -> None:
    from ..train.distributed import rank_device
    from ..train.reversion import check_resume, load_exemplars, train
    from .common import load_engine

    cfg = config_from_args(args)
    if not env.is_main:  # under torchrun / accelerate launch: rank 0 alone shows progress and prints
        args.no_progress = True
    args.device = rank_device(args.device, env)  # one GPU per process
    output_folder(args.out)
    load_exemplars(args.data)  # fail on bad data before loading the model
    check_resume(cfg, args.out, env.world_size)  # and on a bad checkpoint (train() reads it again: cheap)
    engine = load_engine(args, dtype=args.dtype or "fp32", backend=args.backend or "torch")
    result = train(engine, args.data, args.out, cfg, log=lambda line: print(line, flush=True))
    last = result.losses[-1] if result.losses else None
    tail = f" (final denoise {last['denoise']:.4f}, steer {last['steer']:.4f})" if last else ""
    if last and not cfg.lambda_steer:
        tail = f" (final denoise {last['denoise']:.4f}, steering off)"
    if env.is_main:
        print(f"wrote {result.path}: {result.token} after {cfg.steps} steps{tail}")
