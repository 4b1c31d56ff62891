"""Prometheus metrics of one server: the scheduler's ``stats()`` read at each scrape, plus the HTTP layer's own
counters. One ``CollectorRegistry`` per app, so several apps in one process (tests, Ray replicas) never share
series. ``/metrics`` answers OpenMetrics 1.0 to a scraper that asks for it (``Accept:
application/openmetrics-text; version=1.0.0``: Prometheus does), the Prometheus text format otherwise, gzipped when
the scraper accepts it.

Series (``dreamfuse_`` prefix):

- ``queue_depth``, ``running_requests``, ``ready``: gauges.
- ``requests_completed_total{kind}``, ``requests_cancelled_total``, ``requests_timed_out_total``,
  ``requests_failed_total``, ``requests_rejected_total``, ``unet_calls_total``, ``images_total``: counters
  (images/s is ``rate(dreamfuse_images_total[1m])``).
- Histograms (``_bucket{le}``, ``_sum``, ``_count``), cumulative since the process started and fed from every
  observation (:mod:`~dreamfuse.engine.server.histogram`: why these buckets), so ``rate()`` over any range is exact
  and they sum across servers and replicas (the Ray ingress sums its replicas'):

  - ``step_seconds``: every scheduler step (tick: the batched UNet calls and VAE decodes of all running requests).
  - ``unet_rows_per_call``: the rows each UNet call carried (the batching at work).
  - ``request_seconds{kind}``: submission to done, of the requests that finished with images.
  - ``time_to_first_step_seconds{kind}``: submission to the end of the request's first denoising step (its queue
    wait plus one step: when a streaming client sees progress).

  Quantiles: ``histogram_quantile(0.95, sum by (le, kind) (rate(dreamfuse_request_seconds_bucket[5m])))``; the
  mean: ``rate(..._sum[5m]) / rate(..._count[5m])``.
- ``http_requests_total{route,status}``, ``http_client_disconnects_total``: the HTTP layer's counters.
"""

from __future__ import annotations

import gzip

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from .histogram import cumulative


def _buckets(snapshot: dict) -> tuple[list[tuple[str, float]], float]:
    return [(floatToGoString(le), count) for le, count in cumulative(snapshot)], snapshot["sum"]


def _histogram(name: str, text: str, snapshot: dict | None, unit: str = "") -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, text, unit=unit)
    if snapshot:
        h.add_metric([], *_buckets(snapshot))
    return h


def _histogram_by_kind(name: str, text: str, snapshots: dict | None, unit: str = "") -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, text, labels=["kind"], unit=unit)
    for kind, snapshot in sorted((snapshots or {}).items()):
        h.add_metric([kind], *_buckets(snapshot))
    return h


class _SchedulerCollector:
    def __init__(self, scheduler):
        self.scheduler = scheduler

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
        yield _histogram("dreamfuse_unet_rows_per_call", "rows carried by each UNet call", s.get("rows_per_call"))
        yield _histogram("dreamfuse_step_seconds", "scheduler step (tick) latency", s.get("step_seconds"), "seconds")
        yield _histogram_by_kind("dreamfuse_request_seconds", "request latency, submission to done, by kind",
                                 s.get("request_seconds"), "seconds")
        yield _histogram_by_kind("dreamfuse_time_to_first_step_seconds",
                                 "submission to the end of the first denoising step (queue wait + one step), by kind",
                                 s.get("first_step_seconds"), "seconds")


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

    def render(self, accept: str | None = None, accept_encoding: str | None = None) -> tuple[bytes, dict[str, str]]:
        """The exposition and its headers for a scrape with these ``Accept`` / ``Accept-Encoding`` headers:
        OpenMetrics when asked for, else the text format (prometheus_client's own negotiation); gzip when
        accepted (~320 samples: ~23 kB as text, ~2 kB gzipped)."""
        encoder, content_type = choose_encoder(accept or "")
        body = encoder(self.registry)
        headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
        if "gzip" in (accept_encoding or ""):
            body = gzip.compress(body, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        return body, headers
