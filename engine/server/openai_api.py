"""The OpenAI Images API over the step scheduler: what the official ``openai`` client sends, answered as OpenAI does.

Routes (under ``/v1``, behind the API key when one is set):

* ``POST /v1/images/generations`` -- text to image (``text2img``; with ``ip_image`` an IP-Adapter image prompt);
* ``POST /v1/images/edits`` -- ``image`` (+ ``mask``): without a mask img2img, with one inpainting. OpenAI's mask
  convention: the mask's fully transparent pixels (alpha 0) are repainted; a mask without an alpha channel is read
  as dreamfuse's own (white = repaint);
* ``POST /v1/images/variations`` -- variations of ``image``: with an IP-Adapter loaded, the image as an image prompt
  (``ip_scale`` 1 by default, an empty text prompt), otherwise img2img of it with an empty prompt at ``strength`` 0.6;
* ``GET /v1/models``, ``GET /v1/models/{id}`` -- the model the server serves;
* ``GET /v1/images/files/{token}`` -- images answered with ``response_format="url"``: unguessable, expiring links
  (``url_ttl_s``) to the server's own store, no API key needed (the link is the capability).

OpenAI's fields are honoured or accepted and documented as ignored:

=====================  ============================================================================================
``n``, ``size``        images per request; ``"WIDTHxHEIGHT"`` or ``"auto"`` (the model's native size; for an edit
                       the input image's size, fitted to the server's limits)
``quality``            step presets: ``low`` 15, ``medium`` 25, ``standard`` 30, ``high`` 40, ``hd``/``xhigh``/
                       ``max`` 50; ``auto`` = the server's default (50). Giving ``steps`` too is an error
``response_format``    ``b64_json`` (default), ``url`` (the store above), ``png`` (dreamfuse: the PNG bytes, n = 1)
``output_format``      ``png`` (default), ``jpeg``, ``webp``; ``output_compression`` 0-100 is the JPEG/WebP quality
``background``         ``auto`` and ``opaque`` accepted; ``transparent`` refused (400, param ``background``)
``stream``             with ``partial_images`` 0-3: OpenAI's streaming events (``image_generation.partial_image``
                       from the scheduler's x̂0 decodes, then ``image_generation.completed`` per image;
                       ``image_edit.*`` for edits); an ``error`` event when the job fails
``model``, ``style``,  accepted and ignored (the model is chosen on the server's command line)
``moderation``,
``user``, ``safety_identifier``, ``input_fidelity``
=====================  ============================================================================================

dreamfuse's own fields stay (``seed``, ``steps``, ``negative_prompt``, ``guidance_scale``, ``sampler``, ``width`` /
``height``, ``strength``, ``ip_image``, ``ip_scale``, ``priority``, ``deadline_s``, ``wait``, and the per-request
adapters ``loras: [{"name", "scale"}]`` / ``learned_tokens: [name]``): the ``openai`` client sends them with
``extra_body={...}``; a bad adapter is a 400 with ``param`` ``loras`` / ``learned_tokens``. Unknown fields are a
400 naming them.

Errors are OpenAI's objects ``{"error": {"message", "type", "param", "code"}}`` with OpenAI's status codes (400 for
a bad field, ``param`` naming it), so ``except openai.BadRequestError as e: e.param`` works. Answers a retry cannot
change carry ``x-should-retry: false`` (the client obeys it: a request that timed out is not run three times);
429 and 503 carry ``Retry-After``. An ``Idempotency-Key`` header makes a repeated request (a client's retry after
its own timeout) answer with the first request's job instead of running the work again; the same key with another
request is a 400.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import secrets
import threading
import time
from collections import OrderedDict
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, Field, model_validator

from .schemas import GenerationRequest, Int, Number, Side, _no_bool, _Request

QUALITY_STEPS = {"low": 15, "medium": 25, "standard": 30, "high": 40, "hd": 50, "xhigh": 50, "max": 50}
"""OpenAI's ``quality`` as sampler steps (``auto``: the request's default)."""
VARIATION_STRENGTH = 0.6
_TERMINAL = ("done", "cancelled", "timed_out", "failed")
_KEYS_KEPT = 4096  # idempotency keys remembered in memory (the journal keeps them too)


# ------------------------------------------------------------------------------------------------ errors
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
          504: "timeout_error"}
_CODES = {401: "invalid_api_key", 404: "not_found", 409: "cancelled", 413: "request_too_large",
          415: "unsupported_media_type", 429: "server_overloaded", 500: "server_error", 503: "server_shutting_down",
          504: "deadline_exceeded"}
_RETRYABLE = {429, 503}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """An OpenAI error object with its status; ``x-should-retry`` says whether retrying can change the answer."""
    status = 400 if status == 422 else status
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code or _CODES.get(status, "invalid_value" if status == 400 else None)}}
    out = dict(headers or {})
    out["x-should-retry"] = "true" if status in _RETRYABLE else "false"
    return JSONResponse(body, status_code=status, headers=out)


def _from_http(e: HTTPException) -> JSONResponse:
    """A FastAPI error raised by the shared request handling (its ``detail`` list names the field) as OpenAI's."""
    detail, param, code = e.detail, None, None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        loc = [str(x) for x in first.get("loc") or () if x != "body"]
        param = loc[0] if loc else None
        message = str(first.get("msg", ""))
        kind = str(first.get("type", ""))
        code = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter",
                "json_invalid": "invalid_json"}.get(kind)
        if kind == "extra_forbidden" and param:  # a nested one as OpenAI writes it: 'loras[0].path'
            where = "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc[1:])
            message = f"Unknown parameter: '{param}{where}'."
        elif param and not message.startswith(param):
            message = f"{param}: {message}"
    elif isinstance(detail, dict):  # a job's end: {"id", "status", "error"}
        message = f"job {detail.get('id')} {detail.get('status')}: {detail.get('error')}"
        code = {"timed_out": "deadline_exceeded", "cancelled": "cancelled", "failed": "server_error"}.get(
            str(detail.get("status")))
        if e.status_code == 422 and code == "server_error":  # its own numbers overflowed (http.NON_FINITE)
            code = "non_finite_output"
    else:
        message = str(detail)
    return error_response(e.status_code, message, param, code, dict(e.headers or {}))


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class OpenAIRoute(APIRoute):
    """A route whose errors (the shared handlers' ``HTTPException``s, the auth dependency's 401, ``OpenAIError``)
    are answered as OpenAI error objects."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except OpenAIError as e:
                return error_response(e.status, e.message, e.param, e.code, e.headers)
            except HTTPException as e:
                return _from_http(e)

        return route


# ------------------------------------------------------------------------------------------------ request bodies
Quality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]
Compression = Annotated[int, BeforeValidator(_no_bool), Field(ge=0, le=100)]


class _OpenAIFields(BaseModel):
    """OpenAI's fields shared by the three routes."""

    response_format: Literal["b64_json", "url", "png"] = Field(
        default="b64_json", description="b64_json (default), url (an expiring link to this server), png (dreamfuse: "
                                        "the PNG bytes, n = 1)")
    output_format: Literal["png", "jpeg", "webp"] = Field(default="png", description="the images' file format")
    output_compression: Compression | None = Field(default=None, description="JPEG/WebP quality 0-100 (default 100)")
    quality: Quality | None = Field(default=None, description="a step preset (low 15 ... hd 50); auto = default")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        default=None, description="auto / opaque; transparent is refused (the images are opaque)")
    moderation: str | None = Field(default=None, description="accepted and ignored")
    style: str | None = Field(default=None, description="accepted and ignored")
    safety_identifier: str | None = Field(default=None, description="accepted and ignored")
    stream: bool = Field(default=False, description="OpenAI's streaming events (text/event-stream)")
    partial_images: Annotated[int, BeforeValidator(_no_bool), Field(ge=0, le=3)] | None = Field(
        default=None, description="with stream: partial images (0-3) before the final ones")

    @model_validator(mode="after")
    def _openai_rules(self):
        if self.background == "transparent":
            raise ValueError("background: 'transparent' is not supported: dreamfuse generates opaque images (use "
                             "'auto' or 'opaque')")
        if self.quality not in (None, "auto") and "steps" in self.model_fields_set:
            raise ValueError("quality: give quality (a step preset) or steps, not both")
        if self.response_format == "png" and self.stream:
            raise ValueError("response_format: 'png' answers with bytes; it does not stream")
        return self

    def steps_for(self, default: int) -> int:
        steps = getattr(self, "steps", default)
        if self.quality not in (None, "auto"):
            return QUALITY_STEPS[self.quality]
        return steps if "steps" in self.model_fields_set else default


