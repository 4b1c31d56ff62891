"""Prometheus metrics of one server: the scheduler's ``stats()`` read at each scrape, plus the HTTP layer's own
counters. One ``CollectorRegistry`` per app, so several apps in one process (tests, Ray replicas) never share
series.

Series (``dreamfuse_`` prefix):

- ``queue_depth``, ``running_requests``, ``ready``: gauges.
- ``requests_completed_total{kind}``, ``requests_cancelled_total``, ``requests_timed_out_total``,
  ``requests_failed_total``, ``requests_rejected_total``, ``unet_calls_total``, ``images_total``: counters
  (images/s is ``rate(dreamfuse_images_total[1m])``).
- ``unet_rows_per_call``: a histogram of the rows each UNet call carried (the batching at work). The scheduler
  keeps only its recent calls; each scrape adds the calls made since the previous one (all of them unless more
  than the scheduler's window happened in between).
- ``step_seconds{quantile}``, ``request_seconds{kind,quantile}``: gauges of the quantiles over the scheduler's
  recent window (a summary's sliding-window quantiles), with ``_count`` of that window.
- ``http_requests_total{route,status}``, ``http_client_disconnects_total``: the HTTP layer's counters.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
QUANTILES = (0.5, 0.9, 0.95, 0.99)


def quantile(values, q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation, as numpy's default); nan when empty."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class _SchedulerCollector:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        self._lock = threading.Lock()
        self._calls_seen = 0
        self._bucket_counts = [0] * len(ROW_BUCKETS)  # non-cumulative; +Inf is the rest
        self._over = 0
        self._rows_sum = 0

    def _observe_rows(self, unet_calls: int, recent: list[int]) -> None:
        with self._lock:
            new = max(0, unet_calls - self._calls_seen)
            self._calls_seen = max(self._calls_seen, unet_calls)
            for rows in recent[len(recent) - min(new, len(recent)):]:
                self._rows_sum += rows
                for i, bound in enumerate(ROW_BUCKETS):
                    if rows <= bound:
                        self._bucket_counts[i] += 1
                        break
                else:
                    self._over += 1

    def collect(self):
        s = self.scheduler.stats()
        yield GaugeMetricFamily("dreamfuse_ready", "1 when the model is loaded and warmed up",
                                value=1.0 if getattr(self.scheduler, "ready", False) else 0.0)
        yield GaugeMetricFamily("dreamfuse_queue_depth", "requests admitted and waiting for their first step",
                                value=s.get("queue_depth", 0))
        yield GaugeMetricFamily("dreamfuse_running_requests", "requests being stepped",
                                value=s.get("running", 0))
        done = CounterMetricFamily("dreamfuse_requests_completed", "requests finished with images, by kind",
                                   labels=["kind"])
        for kind, count in sorted(s.get("completed", {}).items()):
            done.add_metric([kind], count)
        yield done
        for key, text in (("cancelled", "requests cancelled (client, DELETE, disconnect or shutdown)"),
                          ("timed_out", "requests dropped at their deadline"),
                          ("failed", "requests failed (the reason is in the job)"),
                          ("rejected", "submissions refused because the admission queue was full")):
            yield CounterMetricFamily(f"dreamfuse_requests_{key}", text, value=s.get(key, 0))
        yield CounterMetricFamily("dreamfuse_unet_calls", "batched UNet calls", value=s.get("unet_calls", 0))
        yield CounterMetricFamily("dreamfuse_images", "images generated", value=s.get("images", 0))

        self._observe_rows(s.get("unet_calls", 0), list(s.get("rows_per_call", [])))
        with self._lock:
            cumulative, total = [], 0
            for bound, count in zip(ROW_BUCKETS, self._bucket_counts):
                total += count
                cumulative.append((str(bound), total))
            cumulative.append(("+Inf", total + self._over))
            rows_sum = self._rows_sum
        yield HistogramMetricFamily("dreamfuse_unet_rows_per_call", "rows carried by each UNet call",
                                    buckets=cumulative, sum_value=rows_sum)

        steps = list(s.get("step_seconds", []))
        g = GaugeMetricFamily("dreamfuse_step_seconds", "scheduler step latency quantiles over the recent window",
                              labels=["quantile"])
        for q in QUANTILES:
            if steps:
                g.add_metric([str(q)], quantile(steps, q))
        yield g
        yield GaugeMetricFamily("dreamfuse_step_seconds_count", "steps in the recent window", value=len(steps))
        g = GaugeMetricFamily("dreamfuse_request_seconds",
                              "request latency (submit to done) quantiles over the recent window, by kind",
                              labels=["kind", "quantile"])
        counts = GaugeMetricFamily("dreamfuse_request_seconds_count", "requests in the recent window, by kind",
                                   labels=["kind"])
        for kind, values in sorted(s.get("request_seconds", {}).items()):
            values = list(values)
            counts.add_metric([kind], len(values))
            for q in QUANTILES:
                if values:
                    g.add_metric([kind, str(q)], quantile(values, q))
        yield g
        yield counts


class ServerMetrics:
    """The registry of one app: the scheduler's series plus the HTTP counters."""

    def __init__(self, scheduler):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SchedulerCollector(scheduler))
        self.http_requests = Counter("dreamfuse_http_requests", "HTTP requests answered, by route and status",
                                     ["route", "status"], registry=self.registry)
        self.disconnects = Counter("dreamfuse_http_client_disconnects",
                                   "clients that left before their job finished (the job is cancelled)",
                                   registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
