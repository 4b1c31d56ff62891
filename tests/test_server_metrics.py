"""/metrics (engine/server/metrics.py, engine/server/histogram.py): cumulative histograms whose counts are every
step, UNet call and request a real StepScheduler ran (the tiny model at 64x64), with scrapes far apart; OpenMetrics
when the scraper asks, the text format otherwise, both parsed back by prometheus_client's parsers; the Ray ingress's
sum of its replicas' histograms against one histogram fed every observation."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from dreamfuse.engine.server.histogram import (  # noqa: E402
    REQUEST_BUCKETS,
    ROW_BUCKETS,
    STEP_BUCKETS,
    Histogram,
    cumulative,
    merge,
    sum_stats,
)
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families as parse_text  # noqa: E402
from server_helpers import SIZE, wait_for  # noqa: E402

LOCAL = "http://localhost"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
# what Prometheus 2.x/3.x sends by default: OpenMetrics 1.0 first
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;"
                     "q=0.4,text/plain;version=1.0.0;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1")
HISTOGRAMS = ("dreamfuse_step_seconds", "dreamfuse_unet_rows_per_call", "dreamfuse_request_seconds",
              "dreamfuse_time_to_first_step_seconds")


def _samples(families) -> dict[tuple, float]:
    """``{(sample name, sorted labels): value}`` of parsed metric families."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def _buckets(samples: dict, name: str, **labels) -> list[tuple[float, float]]:
    """The ``(le, cumulative count)`` of one histogram, in order of ``le``."""
    out = [(float(dict(k)["le"]), v) for (n, k), v in samples.items()
           if n == f"{name}_bucket" and {a: b for a, b in k if a != "le"} == labels]
    return sorted(out)


def _check_histogram(samples: dict, name: str, **labels) -> float:
    """A well-formed cumulative histogram: buckets ascending in ``le`` and in count, ending at +Inf = ``_count``;
    returns ``_count``."""
    buckets = _buckets(samples, name, **labels)
    assert buckets and buckets[-1][0] == math.inf, (name, labels)
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), (name, labels, counts)
    key = tuple(sorted(labels.items()))
    assert samples[(f"{name}_count", key)] == counts[-1]
    assert samples[(f"{name}_sum", key)] >= 0
    return counts[-1]


# ------------------------------------------------------------------------------------------------ the histogram
def test_histogram_buckets_are_inclusive_upper_bounds_and_cumulative():
    h = Histogram(REQUEST_BUCKETS)
    for v in (0.0, 0.05, 0.0500001, 2.0, 1799.0, 1800.0, 5000.0):
        h.observe(v)
    cum = dict(cumulative(h.snapshot()))
    assert cum[0.05] == 2 and cum[0.1] == 3 and cum[2.0] == 4 and cum[1800.0] == 6 and cum[math.inf] == 7
    s = h.snapshot()
    assert s["count"] == 7 and s["sum"] == pytest.approx(0.05 + 0.0500001 + 2 + 1799 + 1800 + 5000)
    assert len(s["counts"]) == len(REQUEST_BUCKETS) + 1
    with pytest.raises(ValueError, match="bounds"):
        Histogram((1.0, 1.0))
    with pytest.raises(ValueError, match="bounds"):
        Histogram((1.0, math.inf))
    for bounds, low, high in ((STEP_BUCKETS, 0.001, 60.0), (REQUEST_BUCKETS, 0.05, 1800.0)):
        assert bounds[0] == low and bounds[-1] == high and list(bounds) == sorted(set(bounds))


def _same(a: dict, b: dict) -> bool:
    """Equal histogram snapshots (the sums up to float rounding)."""
    return (a["bounds"], a["counts"], a["count"]) == (b["bounds"], b["counts"], b["count"]) and math.isclose(
        a["sum"], b["sum"])


def _replica(seq: int, steps=(), rows=(), requests=(), first_steps=()) -> dict:
    """A replica's ``stats()``: its cumulative histograms fed these observations (``requests``: (kind, seconds))."""
    step, row = Histogram(STEP_BUCKETS), Histogram(ROW_BUCKETS)
    for v in steps:
        step.observe(v)
    for v in rows:
        row.observe(v)
    by_kind: dict[str, dict[str, Histogram]] = {"request_seconds": {}, "first_step_seconds": {}}
    for key, obs in (("request_seconds", requests), ("first_step_seconds", first_steps)):
        for kind, v in obs:
            by_kind[key].setdefault(kind, Histogram(REQUEST_BUCKETS)).observe(v)
    return {"replica": None, "seq": seq, "unet_calls": len(rows), "step_seconds": step.snapshot(),
            "rows_per_call": row.snapshot(),
            **{key: {k: h.snapshot() for k, h in hs.items()} for key, hs in by_kind.items()}}