class OpenAIGenerationRequest(_OpenAIFields, GenerationRequest):
    """``POST /v1/images/generations``."""

    response_format: Literal["b64_json", "url", "png"] = Field(default="b64_json")
    size: str | None = Field(default=None, pattern=r"^(auto|\d{1,5}x\d{1,5})$",
                             description="'WIDTHxHEIGHT' or 'auto' (the model's native size)")

    @model_validator(mode="after")
    def _size(self):  # GenerationRequest's, with "auto"
        if self.size == "auto":
            self.size = None
        return GenerationRequest._size(self)


class OpenAIEditRequest(OpenAIGenerationRequest):
    """``POST /v1/images/edits``: ``image`` (and ``mask``) as uploaded files, or base64 in a JSON body."""

    image: str | None = Field(default=None, description="the image to edit (base64 in JSON; multipart: a file)")
    mask: str | None = Field(default=None, description="where to repaint: alpha 0 (OpenAI's convention) or white")
    strength: Number | None = Field(default=None, gt=0, le=1,
                                    description="how far from the input (0-1]; default 0.8 img2img, 1.0 inpainting")
    input_fidelity: str | None = Field(default=None, description="accepted and ignored")


class OpenAIVariationRequest(_OpenAIFields, _Request):
    """``POST /v1/images/variations``."""

    image: str | None = Field(default=None, description="the image (base64 in JSON; multipart: a file)")
    prompt: str = Field(default="", description="dreamfuse: a text prompt to steer the variations (default none)")
    n: Int = Field(default=1, ge=1, description="images")
    size: str | None = Field(default=None, pattern=r"^(auto|\d{1,5}x\d{1,5})$",
                             description="'WIDTHxHEIGHT' or 'auto' (the input's size, fitted to the limits)")
    width: Side = Field(description="multiple of 8")
    height: Side = Field(description="multiple of 8")
    sampler: str = Field(default="ddim", description="a sampler name")
    strength: Number | None = Field(default=None, gt=0, le=1,
                                    description="without an IP-Adapter: img2img strength (default 0.6)")
    ip_scale: Number = Field(default=1.0, ge=0, le=10, description="with an IP-Adapter: the image prompt's weight")

    @model_validator(mode="after")
    def _size(self):
        if self.size not in (None, "auto"):
            if self.width is not None or self.height is not None:
                raise ValueError("size: give size or width/height, not both")
            w, h = (int(v) for v in self.size.split("x"))
            for v in (w, h):
                if v < 8 or v % 8:
                    raise ValueError(f"size: sides must be positive multiples of 8, got {v}")
            self.width, self.height = w, h
        return self


