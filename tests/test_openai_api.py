"""The OpenAI Images API, tested with the official `openai` client against a server on 127.0.0.1: generations,
edits (img2img, and inpainting with OpenAI's alpha mask), variations, streaming, models, URLs, output formats,
OpenAI error objects, and no duplicate work when the client retries. Each image is compared with the engine's own
solo run (the client is only a transport)."""

from __future__ import annotations

import base64
import io
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

openai = pytest.importorskip("openai")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from dreamfuse.engine import Engine, EngineConfig  # noqa: E402
from dreamfuse.engine.server import StepScheduler  # noqa: E402
from dreamfuse.engine.server.http import create_app  # noqa: E402
from PIL import Image  # noqa: E402
from server_helpers import SIZE, Spy, png_bytes, reference_image, serve  # noqa: E402

STEPS = 2
EXTRA = {"steps": STEPS}


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))


@pytest.fixture(scope="module")
def sched(engine):
    s = StepScheduler(engine, max_batch_rows=8, max_queue=16)
    s.warmup()
    yield s
    s.shutdown(0)


@pytest.fixture(scope="module")
def spy(sched):
    return Spy(sched)


@pytest.fixture(scope="module")
def url(spy):
    with serve(create_app(spy, model_name="tiny"), lifespan="off") as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), np.int16)


def _decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _close(a: Image.Image, b: Image.Image, tol: int = 1) -> bool:
    return int(np.abs(_pixels(a) - _pixels(b)).max()) <= tol


def _file(img: Image.Image, name: str = "i.png"):
    return (name, png_bytes(img), "image/png")


# ------------------------------------------------------------------------------------------ the routes
def test_generate_equals_text2img(client, engine):
    r = client.images.generate(prompt="a photo of a cat", n=2, size=f"{SIZE}x{SIZE}", extra_body={**EXTRA, "seed": 7})
    solo = engine.text2img(["a photo of a cat"] * 2, seed=7, steps=STEPS, height=SIZE, width=SIZE)
    assert len(r.data) == 2 and r.size == f"{SIZE}x{SIZE}" and r.output_format == "png"
    assert all(_close(_decoded(d.b64_json), ref) for d, ref in zip(r.data, solo))