def test_sum_stats_equals_one_histogram_of_every_replicas_observations():
    a = dict(steps=(0.0004, 0.01, 0.2, 3.0), rows=(1, 8, 16), requests=(("text2img", 1.5),),
             first_steps=(("text2img", 0.2),))
    b = dict(steps=(0.02, 0.2, 100.0), rows=(2, 200), requests=(("text2img", 2.5), ("compose", 40.0)),
             first_steps=(("text2img", 0.3), ("compose", 9.0)))
    total = sum_stats([_replica(1, **a), _replica(1, **b)])
    for key, bounds, field in (("step_seconds", STEP_BUCKETS, "steps"), ("rows_per_call", ROW_BUCKETS, "rows")):
        one = Histogram(bounds)
        for v in a[field] + b[field]:
            one.observe(v)
        assert _same(total[key], one.snapshot()), key
    for key, field in (("request_seconds", "requests"), ("first_step_seconds", "first_steps")):
        assert sorted(total[key]) == ["compose", "text2img"]
        for kind in ("compose", "text2img"):
            one = Histogram(REQUEST_BUCKETS)
            for k, v in a[field] + b[field]:
                if k == kind:
                    one.observe(v)
            assert _same(total[key][kind], one.snapshot()), (key, kind)
    empty = sum_stats([])
    assert empty["step_seconds"]["count"] == 0 and empty["request_seconds"] == {}


def test_merge_onto_other_bounds_keeps_count_and_sum_and_never_counts_under_a_lower_bound():
    old = Histogram((0.5, 1.0, 4.0))  # a replica of another version
    for v in (0.1, 0.7, 3.0, 9.0):
        old.observe(v)
    new = Histogram(REQUEST_BUCKETS)
    new.observe(0.7)
    total = merge([old.snapshot(), None, new.snapshot()], REQUEST_BUCKETS)
    assert total["count"] == 5 and total["sum"] == pytest.approx(0.1 + 0.7 + 3.0 + 9.0 + 0.7)
    cum = dict(cumulative(total))
    assert cum[0.5] == 1 and cum[1.0] == 3 and cum[5.0] == 4 and cum[math.inf] == 5  # 0.1 <= 0.5, 3.0 <= 4.0 <= 5
    assert cum[3.0] == 3  # 3.0 came in a bucket up to 4: not counted under le=3 (low, never wrong the other way)


def test_the_ray_ingress_exposes_the_sum_of_its_replicas_latest_histograms():
    from dreamfuse.engine.server.metrics import ServerMetrics
    from dreamfuse.engine.server.ray_app import RemoteScheduler

    handle = SimpleNamespace(ready=SimpleNamespace(remote=lambda: SimpleNamespace(result=lambda timeout_s: True)))
    remote = RemoteScheduler(handle)
    try:
        a1 = dict(steps=(0.01, 0.02), rows=(2, 2), requests=(("text2img", 1.0),), first_steps=(("text2img", 0.1),))
        a2 = dict(steps=(0.01, 0.02, 0.5), rows=(2, 2, 8), requests=(("text2img", 1.0), ("inpaint", 30.0)),
                  first_steps=(("text2img", 0.1), ("inpaint", 2.0)))
        b1 = dict(steps=(0.3,), rows=(16,), requests=(("text2img", 4.0),), first_steps=(("text2img", 0.4),))
        remote._on_stats({**_replica(1, **a1), "replica": "a"})
        remote._on_stats({**_replica(1, **b1), "replica": "b"})
        remote._on_stats({**_replica(2, **a2), "replica": "a"})
        remote._on_stats({**_replica(1, **a1), "replica": "a"})  # arrived late on another job's stream: ignored
        stats = remote.stats()
        assert stats["replicas"] == 2 and stats["unet_calls"] == 4
        assert _same(stats["step_seconds"], sum_stats([_replica(2, **a2), _replica(1, **b1)])["step_seconds"])
        samples = _samples(parse_text(ServerMetrics(remote).render()[0].decode()))
        assert _check_histogram(samples, "dreamfuse_step_seconds") == 4
        assert _check_histogram(samples, "dreamfuse_unet_rows_per_call") == 4
        assert samples[("dreamfuse_unet_rows_per_call_sum", ())] == 2 + 2 + 8 + 16
        assert _check_histogram(samples, "dreamfuse_request_seconds", kind="text2img") == 2
        assert _check_histogram(samples, "dreamfuse_request_seconds", kind="inpaint") == 1
        assert _check_histogram(samples, "dreamfuse_time_to_first_step_seconds", kind="text2img") == 2
        assert dict(_buckets(samples, "dreamfuse_request_seconds", kind="text2img"))[1.0] == 1  # a's, not b's 4 s
    finally:
        remote.shutdown(0)


# ------------------------------------------------------------------------------------------------ a real scheduler
@pytest.fixture(scope="module")
def engine():
    from dreamfuse.engine import Engine, EngineConfig

    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))


@pytest.fixture()
def served(engine):
    from dreamfuse.engine.server import StepScheduler
    from dreamfuse.engine.server.http import create_app
    from fastapi.testclient import TestClient

    s = StepScheduler(engine, max_batch_rows=8)
    yield s, TestClient(create_app(s), base_url=LOCAL)
    s.shutdown(0)


