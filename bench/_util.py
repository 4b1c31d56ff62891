"""Timing and table helpers shared by the benchmark scripts.

Every benchmark measures its baseline in the same run and prints ratios: these machines are noisy,
so only side-by-side numbers mean anything; absolute times count only on a GPU. :func:`compare` times the
things compared interleaved, call by call, and reports the median and the minimum of each (:class:`Timing`).
"""

from __future__ import annotations

import dataclasses
import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """Wall times of one function in milliseconds: the median and the minimum of its ``n`` timed calls.

    Arithmetic applies to both figures, so derived columns keep both: ``t / steps``, ``t * 1e-3``,
    ``flops / t`` (a rate: the second figure is then the min-time one, the best rate), ``a / b`` (ratio of
    medians, ratio of minimums), ``a - b``. :func:`print_table` shows a Timing as ``median / min``."""

    median: float
    min: float
    n: int = 0

    def map(self, f: Callable[[float], float]) -> Timing:
        return Timing(f(self.median), f(self.min), self.n)

    def _zip(self, other, f) -> Timing:
        if isinstance(other, Timing):
            return Timing(f(self.median, other.median), f(self.min, other.min), min(self.n, other.n))
        return self.map(lambda x: f(x, other))

    def __add__(self, other):
        return self._zip(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._zip(other, lambda a, b: a - b)

    def __mul__(self, other):
        return self._zip(other, lambda a, b: a * b)

    def __truediv__(self, other):
        return self._zip(other, lambda a, b: a / b)

    __radd__ = __add__
    __rmul__ = __mul__

    def __rsub__(self, other):
        return self.map(lambda x: other - x)

    def __rtruediv__(self, other):
        return self.map(lambda x: other / x)

    def __format__(self, spec: str) -> str:
        return f"{self.median:{spec}} / {self.min:{spec}}"


def _time_call(fn: Callable[[], object], cuda: bool) -> float:
    """One call of ``fn`` in ms; the device is idle before and after (CUDA events time it on the GPU)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def compare(fns: Mapping[str, Callable[[], object]], *, device: torch.device | str, warmup: int = 3,
            iters: int = 10, min_time_s: float = 0.0,
            around: Mapping[str, Callable[[], AbstractContextManager]] | None = None) -> dict[str, Timing]:
    """Time several functions side by side, interleaved: every round calls each of ``fns`` once, in order
    (A B C A B C ...), ``warmup`` untimed rounds first, then at least ``iters`` timed ones. A burst of load from
    other processes on a shared machine then hits every function's calls alike instead of one function's whole
    series; the minimum is the least disturbed call, the median the typical one. The device is synchronized
    around every call (CUDA events time the calls on CUDA). ``min_time_s`` adds rounds until every function has
    run that long in total (for sub-millisecond kernels). ``around[name]()``, when given, is a context manager
    entered around each call of ``fns[name]``, outside its timed region (e.g. swapping attention processors)."""
    around = around or {}
    cuda = torch.device(device).type == "cuda"

    def call(name: str) -> float:
        with around[name]() if name in around else nullcontext():
            sync(device)
            return _time_call(fns[name], cuda)

    for _ in range(warmup):
        for name in fns:
            call(name)
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < iters or min(sum(t) for t in times.values()) < min_time_s * 1e3:
        for name in fns:
            times[name].append(call(name))
        rounds += 1
        if rounds >= 10_000:
            break
    return {name: Timing(statistics.median(t), min(t), len(t)) for name, t in times.items()}


def timeit(fn: Callable[[], object], *, device: torch.device | str, warmup: int = 3, iters: int = 10,
           min_time_s: float = 0.0) -> Timing:
    """:func:`compare` for one function: the median and minimum wall time of ``fn()`` in ms. To compare two
    things, time them together with :func:`compare` (interleaved), not with two calls of this."""
    return compare({"fn": fn}, device=device, warmup=warmup, iters=iters, min_time_s=min_time_s)["fn"]


def to_json(obj):
    """``json.dumps(..., default=to_json)``: a :class:`Timing` as ``{"median": ..., "min": ..., "n": ...}``."""
    if isinstance(obj, Timing):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


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
                        iters: int) -> tuple[Timing, float]:
    """(:class:`Timing` of ``step()``, peak memory MiB): on CUDA the peak allocated since this call started; on CPU
    the process's peak resident set so far (it only grows, so compare configurations run in one process with
    care). One function only: configurations that cannot be interleaved (each its own training session)."""
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
    """Print a Markdown table (so it pastes straight into bench/RESULTS.md). A :class:`Timing` cell reads
    ``median / min``; the table then says so under its title."""
    def num(x: float) -> str:
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"

    def fmt(x: object) -> str:
        if isinstance(x, Timing):
            return f"{num(x.median)} / {num(x.min)}"
        if isinstance(x, float):
            return num(x)
        return "-" if x is None else str(x)

    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n### {title}\n")
    timings = [c for r in rows for c in r if isinstance(c, Timing)]
    if timings:
        n = min(t.n for t in timings)
        more = "+" if n != max(t.n for t in timings) else ""
        print(f"`a / b` cells: median / min of {n}{more} timed calls (ratios and rates: of the medians / of the "
              "mins)\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def add_model_args(p) -> None:
    """The model, device and dtype options every inference benchmark takes."""
    p.add_argument("--model", default="tiny", help="'tiny', 'tiny-xl', 'random-sd15', 'random-sdxl' (random weights, "
                   "real architectures) or a diffusers SD/SDXL folder (default tiny)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default fp16 on CUDA, fp32 on CPU)")


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
