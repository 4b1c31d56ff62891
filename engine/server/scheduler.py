"""The step scheduler: continuous batching of diffusion requests, one denoising step at a time.

Every request is a pipeline *program* (:mod:`dreamfuse.engine.pipelines.program`): the very code of
``engine.text2img`` / ``personalize`` / ``compose``, which asks for its UNet evaluations and VAE decodes instead of
making them. The worker thread keeps a set of running programs; each *tick* it collects the next request of every
one of them and

- merges the UNet calls that fit together — same latent size, dtype, text width, IP-Adapter scale, no per-call
  layer handlers; whatever their per-request LoRAs, each row keeps its own — into batched calls of at most
  ``max_batch_rows`` rows, each row with its own timestep
  (``timestep (B,)``: diffusers' UNet embeds each row's own), and hands every program its rows of the output;
- runs the calls that carry layer handlers (personalize's AMA steps) on their own, in the same tick;
- decodes the latents of the programs that finished in batched VAE calls per image size.

A tick does a bounded amount of work: at most ``max_batch_rows`` rows at the model's native size (a row of twice the
side costs four) of UNet evaluation, and as much of VAE decoding. A request whose step is larger than that (many
images, a large size) is split into pieces of at most ``max_batch_rows`` rows that run over several ticks, beside
the other requests' steps; requests are served in the order they were last served, so every running request
advances, and cancellation and deadlines act within one tick, never after a whole oversized step.

A request admitted while others are at step 30 of 50 runs its step 0 in the next tick; a finished one leaves at
once. Since a program never sees which rows shared its call, a request's image is the one it gets alone, within the
rounding of batched matrix products (the same as batched text2img).

Admission and policy: requests wait in a bounded priority queue (higher ``priority`` first, then arrival); a full
queue rejects at once (:class:`QueueFull` with a retry hint). Between ticks, queued requests are admitted while the
running rows stay within ``max_batch_rows`` (counted at the model's native size: a row of twice the side costs four),
so at light load a request runs alone in small calls (lowest latency) and at heavy load every call is as full as
the budget allows (highest throughput). Calls are padded to the engine's compile buckets by ``Engine.unet_call``.
Deadlines: a request whose deadline has passed, or that cannot finish before it at the measured step time, is
dropped (``timed_out``) before any more of its work is done. Cancellation takes effect between ticks.

Per-request limits: ``limits`` (default: the engine's ``config.limits``) bound what one request may ask for
(images, steps, pixels) at submission; a server sets them below the library's (``dreamfuse serve --max-n ...``).
Model changes (a LoRA loaded while serving, ...) wait for the running requests and hold admission meanwhile: every
running request holds a lease on the engine's model lock (:mod:`~dreamfuse.engine.concurrency`).
"""

from __future__ import annotations

import base64
import dataclasses
import heapq
import io
import itertools
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import torch

from ..adapters import row_adapters, rows_slice
from ..pipelines.common import resolve_seeds
from ..pipelines.program import Decode, UNetCall
from ..pipelines.stepping import SamplingLoop
from ..prediction import prediction_type_of, to_eps_x0
from .histogram import SERIES, SERIES_BY_KIND, Histogram

JOB_STATES = ("queued", "running", "done", "cancelled", "timed_out", "failed")
TERMINAL_STATES = frozenset(JOB_STATES[2:])
KINDS = ("text2img", "personalize", "compose", "img2img", "inpaint")