def _scrape(client, accept: str | None = None) -> dict:
    r = client.get("/metrics", headers={"Accept": accept} if accept else {})
    assert r.status_code == 200
    return _samples(parse_text(r.text))


def test_histogram_counts_are_every_step_call_and_request_run_with_scrapes_far_apart(served):
    sched, client = served
    first = _scrape(client)
    for name in ("dreamfuse_step_seconds", "dreamfuse_unet_rows_per_call"):
        assert _check_histogram(first, name) == 0
    for kind in ("text2img", "img2img", "inpaint", "personalize", "compose"):  # every kind from the start (rate())
        assert _check_histogram(first, "dreamfuse_request_seconds", kind=kind) == 0
    steps = (2, 3, 2)
    t0 = time.monotonic()
    for i, n in enumerate(steps):  # one at a time: a request alone is n UNet calls (CFG: 2 rows) and a decode tick
        job = sched.submit("text2img", prompt=f"a photo of thing {i}", steps=n, seed=i, width=SIZE, height=SIZE)
        assert job.wait(120) and job.state == "done", job.error
        # its request and first step are counted by the time its end is seen
        assert sched.stats()["request_seconds"]["text2img"]["count"] == i + 1
        assert sched.stats()["first_step_seconds"]["text2img"]["count"] == i + 1
        if i == 0:
            middle = _scrape(client)  # then no scrape until the end: nothing may be lost in between
    ticks = sum(n + 1 for n in steps)
    # the tick that ended a job is timed just after the job's end is visible
    wait_for(lambda: sched.stats()["step_seconds"]["count"] >= ticks, timeout=10, what="the last tick timed")
    wall = time.monotonic() - t0
    last = _scrape(client)

    assert _check_histogram(last, "dreamfuse_step_seconds") == ticks
    assert _check_histogram(last, "dreamfuse_unet_rows_per_call") == sum(steps) == last[("dreamfuse_unet_calls_total",
                                                                                          ())]
    assert last[("dreamfuse_unet_rows_per_call_sum", ())] == 2 * sum(steps)
    completed = last[("dreamfuse_requests_completed_total", (("kind", "text2img"),))]
    assert _check_histogram(last, "dreamfuse_request_seconds", kind="text2img") == len(steps) == completed
    assert _check_histogram(last, "dreamfuse_time_to_first_step_seconds", kind="text2img") == len(steps)
    assert _check_histogram(last, "dreamfuse_request_seconds", kind="compose") == 0
    requests_s = last[("dreamfuse_request_seconds_sum", (("kind", "text2img"),))]
    first_steps_s = last[("dreamfuse_time_to_first_step_seconds_sum", (("kind", "text2img"),))]
    assert 0 < first_steps_s < requests_s <= wall
    assert 0 < last[("dreamfuse_step_seconds_sum", ())] <= wall

    # counters and buckets only grow, scrape after scrape
    for key, value in last.items():
        if key[0].endswith(("_bucket", "_count", "_sum")):
            assert first.get(key, 0) <= middle.get(key, 0) <= value, key


def test_openmetrics_when_asked_the_text_format_otherwise(served):
    sched, client = served
    job = sched.submit("text2img", prompt="a cat", steps=2, seed=0, width=SIZE, height=SIZE)
    assert job.wait(120) and job.state == "done"
    for accept in (OPENMETRICS, PROMETHEUS_ACCEPT, "application/openmetrics-text"):
        r = client.get("/metrics", headers={"Accept": accept})
        assert r.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0"), accept
        assert r.text.endswith("# EOF\n")
        families = {f.name: f for f in parse_openmetrics(r.text)}  # strict: a malformed exposition raises
        for name in HISTOGRAMS:
            assert families[name].type == "histogram", name
        assert families["dreamfuse_step_seconds"].unit == "seconds"
        assert families["dreamfuse_requests_completed"].type == "counter"
        samples = _samples(families.values())
        assert _check_histogram(samples, "dreamfuse_request_seconds", kind="text2img") == 1
        assert _check_histogram(samples, "dreamfuse_step_seconds") >= 2
    for accept in (None, "text/plain", "*/*", "application/json", "application/openmetrics-text; version=0.0.1"):
        r = client.get("/metrics", headers={"Accept": accept} if accept else {})
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8", accept
        assert "# EOF" not in r.text
        families = {f.name: f for f in parse_text(r.text)}
        for name in HISTOGRAMS:
            assert families[name].type == "histogram", name
        assert "quantile" not in r.text  # no summaries: they do not add up across replicas
    # gzipped for a scraper that accepts it (Prometheus does); httpx undoes it
    r = client.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip" and "dreamfuse_step_seconds_bucket" in r.text
    assert "content-encoding" not in client.get("/metrics", headers={"Accept-Encoding": "identity"}).headers
    assert "Accept" in r.headers["vary"]
    answers = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(answers) == {"text/plain", "application/openmetrics-text"}
