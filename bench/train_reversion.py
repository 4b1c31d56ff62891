"""ReVersion training step: steps/s and peak memory, full loss vs denoising loss only (λsteer = 0).

The steering loss adds a few hundred dot products on the token-embedding table per step; this measures what
that costs next to the UNet forward + backward, as a ratio measured side by side in one run.

    python -m bench.train_reversion                 # tiny model, default device
    python -m bench.train_reversion --model ./stable-diffusion-v1-5 --resolution 512 --device cuda
    python -m bench.train_reversion --model random-sd15 --resolution 512 --device cuda   # SD-sized, random weights

Each configuration is its own training session, so the two are timed one after the other (not interleaved);
time cells read ``median / min`` of ``--iters`` steps.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps (reset per configuration); on
CPU the process's peak resident set size (``resource.getrusage``), which only grows: read the CPU column as
"peak so far" (the denoise-only configuration runs first).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench._util import add_trainer_args, hardware, print_table, time_step_with_peak, to_json, trainer_engine


def _make_data(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    table = {}
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
        table[f"{i}.png"] = ["cat {} box", "an orange cat {} a black wooden box, with green trees in the background"]
    (root / "text.json").write_text(json.dumps(table))
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.train_reversion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (default), 'random-sd15', a diffusers folder or a "
                   ".safetensors file")
    add_trainer_args(p, batch_size=2, batch_help="images per step (default 2, the paper's)")
    args = p.parse_args(argv)

    from dreamfuse.engine.train.reversion import ReVersionConfig, load_exemplars, training_session

    engine = trainer_engine(args)
    size = args.resolution or engine.default_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data").mkdir()
        data = _make_data(Path(tmp) / "data", 4, size)
        exemplars = load_exemplars(data)
        results = {}
        for name, lam in (("denoise only (λsteer=0)", 0.0), ("ReVersion (λsteer=0.01)", 0.01)):
            # grad_accum=1: one micro-batch per timed step (the official recipe accumulates 4)
            cfg = ReVersionConfig(batch_size=args.batch_size, grad_accum=1, resolution=size, lambda_steer=lam,
                                  mixed_precision=args.mixed_precision, checkpoint_every=0, progress=False)
            with training_session(engine, exemplars, Path(tmp) / "out", cfg) as trainer:
                ms, mb = time_step_with_peak(trainer.train_step, device=engine.device, warmup=args.warmup,
                                             iters=args.iters)
                results[name] = (ms, mb)
        base_ms = results["denoise only (λsteer=0)"][0]
        for name, (ms, mb) in results.items():
            rows.append([name, ms, 1e3 / ms, ms / base_ms, mb])
    title = (f"ReVersion train step — {args.model}, {size}×{size}, batch {args.batch_size}, "
             f"mixed precision {args.mixed_precision}, {hardware(engine.device)}")
    print_table(title, ["configuration", "ms/step", "steps/s", "time vs denoise-only", "peak MiB"], rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"title": title, "rows": rows}, indent=1, default=to_json))


if __name__ == "__main__":
    main()
