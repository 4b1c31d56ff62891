"""Timing and table helpers shared by the benchmark scripts.

Every benchmark measures its baseline in the same run and prints ratios: these machines are noisy,
so only side-by-side numbers mean anything; absolute times count only on a GPU.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], *, device: torch.device | str, warmup: int = 3, iters: int = 10,
           min_time_s: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` calls, synchronizing the device
    around every call. On CUDA, CUDA events time the calls; ``min_time_s`` extends ``iters`` until that
    much time was measured (useful for sub-millisecond kernels)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    total = 0.0
    cuda = torch.device(device).type == "cuda"
    while len(times) < iters or total < min_time_s * 1e3:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        total += ms
        if len(times) > 10_000:
            break
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak device memory (MiB) allocated while running ``fn`` once on CUDA; None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_step_with_peak(step: Callable[[], object], *, device: torch.device | str, warmup: int,
                        iters: int) -> tuple[float, float]:
    """(median ms of ``step()``, peak memory MiB): on CUDA the peak allocated since this call started; on CPU the
    process's peak resident set so far (it only grows, so compare configurations run in one process with care)."""
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
    ms = timeit(step, device=device, warmup=warmup, iters=iters)
    if torch.device(device).type == "cuda":
        return ms, torch.cuda.max_memory_allocated() / 2**20
    return ms, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def hardware(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return f"{name}, torch {torch.__version__}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table (so it pastes straight into bench/RESULTS.md)."""
    def fmt(x: object) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return "-" if x is None else str(x)

    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def add_trainer_args(p, *, batch_size: int, batch_help: str) -> None:
    """The options both trainer benchmarks take (device, size, batch, precision, timing, threads, JSON out)."""
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resolution", type=int, default=None, help="training image size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
                   help="autocast (default auto: bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--iters", type=int, default=10, help="timed steps per configuration (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the table rows as JSON to this file")


def trainer_engine(args):
    """The fp32, torch-backend engine a trainer benchmark times (``--threads`` applied first)."""
    from dreamfuse.engine.config import EngineConfig
    from dreamfuse.engine.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    return Engine.from_pretrained(args.model, EngineConfig(device=args.device, dtype="fp32", backend="torch",
                                                           progress=False))
