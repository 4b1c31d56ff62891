"""Ray Serve: the same HTTP API over many step schedulers, one per GPU, on one machine or many.

Two deployments in one Serve application:

- ``DreamfuseWorker``: one replica per GPU (``num_gpus=1`` on CUDA, 0 on CPU). Each loads the engine from the
  command line's options and runs its own :class:`StepScheduler` (step-level continuous batching inside the
  replica; not ``@serve.batch``, which batches whole requests). ``run(kind, kwargs)`` is a streaming method:
  it submits the job and streams its events, then its PNGs. Cancelling the stream (a ``DELETE``, a client that
  left) cancels the job between steps. Replica count: fixed (``--replicas``) or autoscaled on ongoing requests
  (``--autoscale MIN-MAX``; the target is ``max_batch_rows // 2`` ongoing requests per replica: a text2img
  image with CFG is two rows). ``max_queued_requests`` bounds the router's queue: beyond it a request is
  answered 429, as the single-process server's admission queue does.
- ``DreamfuseIngress``: Serve's FastAPI ingress running :func:`~dreamfuse.engine.server.http.create_app` over a
  :class:`RemoteScheduler`, which forwards each submission to a worker and keeps the job (state, events,
  images) where ``GET /v1/jobs/{id}``, its event stream and ``DELETE`` find it. One replica (it only moves
  bytes), so a job's id is known wherever the follow-up request lands.

Multi-node: ``ray start --head --port 6379`` on the first machine, ``ray start --address HEAD_IP:6379`` on
each other one, then ``dreamfuse serve --ray --ray-address auto --replicas N`` on the head. The model path (and
adapter files) must exist at the same path on every node. Serve's proxy listens on ``--host``/``--port`` of
each node.

``/metrics`` of the ingress: its own job counts, queue depth, running requests and HTTP counters; UNet calls and
the histograms (step and request latency, time to first step, rows per UNet call) summed over the replicas'
latest stats (:func:`~dreamfuse.engine.server.histogram.sum_stats`), which each replica sends at the end of each of
its jobs and every few seconds while one runs. The replicas' counts are cumulative, so the sums are cluster-wide
histograms that only grow: a replica that stopped keeps its last counts in them.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections import OrderedDict

from .histogram import sum_stats

WORKER = "DreamfuseWorker"
INGRESS = "DreamfuseIngress"
APP_NAME = "dreamfuse"
_TERMINAL = ("done", "cancelled", "timed_out", "failed")
_HISTORY = 1024  # finished jobs the ingress remembers for GET /v1/jobs/{id}
_STATS_EVERY_S = 5.0  # a running job's stream carries its replica's stats this often (scrapes come every 15-60 s)
_MODEL_KEYS = ("model", "config", "variant", "device", "dtype", "backend", "compile", "unet", "lora", "no_progress",
               "preload_relation", "ip_adapter", "image_encoder", "adapters", "adapter_cache_mb")


def options_from_args(args) -> dict:
    """What the replicas need from ``dreamfuse serve``'s options (plain data: Ray pickles it to every node)."""
    from ..cli.serve import app_options, scheduler_options

    return {"model_args": {k: getattr(args, k, None) for k in _MODEL_KEYS},
            "scheduler": scheduler_options(args), "app": app_options(args), "replicas": args.replicas,
            "autoscale": args.autoscale}


