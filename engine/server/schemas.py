"""The HTTP API's request bodies (pydantic) and the decoding of what a request uploads: base64 or multipart images
and the compose segments JSON. Imports no torch.

The models check types and the ranges that do not depend on the engine (steps >= 1, sizes multiples of 8, finite
guidance, seeds in [0, 2**64)); the engine's own limits (``Limits``: pixels, steps, images, segments, prompt
length) are checked by ``scheduler.submit`` with the same messages as ``engine.text2img``, and the HTTP layer
turns those ``ValueError``s into 422s naming the field too. Unknown fields are refused (a typo such as ``step``
is a 422, not a silently ignored option); ``model`` and ``user`` are accepted and ignored, for OpenAI clients
(the model is chosen on the server's command line, never by a request).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..files import loads_json as files_loads_json

MAX_SEED = 2**64 - 1
MIB = 1 << 20
DEFAULT_MAX_UPLOAD_BYTES = 20 * MIB
"""Largest image one request may upload (decoded bytes); the whole request body may hold base64 of it plus
``_BODY_SLACK``. Pixels are bounded separately by ``limits.max_input_pixels``, from the image header."""
_BODY_SLACK = 1 * MIB
_MAX_SEGMENTS_JSON = 1 * MIB  # as a SEGMENTS.json file (engine.layout)
_MAX_JSON_DEPTH = 32


class UploadTooLarge(ValueError):
    """An upload over the byte limit: answered 413 naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def body_limit(max_upload_bytes: int) -> int:
    """Most bytes a request body may have: one base64 image of ``max_upload_bytes`` plus the other fields."""
    return math.ceil(max_upload_bytes * 4 / 3) + _BODY_SLACK


def _no_bool(v):
    # pydantic's lax mode takes true for 1; a boolean where a number belongs is a client bug
    if isinstance(v, bool):
        raise ValueError("must be a number, not a boolean")
    return v


def _blank_is_none(v):
    # an empty multipart field (a cleared form input) means "not given"
    return None if isinstance(v, str) and not v.strip() else v


Int = Annotated[int, BeforeValidator(_no_bool)]
Number = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]
# The constraints sit on the value type, not on the optional: pydantic applies a union's constraints to None too
# (a TypeError, i.e. a 500, for "seed": null).
Side = Annotated[Annotated[int, BeforeValidator(_no_bool), Field(ge=8, multiple_of=8)] | None,
                 BeforeValidator(_blank_is_none), Field(default=None)]
def _seed_range(v: int) -> int:
    # a validator of its own: pydantic prints an `le` bound of 2**64 - 1 as a float (18446744073709552000)
    if not 0 <= v <= MAX_SEED:
        raise ValueError(f"must be an integer in [0, {MAX_SEED}]")
    return v


Seed = Annotated[Annotated[int, BeforeValidator(_no_bool), AfterValidator(_seed_range)] | None,
                 BeforeValidator(_blank_is_none), Field(default=None)]
Deadline = Annotated[Annotated[float, BeforeValidator(_no_bool), Field(gt=0, allow_inf_nan=False)] | None,
                     BeforeValidator(_blank_is_none), Field(default=None)]
MAX_ADAPTERS = 8
"""Most LoRAs (and learned tokens) one request names: ``dreamfuse.engine.adapters.MAX_PER_REQUEST`` (not imported:
this module imports no torch)."""
_ADAPTER_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$"


