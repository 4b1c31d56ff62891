"""What a denoising step costs around the UNet: the pipelines' and the step scheduler's own overhead, measured with a
zero-cost UNet.

    python -m bench.overhead                         # tiny, CPU: the whole table
    python -m bench.overhead --requests 1 16 --steps-long 60
    python -m bench.overhead --model random-sd15 --size 512 --device cuda   # on a GPU (also counts kernel launches)

The UNet's ``forward`` is replaced by ``zeros_like(sample)`` for the whole run (one model: diffusers' pipeline is
built on the engine's own modules), so what remains is everything else a step does: CFG, the sampler's update,
timesteps, row merging and splitting, events, bookkeeping. Per step: a call of ``--steps-long`` steps minus a call
of ``--steps-short`` steps, divided by the difference (the prompt encoding, the initial latents and VAE decoding
cancel out; ``output_type="latent"``), interleaved, median / min over ``--iters`` rounds.

Rows:

* diffusers ``StableDiffusionPipeline`` (or the XL one), batch 1, DDIM — the baseline of the ratios;
* ``engine.text2img``, batch 1 and batch 8 (per image: / 8), DDIM; ``engine.compose`` with two segments;
  ``engine.personalize`` with AMA off (``ama_start`` past the last step): the pipelines' loops;
* the step scheduler with N = 1, 4, 16, 64 concurrent text2img requests (each 1 image, CFG 7.5, DDIM): seconds per
  *tick* (one step of every running request) and per request-step, from the ticks of the run's steady part (all N
  requests running): how the tick grows with the number of requests.

On CUDA, ``torch.profiler`` also counts the CUDA kernel launches of one tick outside the UNet.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from dreamfuse.engine import Engine, EngineConfig

from bench._util import compare, hardware, print_table


def zero_unet(engine) -> None:
    """Make the engine's UNet cost nothing: its forward returns zeros shaped like the sample."""

    def forward(sample, timestep, encoder_hidden_states=None, *args, return_dict=True, **kwargs):
        out = torch.zeros_like(sample)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    engine.unet.forward = forward