# ------------------------------------------------------------------------------------------------ worker side
class _Worker:
    """A worker replica: an engine and its step scheduler."""

    def __init__(self, options: dict):
        from ..cli.serve import prepare_engine
        from . import StepScheduler

        args = argparse.Namespace(**options["model_args"])
        self.engine = prepare_engine(args)
        self.scheduler = StepScheduler(self.engine, **options["scheduler"])
        self.scheduler.warmup()
        self.grace_s = float(options["app"].get("shutdown_grace_s", 10.0))
        self._stats_lock = threading.Lock()
        self._stats_seq = 0
        try:
            from ray import serve

            self.replica = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # noqa: BLE001 - outside a replica (unit use)
            self.replica = "local"

    def ready(self) -> bool:
        return bool(self.scheduler.ready)

    def stats(self) -> dict:
        """The scheduler's stats with this replica's id and ``seq``, which orders its snapshots (the ingress
        receives them on several jobs' streams, in any order, and keeps the latest)."""
        with self._stats_lock:
            self._stats_seq += 1
            stats = self.scheduler.stats()
            stats.pop("recent_step_seconds", None)  # for benchmarks in-process; not worth shipping
            return {"replica": self.replica, "seq": self._stats_seq, **stats}

    async def run(self, kind: str, kwargs: dict):
        """Stream ``("accepted", info)`` or one refusal (``("rejected", retry_after_s)``, ``("closed", None)``,
        ``("invalid", message)``), then ``("event", ev)``... with ``("images", [png])`` just before the done event,
        ``("stats", dict)`` every few seconds and last."""
        from . import QueueFull, SchedulerClosed
        from .http import png_bytes

        try:
            job = self.scheduler.submit(kind, **kwargs)
        except QueueFull as e:
            yield ("rejected", float(getattr(e, "retry_after_s", 1.0)))
            return
        except SchedulerClosed:
            yield ("closed", None)
            return
        except ValueError as e:
            yield ("invalid", str(e))
            return
        yield ("accepted", {"id": job.id, "kind": job.kind, "seeds": list(job.seeds), "steps": job.steps,
                            "created": job.created, "replica": self.replica})
        index = 0
        next_stats = time.monotonic() + _STATS_EVERY_S
        try:
            while True:
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + _STATS_EVERY_S
                    yield ("stats", self.stats())
                evs = job.events_since(index, 0)
                if not evs:
                    await asyncio.sleep(0.01)
                    continue
                for ev in evs:
                    index += 1
                    if ev["type"] == "done":
                        yield ("images", [png_bytes(img) for img in job.images])
                    yield ("event", dict(ev, _step=job.step, _error=job.error))
                    if ev["type"] in _TERMINAL:
                        yield ("stats", self.stats())
                        return
        finally:
            if not job.done():  # the stream was cancelled: DELETE, a client that left, a shutdown
                job.cancel()

    def __del__(self):  # Serve calls it when the replica stops (scale-down, redeploy, shutdown)
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.shutdown(self.grace_s)


# ------------------------------------------------------------------------------------------------ ingress side
class RemoteJob:
    """A job running on a worker replica, seen through its event stream; the interface of ``Job``."""

    def __init__(self, info: dict, stream, on_end, on_stats):
        self.id, self.kind, self.seeds = info["id"], info["kind"], info["seeds"]
        self.steps, self.created, self.replica = info["steps"], info["created"], info["replica"]
        self.state, self.error, self.step, self.finished = "queued", None, 0, None
        self.pngs: list[bytes] | None = None
        self._images = None
        self._events: list[dict] = []
        self._cond = threading.Condition()
        self._stream = stream
        self._on_end, self._on_stats = on_end, on_stats
        threading.Thread(target=self._follow, name=f"dreamfuse-job-{self.id[:8]}", daemon=True).start()

    @property
    def images(self):
        if self.pngs is None:
            return None
        if self._images is None:
            import io

            from PIL import Image

            self._images = [Image.open(io.BytesIO(p)) for p in self.pngs]
        return self._images

    def _end(self, ev: dict) -> None:
        with self._cond:
            if self.state in _TERMINAL:
                return
            self.state, self.error, self.finished = ev["type"], ev.get("reason"), time.time()
            self._events.append(ev)
            self._cond.notify_all()
        self._on_end(self)

    def _follow(self) -> None:
        from ray.serve.exceptions import RequestCancelledError

        try:
            for tag, value in self._stream:
                if tag == "images":
                    self.pngs = value
                elif tag == "stats":
                    self._on_stats(value)
                elif tag == "event":
                    step, error = value.pop("_step", None), value.pop("_error", None)
                    if value["type"] in _TERMINAL:
                        self._end(value if "reason" in value or error is None else dict(value, reason=error))
                        continue
                    with self._cond:
                        if value["type"] == "started":
                            self.state = "running"
                        if step is not None:
                            self.step = step
                        self._events.append(value)
                        self._cond.notify_all()
        except RequestCancelledError:
            self._end({"type": "cancelled", "reason": "cancelled by request"})
        except Exception as e:  # noqa: BLE001 - a replica lost mid-job fails this job only
            self._end({"type": "failed", "reason": f"worker replica lost: {type(e).__name__}: {e}"})
        if self.state not in _TERMINAL:
            self._end({"type": "failed", "reason": "the worker's stream ended without a final event"})

    def cancel(self) -> None:
        if not self.done():
            self._stream.cancel()

    def done(self) -> bool:
        return self.state in _TERMINAL

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(self.done, timeout)

    def events_since(self, index: int, timeout: float | None) -> list[dict]:
        with self._cond:
            if len(self._events) <= index and timeout != 0:
                self._cond.wait_for(lambda: len(self._events) > index, timeout)
            return list(self._events[index:])