# ------------------------------------------------------------------------------------------------ the URL store
class ImageStore:
    """Images answered as URLs: kept in memory under unguessable tokens until they expire (``ttl_s``), at most
    ``max_bytes`` in all (the oldest go first)."""

    def __init__(self, ttl_s: float = 3600.0, max_bytes: int = 256 << 20):
        self.ttl_s, self.max_bytes = float(ttl_s), int(max_bytes)
        self._items: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._items[token] = (data, media_type, time.monotonic() + self.ttl_s)
            self._size += len(data)
            self._expire()
        return token

    def get(self, token: str) -> tuple[bytes, str] | None:
        with self._lock:
            self._expire()
            item = self._items.get(token)
            return None if item is None else item[:2]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            token, (data, _, expiry) = next(iter(self._items.items()))
            if expiry > now and self._size <= self.max_bytes:
                break
            del self._items[token]
            self._size -= len(data)


# ------------------------------------------------------------------------------------------------ helpers
_EXT = {"png": ("png", "image/png"), "jpeg": ("jpg", "image/jpeg"), "webp": ("webp", "image/webp")}


def encode(png: bytes, output_format: str, compression: int | None) -> bytes:
    """A PNG re-encoded in ``output_format`` (JPEG/WebP at quality ``compression``, default 100)."""
    if output_format == "png":
        return png
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    buf = io.BytesIO()
    quality = 100 if compression is None else int(compression)
    img.save(buf, format="JPEG" if output_format == "jpeg" else "WEBP", quality=quality)
    return buf.getvalue()


