"""Load test of the generation server on loopback: continuous batching vs whole-request batching vs one at a time.

    python -m bench.serve_load                                   # tiny, CPU-sized, rates picked from a solo run
    python -m bench.serve_load --rates 1 2 4 --requests 24       # fixed arrival rates (requests/s)
    python -m bench.serve_load --model random-sd15 --sizes 512 --steps 20 25 30 --rates 1 2 4   # on a GPU

Three servers, each the same FastAPI app (``dreamfuse.engine.server.http.create_app``) under uvicorn on
127.0.0.1, on the same engine, one after another:

* ``continuous``: the :class:`StepScheduler`; requests join and leave the batch between denoising steps;
* ``whole-request``: the baseline published servers use (Ray Serve's ``@serve.batch``, Triton's dynamic
  batcher): queued requests that share size, steps, guidance and sampler are run together as one
  ``engine.text2img`` call, start to end; a request arriving meanwhile waits for the whole call;
* ``one-at-a-time``: the same, one request per call.

Clients are open-loop: arrival times are drawn once per rate (Poisson, seeded), so every server gets exactly the
same requests at the same moments, whatever its latency; mixed sizes and step counts. Each run is bounded in
count (``--requests``) and time (``--timeout`` per run); a request without an answer by then counts as lost.
Every answer is checked: its job id is new (0 duplicated), its seed is the one asked for, and its image equals
the solo generation of that request (``engine.text2img`` alone, same seed; max pixel difference within
``--tolerance``) (0 mismatched). Reported: p50/p95/p99 latency (submission to full response), throughput
(images per second of wall time from the first arrival to the last answer), rows per UNet call (mean).
Only ever sends to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.server.histogram import SERIES, Histogram

from bench._util import hardware, print_table

PROMPTS = ("a photo of a cat", "a red car", "a bowl of fruit", "a lighthouse at dusk", "a dog on the beach")


# ------------------------------------------------------------------------------------------------ the baseline
class _Job:
    """The ``Job`` interface of the API contract, for the baseline scheduler."""

    def __init__(self, kwargs: dict, seeds: list[int]):
        self.id, self.kind, self.kwargs, self.seeds = uuid.uuid4().hex, "text2img", kwargs, seeds
        self.state, self.error, self.images, self.step, self.steps = "queued", None, None, 0, kwargs["steps"]
        self.created, self.finished = time.time(), None
        self._events = [{"type": "queued", "position": 0}]
        self._cond = threading.Condition()

    def _emit(self, ev: dict, state: str | None = None) -> None:
        with self._cond:
            self._events.append(ev)
            if state is not None:
                self.state = state
                if state in ("done", "failed"):
                    self.finished = time.time()
            self._cond.notify_all()

    def cancel(self) -> None:  # the load test never cancels
        pass

    def done(self) -> bool:
        return self.state in ("done", "cancelled", "timed_out", "failed")

    def wait(self, timeout=None) -> bool:
        with self._cond:
            return self._cond.wait_for(self.done, timeout)

    def events_since(self, index: int, timeout) -> list[dict]:
        with self._cond:
            if len(self._events) <= index and timeout != 0:
                self._cond.wait_for(lambda: len(self._events) > index, timeout)
            return list(self._events[index:])


class WholeRequestScheduler:
    """Whole-request batching: the oldest queued request, plus every queued request with the same size, steps,
    guidance and sampler up to ``max_images`` images, as one ``engine.text2img`` call from start to end."""

    def __init__(self, engine: Engine, max_images: int = 8):
        self.engine, self.max_images, self.ready = engine, max_images, True
        self._queue: list[_Job] = []
        self._jobs: dict[str, _Job] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._stats = {"completed": {}, "cancelled": 0, "timed_out": 0, "failed": 0, "rejected": 0,
                       "unet_calls": 0, "images": 0, **{key: Histogram(bounds) for key, bounds in SERIES.items()}}
        self._running = 0
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def submit(self, kind, *, prompt, n=1, width=None, height=None, steps=50, guidance_scale=7.5, seed=None,
               sampler="ddim", negative_prompt=None, **_):
        seed = random.randrange(2**31) if seed is None else seed
        job = _Job(dict(prompt=prompt, width=width, height=height, steps=steps, guidance_scale=guidance_scale,
                        sampler=sampler, negative_prompt=negative_prompt), [seed + i for i in range(n)])
        with self._cond:
            self._queue.append(job)
            self._jobs[job.id] = job
            self._cond.notify()
        return job

    def get(self, job_id):
        return self._jobs.get(job_id)

    def stats(self) -> dict:
        with self._cond:
            return dict(self._stats, queue_depth=len(self._queue), running=self._running,
                        **{key: self._stats[key].snapshot() for key in SERIES})

    def _key(self, job):
        k = job.kwargs
        return (k["width"], k["height"], k["steps"], k["guidance_scale"], k["sampler"], k["negative_prompt"])

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed and not self._queue:
                    return
                first = self._queue[0]
                batch, images = [], 0
                for job in list(self._queue):
                    if self._key(job) == self._key(first) and images + len(job.seeds) <= self.max_images:
                        batch.append(job)
                        images += len(job.seeds)
                        self._queue.remove(job)
                self._running = len(batch)
            k = first.kwargs
            for job in batch:
                job._emit({"type": "started"}, "running")
            t0 = time.perf_counter()
            try:
                out = self.engine.text2img(
                    [job.kwargs["prompt"] for job in batch for _ in job.seeds],
                    seed=[s for job in batch for s in job.seeds],
                    steps=k["steps"], guidance_scale=k["guidance_scale"], height=k["height"], width=k["width"],
                    sampler=k["sampler"], negative_prompt=k["negative_prompt"], progress=False)
            except Exception as e:  # noqa: BLE001 - a baseline: fail the batch, keep serving
                for job in batch:
                    job.error = str(e)
                    job._emit({"type": "failed", "reason": str(e)}, "failed")
                continue
            dt = time.perf_counter() - t0
            rows = images * (2 if k["guidance_scale"] > 1 else 1)
            i = 0
            with self._cond:
                self._stats["unet_calls"] += k["steps"]
                for _ in range(k["steps"]):
                    self._stats["rows_per_call"].observe(rows)
                    self._stats["step_seconds"].observe(dt / k["steps"])
                self._stats["images"] += images
                self._stats["completed"]["text2img"] = self._stats["completed"].get("text2img", 0) + len(batch)
                self._running = 0
            for job in batch:
                job.images, i = out[i:i + len(job.seeds)], i + len(job.seeds)
                job.step = job.steps
                job._emit({"type": "done"}, "done")

    def warmup(self) -> None:
        pass

    def shutdown(self, grace_s: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(grace_s)


# ------------------------------------------------------------------------------------------------ the load
@dataclass
class Spec:
    index: int
    at: float  # seconds after the start
    prompt: str
    size: int
    steps: int
    seed: int

    def body(self, guidance: float) -> dict:
        return {"prompt": self.prompt, "width": self.size, "height": self.size, "steps": self.steps,
                "guidance_scale": guidance, "seed": self.seed}


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    answered: int = 0
    lost: int = 0
    rejected: int = 0
    errors: int = 0
    duplicated: int = 0
    mismatched: int = 0
    max_diff: int = 0
    wall: float = 0.0
    images: int = 0
    rows_per_call: float = float("nan")


def make_load(rate: float, count: int, sizes, steps, seed: int) -> list[Spec]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(count):
        out.append(Spec(i, t, rng.choice(PROMPTS), rng.choice(sizes), rng.choice(steps), 10_000 * seed + i))
        t += rng.expovariate(rate)
    return out


async def drive(port: int, load: list[Spec], guidance: float, timeout: float, max_clients: int):
    """Send every request at its arrival time (open loop, at most ``max_clients`` in flight); answers by index."""
    import httpx

    results: dict[int, tuple[float, int, dict | None, str | None]] = {}
    limits = httpx.Limits(max_connections=max_clients, max_keepalive_connections=max_clients)
    gate = asyncio.Semaphore(max_clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        async def one(spec: Spec):
            await asyncio.sleep(max(0.0, spec.at - (time.perf_counter() - start)))
            async with gate:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/images/generations", json=spec.body(guidance))
                except httpx.HTTPError:
                    return
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
                results[spec.index] = (time.perf_counter() - t0, r.status_code, body, r.headers.get("x-dreamfuse-job"))

        tasks = [asyncio.create_task(one(s)) for s in load]
        _, pending = await asyncio.wait(tasks, timeout=timeout + load[-1].at)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - start
    return results, wall


class Server:
    """uvicorn in a thread on 127.0.0.1 (a free port)."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def solo_images(engine: Engine, load: list[Spec], guidance: float, cache: dict) -> None:
    for s in load:
        key = (s.prompt, s.size, s.steps, s.seed)
        if key not in cache:
            img = engine.text2img(s.prompt, seed=s.seed, steps=s.steps, height=s.size, width=s.size,
                                  guidance_scale=guidance, progress=False)[0]
            cache[key] = np.asarray(img, dtype=np.int16)


