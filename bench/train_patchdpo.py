"""PatchDPO training step: steps/s and peak memory, IP layers only vs IP layers + image projection.

One step runs the UNet forward + backward on ``[ref; gen]`` (twice the pairs per micro-batch); training the
image projection adds its backward (the Plus Resampler). Ratios measured side by side in one run.

    python -m bench.train_patchdpo                       # tiny model, tiny IP-Adapter-Plus, tiny ViT backbone
    python -m bench.train_patchdpo --model tiny-xl       # the SDXL path (pooled embeddings + time ids per row)
    python -m bench.train_patchdpo --model random-sdxl --resolution 1024 --device cuda   # SDXL-sized, random weights
    python -m bench.train_patchdpo --model ./sd15 --ip-adapter ip-adapter-plus_sd15.bin \\
        --image-encoder ./image_encoder --backbone ./dinov2-base --resolution 512 --device cuda

Each configuration is its own training session, so the two are timed one after the other (not interleaved);
time cells read ``median / min`` of ``--iters`` steps.

Data parallelism: ``--nproc N`` times the IP-layers configuration in N processes (torch.distributed + DDP; gloo
on CPU, NCCL on CUDA, one GPU per process) against 1 process, each with ``--batch-size`` pairs per process, so the
global batch grows with N (weak scaling). Scaling = pairs/s of N processes over pairs/s of 1; efficiency =
scaling / N. On CPU every process gets ``--threads`` threads (default: the cores / N), and a row with 1 process on
all N·threads threads shows what the same cores do without data parallelism. Each row is its own set of
processes, timed one after the other.

    python -m bench.train_patchdpo --nproc 2                                    # CPU, gloo
    python -m bench.train_patchdpo --nproc 8 --model random-sdxl --resolution 1024 --batch-size 4 --device cuda

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps (reset per configuration); on
CPU the process's peak resident set size, which only grows: read the CPU column as "peak so far".
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench._util import add_trainer_args, hardware, print_table, time_step_with_peak, to_json, trainer_engine


def _make_data(root: Path, n: int, gens: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"s{i}"
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / "ref.png")
        for g in range(gens):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"gen{g}.png")
        (d / "prompt.txt").write_text("a photo of a toy on a wooden table")
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.train_patchdpo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (default), 'tiny-xl', 'random-sd15', 'random-sdxl', a "
                   "diffusers folder or a .safetensors file")
    p.add_argument("--ip-adapter", default=None, help="IP-Adapter weights (default: the tiny IP-Adapter-Plus)")
    p.add_argument("--image-encoder", default=None, help="its image encoder folder (with --ip-adapter)")
    p.add_argument("--backbone", default=None, help="patch-quality backbone folder (default: a tiny random ViT)")
    add_trainer_args(p, batch_size=1, batch_help='pairs per step (default 1: a UNet batch of 2)')
    p.add_argument("--nproc", type=int, default=None,
                   help="data-parallel scaling: N processes against 1 (per-process batch --batch-size)")
    args = p.parse_args(argv)
    if args.nproc is not None:
        if args.nproc < 1:
            p.error("--nproc: must be >= 1")
        return scaling(args)

    from dreamfuse.engine.patch_quality import quality_maps
    from dreamfuse.engine.train.patchdpo import PatchDPOConfig, training_session

    engine, estimator = _engine_and_estimator(args)
    size = args.resolution or engine.default_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _make_data(Path(tmp) / "data", 2, 2, size)
        samples = quality_maps(data, estimator, size // engine.vae_scale_factor, Path(tmp) / "cache")
        results = {}
        for name, proj in (("IP layers (to_k_ip/to_v_ip)", False), ("+ image projection", True)):
            cfg = PatchDPOConfig(batch_size=args.batch_size, resolution=size, train_projection=proj,
                                 mixed_precision=args.mixed_precision, checkpoint_every=0, progress=False)
            with training_session(engine, samples, Path(tmp) / "out", cfg, size) as trainer:
                ms, mb = time_step_with_peak(trainer.train_step, device=engine.device, warmup=args.warmup,
                                             iters=args.iters)
                results[name] = (ms, mb, sum(t.numel() for t in trainer.params.values()))
        base_ms = next(iter(results.values()))[0]
        for name, (ms, mb, n) in results.items():
            rows.append([name, n, ms, 1e3 / ms, ms / base_ms, mb])
    title = (f"PatchDPO train step — {args.model}, {size}×{size}, {args.batch_size} pair(s)/step, "
             f"mixed precision {args.mixed_precision}, {hardware(engine.device)}")
    print_table(title, ["configuration", "trained params", "ms/step", "steps/s", "time vs IP layers", "peak MiB"],
                rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"title": title, "rows": rows}, indent=1, default=to_json))


def _engine_and_estimator(args):
    """The engine with its IP-Adapter (the given one, or the tiny Plus adapter) and the patch-quality estimator
    (the given backbone, or a seeded tiny ViT), both on the engine's device."""
    from dreamfuse.engine.ip_adapter import build_tiny_ip_adapter
    from dreamfuse.engine.patch_quality import PatchQualityEstimator
    from transformers import ViTConfig, ViTModel

    engine = trainer_engine(args)
    if args.ip_adapter:
        engine.load_ip_adapter(args.ip_adapter, args.image_encoder)
    else:
        engine.load_ip_adapter(build_tiny_ip_adapter(engine, plus=True))
    if args.backbone:
        estimator = PatchQualityEstimator(args.backbone)
    else:
        torch.manual_seed(0)
        estimator = PatchQualityEstimator(ViTModel(ViTConfig(
            image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64), add_pooling_layer=False))
    estimator.backbone.to(engine.device)
    return engine, estimator