class QueueFull(Exception):
    """The admission queue is full; try again after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: float, depth: int):
        super().__init__(f"queue full ({depth} requests waiting); retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class SchedulerClosed(Exception):
    """The scheduler is shutting down and admits nothing new."""


class Job:
    """One request: its state, progress, events and result. Created by :meth:`StepScheduler.submit`."""

    def __init__(self, kind: str, program, seeds: list[int], steps: int, rows: int, cost: float, priority: int,
                 deadline: float | None, job_id: str | None = None):
        self.id = job_id or uuid.uuid4().hex
        self.kind = kind
        self.seeds = seeds
        self.step = 0
        self.steps = steps
        self.priority = priority
        self.deadline = deadline
        self.created = time.time()
        self._t0 = time.monotonic()  # submission, for the latency histograms (``created`` is wall-clock, for clients)
        self._stepped = False  # its first step has run (time to first step recorded)
        self.started: float | None = None
        self.finished: float | None = None
        self.state = "queued"
        self.error: str | None = None
        self.images: list | None = None
        self._program = program
        self._pending: UNetCall | Decode | None = None
        self._rows = rows  # estimated UNet rows per call (for admission)
        self._cost = cost  # rows x (latent pixels / native latent pixels)
        self._cancel = threading.Event()
        self._cancel_reason = "cancelled"
        self._cond = threading.Condition()
        self._ended = threading.Event()
        self._events: list[dict] = []
        self._row_cost = cost / max(rows, 1)  # one UNet row at this request's size, in native-size rows
        self._parts: list[torch.Tensor] = []  # outputs of the pieces of the pending request run so far
        self._offset = 0  # rows of the pending request run so far
        self._served = -1  # the tick that last ran a piece of this job (fair order)
        self._seq = 0  # submission order
        self._release = None  # gives the model-lock lease back (once)
        self._callbacks: list = []
        self._partials = 0  # partial images asked for (decoded x̂0 of the first image at evenly spaced steps)
        self._loop: SamplingLoop | None = None  # the sampling loop the program handed over (engine/server/loops.py)
        self._loop_k = 0  # its next step
        self._loop_x: torch.Tensor | None = None  # its latents (while in a persistent batch: refreshed on rebuild)
        self._loop_key: tuple | None = None  # the persistent batch it may share (loops.loop_key)
        self._wake = None  # wakes its scheduler's queue watch (a cancel of a queued job acts at once)

    # ------------------------------------------------------------------------------------------- public
    def cancel(self, reason: str = "cancelled by the client") -> None:
        """Ask for cancellation; it takes effect between steps (at once for a queued job). No-op when terminal."""
        if not self.done():
            self._cancel_reason = reason
            self._cancel.set()
            wake = self._wake
            if wake is not None:
                wake()

    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    def add_done_callback(self, fn) -> None:
        """Call ``fn(job)`` once the job is terminal (at once if it already is), in the thread that ends it; an
        exception in ``fn`` is reported as a warning, never raised into the scheduler."""
        with self._cond:
            if not self.done():
                self._callbacks.append(fn)
                return
        _call_back(fn, self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is terminal (True) or ``timeout`` seconds passed (False). (Woken once, at the end:
        not at every step event, which would make the worker hand the GIL over at every step.)"""
        return self._ended.wait(timeout)

    def events_since(self, index: int, timeout: float | None = None) -> list[dict]:
        """Every event from position ``index`` on, in order; waits up to ``timeout`` for at least one."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._events) > index or self.done(), timeout)
            return list(self._events[index:])

    def __repr__(self) -> str:
        return f"Job({self.kind}, {self.id[:8]}, {self.state}, step {self.step}/{self.steps})"

    # ------------------------------------------------------------------------------------------- scheduler side
    def _emit(self, event: dict) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def _finish(self, state: str, error: str | None = None, images=None) -> None:
        with self._cond:
            if self.done():
                return
            self.images, self.error, self.finished = images, error, time.time()
            self.state = state
            event = {"type": state} if state == "done" else {"type": state, "reason": error}
            self._events.append(event)
            self._cond.notify_all()
        self._ended.set()
        self._parts, self._pending = [], None
        if self._program is not None:
            self._program.close()
            self._program = None
        release, self._release = self._release, None
        if release is not None:
            release()
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            _call_back(fn, self)


def _call_back(fn, job) -> None:
    try:
        fn(job)
    except Exception as e:  # noqa: BLE001 - a callback's failure must not take the scheduler down
        import warnings

        warnings.warn(f"job {job.id}: a done-callback failed ({type(e).__name__}: {e})", RuntimeWarning, stacklevel=2)


def _cat_timesteps(calls: Sequence[UNetCall], device) -> torch.Tensor:
    """One fp32 timestep per row of the merged call (the UNet embeds timesteps as floats either way). Scalar
    timesteps are stacked and repeated in two ops (no per-call tensor, no host read of a device value)."""
    if all(not isinstance(c.t, torch.Tensor) or c.t.dim() == 0 for c in calls):
        ts = torch.stack([torch.as_tensor(c.t).reshape(()) for c in calls]).to(device=device, dtype=torch.float32)
        return ts.repeat_interleave(torch.tensor([c.rows for c in calls], device=device))
    return torch.cat([torch.as_tensor(c.t, device=device).float().reshape(-1).expand(c.rows) for c in calls])


def _rows_of(x, a: int, b: int, rows: int):
    """Rows ``a:b`` of a per-row tensor (first dimension ``rows``); anything else (a scalar timestep, one
    ``(6,)`` time-id vector for all rows, None) unchanged."""
    if isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] == rows:
        return x[a:b]
    return x


def _piece(call: UNetCall, a: int, b: int) -> UNetCall:
    """Rows ``a:b`` of a UNet call (the whole call when they are all of it)."""
    rows = call.rows
    if a == 0 and b == rows:
        return call
    return UNetCall(call.latents[a:b], _rows_of(call.t, a, b, rows), call.embeddings[a:b],
                    _rows_of(call.ip_tokens, a, b, rows), call.ip_scale, pooled=_rows_of(call.pooled, a, b, rows),
                    time_ids=_rows_of(call.time_ids, a, b, rows), adapters=rows_slice(call.adapters, a, b))


def _merge_key(call: UNetCall):
    ip = None if call.ip_tokens is None else (tuple(call.ip_tokens.shape[1:]), float(call.ip_scale))
    return (tuple(call.latents.shape[1:]), call.latents.dtype, tuple(call.embeddings.shape[1:]), ip,
            call.pooled is None)


class StepScheduler:
    """Continuous batching over one :class:`~dreamfuse.engine.Engine`; see the module docs. Starts its worker
    thread at once.

    Args:
        engine: the engine (any UNet backend); the scheduler's worker is the only thread that should run pipelines
            on it while it serves.
        max_batch_rows: UNet rows per call (at the model's native size) and the admission budget of running rows.
        max_queue: requests waiting for admission; one more is rejected with :class:`QueueFull`.
        preview_every: emit a ``preview`` event (the current x̂0 of the request's first image through a fitted
            latent->RGB linear map, a small PNG) every this many steps; 0 = never.
        history: finished jobs kept for :meth:`get`.
    """

    def __init__(self, engine, *, max_batch_rows: int = 16, max_queue: int = 64, preview_every: int = 0,
                 history: int = 1024, limits=None):
        for name, value, low in (("max_batch_rows", max_batch_rows, 1), ("max_queue", max_queue, 0),
                                 ("preview_every", preview_every, 0), ("history", history, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
        if isinstance(limits, dict):  # plain data (a Ray replica's options): fields over the engine's limits
            import dataclasses

            try:
                limits = dataclasses.replace(engine.config.limits, **limits)
            except TypeError as e:
                raise ValueError(f"limits: {e}") from None
        if limits is not None and not hasattr(limits, "validated"):
            raise ValueError(f"limits: expected a Limits, got {type(limits).__name__}")
        self.engine = engine
        self.limits = (limits or engine.config.limits).validated()
        """What one request may ask for (checked at :meth:`submit`); the engine's own limits still apply."""
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self.preview_every = preview_every
        self.ready = False
        self._native = (engine.default_size // engine.vae_scale_factor) ** 2
        self._lock = threading.Condition()
        self._watch_cond = threading.Condition(self._lock)  # the queue watch's own wake-ups (same lock)
        self._queue: list[tuple[int, int, Job]] = []
        self._seq = itertools.count()
        self._active: list[Job] = []
        self._ready: list[tuple[Job, torch.Tensor]] = []  # UNet outputs waiting for the tick's batched update
        self._cond_cache: OrderedDict[tuple, tuple] = OrderedDict()  # merged conditioning of recent calls
        self._loop_groups: dict[tuple, Any] = {}  # persistent batches of sampling loops (loops.LoopGroup)
        self._ticks = 0
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._history = history
        self._closed = False
        self._stop = False
        self._step_ema: float | None = None  # seconds per tick, exponential moving average
        self._rgb_map: torch.Tensor | None = None
        # counters and cumulative histograms since start (never a window: a late scrape loses nothing), see stats()
        self._stats: dict[str, Any] = {"completed": Counter(), "cancelled": 0, "timed_out": 0, "failed": 0,
                                       "rejected": 0, "unet_calls": 0, "images": 0}
        self._stats.update({key: Histogram(bounds) for key, bounds in SERIES.items()})
        self._stats.update({key: {k: Histogram(bounds) for k in KINDS} for key, bounds in SERIES_BY_KIND.items()})
        self._recent_ticks: deque[float] = deque(maxlen=1024)
        self._thread = threading.Thread(target=self._loop, name="dreamfuse-step-scheduler", daemon=True)
        self._thread.start()
        # queued jobs' cancels and deadlines act while the worker is inside a long tick (a large decode, a large
        # image's UNet call), not after it
        self._watch = threading.Thread(target=self._watch_queue, name="dreamfuse-queue-watch", daemon=True)
        self._watch.start()

    # ------------------------------------------------------------------------------------------- submitting
    def submit(self, kind: str, *, n: int = 1, seed: int | Sequence[int] | None = None, priority: int = 0,
               deadline_s: float | None = None, job_id: str | None = None, force: bool = False,
               partial_images: int = 0, **fields) -> Job:
        """Validate a request and queue it; returns its :class:`Job` at once. ``kind``: ``"text2img"`` (fields of
        ``text2img_program``: ``prompt``, ``negative_prompt``, ``width``, ``height``, ``steps``, ``guidance_scale``,
        ``sampler``, ``ip_image``, ``ip_scale``), ``"personalize"`` (``prompt``, ``reference_image``,
        ``subject_token``, ... of ``personalize_program``), ``"compose"`` (``layout``, ``segments``, ``prompt``,
        ... of ``compose_batch_program``), ``"img2img"`` (``prompt``, ``image``, ``strength``, ... of
        ``img2img_program``) or ``"inpaint"`` (``prompt``, ``image``, ``mask``, ``strength``, ... of
        ``inpaint_program``). ``n`` images, ``seed`` as the pipelines (image i gets seed + i).
        ``ValueError`` names a bad field; :class:`QueueFull` / :class:`SchedulerClosed` when not admitted.
        ``job_id``: the job's id (default: a fresh one; a journal resubmitting a job after a restart keeps its id);
        ``force``: queue it even when the queue is full (jobs accepted before a restart); ``partial_images``: that
        many ``partial_image`` events (the first image's current x̂0 decoded by the VAE, a PNG) at evenly spaced
        steps (at most 3)."""
        if kind not in KINDS:
            raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        limits = self.limits
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_images:
            raise ValueError(f"n: must be an integer in [1, {limits.max_images}], got {n!r}")
        self._check_request_limits(fields)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority: must be an integer, got {priority!r}")
        deadline = None
        if deadline_s is not None:
            if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or not deadline_s > 0:
                raise ValueError(f"deadline_s: must be a number of seconds > 0, got {deadline_s!r}")
            deadline = time.monotonic() + float(deadline_s)
        if "prompt" not in fields:
            raise ValueError("prompt: required")
        for reserved in ("progress", "output_type", "callback", "prompts", "requests"):
            if reserved in fields:
                raise ValueError(f"{reserved}: not a request field")
        seeds = resolve_seeds(seed, n)
        program, rows, steps, side = self._program(kind, n, seeds, fields)
        cost = rows * side / self._native
        if isinstance(partial_images, bool) or not isinstance(partial_images, int) or not 0 <= partial_images <= 3:
            raise ValueError(f"partial_images: must be an integer in [0, 3], got {partial_images!r}")
        if job_id is not None and (not isinstance(job_id, str) or not 1 <= len(job_id) <= 64):
            raise ValueError(f"job_id: must be a string of 1 to 64 characters, got {job_id!r}")
        job = Job(kind, program, seeds, steps, rows, cost, priority, deadline, job_id)
        job._seq = next(self._seq)
        job._partials = partial_images
        with self._lock:
            if self._closed:
                program.close()
                raise SchedulerClosed("the server is shutting down")
            if job.id in self._jobs:
                program.close()
                raise ValueError(f"job_id: {job.id!r} is already a job of this scheduler")
            if len(self._queue) >= self.max_queue and not force:
                self._stats["rejected"] += 1
                program.close()
                raise QueueFull(self._retry_after(), len(self._queue))
            heapq.heappush(self._queue, (-priority, job._seq, job))
            job._wake = self._wake_watch
            if deadline is not None:
                self._watch_cond.notify()
            self._remember(job)
            position = sum(1 for _, _, j in self._queue if (-j.priority, 0) <= (-priority, 0)) - 1
            job._emit({"type": "queued", "position": position})
            self._lock.notify_all()
        return job

    def _check_request_limits(self, fields: dict) -> None:
        """This scheduler's per-request limits on steps and size (the engine checks its own again)."""
        from ..validation import is_int

        limits = self.limits
        steps = fields.get("steps")
        if is_int(steps) and steps > limits.max_steps:
            raise ValueError(f"steps: {steps}, the limit of this server is {limits.max_steps}")
        h, w = fields.get("height"), fields.get("width")
        for name, v in (("height", h), ("width", w)):
            if is_int(v) and v > limits.max_side:
                raise ValueError(f"{name}: {v} pixels, the limit of this server is {limits.max_side}")
        if is_int(h) and is_int(w) and h * w > limits.max_pixels:
            raise ValueError(f"height/width: {w}x{h} is {h * w} pixels, the limit of this server is "
                             f"{limits.max_pixels}")

    def _program(self, kind: str, n: int, seeds: list[int], fields: dict):
        """(program, rows per call, sampling steps, latent pixels) of a request; checks every field now."""
        e = self.engine
        f = dict(fields)
        prompt = f.pop("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: must be a string, got {type(prompt).__name__}")
        common = dict(progress=False, output_type="pil")
        if kind == "text2img":
            from ..pipelines.text2img import text2img_program

            program = text2img_program(e, [prompt] * n, seed=seeds, **common, **f)
            cfg = f.get("guidance_scale", 7.5) > 1.0
            rows = n * (2 if cfg else 1)
        elif kind == "personalize":
            from ..pipelines.personalize import personalize_program

            ref = f.pop("reference_image", None)
            if ref is None:
                raise ValueError("reference_image: required")
            program = personalize_program(e, [prompt] * n, ref, seed=seeds, **common, **f)
            rows = 2 * (n + 1)
        elif kind in ("img2img", "inpaint"):
            from ..images import load_image_tensor
            from ..pipelines.img2img import img2img_program
            from ..pipelines.inpaint import inpaint_program

            # read once here: its size is the request's default size (and its cost)
            image = load_image_tensor(f.pop("image", None), "image", e.config.limits)
            if kind == "img2img":
                program = img2img_program(e, [prompt] * n, image, seed=seeds, **common, **f)
            else:
                program = inpaint_program(e, [prompt] * n, image, f.pop("mask", None), seed=seeds, **common, **f)
            for key, own in (("height", image.shape[-2]), ("width", image.shape[-1])):
                f[key] = own if f.get(key) is None else f[key]
            strength = f.get("strength", 0.8 if kind == "img2img" else 1.0)
            f["steps"] = min(int(f.get("steps", 50) * strength), f.get("steps", 50))  # the steps that run
            rows = n * (2 if f.get("guidance_scale", 7.5) > 1.0 else 1)
        else:
            from ..pipelines.composite import ComposeRequest, compose_batch_program

            layout, segments = f.pop("layout", None), f.pop("segments", None)
            if layout is None or segments is None:
                raise ValueError(f"{'layout' if layout is None else 'segments'}: required")
            req = ComposeRequest(layout, segments, prompt, f.pop("negative_prompt", None),
                                 f.pop("scaffold_image", None))
            program = compose_batch_program(e, [req] * n, seed=seeds, **common, **f)
            rows = 2 * n
        steps = f.get("steps", 80 if kind == "compose" else 50)
        h = f.get("height") or e.default_size
        w = f.get("width") or e.default_size
        return program, rows, int(steps), (h // e.vae_scale_factor) * (w // e.vae_scale_factor)

    # ------------------------------------------------------------------------------------------- queries
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot (plain data). Gauges: ``queue_depth``, ``running``. Counters since start:
        ``completed`` (``{kind: n}``), ``cancelled``, ``timed_out``, ``failed``, ``rejected``, ``unet_calls``,
        ``images``. Cumulative histograms since start (:mod:`~dreamfuse.engine.server.histogram` snapshots):
        ``step_seconds`` (every tick), ``rows_per_call`` (every UNet call), and ``{kind: snapshot}``
        ``request_seconds`` (submission to done, done requests) and ``first_step_seconds`` (submission to the end of
        the request's first denoising step: its queue wait plus one step). A request is counted before its terminal
        event is sent, so whoever sees a job end sees it counted. ``recent_step_seconds``: the last 1024 ticks'
        durations, for benchmarks (not exported)."""
        with self._lock:
            s = self._stats
            out = {"queue_depth": len(self._queue), "running": len(self._active),
                   "completed": dict(s["completed"]), "cancelled": s["cancelled"], "timed_out": s["timed_out"],
                   "failed": s["failed"], "rejected": s["rejected"], "unet_calls": s["unet_calls"],
                   "images": s["images"], "recent_step_seconds": list(self._recent_ticks)}
            out.update({key: s[key].snapshot() for key in SERIES})
            out.update({key: {k: h.snapshot() for k, h in s[key].items()} for key in SERIES_BY_KIND})
            return out

    def warmup(self, timeout: float | None = None) -> None:
        """One small text2img through the scheduler (first calls pay allocator and compile costs); then
        :attr:`ready` is True."""
        job = self.submit("text2img", prompt="warm-up", steps=2, seed=0)
        job.wait(timeout)
        if job.state != "done":
            raise RuntimeError(f"warm-up failed: {job.state} ({job.error})")
        self.ready = True

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop admitting; let queued and running jobs finish within ``grace_s`` seconds, cancel the rest; join."""
        end = time.monotonic() + max(0.0, grace_s)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            self._lock.wait_for(lambda: not self._active and not self._queue, max(0.0, end - time.monotonic()))
            self._stop = True
            self._lock.notify_all()
            self._watch_cond.notify()
        self._thread.join()
        self._watch.join()
        with self._lock:  # whatever the grace period did not finish
            left = [j for _, _, j in self._queue] + self._active
            self._queue.clear()
            self._active.clear()
        for job in left:
            self._end(job, "cancelled", "server shutting down")
        self.ready = False

    # ------------------------------------------------------------------------------------------- worker
    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > self._history:
            oldest = next(iter(self._jobs.values()))
            if not oldest.done():
                break
            self._jobs.popitem(last=False)

    def _retry_after(self) -> float:
        per_step = self._step_ema or 0.5
        return round(max(1.0, per_step * 10), 1)

    def _end(self, job: Job, state: str, reason: str | None = None, images=None) -> None:
        if job.done():  # ended already: counted already
            return
        with self._lock:  # counted before the end is visible (stats() promises it)
            if state == "done":
                self._stats["completed"][job.kind] += 1
                self._stats["images"] += len(images or ())
                self._stats["request_seconds"][job.kind].observe(time.monotonic() - job._t0)
            else:
                self._stats[state] += 1
        job._finish(state, reason, images)
        with self._lock:
            self._lock.notify_all()

    def _admission_cost(self, job: Job) -> float:
        """What a running job takes of the admission budget: its cost, or half the budget for a job larger than a
        tick (it runs in pieces, see :meth:`_share`, and leaves room for others to run beside it)."""
        return job._cost if job._cost <= self.max_batch_rows else self.max_batch_rows / 2

    def _sweep_queue(self, now: float) -> list[tuple[Job, str, str]]:
        """Under the lock: take the cancelled and expired jobs out of the queue; returns them with their end."""
        kept, dropped = [], []
        for item in self._queue:
            job = item[2]
            if job._cancel.is_set():
                dropped.append((job, "cancelled", job._cancel_reason))
            elif job.deadline is not None and now >= job.deadline:
                dropped.append((job, "timed_out", "deadline passed while queued"))
            else:
                kept.append(item)
        if dropped:
            heapq.heapify(kept)
            self._queue = kept
        return dropped

    def _drop(self, dropped: list[tuple[Job, str, str]]) -> None:
        """Under the lock: end jobs taken out of the queue."""
        for job, state, reason in dropped:
            self._stats[state] += 1  # counted before the end is visible (stats() promises it)
            job._finish(state, reason)
        if dropped:
            self._lock.notify_all()

    def _wake_watch(self) -> None:
        with self._lock:
            self._watch_cond.notify()

    def _watch_queue(self) -> None:
        """Queued jobs that are cancelled, or whose deadline passes, end at once, whatever the worker is doing (it
        only looks at the queue between ticks, and a tick may be one long call). Asleep until a cancel, a new
        deadline or the earliest queued deadline: never woken by the worker's own notifications (no GIL hand-over
        in its hot path)."""
        with self._lock:
            while not self._stop:
                now = time.monotonic()
                self._drop(self._sweep_queue(now))
                deadlines = [j.deadline for _, _, j in self._queue if j.deadline is not None]
                self._watch_cond.wait(None if not deadlines else max(0.0, min(deadlines) - now) + 0.001)

    def _admit(self) -> list[Job]:
        """Under the lock: drop cancelled / expired queued jobs, admit while the rows budget allows."""
        now = time.monotonic()
        dropped = self._sweep_queue(now)
        budget = self.max_batch_rows - sum(self._admission_cost(j) for j in self._active)
        admitted = []
        lock = getattr(self.engine, "model_lock", None)
        while self._queue and not (lock is not None and lock.change_waiting):  # a model change waits: hold
            job = self._queue[0][2]
            if self._active or admitted:  # an idle scheduler always takes the first job, whatever its size
                if self._admission_cost(job) > budget:
                    break
            heapq.heappop(self._queue)
            if job.deadline is not None and self._step_ema is not None:
                need = self._step_ema * job.steps
                if now + need > job.deadline:
                    dropped.append((job, "timed_out", f"cannot finish before its deadline (needs ~{need:.1f} s "
                                                      f"at {self._step_ema:.3f} s/step)"))
                    continue
            budget -= self._admission_cost(job)
            admitted.append(job)
        self._drop(dropped)
        return admitted

    def _loop(self) -> None:
        lock = getattr(self.engine, "model_lock", None)
        if lock is not None:
            lock.mark_worker()
        while True:
            with self._lock:
                if self._stop:
                    return
                new = self._admit()
                if not new and not self._active:
                    self._lock.wait(timeout=0.05)
                    continue
            for job in new:
                self._start(job)
            with self._lock:
                active = list(self._active)
            if active:
                t0 = time.perf_counter()
                self._ticks += 1
                self._tick(active)
                dt = time.perf_counter() - t0
                with self._lock:
                    self._stats["step_seconds"].observe(dt)
                    self._recent_ticks.append(dt)
                    self._step_ema = dt if self._step_ema is None else 0.8 * self._step_ema + 0.2 * dt

    def _start(self, job: Job) -> None:
        lock = getattr(self.engine, "model_lock", None)
        if lock is not None:
            if not lock.try_lease():  # a model change began since admission: back to the queue
                with self._lock:
                    heapq.heappush(self._queue, (-job.priority, job._seq, job))
                return
            job._release = lock.release_lease
        job.started = time.time()
        job.state = "running"
        job._emit({"type": "started"})
        try:
            self._prepare(job, next(job._program))
        except StopIteration as stop:  # nothing to compute (cannot happen for the pipelines, but be exact)
            self._end(job, "done", images=stop.value)
            return
        except Exception as exc:  # noqa: BLE001 - the request fails alone, with its reason
            self._end(job, "failed", _reason(exc))
            return
        with self._lock:
            self._active.append(job)

    def _prepare(self, job: Job, request) -> None:
        """Make ``request`` (what the program asks for next) the job's pending work. A sampling loop joins a
        persistent batch (loops.py), or, when it is larger than a tick (rows past ``max_batch_rows``), is stepped
        one call at a time through the pieces path."""
        if isinstance(request, SamplingLoop):
            from .loops import loop_key

            job._loop, job._loop_k, job._loop_x = request, 0, request.latents
            job._loop_key = loop_key(request)  # its persistent batch's key, read every tick
            oversized = request.rows > self.max_batch_rows or request.rows * job._row_cost > self.max_batch_rows
            job._pending = request.call(0, request.latents) if oversized else request
        else:
            job._pending = request

    def _send(self, job: Job, value) -> bool:
        """Resume the job's program with ``value``; prepare what it asks for next, or end the job. False when the
        job ended."""
        try:
            self._prepare(job, job._program.send(value))
        except StopIteration as stop:
            self._retire(job)
            self._end(job, "done", images=stop.value)
            return False
        except Exception as exc:  # noqa: BLE001 - the request fails alone, with its reason
            self._retire(job)
            self._end(job, "failed", _reason(exc))
            return False
        return True

    def _advance(self, job: Job, result: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """Send ``result`` to the job's program; record its next request, or its end. ``out``: the UNet's output
        when ``result`` is the new latents of a batched update (previews read the prediction)."""
        request = job._pending
        out = result if out is None else out
        preview, partial = False, None
        if isinstance(request, UNetCall) and request.step is not None and request.preview is not None:
            step = request.step + 1  # decided, and ᾱ_t read, before the program steps its sampler on
            preview = bool(self.preview_every) and step % self.preview_every == 0
            if job._partials:
                at = {max(1, round((k + 1) * request.steps / (job._partials + 1))): k for k in range(job._partials)}
                partial = at.get(step)
            if preview or partial is not None:
                rows, alpha = request.preview
                alpha = alpha() if callable(alpha) else alpha
                request = dataclasses.replace(request, preview=(rows, alpha))
        loop = job._loop
        if loop is not None and isinstance(request, UNetCall):  # an oversized loop, stepped call by call
            job._loop_k += 1
            if job._loop_k < loop.length:
                job._loop_x = result
                job._pending = loop.call(job._loop_k, result)
            else:
                job._loop, job._loop_x = None, None
                if not self._send(job, result):
                    return
        elif not self._send(job, result):
            return
        if isinstance(request, UNetCall) and request.step is not None:
            self._first_step(job)
            job.step, job.steps = request.step + 1, request.steps
            job._emit({"type": "step", "step": job.step, "steps": job.steps})
            if preview:
                self._preview(job, request, out)
            if partial is not None:
                self._partial(job, request, out, partial)

    def _first_step(self, job: Job) -> None:
        """Count a job's time to its first denoising step, once, before its first step event: whoever sees that
        event sees it counted."""
        if not job._stepped:
            job._stepped = True
            with self._lock:
                self._stats["first_step_seconds"][job.kind].observe(time.monotonic() - job._t0)

    def _retire(self, job: Job) -> None:
        with self._lock:
            if job in self._active:
                self._active.remove(job)

    def _tick(self, active: list[Job]) -> None:
        now = time.monotonic()
        runnable = []
        for job in active:
            if job._cancel.is_set():
                self._retire(job)
                self._end(job, "cancelled", job._cancel_reason)
            elif job.deadline is not None and now >= job.deadline:
                self._retire(job)
                self._end(job, "timed_out", f"deadline passed at step {job.step} of {job.steps}")
            elif (job.deadline is not None and self._step_ema is not None
                  and now + self._step_ema * (job.steps - job.step) > job.deadline):
                self._retire(job)
                self._end(job, "timed_out", f"cannot finish before its deadline (step {job.step} of {job.steps}, "
                                            f"{self._step_ema:.3f} s/step)")
            else:
                runnable.append(job)
        decodes = [j for j in runnable if isinstance(j._pending, Decode)]
        calls = [j for j in runnable if isinstance(j._pending, UNetCall)]
        loops = [j for j in runnable if isinstance(j._pending, SamplingLoop)]
        tick = self._ticks
        # ---- VAE decodes of the finished programs: batched per latent size, at most a tick's budget of images
        by_shape: dict[tuple, list[tuple[Job, int]]] = {}
        for job, n in self._share(decodes, lambda j: j._pending.latents.shape[0], tick):
            by_shape.setdefault(tuple(job._pending.latents.shape[1:]), []).append((job, n))
        for group in by_shape.values():
            for chunk in self._chunks(group):
                self._run_pieces(chunk, self._decode, lambda j: j._pending.latents.shape[0])
        # ---- UNet calls: merge what fits, the calls with layer handlers alone (and whole)
        alone = [[(job, job._pending.rows)] for job in calls if job._pending.ctx is not None]
        groups: dict[Any, list[tuple[Job, int]]] = {}
        for job, n in self._share([j for j in calls if j._pending.ctx is None], lambda j: j._pending.rows, tick):
            groups.setdefault(_merge_key(job._pending), []).append((job, n))
        self._ready = []
        self._run_loops(loops, groups)  # takes the pieces that fit its UNet calls along (out of `groups`)
        chunks = [chunk for group in groups.values() for chunk in self._chunks(group)]
        for chunk in chunks + alone:
            self._run_pieces(chunk, self._unet, lambda j: j._pending.rows)
        self._flush_updates()

    def _complete(self, job: Job, out: torch.Tensor) -> None:
        """A job's pending request is done: a UNet call whose program left CFG and the sampler's update to the
        runner waits for the tick's batched update; anything else goes back to its program now."""
        if isinstance(job._pending, UNetCall) and job._pending.update is not None:
            self._ready.append((job, out))
        else:
            self._advance(job, out)

    def _flush_updates(self) -> None:
        """Every update of the tick in one batched call per kind (``apply_updates``), then each program steps on
        with its new latents; if the batched call fails, each update runs alone (a failure stays its own)."""
        ready, self._ready = self._ready, []
        if not ready:
            return
        from ..pipelines.stepping import apply_updates

        try:
            news = apply_updates([j._pending.update for j, _ in ready], [out for _, out in ready])
        except Exception:  # noqa: BLE001 - retried one by one below
            news = None
        for k, (job, out) in enumerate(ready):
            if news is not None:
                self._advance(job, news[k], out)
                continue
            try:
                new = job._pending.update.apply(out)
            except Exception as exc:  # noqa: BLE001 - the request fails alone, with its reason
                self._retire(job)
                self._end(job, "failed", _reason(exc))
                continue
            self._advance(job, new, out)

    def _run_loops(self, jobs: list[Job], calls: dict) -> None:
        """One step of every persistent batch of sampling loops (loops.py): groups are rebuilt only when their
        requests changed; per request only its step event (and its end) is Python. ``calls``: this tick's pieces
        of step-by-step UNet calls by merge key; those a group's UNet calls can carry ride along (popped)."""
        from .loops import LoopGroup, compat_key, run_alone

        by_key: dict[tuple, list[Job]] = {}
        for job in jobs:
            by_key.setdefault(job._loop_key, []).append(job)
        groups = {}
        for key, members in by_key.items():
            group = self._loop_groups.get(key)
            if group is None or not group.same_jobs(members):
                if group is not None:
                    group.save()
                group = LoopGroup(members)
            groups[key] = group
        for key, group in self._loop_groups.items():
            if groups.get(key) is not group:
                group.save()  # requests that left keep their latents (a rebuilt group read them already)
        self._loop_groups = groups
        for key, group in list(groups.items()):
            due = self._loop_previews(group)
            guests = calls.pop(compat_key(group.jobs[0]._loop), None) if group.takes_guests else None
            guest_calls = [_piece(j._pending, j._offset, j._offset + n) for j, n in guests or ()]
            try:
                out, guest_out = group.step(self._loop_unet, self.max_batch_rows, guest_calls)
            except Exception:  # noqa: BLE001 - step each request alone: only the ones that fail alone fail
                del self._loop_groups[key]
                group.save()
                for chunk in self._chunks(guests or []):
                    self._run_pieces(chunk, self._unet, lambda j: j._pending.rows)
                for job in group.jobs:
                    try:
                        run_alone(job, self.engine)
                    except Exception as exc:  # noqa: BLE001
                        self._retire(job)
                        self._end(job, "failed", _reason(exc))
                        continue
                    self._loop_stepped(job, lambda job=job: job._loop_x, None)
                continue
            if guests:
                self._distribute(guests, guest_out, lambda j: j._pending.rows)
            for i, job in enumerate(group.jobs):  # per request: no tensor made unless its step needs one
                job._loop_k += 1
                d = due.get(i)
                self._loop_stepped(job, lambda i=i, g=group: g.latents_of(i),
                                   None if d is None else (d, group.output_of(i, out)))

    def _loop_previews(self, group) -> dict[int, tuple]:
        """The jobs of ``group`` whose next step is due a preview or a partial image: their call (latents before
        the step, ᾱ), read before the step replaces ``X``."""
        due = {}
        if not self.preview_every and not any(j._partials for j in group.jobs):
            return due
        for i, job in enumerate(group.jobs):
            loop, step = job._loop, job._loop.start + job._loop_k + 1
            preview = bool(self.preview_every) and step % self.preview_every == 0
            partial = None
            if job._partials:
                at = {max(1, round((k + 1) * loop.steps / (job._partials + 1))): k for k in range(job._partials)}
                partial = at.get(step)
            if (preview or partial is not None) and loop.preview_rows is not None:
                call = loop.call(job._loop_k, group.latents_of(i))
                rows, alpha = call.preview
                due[i] = (dataclasses.replace(call, preview=(rows, alpha())), preview, partial)
        return due

    def _loop_stepped(self, job: Job, latents, due) -> None:
        """A job's loop made one step (``latents()``: its latents now): its step event, its preview or partial image
        when ``due`` (``((call, preview, partial), its UNet output rows)``), and at the loop's end its final latents
        back to its program."""
        loop = job._loop
        self._first_step(job)
        job.step, job.steps = loop.start + job._loop_k, loop.steps
        job._emit({"type": "step", "step": job.step, "steps": job.steps})
        if due is not None:
            (call, preview, partial), out = due
            if preview:
                self._preview(job, call, out)
            if partial is not None:
                self._partial(job, call, out, partial)
        if job._loop_k >= loop.length:
            job._loop, job._loop_x = None, None
            self._send(job, latents())

    def _loop_unet(self, latents, t, embeddings, ip_tokens, ip_scale, pooled, time_ids, adapters=None) -> torch.Tensor:
        with self._lock:
            self._stats["unet_calls"] += 1
            self._stats["rows_per_call"].observe(int(latents.shape[0]))
        return UNetCall(latents, t, embeddings, ip_tokens, ip_scale, pooled=pooled, time_ids=time_ids,
                        adapters=adapters).run(self.engine)

    def _share(self, jobs: list[Job], rows_of, tick: int) -> list[tuple[Job, int]]:
        """This tick's rows of each job's pending request: every job whose remaining rows fit the tick's budget
        (``max_batch_rows`` native-size rows) runs them all, in the order the jobs were last served; a job whose
        request can never fit one tick (too many rows, or too large) gets what budget is left, in pieces of at most
        ``max_batch_rows`` rows; a tick always runs something (a row dearer than the whole budget: one row, never
        ``max_batch_rows`` of them)."""
        budget = float(self.max_batch_rows)
        share = []
        order = sorted(jobs, key=lambda j: (j._served, j._seq))
        for job in order:
            left = rows_of(job) - job._offset
            cost = job._row_cost
            if left * cost <= budget and left <= self.max_batch_rows:
                n = left
            elif rows_of(job) * cost > self.max_batch_rows or rows_of(job) > self.max_batch_rows:
                n = min(left, self.max_batch_rows, int(budget // cost) if cost > 0 else left)
            else:
                n = 0  # it fits a tick, not what is left of this one: first in line next tick
            if n > 0:
                share.append((job, n))
                budget -= n * cost
        if not share and order:  # rows dearer than the whole budget (a large image): one row at a time
            job = order[0]
            fit = int(self.max_batch_rows // job._row_cost) if job._row_cost > 0 else self.max_batch_rows
            share.append((job, max(1, min(rows_of(job) - job._offset, self.max_batch_rows, fit))))
        for job, _ in share:
            job._served = tick
        return share

    def _chunks(self, group: list[tuple[Job, int]]) -> list[list[tuple[Job, int]]]:
        """Consecutive pieces packed into calls of at most ``max_batch_rows`` rows."""
        chunks, chunk, rows = [], [], 0
        for job, n in group:
            if chunk and rows + n > self.max_batch_rows:
                chunks.append(chunk)
                chunk, rows = [], 0
            chunk.append((job, n))
            rows += n
        if chunk:
            chunks.append(chunk)
        return chunks

    def _run_pieces(self, pieces: list[tuple[Job, int]], fn, rows_of) -> None:
        """Run ``fn(pieces)`` once and give each job its rows; a job whose pending request is then complete gets
        its whole result. If the merged run fails, run each piece alone so that only the jobs that fail by
        themselves fail."""
        try:
            out = fn(pieces)
        except Exception as exc:  # noqa: BLE001 - a merged run is retried piece by piece
            if len(pieces) == 1:
                job = pieces[0][0]
                self._retire(job)
                self._end(job, "failed", _reason(exc))
            else:
                for piece in pieces:
                    self._run_pieces([piece], fn, rows_of)
            return
        self._distribute(pieces, out, rows_of)

    def _distribute(self, pieces: list[tuple[Job, int]], out: torch.Tensor, rows_of) -> None:
        """Give each piece's job its rows of ``out``; a job whose pending request is then complete gets its whole
        result."""
        start = 0
        for job, n in pieces:
            part = out[start:start + n]
            start += n
            if job._offset == 0 and n == rows_of(job):
                self._complete(job, part)
                continue
            job._parts.append(part)
            job._offset += n
            if job._offset == rows_of(job):
                result, job._parts, job._offset = torch.cat(job._parts), [], 0
                self._complete(job, result)

    def _decode(self, pieces: list[tuple[Job, int]]) -> torch.Tensor:
        return self.engine.decode(torch.cat([j._pending.latents[j._offset:j._offset + n] for j, n in pieces]))

    def _unet(self, pieces: list[tuple[Job, int]]) -> torch.Tensor:
        calls = [_piece(j._pending, j._offset, j._offset + n) for j, n in pieces]
        with self._lock:
            self._stats["unet_calls"] += 1
            self._stats["rows_per_call"].observe(sum(c.rows for c in calls))
        if len(calls) == 1:
            return calls[0].run(self.engine)
        e = self.engine
        first = calls[0]
        time_ids = None
        if e.is_xl:
            h, w = (s * e.vae_scale_factor for s in first.latents.shape[-2:])
            time_ids = torch.cat([torch.as_tensor(c.time_ids if c.time_ids is not None else e.time_ids(h, w))
                                  .to(e.device, e.dtype).reshape(-1, 6).expand(c.rows, -1) for c in calls])
        embeddings, ip_tokens, pooled = self._conditioning(pieces, calls)
        merged = UNetCall(torch.cat([c.latents for c in calls]), _cat_timesteps(calls, e.device), embeddings, ip_tokens,
                          first.ip_scale, pooled=pooled, time_ids=time_ids,
                          adapters=row_adapters([(c.adapters, c.rows) for c in calls]))  # each row keeps its own
        return merged.run(e)

    def _conditioning(self, pieces, calls):
        """The merged call's text (and image-prompt) conditioning. It does not change from step to step while the
        same rows of the same requests share a call (a persistent batch): the concatenation is kept and reused,
        not redone every tick (for 64 SD requests 2·64·77·768 floats, 30 MB, per tick)."""
        key = tuple((j.id, j._offset, n) for j, n in pieces)
        sources = [(c.embeddings, c.ip_tokens, c.pooled) for c in calls]
        hit = self._cond_cache.get(key)
        if hit is not None and all(a is b for old, new in zip(hit[0], sources) for a, b in zip(old, new)):
            self._cond_cache.move_to_end(key)
            return hit[1]
        first = calls[0]
        value = (torch.cat([c.embeddings for c in calls]),
                 None if first.ip_tokens is None else torch.cat([c.ip_tokens for c in calls]),
                 None if first.pooled is None else torch.cat([c.pooled for c in calls]))
        self._cond_cache[key] = (sources, value)
        while len(self._cond_cache) > 8:
            self._cond_cache.popitem(last=False)
        return value

    # ------------------------------------------------------------------------------------------- previews
    def _preview(self, job: Job, call: UNetCall, out: torch.Tensor) -> None:
        rows, alpha = call.preview
        kind = prediction_type_of(self.engine.scheduler)
        latents = call.latents[rows, : out.shape[1]]  # an inpainting UNet's input carries mask channels after them
        _, x0 = to_eps_x0(out[rows].float(), latents.float(), alpha, kind)
        rgb = (x0[0].permute(1, 2, 0) @ self._latent_rgb()[:-1] + self._latent_rgb()[-1]).clamp(0, 1)
        from PIL import Image

        img = Image.fromarray((rgb.cpu().numpy() * 255).round().astype("uint8"))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        job._emit({"type": "preview", "step": job.step, "png_b64": base64.b64encode(buf.getvalue()).decode()})

    def _partial(self, job: Job, call: UNetCall, out: torch.Tensor, index: int) -> None:
        """A ``partial_image`` event: the first image's current x̂0 through the VAE (what the image would be if
        sampling stopped here), as a PNG."""
        rows, alpha = call.preview
        kind = prediction_type_of(self.engine.scheduler)
        latents = call.latents[rows].float()
        channels = self.engine.vae.config.latent_channels
        _, x0 = to_eps_x0(out[rows].float()[:, :channels], latents[:, :channels], alpha, kind)
        try:
            image = self.engine.to_pil(self.engine.decode(x0[:1].to(self.engine.dtype)))[0]
        except Exception:  # noqa: BLE001 - a partial image is a courtesy: never fail the request for it
            return
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        job._emit({"type": "partial_image", "index": index, "step": job.step,
                   "png_b64": base64.b64encode(buf.getvalue()).decode()})

    def _latent_rgb(self) -> torch.Tensor:
        """A ``(C + 1, 3)`` affine map latent channels -> RGB, least-squares fitted once to this model's VAE on a
        few random latents (each latent pixel against the mean colour of the 8x8 patch it decodes to)."""
        if self._rgb_map is None:
            e = self.engine
            g = torch.Generator("cpu").manual_seed(0)
            z = torch.randn(4, e.vae.config.latent_channels, 8, 8, generator=g).to(e.device, e.dtype)
            img = e.decode(z)  # (4, 3, 8f, 8f) in [0, 1]
            target = torch.nn.functional.avg_pool2d(img, e.vae_scale_factor).permute(0, 2, 3, 1).reshape(-1, 3)
            x = z.float().cpu().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            x = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
            self._rgb_map = torch.linalg.lstsq(x, target).solution.to(e.device)
        return self._rgb_map


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


__all__ = ["JOB_STATES", "KINDS", "Job", "QueueFull", "SchedulerClosed", "StepScheduler"]