def check(load, results, wall, solo, tolerance, stats_before, stats_after) -> Outcome:
    from PIL import Image

    out = Outcome(wall=wall)
    seen_ids = set()
    for s in load:
        if s.index not in results:
            out.lost += 1
            continue
        latency, status, body, job_id = results[s.index]
        if status == 429:
            out.rejected += 1
            continue
        if status != 200 or body is None:
            out.errors += 1
            continue
        out.answered += 1
        out.latencies.append(latency)
        if job_id is None or job_id in seen_ids:
            out.duplicated += 1
        seen_ids.add(job_id)
        data = body["data"]
        if len(data) != 1 or data[0]["seed"] != s.seed:
            out.mismatched += 1
            continue
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).convert("RGB"), np.int16)
        ref = solo[(s.prompt, s.size, s.steps, s.seed)]
        diff = int(np.abs(img - ref).max()) if img.shape == ref.shape else 255
        out.max_diff = max(out.max_diff, diff)
        if diff > tolerance:
            out.mismatched += 1
        out.images += 1
    before, after = stats_before["rows_per_call"], stats_after["rows_per_call"]  # cumulative: exact over the run
    if after["count"] > before["count"]:
        out.rows_per_call = (after["sum"] - before["sum"]) / (after["count"] - before["count"])
    return out


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=[48, 64], help="square sizes, mixed (default 48 64)")
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8], help="step counts, mixed (default 2 4 8)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--rates", type=float, nargs="+", default=None,
                   help="arrival rates in requests/s (default: 0.5x, 1.5x and 4x the one-at-a-time capacity "
                        "measured from solo generations)")
    p.add_argument("--requests", type=int, default=24, help="requests per run (default 24)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds a run may take past its last arrival")
    p.add_argument("--max-clients", type=int, default=64, help="most requests in flight (default 64)")
    p.add_argument("--max-batch-rows", type=int, default=16)
    p.add_argument("--tolerance", type=int, default=2, help="max pixel difference against the solo image")
    p.add_argument("--modes", nargs="+", default=["continuous", "whole-request", "one-at-a-time"],
                   choices=["continuous", "whole-request", "one-at-a-time"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from dreamfuse.engine.server import StepScheduler
    from dreamfuse.engine.server.http import create_app

    engine = Engine.from_pretrained(args.model, EngineConfig(device=args.device, progress=False))
    # warm-up + capacity estimate: the best of 3 solo times of each size x steps, averaged
    solo_t = []
    for size in args.sizes:
        for steps in args.steps:
            engine.text2img("warm-up", seed=0, steps=steps, height=size, width=size, progress=False)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                engine.text2img("warm-up", seed=0, steps=steps, height=size, width=size, progress=False)
                times.append(time.perf_counter() - t0)
            solo_t.append(min(times))
    mean_solo = statistics.mean(solo_t)
    rates = args.rates or [round(f / mean_solo, 2) for f in (0.5, 1.5, 4.0)]
    print(f"# serve_load: {hardware(engine.device)}; model {args.model}, {engine.dtype}; sizes {args.sizes}, "
          f"steps {args.steps}, guidance {args.guidance}; {args.requests} requests per run; mean solo request "
          f"{mean_solo * 1e3:.0f} ms (capacity one at a time ~{1 / mean_solo:.2f} req/s); max_batch_rows "
          f"{args.max_batch_rows}")

    solo: dict = {}
    rows = []
    for r_i, rate in enumerate(rates):
        load = make_load(rate, args.requests, args.sizes, args.steps, args.seed * 100 + r_i)
        solo_images(engine, load, args.guidance, solo)
        for mode in args.modes:
            if mode == "continuous":
                sched = StepScheduler(engine, max_batch_rows=args.max_batch_rows, max_queue=max(64, args.requests))
                sched.warmup()
            else:
                sched = WholeRequestScheduler(engine, max_images=args.max_batch_rows // 2 if mode == "whole-request"
                                              else 1)
            app = create_app(sched)
            before = sched.stats()
            with Server(app) as server:
                results, wall = asyncio.run(drive(server.port, load, args.guidance, args.timeout,
                                                  args.max_clients))
            after = sched.stats()
            sched.shutdown(5.0)
            o = check(load, results, wall, solo, args.tolerance, before, after)
            rows.append({"rate req/s": rate, "mode": mode, "p50 s": pct(o.latencies, 0.5),
                         "p95 s": pct(o.latencies, 0.95), "p99 s": pct(o.latencies, 0.99),
                         "images/s": o.images / o.wall if o.wall else float("nan"),
                         "rows/UNet call": o.rows_per_call, "ok": o.answered, "lost": o.lost,
                         "dup": o.duplicated, "mismatch": o.mismatched, "errors": o.errors, "429": o.rejected,
                         "max px diff": o.max_diff})
            print(f"  rate {rate}: {mode} done ({o.answered}/{len(load)} answered in {o.wall:.1f} s)", flush=True)
    print()
    header = list(rows[0])
    print_table(f"serve_load: {args.model}, sizes {args.sizes}, steps {args.steps}, {args.requests} requests per run",
                header, [[r[h] for h in header] for r in rows])
    bad = sum(r["lost"] + r["dup"] + r["mismatch"] + r["errors"] for r in rows)
    print(f"\n{'OK' if bad == 0 else 'FAILED'}: {bad} lost/duplicated/mismatched/failed answers in all")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