def openai_mask(mask):
    """An OpenAI edit mask (repaint where alpha is 0) as dreamfuse's (an L image, white = repaint); a mask without
    an alpha channel is already dreamfuse's."""
    from PIL import Image

    has_alpha = mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info)
    if not has_alpha:
        return mask
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0).convert("L") if isinstance(alpha, Image.Image) else mask


def _png_of(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _request_hash(req: BaseModel, uploads: dict) -> str:
    h = hashlib.sha256(json.dumps(req.model_dump(mode="json"), sort_keys=True, default=str).encode())
    for k in sorted(uploads):
        h.update(k.encode() + hashlib.sha256(uploads[k]).digest())
    return h.hexdigest()


def _size_of(job, req) -> str:
    images = getattr(job, "images", None)
    if images:
        return f"{images[0].width}x{images[0].height}"
    if getattr(req, "width", None) and getattr(req, "height", None):
        return f"{req.width}x{req.height}"
    return "auto"


# ------------------------------------------------------------------------------------------------ the routes
def add_openai_routes(app, state, dependencies, model_name: str) -> None:
    """Add the OpenAI routes to ``app`` over ``state`` (the HTTP layer's ``_App``)."""
    router = APIRouter(prefix="/v1", dependencies=dependencies, route_class=OpenAIRoute)
    started = int(time.time())
    store = state.url_store
    keys: OrderedDict[str, tuple[str, str]] = OrderedDict()
    keys_lock = asyncio.Lock()

    async def submit(request: Request, req, uploads: dict, kind: str, raw: dict, **kwargs):
        """Submit once per idempotency key: a repeated key answers with its first job."""
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 255:
            raise OpenAIError(400, "Idempotency-Key: must be 1 to 255 characters", "Idempotency-Key")
        if key is None:
            return await state.submit(kind, type(req).model_fields, raw=raw, **kwargs)
        digest = _request_hash(req, uploads)
        async with keys_lock:
            seen = keys.get(key)
            if seen is None and state.journal is not None:
                rec = await run_in_threadpool(state.journal.by_key, key)
                if rec is not None:
                    seen = (rec.id, None)
            if seen is not None:
                job_id, first = seen
                if first is not None and first != digest:
                    raise OpenAIError(400, "Idempotency-Key: this key was used with another request",
                                      "Idempotency-Key", "idempotency_key_reused")
                try:
                    return state.job(job_id)
                except HTTPException:
                    pass  # forgotten long ago: run it again
            job = await state.submit(kind, type(req).model_fields, raw=raw, idempotency_key=key, **kwargs)
            keys[key] = (job.id, digest)
            while len(keys) > _KEYS_KEPT:
                keys.popitem(last=False)
            return job

    async def images_response(request: Request, job, req, event_prefix: str):
        if req.stream:
            return StreamingResponse(stream(request, job, req, event_prefix), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              "X-Dreamfuse-Job": job.id})
        if not req.wait:
            from .http import job_json

            return JSONResponse(job_json(job), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
        keyed = request.headers.get("idempotency-key") is not None  # the client may come back for it: keep the job
        left = await state.wait_for(request, job, cancel_on_disconnect=not keyed)
        if left is not None:
            return left
        if job.state != "done":
            await state.result(job)  # raises the status for the job's end (converted by the route)
        pngs = await run_in_threadpool(state.pngs_of, job)
        headers = {"X-Dreamfuse-Job": job.id, "X-Dreamfuse-Seeds": ",".join(str(s) for s in job.seeds)}
        if getattr(job, "replica", None):  # a Ray Serve worker replica (ray_app)
            headers["X-Dreamfuse-Replica"] = str(job.replica)
        if req.response_format == "png":
            return Response(pngs[0], media_type="image/png", headers=headers)
        files = await run_in_threadpool(lambda: [encode(p, req.output_format, req.output_compression) for p in pngs])
        data = []
        for f, seed in zip(files, job.seeds):
            if req.response_format == "url":
                ext, media = _EXT[req.output_format]
                token = store.put(f, media)
                data.append({"url": f"{str(request.base_url).rstrip('/')}/v1/images/files/{token}.{ext}",
                             "seed": seed})
            else:
                data.append({"b64_json": base64.b64encode(f).decode("ascii"), "seed": seed})
        return JSONResponse({"created": int(job.created), "data": data, "background": "opaque",
                             "output_format": req.output_format, "size": _size_of(job, req),
                             "quality": req.quality or "auto"}, headers=headers)

    async def stream(request: Request, job, req, prefix: str):
        """OpenAI's image streaming events from the job's events."""
        finished = False
        index = 0
        try:
            while True:
                events = job.events_since(index, 0)
                if not events:
                    await asyncio.sleep(0.02)
                    continue
                for ev in events:
                    index += 1
                    kind = ev["type"]
                    base = {"created_at": int(time.time()), "size": _size_of(job, req),
                            "quality": req.quality or "auto", "background": "opaque",
                            "output_format": req.output_format}
                    if kind == "partial_image":
                        data = await run_in_threadpool(encode, base64.b64decode(ev["png_b64"]), req.output_format,
                                                       req.output_compression)
                        payload = {"type": f"{prefix}.partial_image", "b64_json": base64.b64encode(data).decode(),
                                   "partial_image_index": ev["index"], **base}
                        yield f"event: {prefix}.partial_image\ndata: {json.dumps(payload)}\n\n"
                    elif kind == "done":
                        pngs = await run_in_threadpool(state.pngs_of, job)
                        for png in pngs:
                            data = await run_in_threadpool(encode, png, req.output_format, req.output_compression)
                            payload = {"type": f"{prefix}.completed", "b64_json": base64.b64encode(data).decode(),
                                       **base, "size": _size_of(job, req),
                                       "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                                 "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}}
                            yield f"event: {prefix}.completed\ndata: {json.dumps(payload)}\n\n"
                        finished = True
                        return
                    elif kind in _TERMINAL:
                        code = {"timed_out": "deadline_exceeded", "cancelled": "cancelled"}.get(kind, "server_error")
                        err = {"error": {"message": f"job {job.id} {kind}: {ev.get('reason')}",
                                         "type": "server_error", "param": None, "code": code}}
                        yield f"event: error\ndata: {json.dumps(err)}\n\n"
                        finished = True
                        return
        finally:
            if not finished and not job.done():  # the client left the stream
                job.cancel()

    # ---------------------------------------------------------------------------------------- generations
    @router.post("/images/generations", summary="text to image (OpenAI Images API)",
                 responses=_RESPONSES, openapi_extra=_body(OpenAIGenerationRequest, ("ip_image",)))
    async def generations(request: Request):
        req, uploads = await state.parse(request, OpenAIGenerationRequest, ("ip_image",))
        raw: dict = {}
        ip_image = await state.image("ip_image", req.ip_image, uploads, raw=raw)
        job = await submit(request, req, uploads, "text2img", raw, prompt=req.prompt,
                           negative_prompt=req.negative_prompt, n=req.n, width=req.width, height=req.height,
                           steps=req.steps_for(50), guidance_scale=req.guidance_scale, seed=req.seed,
                           sampler=req.sampler, ip_image=ip_image, ip_scale=req.ip_scale, priority=req.priority,
                           deadline_s=req.deadline_s, partial_images=(req.partial_images or 0) if req.stream else 0,
                           **req.adapter_fields())
        return await images_response(request, job, req, "image_generation")

    # ---------------------------------------------------------------------------------------- edits
    @router.post("/images/edits", summary="edit an image: img2img, or inpainting with a mask (OpenAI Images API)",
                 responses=_RESPONSES, openapi_extra=_body(OpenAIEditRequest, ("image", "mask", "ip_image")))
    async def edits(request: Request):
        try:
            req, uploads = await state.parse(request, OpenAIEditRequest, ("image", "image[]", "mask", "ip_image"))
        except HTTPException as e:
            if "image[]" in str(e.detail):  # several images (the client sends image[] per file)
                raise OpenAIError(400, "image: dreamfuse edits one image; several were sent", "image") from None
            raise
        if "image[]" in uploads:
            if "image" in uploads:
                raise OpenAIError(400, "image: dreamfuse edits one image; several were sent", "image")
            uploads["image"] = uploads.pop("image[]")
        raw: dict = {}
        image = await state.image("image", req.image, uploads, required=True, raw=raw)
        mask = await state.image("mask", req.mask, uploads, raw=raw)
        if mask is not None:
            mask = openai_mask(mask)
            raw["mask"] = _png_of(mask)  # the journal keeps what the pipeline reads
        width, height = req.width, req.height
        if width is None and height is None:
            image, mask, width, height = _fit(image, mask, state.limits, raw)
        ip_image = await state.image("ip_image", req.ip_image, uploads, raw=raw)
        kind = "img2img" if mask is None else "inpaint"
        strength = req.strength if req.strength is not None else (0.8 if mask is None else 1.0)
        fields = dict(prompt=req.prompt, image=image, strength=strength, negative_prompt=req.negative_prompt, n=req.n,
                      width=width, height=height, steps=req.steps_for(50), guidance_scale=req.guidance_scale,
                      seed=req.seed, sampler=req.sampler, ip_image=ip_image, ip_scale=req.ip_scale,
                      priority=req.priority, deadline_s=req.deadline_s,
                      partial_images=(req.partial_images or 0) if req.stream else 0, **req.adapter_fields())
        if mask is not None:
            fields["mask"] = mask
        job = await submit(request, req, uploads, kind, raw, **fields)
        return await images_response(request, job, req, "image_edit")

    # ---------------------------------------------------------------------------------------- variations
    @router.post("/images/variations", summary="variations of an image (OpenAI Images API)",
                 responses=_RESPONSES, openapi_extra=_body(OpenAIVariationRequest, ("image",)))
    async def variations(request: Request):
        req, uploads = await state.parse(request, OpenAIVariationRequest, ("image",))
        raw: dict = {}
        image = await state.image("image", req.image, uploads, required=True, raw=raw)
        engine = getattr(state.scheduler, "engine", None)
        common = dict(negative_prompt=None, n=req.n, steps=req.steps_for(50), guidance_scale=req.guidance_scale,
                      seed=req.seed, sampler=req.sampler, priority=req.priority, deadline_s=req.deadline_s,
                      partial_images=(req.partial_images or 0) if req.stream else 0, **req.adapter_fields())
        if engine is not None and getattr(engine, "ip_adapter", None) is not None:
            raw["ip_image"] = raw.pop("image")
            job = await submit(request, req, uploads, "text2img", raw, prompt=req.prompt, ip_image=image,
                               ip_scale=req.ip_scale, width=req.width, height=req.height, **common)
        else:
            width, height = req.width, req.height
            if width is None and height is None:
                image, _, width, height = _fit(image, None, state.limits, raw)
            job = await submit(request, req, uploads, "img2img", raw, prompt=req.prompt, image=image,
                               strength=req.strength or VARIATION_STRENGTH, width=width, height=height, **common)
        return await images_response(request, job, req, "image_generation")

    # ---------------------------------------------------------------------------------------- models, files
    def model_object() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "dreamfuse"}

    @router.get("/models", summary="the model this server serves (OpenAI Models API)")
    async def models():
        return {"object": "list", "data": [model_object()]}

    @router.get("/models/{model_id:path}", summary="one model (OpenAI Models API)")
    async def model(model_id: str):
        if model_id != model_name:
            raise OpenAIError(404, f"The model '{model_id}' does not exist (this server serves '{model_name}')",
                              "model", "model_not_found")
        return model_object()

    app.include_router(router)
    files = APIRouter(prefix="/v1", route_class=OpenAIRoute)  # no key: the unguessable link is the capability

    @files.get("/images/files/{name}", summary="an image answered with response_format=url (expires)",
               response_class=Response, responses={200: {"content": {"image/png": {}, "image/jpeg": {},
                                                                      "image/webp": {}}}})
    async def image_file(name: str):
        item = store.get(name.rsplit(".", 1)[0])
        if item is None:
            raise OpenAIError(404, "this image link is unknown or has expired", "url", "not_found")
        data, media = item
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    app.include_router(files)