class RemoteScheduler:
    """The ``StepScheduler`` interface over the worker deployment (``submit``, ``get``, ``stats``, ``ready``,
    ``shutdown``), for :func:`create_app` in the ingress replica."""

    def __init__(self, handle):
        self.handle = handle
        self.ready = False
        self._jobs: OrderedDict[str, RemoteJob] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        self._counts = {"completed": {}, "cancelled": 0, "timed_out": 0, "failed": 0, "rejected": 0, "images": 0}
        self._replicas: dict[str, dict] = {}  # replica id -> its latest stats (kept after it stops: counts never drop)
        threading.Thread(target=self._probe, name="dreamfuse-ready-probe", daemon=True).start()

    def _probe(self) -> None:
        while not self.ready and not self._closed:
            try:
                self.ready = bool(self.handle.ready.remote().result(timeout_s=30))
            except Exception:  # noqa: BLE001 - replicas still starting
                time.sleep(0.5)

    def submit(self, kind: str, **kwargs) -> RemoteJob:
        from ray.serve.exceptions import BackPressureError

        from . import QueueFull, SchedulerClosed

        if self._closed:
            raise SchedulerClosed("the server is shutting down")
        try:
            stream = self.handle.options(stream=True).run.remote(kind, kwargs)
            tag, value = next(stream)
        except BackPressureError:
            self._count("rejected")
            raise QueueFull(1.0) from None
        if tag == "rejected":
            self._count("rejected")
            raise QueueFull(value)
        if tag == "closed":
            raise SchedulerClosed("the server is shutting down")
        if tag == "invalid":
            raise ValueError(value)
        job = RemoteJob(value, stream, self._ended, self._on_stats)
        with self._lock:
            self._jobs[job.id] = job
            finished = [k for k, j in self._jobs.items() if j.done()]
            for k in finished[: max(0, len(self._jobs) - _HISTORY)]:
                del self._jobs[k]
        return job

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _ended(self, job: RemoteJob) -> None:
        with self._lock:
            if job.state == "done":
                done = self._counts["completed"]
                done[job.kind] = done.get(job.kind, 0) + 1
                self._counts["images"] += len(job.seeds)
            else:
                self._counts[job.state] += 1

    def _on_stats(self, stats: dict) -> None:
        with self._lock:
            replica = stats.get("replica", "?")
            seen = self._replicas.get(replica)
            if seen is None or stats.get("seq", 0) > seen.get("seq", 0):  # an older snapshot would undo counts
                self._replicas[replica] = stats

    def get(self, job_id: str) -> RemoteJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def stats(self) -> dict:
        with self._lock:
            replicas = list(self._replicas.values())
            out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._counts.items()}
            jobs = list(self._jobs.values())
        out["queue_depth"] = sum(1 for j in jobs if j.state == "queued")
        out["running"] = sum(1 for j in jobs if j.state == "running")
        out["unet_calls"] = sum(r.get("unet_calls", 0) for r in replicas)
        out.update(sum_stats(replicas))
        out["replicas"] = len(replicas)
        return out

    def warmup(self) -> None:  # the workers warm up in their constructors
        return None

    def shutdown(self, grace_s: float = 10.0) -> None:
        self._closed = True
        end = time.monotonic() + grace_s
        with self._lock:
            jobs = [j for j in self._jobs.values() if not j.done()]
        for job in jobs:
            job.wait(max(0.0, end - time.monotonic()))
        for job in jobs:
            if not job.done():
                job._stream.cancel()
                job._end({"type": "cancelled", "reason": "server shutting down"})


