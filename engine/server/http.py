"""The HTTP API over a :class:`~dreamfuse.engine.server.StepScheduler`: FastAPI, OpenAI-images-shaped.

``create_app(scheduler)`` returns the ASGI app; ``dreamfuse serve`` runs it under uvicorn, ``ray_app`` under Ray
Serve's ingress. Endpoints (``/openapi.json`` and ``/docs`` describe every field):

- ``POST /v1/images/generations`` (text2img, IP-Adapter image prompt), ``POST /v1/images/personalize``,
  ``POST /v1/images/compose``: a JSON body, or multipart/form-data with the images as uploaded files. The answer
  is ``{"created", "data": [{"b64_json", "seed"}]}`` or, with ``"response_format": "png"``, the PNG bytes. With
  ``"wait": false`` the answer is ``202`` with the job (``id``, ``status``, ``seeds``) at once.
- ``GET /v1/jobs/{id}`` (state, progress, and the images once done), ``GET /v1/jobs/{id}/images/{i}`` (PNG),
  ``GET /v1/jobs/{id}/events`` (Server-Sent Events: queued, started, step, preview, then exactly one of done /
  cancelled / timed_out / failed; ``Last-Event-ID`` resumes), ``DELETE /v1/jobs/{id}`` (cancel).
- ``GET /v1/adapters``: the per-request adapters (``dreamfuse serve --adapters DIR``) that requests name in
  ``loras: [{"name", "scale"}]`` and ``learned_tokens: [name]``: name, kind, rank, size, loaded or not.
- ``/healthz`` (the process answers), ``/readyz`` (model loaded and warmed up: 200, else 503), ``/metrics``
  (Prometheus text format, or OpenMetrics when asked: :mod:`~dreamfuse.engine.server.metrics`), ``/`` (a one-page
  UI).

Status codes: 422 for any bad field (pydantic's checks, and the engine's limits from ``scheduler.submit``,
each naming the field in ``detail[].loc``), 413 for an upload over ``max_upload_bytes``, 415 for a body that is
neither JSON nor a form, 429 with ``Retry-After`` when the admission queue is full, 503 while shutting down,
401 without the bearer token when one is set. A synchronous request answers 504 when its deadline passed
(the job is dropped, never computed past it), 409 when it was cancelled (``DELETE``), 503 when shutdown cancelled
it, 500 when it failed (the reason in ``detail``). A client that disconnects from a synchronous request or from
an event stream cancels its job (``?cancel_on_disconnect=false`` on the stream keeps it).

Model files are never taken from a request: the model, adapters and relation tokens come from the command line
(requests name adapters of the server's folder; a name is a plain file stem and never reaches outside it).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import re
import threading
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from .metrics import ServerMetrics
from .schemas import (
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MAX_UPLOAD_SIDE,
    ComposeRequest,
    PersonalizeRequest,
    UploadTooLarge,
    b64_bytes,
    body_limit,
    decode_image,
    loads_json,
    segments_mapping,
)

TERMINAL_EVENTS = ("done", "cancelled", "timed_out", "failed")
NON_FINITE = "NonFiniteOutputError"  # a job failed because its own numbers overflowed (engine/pipelines/common.py)
SHUTDOWN_REASON = "shutting down"  # in the reason of jobs that shutdown cancelled (answered 503, not 409)
_POLL_S = (0.005, 0.02)  # job polling: fast at first, then 50 Hz (cheap next to any UNet step)
_HEARTBEAT_S = 5.0  # an SSE comment this often while nothing happens, so proxies keep the stream open
_ENGINE_FIELD_ALIASES = {"prompts": "prompt", "guidance": "guidance_scale", "num_images": "n", "images": "n",
                         "reference": "reference_image", "image": "ip_image"}


def field_error(field: str | None, message: str, status: int = 422, type_: str = "value_error") -> HTTPException:
    loc = ["body", field] if field else ["body"]
    return HTTPException(status, detail=[{"type": type_, "loc": loc, "msg": message}])


def _engine_field(message: str, fields) -> str | None:
    """The request field an engine ``ValueError`` names (its messages start with ``field:``)."""
    m = re.match(r"\s*([A-Za-z_]\w*)", message)
    if m is None:
        return None
    name = m.group(1)
    if name not in fields:  # the engine's name for a request field ("image" is the edits' own field, else ip_image)
        name = _ENGINE_FIELD_ALIASES.get(name, name)
    return name if name in fields else None


def _validation_error(e: ValidationError) -> HTTPException:
    errors = []
    for err in e.errors(include_url=False, include_context=False, include_input=False):
        msg = err["msg"].removeprefix("Value error, ")
        loc = list(err["loc"])
        if err["type"] == "value_error" and not loc:  # a model validator: "field: message"
            loc = [msg.split(":", 1)[0].strip()]
        errors.append({"type": err["type"], "loc": ["body", *loc], "msg": msg})
    return HTTPException(422, detail=errors)


_EVENT_ID = re.compile(r"[0-9]{1,12}")
_EXACT_UPLOADS = frozenset({"layout"})  # uploads whose size is the output's: never downscaled


def last_event_start(value: str | None) -> int:
    """The first event to send after ``Last-Event-ID: value`` (0 without one); a value that is not an id this
    server sends (digits only, at most 12) is a 400 naming the header."""
    if value is None or not value.strip():
        return 0
    if not _EVENT_ID.fullmatch(value.strip()):
        raise field_error("Last-Event-ID", f"Last-Event-ID: must be an event id this server sent (a non-negative "
                                           f"integer), got {value[:40]!r}", 400)
    return int(value.strip()) + 1


def png_bytes(img) -> bytes:
    """A PIL image -> PNG bytes, its ``.info`` strings (prompt, seed, steps...) as text chunks."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for k, v in img.info.items():
        if isinstance(v, str):
            meta.add_text(k, v)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=meta, compress_level=4)
    return buf.getvalue()