def _fit(image, mask, limits, raw: dict):
    """An edit without a size: the output is the input's size, downscaled to the server's output limits and to
    multiples of 8 (the input and mask resized alike; ``raw`` updated so a restart reads the same pixels)."""
    from PIL import Image

    w, h = image.size
    scale = min(1.0, (limits.max_pixels / (w * h)) ** 0.5, limits.max_side / max(w, h))
    tw, th = max(8, int(w * scale) // 8 * 8), max(8, int(h * scale) // 8 * 8)
    if (tw, th) != (w, h):
        image = image.convert("RGB").resize((tw, th), Image.Resampling.LANCZOS)
        raw["image"] = _png_of(image)
        if mask is not None:
            mask = mask.resize((tw, th), Image.Resampling.LANCZOS)
            raw["mask"] = _png_of(mask)
    return image, mask, tw, th


_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}}}
_IMAGES_SCHEMA = {"type": "object", "properties": {
    "created": {"type": "integer"}, "background": {"type": "string"}, "output_format": {"type": "string"},
    "size": {"type": "string"}, "quality": {"type": "string"},
    "data": {"type": "array", "items": {"type": "object", "properties": {
        "b64_json": {"type": "string"}, "url": {"type": "string"}, "seed": {"type": "integer"}}}}}}
_RESPONSES = {
    200: {"description": "the images (OpenAI's ImagesResponse; `stream`: text/event-stream of OpenAI's image events;"
                         " response_format png: the bytes)",
          "content": {"application/json": {"schema": _IMAGES_SCHEMA}, "text/event-stream": {},
                      "image/png": {}}},
    202: {"description": "`wait: false`: the job, at once"},
    **{status: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
       for status, text in ((400, "a bad field (`error.param` names it)"), (401, "no or a wrong API key"),
                            (409, "the job was cancelled"), (413, "an upload over the limit"),
                            (429, "the queue is full (Retry-After)"), (500, "the job failed"),
                            (503, "shutting down (Retry-After)"), (504, "the deadline passed"))}}


def _body(model: type[BaseModel], files: tuple[str, ...]) -> dict:
    from .http import _openapi_body

    return _openapi_body(model, files)


__all__ = ["ImageStore", "OpenAIError", "QUALITY_STEPS", "add_openai_routes", "error_response", "openai_mask"]