# ------------------------------------------------------------------------------------------------ the application
def build_app(options: dict, *, use_gpu: bool | None = None):
    """The Serve application (``serve.run(build_app(options))``): the ingress bound to the worker deployment."""
    from ray import serve

    options = {**options, "model_args": dict(options["model_args"])}
    if use_gpu is None:
        import torch

        use_gpu = torch.cuda.is_available() and options["model_args"].get("device") != "cpu"
    if use_gpu:
        options["model_args"]["device"] = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the replica's GPU
    sched = options["scheduler"]
    worker_opts = {"ray_actor_options": {"num_gpus": 1 if use_gpu else 0, "num_cpus": 1},
                   "max_ongoing_requests": sched["max_queue"] + sched["max_batch_rows"],
                   "max_queued_requests": sched["max_queue"]}
    if options.get("autoscale"):
        lo, hi = options["autoscale"]
        worker_opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                             "target_ongoing_requests": max(1, sched["max_batch_rows"] // 2)}
    else:
        worker_opts["num_replicas"] = options.get("replicas") or 1
    Worker = serve.deployment(name=WORKER, **worker_opts)(_Worker)
    app_options = dict(options["app"])
    app_name = options.get("app_name", APP_NAME)

    def build_asgi():  # runs in the ingress replica, after its constructor
        from .http import create_app

        handle = serve.get_deployment_handle(WORKER, app_name=app_name)
        limits = None
        if sched.get("limits"):
            import dataclasses

            from ..limits import DEFAULT_LIMITS

            limits = dataclasses.replace(DEFAULT_LIMITS, **sched["limits"])
        return create_app(RemoteScheduler(handle), limits=limits, **app_options)

    class _Ingress:
        def __init__(self, worker):  # the bound worker makes Serve deploy it in this application
            self.worker = worker

    Ingress = serve.deployment(name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=10_000)(serve.ingress(build_asgi)(_Ingress))
    return Ingress.bind(Worker.bind(options))


def run_ray(args) -> None:
    """``dreamfuse serve --ray``: join (or start) a Ray cluster, deploy, serve until Ctrl-C / SIGTERM."""
    import signal
    import sys

    try:
        import ray
        from ray import serve
    except ImportError:
        from ..cli.common import CLIError

        raise CLIError("--ray: Ray Serve is not installed (pip install 'dreamfuse[ray]')") from None
    ray.init(address=args.ray_address, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    options = options_from_args(args)
    options["app_name"] = APP_NAME
    serve.run(build_app(options), name=APP_NAME, route_prefix="/")
    print(f"dreamfuse: Ray Serve app {APP_NAME!r} on http://{args.host}:{args.port}", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops without the cleanup
    print("dreamfuse: stopping (the replicas finish or cancel their work)", file=sys.stderr)
    serve.delete(APP_NAME)
    serve.shutdown()
    print("dreamfuse: stopped", file=sys.stderr)