class LoraRef(BaseModel):
    """One per-request LoRA: an adapter of the server's ``--adapters`` folder by name, and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_ADAPTER_NAME, description="the adapter's name (its file stem); GET /v1/adapters")
    scale: Number = Field(default=1.0, ge=0, description="its weight (default 1; 0 = off)")


def _json_text(v):
    # a form field carries a list as JSON text; one name or object stands for a list of one
    if isinstance(v, str) and v.strip().startswith("["):
        return files_loads_json(v, "loras", max_bytes=64 * 1024, max_depth=4)
    return [v] if isinstance(v, (str, dict)) else v


def _lora_refs(v):
    v = _json_text(v)
    return [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v


Loras = Annotated[list[LoraRef] | None, BeforeValidator(_lora_refs), Field(default=None, max_length=MAX_ADAPTERS)]
TokenNames = Annotated[list[Annotated[str, Field(pattern=_ADAPTER_NAME)]] | None, BeforeValidator(_json_text),
                       Field(default=None, max_length=MAX_ADAPTERS)]
_TEXT_FIELDS = frozenset({"prompt", "negative_prompt"})
"""Fields where an empty string is a value (the other fields read "" -- a cleared form input -- as not given)."""
ResponseFormat = Literal["b64_json", "png"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    prompt: str = Field(min_length=1, description="the prompt (the model's tokenizer reads 77 tokens)")
    negative_prompt: str | None = Field(default=None, description="default: none (the empty prompt's embedding)")
    steps: Int = Field(default=50, ge=1, description="sampler steps (engine limit: limits.max_steps)")
    guidance_scale: Number = Field(default=7.5, ge=0, le=100, description="classifier-free guidance; <= 1 disables CFG")
    seed: Seed = Field(description="seed of the first image (image i uses seed + i); default random")
    priority: Int = Field(default=0, ge=-1000, le=1000, description="higher runs first (default 0)")
    deadline_s: Deadline = Field(description="seconds from now; missed -> status timed_out (504), never computed")
    wait: bool = Field(default=True, description="false: answer 202 with a job id at once (GET /v1/jobs/{id})")
    response_format: ResponseFormat = Field(default="b64_json",
                                            description="b64_json: JSON with base64 PNGs; png: the PNG bytes (n=1)")
    model: str | None = Field(default=None, description="ignored (the model is chosen on the command line)")
    user: str | None = Field(default=None, description="ignored (OpenAI clients send it)")
    loras: Loras = Field(description="per-request LoRAs of the server's adapters: [{\"name\": ..., \"scale\": ...}] "
                                     "(or names), applied to this request's rows only (GET /v1/adapters lists them)")
    learned_tokens: TokenNames = Field(description="learned-token adapters by name: their tokens read as learned in "
                                                   "this request's prompts only")

    def adapter_fields(self) -> dict:
        """``loras`` / ``learned_tokens`` as the scheduler takes them (plain data: the journal stores it)."""
        out = {}
        if self.loras:
            out["loras"] = [x.model_dump() for x in self.loras]
        if self.learned_tokens:
            out["learned_tokens"] = list(self.learned_tokens)
        return out

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        # null (JSON) or a blank form input means "not given": the field's default, as OpenAI's API reads it
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if v is not None and not (k not in _TEXT_FIELDS and isinstance(v, str) and not v.strip())}
        return data

    @model_validator(mode="after")
    def _png_is_one_image(self):
        if self.response_format == "png" and getattr(self, "n", 1) != 1:
            raise ValueError("response_format: 'png' answers with one image's bytes; use n=1 or b64_json")
        return self


class GenerationRequest(_Request):
    """``POST /v1/images/generations``: text-to-image, optionally with an IP-Adapter image prompt."""

    n: Int = Field(default=1, ge=1, description="images (seeds seed, seed+1, ...)")
    width: Side = Field(description="multiple of 8; default the model's native size")
    height: Side = Field(description="multiple of 8; default the model's native size")
    size: str | None = Field(default=None, pattern=r"^\d{1,5}x\d{1,5}$",
                             description="OpenAI style 'WIDTHxHEIGHT' instead of width/height")
    sampler: str = Field(default="ddim", description="a sampler name (dreamfuse generate --help lists them)")
    ip_image: str | None = Field(default=None, description="IP-Adapter image prompt: base64 (or a data: URL) of an "
                                                           "image; multipart: an uploaded file")
    ip_scale: Number = Field(default=0.6, ge=0, le=10, description="weight of the image prompt (0 = text only)")

    @model_validator(mode="after")
    def _size(self):
        if self.size is not None:
            if self.width is not None or self.height is not None:
                raise ValueError("size: give size or width/height, not both")
            w, h = (int(v) for v in self.size.split("x"))
            self.width, self.height = _side(w, "size"), _side(h, "size")
        return self


class PersonalizeRequest(_Request):
    """``POST /v1/images/personalize``: DreamMatcher; the subject of ``reference_image`` in new scenes."""

    guidance_scale: Number = Field(default=10.0, ge=0, le=100, description="classifier-free guidance (default 10)")
    n: Int = Field(default=1, ge=1, description="target images")
    width: Side = Field(description="multiple of 8; default the model's native size")
    height: Side = Field(description="multiple of 8; default the model's native size")
    subject_token: str | None = Field(default=None, description="the subject's word in the prompt, e.g. 'sks'")
    reference_image: str | None = Field(default=None, description="base64 image (or an uploaded file)")


class ComposeRequest(_Request):
    """``POST /v1/images/compose``: a colour layout with a prompt per segment (MSP / Composite Diffusion)."""

    steps: Int = Field(default=80, ge=1, description="sampler steps (default 80)")
    sampler: str = Field(default="ddim", description="a stateless sampler (ddim, euler, ...)")
    layout: str | None = Field(default=None, description="base64 layout image (or an uploaded file): one flat "
                                                         "colour per segment; its size is the image's")
    segments: dict[str, Any] | str | None = Field(
        default=None, description="colour -> prompt (or object), as SEGMENTS.json; an object or its JSON text")


def _side(v: int, field: str) -> int:
    if v < 8 or v % 8:
        raise ValueError(f"{field}: sides must be positive multiples of 8, got {v}")
    return v


# ------------------------------------------------------------------------------------------------ body decoding
def loads_json(data: bytes | str, field: str = "body", max_bytes: int | None = None):
    """JSON text -> value, refusing what ``engine.files.read_json`` refuses in files (a key twice, non-UTF-8
    bytes, nesting beyond 32 levels), see :func:`dreamfuse.engine.files.loads_json`."""
    return files_loads_json(data, field, max_bytes=max_bytes, max_depth=_MAX_JSON_DEPTH)


def segments_mapping(value, field: str = "segments") -> dict:
    """The compose segments as a mapping: given as an object, or as JSON text (a form field or uploaded file)."""
    if value is None:
        raise ValueError(f"{field}: missing (a JSON object mapping '#rrggbb' colours to prompts)")
    if isinstance(value, (bytes, str)):
        value = loads_json(value, field, _MAX_SEGMENTS_JSON)
    if not isinstance(value, dict):
        raise ValueError(f"{field}: must be a JSON object mapping colours to prompts, got {type(value).__name__}")
    return value


_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def b64_bytes(text: str, field: str, max_bytes: int) -> bytes:
    """Base64 (standard alphabet, or a ``data:...;base64,`` URL) -> bytes, over ``max_bytes`` refused before
    decoding."""
    text = _DATA_URL.sub("", text.strip(), count=1)
    text = "".join(text.split())
    if len(text) * 3 // 4 > max_bytes:
        raise UploadTooLarge(field, f"about {len(text) * 3 // 4} bytes, the limit for uploads is {max_bytes}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: not valid base64") from None


DEFAULT_MAX_UPLOAD_SIDE = 2048
"""Uploaded images whose longer side is larger are downscaled to it when they arrive (a 7000x7000 reference would
otherwise be held as 590 MB of floats for as long as its request waits and runs)."""


def decode_image(data: bytes, field: str, limits=None, max_side: int | None = DEFAULT_MAX_UPLOAD_SIDE,
                 exact_limits=None):
    """Image file bytes -> a decoded, upright PIL image, with the checks of ``engine.images.open_image``: the
    pixel count from the header before decoding (``limits.max_input_pixels``), corrupt or truncated data as a
    ``ValueError`` naming ``field``, the EXIF orientation applied.

    ``max_side``: an image whose longer side is larger is downscaled to it (aspect kept; JPEGs are decoded at a
    reduced scale directly, others decoded then resized with Lanczos), once, on arrival; None keeps every size.
    ``exact_limits``: for an image whose size *is* the output's (a compose layout): its sides and pixels are checked
    against these generation limits (``max_side``, ``max_pixels``) from the header, and it is never resized."""
    from PIL import Image

    from ..images import check_pixels, open_image
    from ..limits import DEFAULT_LIMITS

    limits = limits or DEFAULT_LIMITS
    if not data:
        raise ValueError(f"{field}: empty upload")
    try:
        img = Image.open(io.BytesIO(data))  # the header only
    except Image.DecompressionBombError as e:
        raise ValueError(f"{field}: too large to decode ({e}); the limit for input images is "
                         f"{limits.max_input_pixels} pixels (limits.max_input_pixels)") from None
    except Exception as e:
        raise ValueError(f"{field}: cannot read the upload as an image ({type(e).__name__}: {e})") from None
    check_pixels(img.width, img.height, field, limits)
    if exact_limits is not None:
        for name, v in (("width", img.width), ("height", img.height)):
            if v > exact_limits.max_side:
                raise ValueError(f"{field}: {name} {v} pixels, the limit is {exact_limits.max_side} (the image's size "
                                 "is the output's)")
        if img.width * img.height > exact_limits.max_pixels:
            raise ValueError(f"{field}: {img.width}x{img.height} is {img.width * img.height} pixels, the limit is "
                             f"{exact_limits.max_pixels} (the image's size is the output's)")
        max_side = None
    elif max_side is not None and max(img.size) > max_side and img.format == "JPEG":
        img.draft("RGB", (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale, still >= max_side
    try:
        img.load()
    except Exception as e:  # truncated or corrupt: OSError, SyntaxError, EOFError, zlib errors...
        raise ValueError(f"{field}: cannot decode the image ({type(e).__name__}: {e})") from None
    img = open_image(img, field, limits)  # orientation (and the same pixel check)
    if max_side is not None and max(img.size) > max_side:
        try:
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        except (ValueError, OSError):  # a mode Pillow cannot resample (16-bit, ...): as the pipelines read it
            import numpy as np

            from ..images import rgb_array

            img = Image.fromarray((rgb_array(img, field) * 255).round().astype(np.uint8))
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img
