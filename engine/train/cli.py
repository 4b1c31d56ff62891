"""``dreamfuse train <method>``: each trainer module registers its own subcommand with ``register_cli``."""

from __future__ import annotations

import argparse
import importlib

_TRAINERS = ("dreamfuse.engine.train.reversion", "dreamfuse.engine.train.patchdpo")


def register_cli(sub) -> None:
    p = sub.add_parser("train", help="training paths (eager PyTorch)",
                       description="Train what the inference engine uses: a ReVersion relation token, "
                                   "or PatchDPO-tuned IP-Adapter weights.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    methods = p.add_subparsers(dest="method", metavar="METHOD")
    methods.required = True
    for module in _TRAINERS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register_cli(methods)
