"""Cumulative histograms of the step scheduler's latencies and batch sizes: plain data (no Prometheus here), fed from
every observation, summable across processes.

A :class:`Histogram` counts observations in fixed buckets from the start of the process. An observation costs a
binary search over ~20 bounds and two additions, so the scheduler records every step, every UNet call and every
request. Counts only grow: a scrape that comes late (or never) loses nothing, and ``rate()`` over any range is exact.
Histograms of the same series add up bucket by bucket, so the Ray ingress sums its replicas' (:func:`sum_stats`) and
Prometheus sums across servers; quantiles come last, from the summed buckets (``histogram_quantile``). Quantiles
computed per process (a summary) can do neither.

:meth:`Histogram.snapshot` is what ``StepScheduler.stats()`` hands out: ``{"bounds", "counts", "sum", "count"}``,
``counts`` per bucket (not cumulative), one more than ``bounds`` (the last: above the largest bound, ``+Inf``).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence

# Upper bounds, inclusive (Prometheus' ``le``). histogram_quantile interpolates linearly inside a bucket, so a
# quantile is only as precise as its bucket is narrow: bounds are ~1.5x apart where diffusion latencies usually fall,
# ~2-2.5x at the ends. Every bucket is a series per label set (x5 request kinds): ~20 is enough.
#
# A scheduler step (tick) is one batched UNet call per group of compatible requests plus the VAE decodes of the
# requests that finished: a few ms (the tiny test model, a small compiled batch), tens of ms for SD1.5 at 512^2 on a
# current GPU, around a second for a full batch of SDXL at 1024^2 or a tick that decodes many large images, tens of
# seconds on a CPU. Hence 1 ms to 60 s, finest over 10 ms - 2.5 s.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# A request is its queue wait plus steps x step time: ~50-300 ms for 1-4 step distilled models (Turbo, LCM), a few
# seconds for 50 steps of SD1.5 alone on a GPU, tens of seconds to minutes under full batching or SDXL, and up to
# tens of minutes on a CPU or behind a long queue. Hence 50 ms to 30 min, finest over 1 s - 2 min. Time to first step
# (queue wait plus one step) uses the same bounds: a request waits for other requests, on their time scale.
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
                   180.0, 300.0, 600.0, 1200.0, 1800.0)
# Rows per UNet call: the engine's compile buckets are powers of two (EngineConfig.batch_buckets), so are these.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

SERIES = {"step_seconds": STEP_BUCKETS, "rows_per_call": ROW_BUCKETS}
"""The scheduler's histograms without labels: ``stats()`` key -> bounds."""
SERIES_BY_KIND = {"request_seconds": REQUEST_BUCKETS, "first_step_seconds": REQUEST_BUCKETS}
"""Its histograms per request kind: ``stats()`` key -> bounds (the value in ``stats()`` is ``{kind: snapshot}``)."""


class Histogram:
    """Counts of observations per bucket since creation, and their sum. Not thread-safe: its owner holds its lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]):
        bounds = tuple(float(b) for b in bounds)
        if not bounds or not all(math.isfinite(b) for b in bounds) or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"bounds: must be finite and strictly increasing, got {bounds!r}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: le is inclusive
        self.sum += value

    def snapshot(self) -> dict:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum, "count": sum(self.counts)}


def merge(snapshots: Iterable[dict | None], bounds: Sequence[float]) -> dict:
    """The sum of histogram snapshots, on ``bounds``: counts add bucket by bucket (None and missing snapshots add
    nothing, so no snapshot at all is an empty histogram). A snapshot on other bounds (a replica of another version)
    has each of its buckets added to the first bucket of ``bounds`` at least as high: ``count`` and ``sum`` stay
    exact and no observation is counted under a bound below its value; only the cumulative counts of the buckets
    in between may be low."""
    total = Histogram(bounds).snapshot()
    for s in snapshots:
        if not s:
            continue
        if s["bounds"] == total["bounds"]:
            total["counts"] = [a + b for a, b in zip(total["counts"], s["counts"])]
        else:
            for upper, count in zip([*s["bounds"], math.inf], s["counts"]):
                total["counts"][bisect_left(total["bounds"], upper)] += count
        total["sum"] += s["sum"]
        total["count"] += s["count"]
    return total


def sum_stats(stats: Sequence[dict]) -> dict:
    """The scheduler histograms (:data:`SERIES`, :data:`SERIES_BY_KIND`) of several ``stats()`` summed: the
    cluster's histograms from its replicas'. Kinds that no replica reports are left out."""
    out: dict = {key: merge((s.get(key) for s in stats), bounds) for key, bounds in SERIES.items()}
    for key, bounds in SERIES_BY_KIND.items():
        kinds = sorted({kind for s in stats for kind in (s.get(key) or {})})
        out[key] = {kind: merge(((s.get(key) or {}).get(kind) for s in stats), bounds) for kind in kinds}
    return out


def cumulative(snapshot: dict) -> list[tuple[float, int]]:
    """``(le, observations <= le)`` for every bound and ``inf``: the Prometheus ``_bucket`` series."""
    out, total = [], 0
    for upper, count in zip([*snapshot["bounds"], math.inf], snapshot["counts"]):
        total += count
        out.append((float(upper), total))
    return out


__all__ = ["REQUEST_BUCKETS", "ROW_BUCKETS", "SERIES", "SERIES_BY_KIND", "STEP_BUCKETS", "Histogram", "cumulative",
           "merge", "sum_stats"]