def diffusers_pipe(engine):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sched = DDIMScheduler.from_config(engine.scheduler.config)
    if engine.is_xl:
        return StableDiffusionXLPipeline(vae=engine.vae, text_encoder=engine.text_encoder,
                                         text_encoder_2=engine.text_encoder_2, tokenizer=engine.tokenizer,
                                         tokenizer_2=engine.tokenizer_2, unet=engine.unet, scheduler=sched)
    return StableDiffusionPipeline(vae=engine.vae, text_encoder=engine.text_encoder, tokenizer=engine.tokenizer,
                                   unet=engine.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def per_step(fns: dict, long: int, short: int, device, iters: int) -> dict:
    """``{name: Timing per step, ms}`` from calls of ``long`` and ``short`` steps timed interleaved."""
    calls = {}
    for name, fn in fns.items():
        calls[f"{name}@long"] = (lambda fn=fn: fn(long))
        calls[f"{name}@short"] = (lambda fn=fn: fn(short))
    t = compare(calls, device=device, warmup=1, iters=iters)
    return {name: (t[f"{name}@long"] - t[f"{name}@short"]) / (long - short) for name in fns}


def scheduler_ticks(engine, n: int, steps: int, size: int) -> tuple[float, float, int]:
    """Median seconds per tick while all ``n`` requests run, its minimum, and the number of such ticks."""
    from dreamfuse.engine.server import StepScheduler

    s = StepScheduler(engine, max_batch_rows=max(16, 2 * n), max_queue=max(64, n))
    try:
        s.submit("text2img", prompt="warm", steps=2, seed=0, height=size, width=size).wait()
        jobs = [s.submit("text2img", prompt=f"p{i}", steps=steps, seed=i, height=size, width=size)
                for i in range(n)]
        while not all(j.done() for j in jobs):  # polled, as the HTTP layer does: no thread woken per event
            time.sleep(0.05)
        ticks = s.stats()["recent_step_seconds"]
    finally:
        s.shutdown(0)
    # the steady part: ticks in which every request runs (drop the admission tick and the decode ticks)
    steady = ticks[-(steps + 1):-2] if len(ticks) > steps + 2 else ticks
    return statistics.median(steady), min(steady), len(steady)


def launches_per_tick(engine, n: int, size: int) -> int | None:
    """CUDA kernels launched by one tick of ``n`` requests with the zero UNet (None off CUDA)."""
    if engine.device.type != "cuda":
        return None
    from dreamfuse.engine.server import StepScheduler
    from torch.profiler import ProfilerActivity, profile

    s = StepScheduler(engine, max_batch_rows=max(16, 2 * n), max_queue=max(64, n))
    try:
        jobs = [s.submit("text2img", prompt=f"p{i}", steps=40, seed=i, height=size, width=size) for i in range(n)]
        while min(j.step for j in jobs) < 5:
            time.sleep(0.001)
        before = s.stats()["unet_calls"]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            while s.stats()["unet_calls"] < before + 10:
                time.sleep(0.0005)
        for j in jobs:
            j.cancel()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return round(len(kernels) / 10)
    finally:
        s.shutdown(0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    ap.add_argument("--steps-long", type=int, default=110)
    ap.add_argument("--steps-short", type=int, default=10)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--requests", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model, EngineConfig(device=args.device, progress=False))
    zero_unet(engine)
    size = args.size or engine.default_size
    device = engine.device
    pipe = diffusers_pipe(engine)
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    layout = torch.zeros(size, size, 3, dtype=torch.uint8).numpy()
    layout[:, size // 2:] = (0, 0, 255)
    layout[:, : size // 2] = (255, 0, 0)
    segments = {"#ff0000": "a cat", "#0000ff": "a dog"}
    ref = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))
    fns = {
        "diffusers": lambda s: pipe("a cat", num_inference_steps=s, guidance_scale=7.5, height=size, width=size,
                                    generator=gen(), output_type="latent"),
        "text2img": lambda s: engine.text2img("a cat", steps=s, seed=0, height=size, width=size,
                                              output_type="latent"),
        "text2img x8": lambda s: engine.text2img(["a cat"] * 8, steps=s, seed=0, height=size, width=size,
                                                 output_type="latent"),
        "compose": lambda s: engine.compose(layout, segments, prompt="two pets", steps=s, seed=0,
                                            output_type="latent"),
        "personalize (AMA off)": lambda s: engine.personalize("a sks dog", ref, subject_token="sks", steps=s,
                                                              seed=0, ama_start=s, height=size, width=size,
                                                              output_type="latent"),
    }
    t = per_step(fns, args.steps_long, args.steps_short, device, args.iters)
    base = t["diffusers"]
    rows = []
    for name, v in t.items():
        per_image = v / 8 if name == "text2img x8" else v
        rows.append([name, v, per_image if name == "text2img x8" else None, v / base])  # compare(): milliseconds
    print(f"{hardware(device)}, {args.model} {size}x{size}, dtype {engine.dtype}, zero-cost UNet, "
          f"{args.steps_long} - {args.steps_short} steps")
    print_table("per step around the UNet (ms)", ["pipeline", "ms / step", "ms / image-step", "vs diffusers"], rows)
    srows = []
    one = None
    for n in args.requests:
        med, lo, count = scheduler_ticks(engine, n, args.steps_long, size)
        one = one or med
        srows.append([n, med * 1e3, lo * 1e3, med / n * 1e3, med / one, launches_per_tick(engine, n, size), count])
    print_table("step scheduler, per tick (every running request advances one step)",
                ["requests", "ms / tick (median)", "min", "ms / request-step", "vs 1 request",
                 "CUDA launches / tick", "ticks measured"], srows)


if __name__ == "__main__":
    main()
