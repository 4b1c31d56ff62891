"""``dreamfuse train <method>``: the trainers (eager PyTorch). Only the method being run is imported."""

from __future__ import annotations

import argparse
import importlib

from .common import finite_float, multiple_of_8, non_negative_int, positive_int, seed_int

METHODS = {
    "reversion": ("train_reversion", "ReVersion: learn a relation token <R> from exemplar images"),
    "patchdpo": ("train_patchdpo", "PatchDPO: patch-quality-weighted fine-tuning of an IP-Adapter(-Plus)"),
}


def register(sub, name: str, help_: str, rest: list[str]) -> None:
    from . import first_positional

    p = sub.add_parser(name, help=help_,
                       description="Train what the inference engine uses: a ReVersion relation token, "
                                   "or PatchDPO-tuned IP-Adapter weights.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = p.add_subparsers(dest="method", metavar="METHOD")
    methods.required = True
    chosen = first_positional(rest)
    for method, (module, method_help) in METHODS.items():
        if method == chosen:
            importlib.import_module(f"{__package__}.{module}").register(methods, method, method_help)
        else:
            methods.add_parser(method, help=method_help)


def add_optimization_args(p, d, *, batch_help: str, max_batch: int):
    """The options every trainer shares (steps, AdamW, micro-batching, precision, seed, resolution), with defaults
    from the trainer's config ``d``; returns the argument group so the trainer can add its own. ``max_batch``: the
    trainer's largest ``batch_size`` (from the engine's ``limits.max_images``, as its config checks it)."""
    from ..train.common import MAX_RESOLUTION, MIXED_PRECISION

    g = p.add_argument_group("optimization")
    g.add_argument("--steps", "--max-steps", dest="steps", type=positive_int("--steps"), default=d.steps,
                   help=f"optimizer steps to train for (default {d.steps})")
    g.add_argument("--lr", type=finite_float("--lr", low=0, low_open=True), default=d.lr,
                   help=f"AdamW learning rate (default {d.lr:g})")
    g.add_argument("--batch-size", type=positive_int("--batch-size", max_batch, "limits.max_images"),
                   default=d.batch_size,
                   help=f"{batch_help} (default {d.batch_size})")
    g.add_argument("--grad-accum", type=positive_int("--grad-accum"), default=d.grad_accum,
                   help=f"micro-batches per optimizer step (default {d.grad_accum})")
    g.add_argument("--weight-decay", type=finite_float("--weight-decay", low=0), default=d.weight_decay,
                   help=f"AdamW weight decay (default {d.weight_decay:g})")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=d.mixed_precision,
                   help="autocast dtype: auto = bf16/fp16 on CUDA, fp32 on CPU (default auto)")
    g.add_argument("--seed", type=seed_int(), default=d.seed, help=f"training seed (default {d.seed})")
    g.add_argument("--resolution", type=multiple_of_8("--resolution", MAX_RESOLUTION, "limits.max_pixels"),
                   default=None, help=f"training image size, a multiple of 8 up to {MAX_RESOLUTION} (default: the "
                                      "model's)")
    return g


def add_checkpoint_args(p, d) -> None:
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-every", type=non_negative_int("--checkpoint-every"), default=d.checkpoint_every,
                   help=f"checkpoint every N steps into OUT/checkpoints, 0 = never (default {d.checkpoint_every})")
    g.add_argument("--resume", default=None, metavar="latest|FILE",
                   help="continue from a checkpoint ('latest' = newest in OUT/checkpoints, if any); the "
                        "hyper-parameters must match the checkpoint's (a mismatch is listed)")