def test_output_formats_and_urls(client, engine):
    jpeg = client.images.generate(prompt="a cat", output_format="jpeg", output_compression=80,
                                  extra_body={**EXTRA, "seed": 1})
    assert _decoded(jpeg.data[0].b64_json).format == "JPEG" and jpeg.output_format == "jpeg"
    webp = client.images.generate(prompt="a cat", output_format="webp", extra_body={**EXTRA, "seed": 1})
    assert _decoded(webp.data[0].b64_json).format == "WEBP"
    linked = client.images.generate(prompt="a cat", response_format="url", extra_body={**EXTRA, "seed": 1})
    got = httpx.get(linked.data[0].url, timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    solo = engine.text2img("a cat", seed=1, steps=STEPS)[0]
    assert _close(Image.open(io.BytesIO(got.content)), solo)
    assert httpx.get(linked.data[0].url.rsplit("/", 1)[0] + "/nope.png").status_code == 404


def test_auto_size_and_quality_presets(client, spy):
    before = len(spy.jobs)
    r = client.images.generate(prompt="a cat", size="auto", quality="low", extra_body={"seed": 2})
    assert r.size == f"{SIZE}x{SIZE}" and spy.jobs[before].steps == 15


def test_edit_without_mask_is_img2img(client, engine):
    src = reference_image(4)
    r = client.images.edit(image=_file(src), prompt="a red car", extra_body={**EXTRA, "seed": 3, "strength": 0.7})
    solo = engine.img2img("a red car", src, strength=0.7, steps=STEPS, seed=3)[0]
    assert _close(_decoded(r.data[0].b64_json), solo)


def test_edit_with_an_alpha_mask_inpaints_where_it_is_transparent(client, engine):
    src = reference_image(5)
    mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, SIZE // 2, SIZE))  # the left half transparent: repaint it
    r = client.images.edit(image=_file(src), mask=_file(mask, "m.png"), prompt="a red circle",
                           extra_body={**EXTRA, "seed": 4})
    white_left = np.zeros((SIZE, SIZE), np.uint8)
    white_left[:, : SIZE // 2] = 255
    solo = engine.inpaint("a red circle", src, Image.fromarray(white_left), steps=STEPS, seed=4)[0]
    got = _decoded(r.data[0].b64_json)
    assert _close(got, solo)


def test_variation(client, engine):
    src = reference_image(6)
    r = client.images.create_variation(image=_file(src), n=1, extra_body={**EXTRA, "seed": 5})
    solo = engine.img2img("", src, strength=0.6, steps=STEPS, seed=5)[0]
    assert _close(_decoded(r.data[0].b64_json), solo)


def test_streaming_partial_images_then_the_image(client, engine):
    events = list(client.images.generate(prompt="a cat", stream=True, partial_images=2,
                                         extra_body={"steps": 6, "seed": 8}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    solo = engine.text2img("a cat", seed=8, steps=6)[0]
    assert _close(_decoded(events[-1].b64_json), solo)
    assert _decoded(events[0].b64_json).size == solo.size
    edits = list(client.images.edit(image=_file(reference_image(1)), prompt="x", stream=True, partial_images=1,
                                    extra_body={"steps": 4, "seed": 1}))
    assert [e.type for e in edits] == ["image_edit.partial_image", "image_edit.completed"]


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "dreamfuse"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("dall-e-3")
    assert e.value.code == "model_not_found"


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, param, code", [
    ({"extra_body": {"steps": 0}}, "steps", "invalid_value"),
    ({"extra_body": {"stepz": 3}}, "stepz", "unknown_parameter"),
    ({"background": "transparent"}, "background", "invalid_value"),
    ({"quality": "high", "extra_body": {"steps": 3}}, "quality", "invalid_value"),
    ({"size": "63x64"}, "size", "invalid_value"),
    ({"n": 500}, "n", "invalid_value"),
    ({"extra_body": {"sampler": "nope"}}, "sampler", "invalid_value"),
])
def test_errors_are_openai_objects(client, kwargs, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a cat", **kwargs)
    err = e.value
    assert err.status_code == 400 and err.param == param and err.code == code, err.body
    assert err.type == "invalid_request_error" and param in err.message


def test_edit_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("x.png", b"not an image", "image/png"), prompt="x")
    assert e.value.param == "image"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=[_file(reference_image(1)), _file(reference_image(2))], prompt="x")
    assert e.value.param == "image" and "one image" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # own red-team pass: this was blamed on `ip_image`
        client.images.edit(image=_file(Image.new("RGB", (1, 1))), prompt="x", size="256x256", extra_body=EXTRA)
    assert e.value.param == "image" and "too small" in e.value.message and "ip_image" not in e.value.message


def test_the_api_key_is_an_authentication_error(sched):
    with serve(create_app(sched, api_key="s3cret"), lifespan="off") as base:
        bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.images.generate(prompt="a cat", extra_body=EXTRA)
        assert e.value.code == "invalid_api_key"
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert len(good.images.generate(prompt="a cat", extra_body=EXTRA).data) == 1


# ------------------------------------------------------------------------------------------ retries
def test_a_timed_out_request_is_not_run_again(url, spy):
    """A 504 (the request's deadline passed) says x-should-retry: false: the client's default retries leave it."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2)
    before = len(spy.jobs)
    with pytest.raises(openai.InternalServerError) as e:
        client.images.generate(prompt="a cat", extra_body={"steps": 400, "deadline_s": 0.2})
    assert e.value.status_code == 504 and e.value.code == "deadline_exceeded"
    assert len(spy.jobs) - before == 1


def test_an_idempotency_key_answers_a_retry_with_the_first_job(url, spy, engine):
    """The client gives up on a slow request (its own timeout) and retries it with the same Idempotency-Key: the
    retry attaches to the first job instead of running it again, and gets its image."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=8, timeout=0.6)
    before = len(spy.jobs)
    r = client.images.generate(prompt="a slow cat", extra_body={"steps": 24, "seed": 9},
                               extra_headers={"Idempotency-Key": "retry-me-1"})
    assert len(spy.jobs) - before == 1
    solo = engine.text2img("a slow cat", seed=9, steps=24)[0]
    assert _close(_decoded(r.data[0].b64_json), solo)
    patient = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    again = patient.images.generate(prompt="a slow cat", extra_body={"steps": 24, "seed": 9},
                                    extra_headers={"Idempotency-Key": "retry-me-1"})
    assert again.data[0].b64_json == r.data[0].b64_json and len(spy.jobs) - before == 1
    with pytest.raises(openai.BadRequestError) as e:
        patient.images.generate(prompt="another cat", extra_body=EXTRA, extra_headers={"Idempotency-Key": "retry-me-1"})
    assert e.value.code == "idempotency_key_reused"


def test_a_full_queue_is_retryable(engine):
    s = StepScheduler(engine, max_batch_rows=2, max_queue=1)
    try:
        with serve(create_app(s), lifespan="off") as base:
            long = {"steps": 300, "wait": False}
            first = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a", **long}, timeout=30)
            second = httpx.post(f"{base}/v1/images/generations", json={"prompt": "b", **long}, timeout=30)
            third = httpx.post(f"{base}/v1/images/generations", json={"prompt": "c", **long}, timeout=30)
            assert (first.status_code, second.status_code, third.status_code) == (202, 202, 429)
            assert third.headers["x-should-retry"] == "true" and int(third.headers["retry-after"]) >= 1
            assert third.json()["error"]["type"] == "rate_limit_error"
    finally:
        s.shutdown(0)


def test_concurrent_clients_each_get_their_solo_image(url, engine):
    results, errors = {}, []

    def call(i):
        try:
            c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            results[i] = c.images.generate(prompt=f"a dog {i}", extra_body={**EXTRA, "seed": i}).data[0].b64_json
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, b64 in results.items():
        assert _close(_decoded(b64), engine.text2img(f"a dog {i}", seed=i, steps=STEPS)[0])
