"""LoRA cost per denoising step: unfused (one and two LoRAs) and fused, against the same model without a LoRA.

    python -m bench.lora                                                  # tiny model, CPU-sized
    python -m bench.lora --model random-sd15 --size 256 --steps 2 --iters 3 --rank 16   # SD 1.5 architecture
    python -m bench.lora --model ./sd15 --size 512 --steps 20 --rank 16 --dtype fp16   # on a GPU

The LoRAs are ``build_tiny_lora``'s (seeded random weights, diffusers format) for the chosen model: every attention
projection of the UNet and of the text encoder(s) (a DreamBooth-LoRA's targets) at rank ``--rank``, written to a
temporary folder. One engine: the configurations are timed interleaved, one call each per round (no LoRA, unfused
x1, fused x1, unfused x2), so machine noise hits them alike. After every switch an untimed one-step call refills
the prompt cache (a LoRA change clears it), so the figures are the denoising loop (CFG 7.5, UNet, scheduler);
VAE decoding is excluded (output_type "latent"). Cells: median / min seconds per step over ``--iters`` calls;
ratios: median against "no LoRA" measured in the same run. Load/fuse times are reported separately (first round).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.tiny_adapters import build_tiny_lora

from bench._util import add_model_args, hardware, print_table, sync

CONFIGS = ("no LoRA", "unfused x1", "fused x1", "unfused x2")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--backend", default=None, choices=("triton", "torch"), help="dreamfuse attention backend")
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per call (default 1; 2 UNet rows each)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per call (default 10)")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank, even (default 4)")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per configuration (default 5)")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.steps < 1 or args.batch < 1:
        ap.error("--iters, --steps and --batch must be >= 1")

    eng = Engine.from_pretrained(args.model, EngineConfig(device=args.device, dtype=args.dtype, backend=args.backend,
                                                           progress=False))
    size = args.size or eng.default_size
    prompts = ["a photo of a sks dog"] * args.batch
    common = dict(seed=0, height=size, width=size, guidance_scale=7.5, output_type="latent")
    setup_s: dict[str, float] = {}

    def timed_setup(label, fn):
        sync(eng.device)
        t0 = time.perf_counter()
        fn()
        sync(eng.device)
        setup_s.setdefault(label, time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        files = [build_tiny_lora(eng, Path(tmp) / f"lora{i}.safetensors", seed=i, rank=args.rank) for i in (0, 1)]
        switch = {  # from the previous configuration of a round to this one
            "no LoRA": lambda: eng.unload_lora(),
            "unfused x1": lambda: timed_setup("load (one LoRA)", lambda: eng.load_lora(files[0], name="a")),
            "fused x1": lambda: timed_setup("fuse (one LoRA)", eng.fuse_lora),
            "unfused x2": lambda: (timed_setup("unfuse (one LoRA)", eng.unfuse_lora),
                                   eng.load_lora(files[1], name="b", scale=0.5)),
        }
        times: dict[str, list[float]] = {c: [] for c in CONFIGS}
        for round_ in range(args.iters + 1):  # round 0 is warm-up
            for config in CONFIGS:
                switch[config]()
                eng.text2img(prompts, steps=1, **common)  # refills the prompt cache the switch cleared
                sync(eng.device)
                t0 = time.perf_counter()
                eng.text2img(prompts, steps=args.steps, **common)
                sync(eng.device)
                if round_:
                    times[config].append((time.perf_counter() - t0) / args.steps)
        eng.unload_lora()

    base = statistics.median(times["no LoRA"])
    rows = [[c, statistics.median(t), min(t), statistics.median(t) / base] for c, t in times.items()]
    print(f"# LoRA per-step cost — {hardware(eng.device)}")
    print(f"model={args.model} {size}x{size} dtype={str(eng.dtype).removeprefix('torch.')} "
          f"backend={eng.config.backend} batch={args.batch} (CFG: {2 * args.batch} UNet rows) steps={args.steps} "
          f"rank={args.rank} iters={args.iters}; LoRAs on every UNet/text-encoder attention projection")
    print_table("seconds per denoising step (median / min over iters), ratio vs no LoRA",
                ["configuration", "s/step median", "s/step min", "x no LoRA"], rows)
    print_table("one-off costs (first round)", ["operation", "seconds"], [[k, v] for k, v in setup_s.items()])


if __name__ == "__main__":
    main()