def _job_pngs(job) -> list[bytes]:
    pngs = getattr(job, "pngs", None)  # a remote job (ray_app) or a stored one (journal) carries PNG bytes
    if pngs is not None:
        return list(pngs)
    pngs = [png_bytes(img) for img in (job.images or [])]
    if job.state == "done":
        try:
            job.pngs = pngs  # encoded once: the answer, GET /v1/jobs/{id} and the journal share them
        except AttributeError:
            pass
    return pngs


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def job_json(job, pngs: list[bytes] | None = None) -> dict:
    out = {"id": job.id, "object": "dreamfuse.job", "kind": job.kind, "status": job.state, "step": job.step,
           "steps": job.steps, "seeds": list(job.seeds), "created": job.created, "finished": job.finished,
           "error": job.error}
    if pngs is not None:
        out["data"] = [{"b64_json": _b64(p), "seed": s} for p, s in zip(pngs, job.seeds)]
    return out


async def _wait_done(job, timeout: float | None = None) -> bool:
    start = time.monotonic()
    while not job.done():
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            return False
        await asyncio.sleep(_POLL_S[0] if waited < 0.2 else _POLL_S[1])
    return True


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (call it once the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _App:
    """The state and handlers of one app (one scheduler)."""

    def __init__(self, scheduler, api_key, max_upload_bytes, limits, shutdown_grace_s,
                 max_upload_side=DEFAULT_MAX_UPLOAD_SIDE, journal=None):
        from . import QueueFull, SchedulerClosed  # the scheduler module imports torch: only once an app is made

        self.scheduler = scheduler
        self.QueueFull, self.SchedulerClosed = QueueFull, SchedulerClosed
        self.api_key = api_key or None
        self.max_upload_bytes = int(max_upload_bytes)
        self.body_limit = body_limit(self.max_upload_bytes)
        if limits is None:
            limits = getattr(scheduler, "limits", None)  # the scheduler's per-request limits
        if limits is None:
            engine = getattr(scheduler, "engine", None)
            limits = getattr(getattr(engine, "config", None), "limits", None)
        if limits is None:
            from ..limits import DEFAULT_LIMITS

            limits = DEFAULT_LIMITS
        self.limits = limits
        self.max_upload_side = max_upload_side
        self.journal = journal
        self._journal_queue = None
        if journal is not None:
            import queue

            self._journal_queue = queue.Queue()
            self._journal_thread = threading.Thread(target=self._journal_writer, name="dreamfuse-journal",
                                                    daemon=True)
            self._journal_thread.start()
        self.shutdown_grace_s = float(shutdown_grace_s)
        self.metrics = ServerMetrics(scheduler)
        self._shutdown_lock = threading.Lock()
        self._shutdown_thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- shutdown
    def begin_shutdown(self) -> threading.Thread:
        """Start the scheduler's graceful shutdown (once; later calls return the same thread): it stops
        admitting at once (503), lets running jobs finish within the grace period, then cancels the rest."""
        with self._shutdown_lock:
            if self._shutdown_thread is None:
                self._shutdown_thread = threading.Thread(
                    target=self.scheduler.shutdown, args=(self.shutdown_grace_s,), name="dreamfuse-shutdown",
                    daemon=True)
                self._shutdown_thread.start()
            return self._shutdown_thread

    def shutdown(self) -> None:
        self.begin_shutdown().join()
        if self._journal_queue is not None:  # what finished is recorded before the process ends
            self._journal_queue.put(None)
            self._journal_thread.join(60)

    # ------------------------------------------------------------------------------------------- journal
    def _journal_done(self, job) -> None:
        """A journaled job ended (worker thread): record it off the worker's path. Jobs that a shutdown cancelled
        stay unfinished in the journal: the next start runs them again."""
        if job.state == "cancelled" and SHUTDOWN_REASON in (job.error or ""):
            return
        self._journal_queue.put(job)

    def _journal_writer(self) -> None:
        while True:
            job = self._journal_queue.get()
            if job is None:
                return
            try:
                pngs = _job_pngs(job) if job.state == "done" else None
                self.journal.finish(job.id, job.state, job.error, pngs)
            except Exception as e:  # noqa: BLE001 - a full disk must not stop the server; the job re-runs later
                import warnings

                warnings.warn(f"journal: cannot record job {job.id} ({type(e).__name__}: {e})", RuntimeWarning,
                              stacklevel=1)

    def recover(self) -> dict[str, int]:
        """Resubmit the jobs the journal holds unfinished (a previous process died or shut down with them), under
        their ids; a job that cannot run again ends failed, "lost in a restart", with the reason. Returns counts."""
        from .journal import LOST

        counts = {"resumed": 0, "lost": 0, "timed_out": 0}
        now = time.time()
        for rec in self.journal.unfinished():
            if self.scheduler.get(rec.id) is not None:
                continue
            if rec.model != self.journal.model:
                self.journal.finish(rec.id, "failed", f"{LOST}: it was accepted for another model ({rec.model}); "
                                                      f"the server now serves {self.journal.model}")
                counts["lost"] += 1
                continue
            if rec.deadline is not None and rec.deadline <= now:
                self.journal.finish(rec.id, "timed_out", "deadline passed during a restart")
                counts["timed_out"] += 1
                continue
            try:
                images = {name: decode_image(path.read_bytes(), name, self.limits, self.max_upload_side,
                                             self.limits if name in _EXACT_UPLOADS else None)
                          for name, path in rec.uploads.items()}
                deadline_s = None if rec.deadline is None else rec.deadline - now
                job = self.scheduler.submit(rec.kind, seed=rec.seeds, job_id=rec.id, force=True,
                                            priority=rec.priority, deadline_s=deadline_s, **rec.fields, **images)
            except (OSError, ValueError, TypeError) as e:
                self.journal.finish(rec.id, "failed", f"{LOST}: {e}")
                counts["lost"] += 1
                continue
            job.add_done_callback(self._journal_done)
            counts["resumed"] += 1
        return counts

    # ------------------------------------------------------------------------------------------- auth
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise HTTPException(401, detail="missing or wrong API key (send 'Authorization: Bearer KEY')",
                                headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------------------------------- request bodies
    async def _read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.body_limit:
            raise field_error(None, f"request body of {length} bytes, the limit is {self.body_limit}", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.body_limit:
                raise field_error(None, f"request body over {self.body_limit} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _form(self, request: Request, body: bytes, files: tuple[str, ...]) -> dict:
        from starlette.datastructures import UploadFile
        from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

        async def stream():
            yield body
            yield b""

        ctype = request.headers.get("content-type", "")
        try:
            if ctype.lower().startswith("multipart/"):
                form = await MultiPartParser(request.headers, stream(), max_files=len(files) + 1, max_fields=64,
                                             max_part_size=self.body_limit).parse()
            else:
                form = await FormParser(request.headers, stream()).parse()
        except MultiPartException as e:
            raise field_error(None, f"cannot parse the form: {e.message}") from None
        data: dict = {}
        for key, value in form.multi_items():
            if key in data:
                raise field_error(key, f"{key}: given twice")
            if isinstance(value, UploadFile):
                if key not in files:
                    raise field_error(key, f"{key}: a file upload is not expected here")
                content = await value.read(self.max_upload_bytes + 1)
                if len(content) > self.max_upload_bytes:
                    raise field_error(key, f"{key}: over {self.max_upload_bytes} bytes, the limit for uploads", 413)
                data[key] = content
            else:
                data[key] = value
        return data

    async def parse(self, request: Request, model: type[BaseModel], files: tuple[str, ...]):
        """The request body -> (validated model, {file field: uploaded bytes})."""
        body = await self._read_body(request)
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            data = await self._form(request, body, files)
        elif ctype in ("application/json", "") or ctype.endswith("+json"):
            try:
                data = loads_json(body, "body")
            except ValueError as e:
                raise field_error(None, str(e), type_="json_invalid") from None
            if not isinstance(data, dict):
                raise field_error(None, f"body: must be a JSON object, got {type(data).__name__}")
        else:
            raise HTTPException(415, detail=f"unsupported content type {ctype!r} (send application/json or "
                                            "multipart/form-data)")
        uploads = {k: data.pop(k) for k in list(data) if isinstance(data[k], bytes)}
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        return req, uploads

    async def image(self, field: str, text: str | None, uploads: dict, required: bool = False,
                    exact: bool = False, raw: dict | None = None):
        """A PIL image from an uploaded file or a base64 field; None when neither is given (unless required).
        Larger than ``max_upload_side``: downscaled on arrival, unless ``exact`` (an image whose size is the
        output's: checked against the request limits instead)."""
        data = uploads.get(field)
        try:
            if data is None and text is not None:
                data = b64_bytes(text, field, self.max_upload_bytes)
            if data is None:
                if required:
                    raise ValueError(f"{field}: missing (base64 in the JSON body, or an uploaded file)")
                return None
            image = await run_in_threadpool(decode_image, data, field, self.limits, self.max_upload_side,
                                            self.limits if exact else None)
            if raw is not None:
                raw[field] = data  # the journal keeps the bytes: a restart decodes exactly what was sent
            return image
        except UploadTooLarge as e:
            raise field_error(e.field, str(e), 413) from None
        except ValueError as e:
            raise field_error(field, str(e)) from None

    # ------------------------------------------------------------------------------------------- submit + answer
    async def submit(self, kind: str, fields, raw: dict | None = None, idempotency_key: str | None = None, **kwargs):
        try:
            if self.journal is None:
                return await run_in_threadpool(self.scheduler.submit, kind, **kwargs)
            return await run_in_threadpool(self._submit_journaled, kind, raw or {}, idempotency_key, kwargs)
        except self.QueueFull as e:
            retry = max(1, int(-(-float(getattr(e, "retry_after_s", 1.0)) // 1)))
            raise HTTPException(429, detail=f"the queue is full; retry in about {retry} s",
                                headers={"Retry-After": str(retry)}) from None
        except self.SchedulerClosed:
            raise HTTPException(503, detail="the server is shutting down", headers={"Retry-After": "5"}) from None
        except ValueError as e:
            message = " ".join(str(e).split())
            raise field_error(_engine_field(message, fields), message) from None

    def _submit_journaled(self, kind: str, raw: dict, idempotency_key: str | None, kwargs: dict):
        """Record the job (its fields, upload bytes, resolved seeds) in the journal, then queue it under that id;
        a job the scheduler refuses is forgotten again."""
        import uuid

        from PIL import Image

        from ..pipelines.common import resolve_seeds

        seeds = resolve_seeds(kwargs.pop("seed", None), kwargs.get("n", 1))
        priority, deadline_s = kwargs.get("priority", 0), kwargs.get("deadline_s")
        fields = {k: v for k, v in kwargs.items()
                  if k not in ("priority", "deadline_s") and not isinstance(v, Image.Image) and v is not None}
        job_id = uuid.uuid4().hex
        deadline = None if deadline_s is None else time.time() + float(deadline_s)
        self.journal.accept(job_id, kind, fields, {k: v for k, v in raw.items() if k in kwargs}, seeds, priority,
                            deadline, idempotency_key)
        try:
            job = self.scheduler.submit(kind, seed=seeds, job_id=job_id, **kwargs)
        except BaseException:
            self.journal.forget(job_id)
            raise
        job.add_done_callback(self._journal_done)
        return job

    async def answer(self, request: Request, job, req) -> Response:
        if not req.wait:
            return JSONResponse(job_json(job), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
        left = await self.wait_for(request, job)
        if left is not None:
            return left
        return await self.result(job, req.response_format)

    def pngs_of(self, job) -> list[bytes]:
        return _job_pngs(job)

    async def wait_for(self, request: Request, job, cancel_on_disconnect: bool = True) -> Response | None:
        """Wait until ``job`` ends (None), or the client leaves: then the job is cancelled (unless
        ``cancel_on_disconnect`` is false: a client that sent an idempotency key may come back for it) and a 499
        returned."""
        if job.done():
            return None
        waiting = asyncio.ensure_future(_wait_done(job))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            job.cancel()
            raise
        finally:
            waiting.cancel()
            gone.cancel()
        if not job.done():  # the client left: nobody will read the result
            if cancel_on_disconnect:
                job.cancel()
            self.metrics.disconnects.inc()
            return Response(status_code=499)
        return None

    async def result(self, job, response_format: str = "b64_json") -> Response:
        state = job.state
        if state != "done":
            status = {"timed_out": 504, "failed": 500}.get(state, 409)
            if state == "failed" and (job.error or "").startswith(NON_FINITE):
                status = 422  # the request's own numbers overflowed (e.g. a huge guidance): not the server's fault
            headers = {"x-should-retry": "false"}  # the same request would end the same way
            if state == "cancelled" and SHUTDOWN_REASON in (job.error or ""):
                status, headers = 503, {"Retry-After": "5"}
            headers["X-Dreamfuse-Job"] = job.id
            raise HTTPException(status, detail={"id": job.id, "status": state, "error": job.error}, headers=headers)
        pngs = await run_in_threadpool(_job_pngs, job)
        headers = {"X-Dreamfuse-Job": job.id, "X-Dreamfuse-Seeds": ",".join(str(s) for s in job.seeds)}
        if getattr(job, "replica", None):  # a Ray Serve worker replica (ray_app)
            headers["X-Dreamfuse-Replica"] = str(job.replica)
        if response_format == "png":
            return Response(pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({"created": int(job.created), "data": [{"b64_json": _b64(p), "seed": s}
                                                                   for p, s in zip(pngs, job.seeds)]},
                            headers=headers)

    def job(self, job_id: str):
        job = self.scheduler.get(job_id)
        if job is None and self.journal is not None and len(job_id) <= 64:
            job = self.journal.stored(job_id)
        if job is None:
            raise HTTPException(404, detail=f"no job {job_id!r} (unknown, or finished long enough ago to be "
                                            "forgotten)")
        return job

    # ------------------------------------------------------------------------------------------- events
    async def events(self, request: Request, job, start: int, cancel_on_disconnect: bool):
        finished = False
        try:
            index, last_write = start, time.monotonic()
            # the reconnection delay rides on the first event: a block of its own reaches third-party SSE clients
            # (httpx-sse) as an empty message
            retry = "retry: 2000\n"
            while True:
                evs = job.events_since(index, 0)
                if not evs:
                    if time.monotonic() - last_write > _HEARTBEAT_S:
                        last_write = time.monotonic()
                        yield ": heartbeat\n\n"
                    await asyncio.sleep(_POLL_S[1])
                    continue
                for ev in evs:
                    yield f"{retry}id: {index}\nevent: {ev['type']}\ndata: {json.dumps(ev, separators=(',', ':'))}\n\n"
                    retry = ""
                    index += 1
                    if ev["type"] in TERMINAL_EVENTS:
                        finished = True
                        return
                last_write = time.monotonic()
        finally:
            if not finished and cancel_on_disconnect and not job.done():
                job.cancel()
                self.metrics.disconnects.inc()


class _RequestCounter:
    """Pure ASGI middleware counting answers by route template and status (never wraps ``receive``: the
    handlers watch it for client disconnects)."""

    def __init__(self, app, state: _App):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            route = _route_of(scope)
            self.state.metrics.http_requests.labels(route, str(status["code"])).inc()


def _route_of(scope) -> str:
    route = scope.get("route")  # set by the router once it matched (a template: no ids in the label)
    return getattr(route, "path", None) or "other"


def _openapi_body(model: type[BaseModel], files: tuple[str, ...]) -> dict:
    schema = model.model_json_schema()
    form = json.loads(json.dumps(schema))
    for f in files:
        if f in form.get("properties", {}):
            form["properties"][f] = {"type": "string", "format": "binary", "description": "an image file"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": form}}}}


_DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
                "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}


def _docs_asset(name: str) -> tuple[bytes, str] | None:
    """Swagger UI's and ReDoc's files from the ``fastapi-offline`` package (the ``serve`` extra): ``/docs`` must not
    need a CDN (a server on a laptop, an air-gapped cluster)."""
    if name not in _DOCS_ASSETS:
        return None
    try:
        from importlib.resources import files

        return files("fastapi_offline").joinpath("static", name).read_bytes(), _DOCS_ASSETS[name]
    except (ImportError, ModuleNotFoundError, OSError):
        return None


def openapi_spec(app: FastAPI, secured: bool) -> dict:
    """The app's OpenAPI document with a bearer security scheme; with an API key, every ``/v1`` operation requires
    it (so /docs' "Authorize" sends it)."""
    import copy

    spec = copy.deepcopy(app.openapi())
    spec.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "dreamfuse serve --api-key KEY"}}
    if secured:
        for path, ops in spec.get("paths", {}).items():
            if path.startswith("/v1") and not path.startswith("/v1/images/files"):
                for op in ops.values():
                    if isinstance(op, dict):
                        op["security"] = [{"bearer": []}]
    return spec


_NATIVE_RESPONSES = {
    200: {"description": "the images: JSON with base64 PNGs (response_format png: the bytes)",
          "content": {"application/json": {"schema": {"type": "object", "properties": {
              "created": {"type": "integer"}, "data": {"type": "array", "items": {"type": "object", "properties": {
                  "b64_json": {"type": "string"}, "seed": {"type": "integer"}}}}}}}, "image/png": {}}},
    202: {"description": "`wait: false`: the job, at once (follow /v1/jobs/{id})"},
    401: {"description": "no or a wrong API key"}, 409: {"description": "the job was cancelled"},
    413: {"description": "an upload over the limit"}, 415: {"description": "neither JSON nor a form"},
    422: {"description": "a bad field (`detail[].loc` names it)"},
    429: {"description": "the queue is full (Retry-After)"}, 500: {"description": "the job failed"},
    503: {"description": "shutting down"}, 504: {"description": "the deadline passed"},
}


def create_app(scheduler, *, api_key: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               limits=None, shutdown_grace_s: float = 10.0, title: str = "dreamfuse", allowed_hosts=(),
               allowed_origins=(), public_docs: bool = False,
               max_upload_side: int | None = DEFAULT_MAX_UPLOAD_SIDE, journal=None, model_name: str = "dreamfuse",
               url_ttl_s: float = 3600.0) -> FastAPI:
    """The FastAPI app serving ``scheduler`` (a ``StepScheduler``, or anything with its interface).

    Args:
        api_key: when set, every ``/v1`` route needs ``Authorization: Bearer <api_key>`` (``/``, ``/healthz``,
            ``/readyz`` and ``/metrics`` stay open for probes and scrapers).
        max_upload_bytes: the most bytes of one uploaded image (base64 or a file); the whole body may hold that
            plus 1 MiB. Pixels are bounded by ``limits.max_input_pixels`` from the image header.
        limits: the per-request :class:`~dreamfuse.engine.limits.Limits` (default: ``scheduler.limits``, else the
            engine's).
        shutdown_grace_s: on app shutdown, running jobs get this long to finish; the rest are cancelled.
        allowed_hosts: host names the server answers to besides ``localhost`` and IP literals (``"*"``: any); see
            :mod:`~dreamfuse.engine.server.security` (DNS rebinding).
        allowed_origins: web origins (``https://app.example``, ``"*"``) whose pages may call the API from a
            browser (they get CORS headers); other cross-origin browser requests are refused with 403.
        public_docs: with ``api_key`` set, ``/docs``, ``/redoc`` and ``/openapi.json`` need the key too, unless
            this is true.
        max_upload_side: uploaded images with a longer side are downscaled to it on arrival (None: never).
        journal: a :class:`~dreamfuse.engine.server.journal.Journal`: every accepted job is recorded before it is
            queued and its end after; jobs it holds unfinished (a previous process died) are resubmitted now, under
            their ids; finished jobs stay answerable from it.
        model_name: the model's id in ``GET /v1/models`` (requests may name any model: it is ignored).
        url_ttl_s: how long images answered with ``response_format="url"`` stay downloadable.
    """
    state = _App(scheduler, api_key, max_upload_bytes, limits, shutdown_grace_s, max_upload_side, journal)
    from .openai_api import ImageStore

    state.url_store = ImageStore(url_ttl_s)
    if journal is not None:
        state.recovered = state.recover()

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(state.shutdown)

    app = FastAPI(title=title, version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  description="dreamfuse image generation: step-level continuous batching over diffusers UNets.")
    app.state.dreamfuse = state
    app.add_middleware(_RequestCounter, state=state)
    if allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        origins = list(allowed_origins)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Dreamfuse-Job", "X-Dreamfuse-Seeds", "Location", "Retry-After"])
    from .security import HostOriginGuard

    app.add_middleware(HostOriginGuard, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)  # outermost
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(state.authorize)])
    docs = APIRouter(dependencies=[] if public_docs else [Depends(state.authorize)], include_in_schema=False)

    @docs.get("/openapi.json")
    async def openapi_json():
        return JSONResponse(openapi_spec(app, secured=state.api_key is not None))

    @docs.get("/docs")
    async def swagger():
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{title} API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png",
                                   swagger_ui_parameters={"persistAuthorization": True})

    @docs.get("/redoc")
    async def redoc():
        from fastapi.openapi.docs import get_redoc_html

        return get_redoc_html(openapi_url="/openapi.json", title=f"{title} API",
                              redoc_js_url="/docs-assets/redoc.standalone.js",
                              redoc_favicon_url="/docs-assets/favicon.png", with_google_fonts=False)

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(name: str):  # the docs pages' scripts, served from here: they work offline
        asset = _docs_asset(name)
        if asset is None:
            raise HTTPException(404, detail=f"no docs asset {name!r}")
        data, media = asset
        return Response(data, media_type=media, headers={"Cache-Control": "public, max-age=86400"})

    app.include_router(docs)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        from .page import INDEX_HTML

        return HTMLResponse(INDEX_HTML)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        ready = bool(getattr(scheduler, "ready", False))
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics (OpenMetrics when asked)",
             responses={200: {"description": "the Prometheus text format (version 0.0.4), or OpenMetrics 1.0 for "
                                             "`Accept: application/openmetrics-text; version=1.0.0`",
                              "content": {"text/plain": {"schema": {"type": "string"}},
                                          "application/openmetrics-text": {"schema": {"type": "string"}}}}})
    async def metrics(request: Request):
        body, headers = await run_in_threadpool(state.metrics.render, request.headers.get("accept"),
                                                request.headers.get("accept-encoding"))
        return Response(body, headers=headers)

    from .openai_api import add_openai_routes

    add_openai_routes(app, state, [Depends(state.authorize)], model_name)

    pers_files = ("reference_image",)

    @v1.post("/images/personalize", openapi_extra=_openapi_body(PersonalizeRequest, pers_files),
             responses=_NATIVE_RESPONSES,
             summary="DreamMatcher: the subject of a reference image in new scenes")
    async def personalize(request: Request):
        req, uploads = await state.parse(request, PersonalizeRequest, pers_files)
        raw: dict = {}
        reference = await state.image("reference_image", req.reference_image, uploads, required=True, raw=raw)
        job = await state.submit(
            "personalize", PersonalizeRequest.model_fields, raw=raw, prompt=req.prompt, reference_image=reference,
            subject_token=req.subject_token, n=req.n, steps=req.steps, guidance_scale=req.guidance_scale,
            seed=req.seed, width=req.width, height=req.height, priority=req.priority, deadline_s=req.deadline_s,
            **req.adapter_fields())
        return await state.answer(request, job, req)

    comp_files = ("layout", "segments")

    @v1.post("/images/compose", openapi_extra=_openapi_body(ComposeRequest, comp_files),
             responses=_NATIVE_RESPONSES,
             summary="Composite Diffusion: a colour layout with a prompt per segment")
    async def compose(request: Request):
        req, uploads = await state.parse(request, ComposeRequest, comp_files)
        raw: dict = {}
        layout = await state.image("layout", req.layout, uploads, required=True, exact=True, raw=raw)
        try:
            segments = segments_mapping(uploads.get("segments", req.segments))
        except ValueError as e:
            raise field_error("segments", str(e)) from None
        job = await state.submit(
            "compose", ComposeRequest.model_fields, raw=raw, layout=layout, segments=segments, prompt=req.prompt,
            negative_prompt=req.negative_prompt, steps=req.steps, guidance_scale=req.guidance_scale, seed=req.seed,
            sampler=req.sampler, priority=req.priority, deadline_s=req.deadline_s, **req.adapter_fields())
        return await state.answer(request, job, req)

    @v1.get("/adapters", summary="the per-request adapters requests may name (loras, learned_tokens)")
    async def adapters():
        registry = getattr(getattr(scheduler, "engine", None), "_adapters", None)
        if registry is None:
            return {"object": "list", "data": [], "pool": None}
        data = await run_in_threadpool(registry.list)
        return {"object": "list", "data": [{"object": "adapter", **d} for d in data], "pool": registry.pool_info()}

    @v1.get("/jobs/{job_id}", summary="a job's state and progress; its images (base64) once done")
    async def get_job(job_id: str):
        job = state.job(job_id)
        pngs = await run_in_threadpool(_job_pngs, job) if job.state == "done" else None
        return job_json(job, pngs)

    @v1.get("/jobs/{job_id}/images/{index}", summary="one image of a finished job as PNG",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def get_image(job_id: str, index: int):
        job = state.job(job_id)
        if job.state != "done":
            return await state.result(job)  # 409 / 500 / 503 / 504 with the reason
        if not 0 <= index < len(job.seeds):
            raise HTTPException(404, detail=f"job {job_id} has images 0..{len(job.seeds) - 1}")
        pngs = await run_in_threadpool(_job_pngs, job)
        return Response(pngs[index], media_type="image/png", headers={"X-Dreamfuse-Seed": str(job.seeds[index])})

    @v1.get("/jobs/{job_id}/events", summary="Server-Sent Events of a job (queued, started, step, preview, end)",
            response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
    async def job_events(job_id: str, request: Request, cancel_on_disconnect: bool = True):
        job = state.job(job_id)
        start = last_event_start(request.headers.get("last-event-id"))
        have = len(job.events_since(0, 0))
        if start >= have and job.done():  # the client has every event: 204 tells EventSource not to reconnect
            return Response(status_code=204)
        if start > have:
            raise field_error("Last-Event-ID", f"Last-Event-ID: event {start - 1} was never sent (the job has sent "
                                               f"{have})", 400)
        return StreamingResponse(state.events(request, job, start, cancel_on_disconnect),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @v1.delete("/jobs/{job_id}", summary="cancel a job (between steps); answers its state")
    async def cancel_job(job_id: str):
        job = state.job(job_id)
        job.cancel()
        await _wait_done(job, timeout=5.0)  # cancellation lands at the next step boundary
        return job_json(job)

    app.include_router(v1)
    return app


__all__ = ["create_app", "job_json", "png_bytes"]
