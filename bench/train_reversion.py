"""ReVersion training step: steps/s and peak memory, full loss vs denoising loss only (λsteer = 0).

The steering loss adds a few hundred dot products on the token-embedding table per step; this measures what
that costs next to the UNet forward + backward, as a ratio measured side by side in one run.

    python -m bench.train_reversion                 # tiny model, default device
    python -m bench.train_reversion --model ./stable-diffusion-v1-5 --resolution 512 --device cuda
    python -m bench.train_reversion --model random-sd15 --resolution 512 --device cuda   # SD-sized, random weights

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
import torch
from PIL import Image

from bench._util import hardware, print_table, time_step_with_peak


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
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resolution", type=int, default=None, help="training image size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=2, help="images per step (default 2, the paper's)")
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
                   help="autocast (default auto: bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--iters", type=int, default=10, help="timed steps per configuration (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the table rows as JSON to this file")
    args = p.parse_args(argv)

    from dreamfuse.engine.config import EngineConfig
    from dreamfuse.engine.engine import Engine
    from dreamfuse.engine.train.reversion import ReVersionConfig, load_exemplars, training_session

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model, EngineConfig(device=args.device, dtype="fp32", backend="torch",
                                                             progress=False))
    size = args.resolution or engine.default_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data").mkdir()
        data = _make_data(Path(tmp) / "data", 4, size)
        exemplars = load_exemplars(data)
        results = {}
        for name, lam in (("denoise only (λsteer=0)", 0.0), ("ReVersion (λsteer=0.01)", 0.01)):
            cfg = ReVersionConfig(batch_size=args.batch_size, resolution=size, lambda_steer=lam,
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
        Path(args.out).write_text(json.dumps({"title": title, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