# ------------------------------------------------------------------------------------------- data parallel
def _session(args, root: Path, dist):
    """The engine, estimator-derived samples and PatchDPO config of one process of a scaling run."""
    from dreamfuse.engine.train.patchdpo import PatchDPOConfig, shared_quality_maps

    engine, estimator = _engine_and_estimator(args)
    size = args.resolution or engine.default_size
    samples = shared_quality_maps(root / "data", estimator, size // engine.vae_scale_factor, root / "cache", dist)
    cfg = PatchDPOConfig(batch_size=args.batch_size, resolution=size, mixed_precision=args.mixed_precision,
                         checkpoint_every=0, progress=False)
    return engine, samples, cfg, size


def _scaling_worker(rank: int, world: int, port: int, args, root: Path, queue) -> None:
    """One process of a scaling run: times ``--iters`` steps (every rank the same number: they are collectives);
    rank 0 reports."""
    import os

    from dreamfuse.engine.train import distributed
    from dreamfuse.engine.train.patchdpo import training_session

    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        args.device = distributed.rank_device(args.device or ("cuda" if torch.cuda.is_available() else None))
    try:
        dist = distributed.setup(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        engine, samples, cfg, size = _session(args, root, dist)
        with training_session(engine, samples, root / "out", cfg, size, dist) as trainer:
            ms, mb = time_step_with_peak(trainer.train_step, device=engine.device, warmup=args.warmup,
                                         iters=args.iters)
        if dist.is_main:
            queue.put((ms, mb, hardware(engine.device), size))
    finally:
        distributed.shutdown()


def _run_processes(args, root: Path, nproc: int, threads: int | None):
    import copy

    import torch.multiprocessing as mp
    from dreamfuse.engine.train.distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    a = copy.copy(args)
    a.threads = threads
    mp.start_processes(_scaling_worker, args=(nproc, free_port(), a, root, queue), nprocs=nproc, start_method="spawn")
    return queue.get()


def scaling(args) -> None:
    """``--nproc N``: steps/s and pairs/s of N data-parallel processes against 1."""
    import os

    n = args.nproc
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda and n > torch.cuda.device_count():
        raise SystemExit(f"--nproc {n}: only {torch.cuda.device_count()} CUDA device(s)")
    threads = args.threads or (None if cuda else max(1, (os.cpu_count() or 1) // n))
    def th(t):
        return "default threads" if t is None else f"{t} thread{'s' if t != 1 else ''}"

    configs = [(f"1 process × {th(threads)}", 1, threads)]
    if not cuda and n > 1:
        configs.append((f"1 process × {th(n * threads)}", 1, n * threads))
    if n > 1:
        configs.append((f"{n} processes × {th(threads)} (DDP)", n, threads))
    rows, base, hw, size = [], None, "", None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _make_data(root / "data", 2, 2, args.resolution or 64)  # random images, resized to the training size
        for name, procs, t in configs:
            ms, mb, hw, size = _run_processes(args, root, procs, t)
            pairs = args.batch_size * procs
            pairs_s = pairs * 1e3 / ms
            base = base or pairs_s
            rows.append([name, procs, pairs, ms, 1e3 / ms, pairs_s, pairs_s / base, pairs_s / base / procs, mb])
    hw = re.sub(r" x\d+ threads", f" ({os.cpu_count()} cores)", hw)
    title = (f"PatchDPO data-parallel train step — {args.model}, {size}×{size}, {args.batch_size} pair(s) per "
             f"process per step, mixed precision {args.mixed_precision}, {hw}")
    print_table(title, ["configuration", "processes", "pairs/step", "ms/step", "steps/s", "pairs/s",
                        "scaling vs 1 process", "efficiency", "peak MiB (rank 0)"], rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"title": title, "rows": rows}, indent=1, default=to_json))


if __name__ == "__main__":
    main()
