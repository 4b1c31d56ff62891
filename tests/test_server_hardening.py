"""What an outside red-team pass found in the HTTP server (issue 25, findings 4-8), each as a test: foreign pages and
DNS rebinding, nulls that were 500s, event ids that were 500s or streams that never ended, the docs behind the key,
uploads held at full resolution."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from dreamfuse.engine import Engine, EngineConfig, Limits  # noqa: E402
from dreamfuse.engine.server import StepScheduler  # noqa: E402
from dreamfuse.engine.server.http import create_app  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from server_helpers import SIZE, Spy, png_bytes, serve, wait_for  # noqa: E402

GEN = "/v1/images/generations"
LOCAL = "http://localhost"
SMALL = {"width": SIZE, "height": SIZE, "steps": 2}


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))


@pytest.fixture(scope="module")
def sched(engine):
    s = StepScheduler(engine, max_batch_rows=8, max_queue=16)
    yield s
    s.shutdown(0)


@pytest.fixture(scope="module")
def client(sched):
    return TestClient(create_app(sched), base_url=LOCAL)


# ------------------------------------------------------------------------------------------ 4. cross-site requests
def test_a_foreign_page_cannot_drive_the_server(sched):
    spy = Spy(sched)
    c = TestClient(create_app(spy), base_url=LOCAL)
    form = {"prompt": "a cat", "steps": "2", "width": str(SIZE), "height": str(SIZE), "response_format": "png"}
    r = c.post(GEN, data=form, headers={"Origin": "http://evil.example"})  # a cross-origin form POST
    assert r.status_code == 403 and "--allow-origin" in r.json()["error"]["message"]
    r = c.post(GEN, data=form, headers={"Origin": "null"})  # a sandboxed iframe / file:// page
    assert r.status_code == 403
    r = c.options(GEN, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403
    assert not spy.jobs  # nothing was computed
    r = c.post(GEN, data=form, headers={"Origin": LOCAL})  # the page at / posts same-origin: still works
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert c.post(GEN, data=form).status_code == 200  # curl, SDKs: no Origin


def test_dns_rebinding_names_are_refused(sched):
    c = TestClient(create_app(sched), base_url="http://evil.example:8000")  # evil.example now resolves to us
    r = c.get("/v1/jobs/x")
    assert r.status_code == 421 and "--allowed-host" in r.json()["error"]["message"]
    assert c.get("/healthz").status_code == 421
    for base in ("http://127.0.0.1:8000", "http://[::1]:8000", "http://localhost", "http://10.1.2.3"):
        assert TestClient(create_app(sched), base_url=base).get("/healthz").status_code == 200, base
    named = TestClient(create_app(sched, allowed_hosts=["gen.lan"]), base_url="http://gen.lan:8000")
    assert named.get("/healthz").status_code == 200
    anyone = TestClient(create_app(sched, allowed_hosts=["*"]), base_url="http://x.example")
    assert anyone.get("/healthz").status_code == 200
    r = TestClient(create_app(sched), base_url=LOCAL).get("/healthz", headers={"Host": "a b"})
    assert r.status_code == 400


def test_allowed_origins_get_cors(sched):
    c = TestClient(create_app(sched, allowed_origins=["https://app.example"]), base_url=LOCAL)
    pre = c.options(GEN, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                  "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    r = c.post(GEN, json={"prompt": "a", **SMALL}, headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert c.post(GEN, json={"prompt": "a", **SMALL}, headers={"Origin": "https://other.example"}).status_code == 403


def test_docs_need_the_key_unless_public(sched):
    key = {"Authorization": "Bearer s3cret"}
    c = TestClient(create_app(sched, api_key="s3cret"), base_url=LOCAL)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers=key).status_code == 200, path
    public = TestClient(create_app(sched, api_key="s3cret", public_docs=True), base_url=LOCAL)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert public.get(path).status_code == 200, path
    assert public.post(GEN, json={"prompt": "a", **SMALL}).status_code == 401  # the API itself still needs it


# ------------------------------------------------------------------------------------------ 5. nulls mean defaults
@pytest.mark.parametrize("field", ["seed", "width", "height", "deadline_s", "n", "steps", "negative_prompt",
                                   "guidance_scale", "sampler"])
def test_null_and_blank_fields_are_defaults(client, field):
    body = {"prompt": "a cat", **SMALL, "seed": 3}
    body[field] = None  # null steps is the default 50: slower, still seconds on tiny
    r = client.post(GEN, json=body)
    assert r.status_code == 200, (field, r.text)
    if field != "negative_prompt":  # a blank form input too ("" is a negative prompt of its own)
        form = {k: str(v) for k, v in body.items() if v is not None}
        form[field] = ""
        assert client.post(GEN, data=form).status_code == 200, (field, "form")


def test_seed_limit_is_printed_exactly(client):
    r = client.post(GEN, json={"prompt": "a", **SMALL, "seed": 2**64})
    assert r.status_code == 400 and "18446744073709551615" in r.text and "e+19" not in r.text


@pytest.mark.parametrize("field,value", [("guidance_scale", 1e308), ("guidance_scale", 101), ("ip_scale", 1e6)])
def test_scales_that_can_only_overflow_are_refused_by_name(client, field, value):
    # red team (own pass): guidance_scale 1e308 ran, overflowed to NaN and answered 500
    r = client.post(GEN, json={"prompt": "a", **SMALL, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_a_job_whose_numbers_overflow_is_the_request_s_fault_not_a_500(client, engine, monkeypatch):
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    def nan_unet(sample, timestep, encoder_hidden_states=None, *args, return_dict=True, **kwargs):
        out = torch.full_like(sample, float("nan"))
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    monkeypatch.setattr(engine.unet, "forward", nan_unet)
    r = client.post(GEN, json={"prompt": "a", **SMALL})
    assert r.status_code == 400 and r.json()["error"]["code"] == "non_finite_output", r.text  # 422 on native routes
    assert "not finite" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ 6. event ids and ends
def _finished_job(client) -> str:
    job = client.post(GEN, json={"prompt": "a cat", **SMALL, "wait": False}).json()["id"]
    wait_for(lambda: client.get(f"/v1/jobs/{job}").json()["status"] == "done", 60, "the job")
    return job


@pytest.mark.parametrize("value", [b"\xc2\xb2", "9" * 5000, "-1", "1e3", "0x10"])
def test_bad_last_event_ids_are_400(client, value):
    job = _finished_job(client)
    r = client.get(f"/v1/jobs/{job}/events", headers={"Last-Event-ID": value})
    assert r.status_code == 400 and "Last-Event-ID" in r.text


def test_a_stream_past_its_end_closes(client):
    job = _finished_job(client)
    r = client.get(f"/v1/jobs/{job}/events", headers={"Last-Event-ID": "999999"})
    assert r.status_code == 204  # EventSource does not reconnect after a 204
    n = len([b for b in client.get(f"/v1/jobs/{job}/events").text.split("\n\n") if b.strip()])
    assert client.get(f"/v1/jobs/{job}/events", headers={"Last-Event-ID": str(n - 1)}).status_code == 204


def test_the_first_block_carries_data(client):
    """A standalone `retry:` block reached httpx-sse as an empty message: the retry rides on the first event."""
    job = _finished_job(client)
    blocks = [b for b in client.get(f"/v1/jobs/{job}/events").text.split("\n\n") if b.strip()]
    assert blocks[0].startswith("retry: ") and "\ndata: " in blocks[0]
    assert all("data: " in b for b in blocks)


# ------------------------------------------------------------------------------------------ 8. large uploads
def test_large_uploads_are_downscaled_on_arrival(sched, engine):
    spy = Spy(sched)
    c = TestClient(create_app(spy, max_upload_side=64), base_url=LOCAL)
    rng = np.random.default_rng(0)
    ref = Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))
    r = c.post("/v1/images/personalize", data={"prompt": "a sks dog", "subject_token": "sks", "steps": "2",
                                               "width": str(SIZE), "height": str(SIZE)},
               files={"reference_image": ("r.png", png_bytes(ref), "image/png")})
    assert r.status_code == 200, r.text
    (job,) = spy.jobs
    assert job is not None
    # the request holds the downscaled image, and the result equals a solo run given it
    small = ref.copy()
    small.thumbnail((64, 64), Image.Resampling.LANCZOS)
    solo = engine.personalize(["a sks dog"], small, subject_token="sks", steps=2, height=SIZE, width=SIZE,
                              seed=job.seeds)
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert np.abs(np.asarray(got, np.int16) - np.asarray(solo[0], np.int16)).max() <= 1


def test_a_layout_larger_than_the_output_limits_is_refused_from_its_header(engine):
    s = StepScheduler(engine, limits=Limits(max_pixels=64 * 64, max_side=64))
    try:
        c = TestClient(create_app(s), base_url=LOCAL)
        layout = Image.new("RGB", (128, 64), (255, 0, 0))
        r = c.post("/v1/images/compose", data={"prompt": "x", "segments": json.dumps({"#ff0000": "a cat"})},
                   files={"layout": ("l.png", png_bytes(layout), "image/png")})
        assert r.status_code == 422 and "layout" in r.text and "128" in r.text
    finally:
        s.shutdown(0)


def test_a_real_server_answers_its_own_page(sched):
    """The guard with a real socket: the page's own fetches (Origin = the server's origin) pass."""
    import httpx

    with serve(create_app(sched), lifespan="off") as url:
        r = httpx.post(url + GEN, json={"prompt": "a", **SMALL}, headers={"Origin": url}, timeout=60)
        assert r.status_code == 200
        r = httpx.post(url + GEN, json={"prompt": "a", **SMALL}, headers={"Origin": "http://127.0.0.1:1"}, timeout=60)
        assert r.status_code == 403  # another port is another origin
