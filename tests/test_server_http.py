"""The HTTP API (engine/server/http.py) against the real StepScheduler on the tiny model at 64x64, 2-4 steps:
results equal to engine.text2img, every status path (422 per field, 413, 415, 429 + Retry-After, 504, 409, 404,
401, 503), cancellation by DELETE and by client disconnect (synchronous request and event stream, over a real
socket), failure isolation, graceful shutdown, SSE order and resumption, metrics, and `dreamfuse serve` itself."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
pytest.importorskip("multipart")

import httpx  # noqa: E402
import torch  # noqa: E402
from dreamfuse.engine import Engine, EngineConfig, Limits  # noqa: E402
from dreamfuse.engine.server import SchedulerClosed, StepScheduler  # noqa: E402
from dreamfuse.engine.server.http import create_app  # noqa: E402
from dreamfuse.engine.tiny_adapters import build_tiny_ip_adapter  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from server_helpers import (  # noqa: E402
    SIZE,
    STEPS,
    Spy,
    decode_b64,
    layout_image,
    max_diff,
    png_b64,
    png_bytes,
    reference_image,
    serve,
    wait_for,
)

GEN = "/v1/images/generations"
LOCAL = "http://localhost"  # TestClient's default Host, testserver, is a name the server does not answer to
SMALL = {"width": SIZE, "height": SIZE, "steps": STEPS}
TOLERANCE = 1  # uint8 levels: the rounding of batched matrix products, as batched text2img


@pytest.fixture(scope="module")
def engine():
    e = Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))
    e.load_ip_adapter(build_tiny_ip_adapter(e, plus=True))
    return e


@pytest.fixture(scope="module")
def sched(engine):
    s = StepScheduler(engine, max_batch_rows=8, max_queue=16, preview_every=2)
    s.warmup()
    yield s
    s.shutdown(0)


@pytest.fixture(scope="module")
def client(sched):
    # no lifespan: the module's scheduler outlives each app made on it (the shutdown test has its own)
    return TestClient(create_app(sched), base_url=LOCAL)


def _solo(engine, prompt, **kw):
    return engine.text2img(prompt, progress=False, **kw)


def _detail_fields(r) -> list[str]:
    """The fields a native route's 422 names (FastAPI's detail list)."""
    return [d["loc"][1] if len(d["loc"]) > 1 else "body" for d in r.json()["detail"]]


def _param(r) -> str | None:
    """The field an OpenAI route's error names (OpenAI's error object)."""
    return r.json()["error"]["param"]


# ------------------------------------------------------------------------------------------------ results
def test_generation_json_equals_text2img(client, engine):
    r = client.post(GEN, json={"prompt": "a photo of a cat", "n": 2, "seed": 11, "guidance_scale": 6.0, **SMALL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and [d["seed"] for d in body["data"]] == [11, 12]
    assert r.headers["x-dreamfuse-seeds"] == "11,12"
    solo = _solo(engine, ["a photo of a cat"] * 2, seed=11, guidance_scale=6.0, steps=STEPS, height=SIZE, width=SIZE)
    for d, ref in zip(body["data"], solo):
        img = decode_b64(d["b64_json"])
        assert img.size == (SIZE, SIZE) and img.info["seed"] == str(d["seed"])
        assert max_diff(img, ref) <= TOLERANCE


def test_png_response_and_staggered_async_requests_equal_solo(client, engine):
    r = client.post(GEN, json={"prompt": "a red car", "seed": 3, "response_format": "png", **SMALL})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    assert r.headers["x-dreamfuse-seeds"] == "3"
    # two requests sharing steps: different step counts, guidance scales and samplers, the second arriving late
    a = client.post(GEN, json={"prompt": "a dog", "seed": 21, "width": SIZE, "height": SIZE, "steps": 4,
                               "wait": False})
    assert a.status_code == 202 and a.headers["location"] == f"/v1/jobs/{a.json()['id']}"
    wait_for(lambda: client.get(f"/v1/jobs/{a.json()['id']}").json()["step"] >= 1, what="first step")
    b = client.post(GEN, json={"prompt": "a boat", "seed": 22, "guidance_scale": 3.0, "sampler": "euler",
                               "wait": False, **SMALL})
    for resp, kw in ((a, dict(prompt="a dog", seed=21, steps=4)),
                     (b, dict(prompt="a boat", seed=22, steps=STEPS, guidance_scale=3.0, sampler="euler"))):
        job_id = resp.json()["id"]
        wait_for(lambda job_id=job_id: client.get(f"/v1/jobs/{job_id}").json()["status"] == "done", what="done")
        got = client.get(f"/v1/jobs/{job_id}").json()
        assert got["step"] == got["steps"] and len(got["data"]) == 1
        ref = _solo(engine, kw.pop("prompt"), height=SIZE, width=SIZE, **kw)[0]
        assert max_diff(decode_b64(got["data"][0]["b64_json"]), ref) <= TOLERANCE
        png = client.get(f"/v1/jobs/{job_id}/images/0")
        assert png.headers["content-type"] == "image/png"
        assert client.get(f"/v1/jobs/{job_id}/images/1").status_code == 404


def test_ip_image_by_multipart_upload_and_base64(client, engine):
    ref_img = reference_image(5)
    fields = {"prompt": "a dog", "seed": "9", "ip_scale": "0.8", "width": str(SIZE), "height": str(SIZE),
              "steps": str(STEPS)}
    r = client.post(GEN, data=fields, files={"ip_image": ("ref.png", png_bytes(ref_img), "image/png")})
    assert r.status_code == 200, r.text
    solo = _solo(engine, "a dog", seed=9, ip_image=ref_img, ip_scale=0.8, steps=STEPS, height=SIZE, width=SIZE)[0]
    assert max_diff(decode_b64(r.json()["data"][0]["b64_json"]), solo) <= TOLERANCE
    r2 = client.post(GEN, json={"prompt": "a dog", "seed": 9, "ip_scale": 0.8, "ip_image": png_b64(ref_img),
                                **SMALL})
    assert r2.status_code == 200 and r2.json()["data"][0]["b64_json"] == r.json()["data"][0]["b64_json"]


def test_personalize_and_compose(client):
    ref = png_b64(reference_image(1))
    r = client.post("/v1/images/personalize", json={"prompt": "a photo of a sks dog", "subject_token": "sks",
                                                    "reference_image": ref, "seed": 4, **SMALL})
    assert r.status_code == 200, r.text
    assert decode_b64(r.json()["data"][0]["b64_json"]).size == (SIZE, SIZE)
    assert _detail_fields(client.post("/v1/images/personalize", json={"prompt": "a sks dog"})) == ["reference_image"]
    segments = {"#ff0000": "a cat", "#0000ff": {"prompt": "a dog"}}
    r = client.post("/v1/images/compose", data={"prompt": "two pets", "steps": str(STEPS), "seed": "6",
                                                "segments": json.dumps(segments)},
                    files={"layout": ("layout.png", png_bytes(layout_image()), "image/png")})
    assert r.status_code == 200, r.text
    r2 = client.post("/v1/images/compose", json={"prompt": "two pets", "steps": STEPS, "seed": 6,
                                                 "segments": segments, "layout": png_b64(layout_image())})
    assert r2.status_code == 200 and r2.json()["data"][0]["b64_json"] == r.json()["data"][0]["b64_json"]
    bad = client.post("/v1/images/compose", json={"prompt": "p", "layout": png_b64(layout_image()),
                                                  "segments": {"#ff0000": "a", "#00zz00": "b"}})
    assert bad.status_code == 422 and _detail_fields(bad) == ["segments"]
    dup = client.post("/v1/images/compose", json={"prompt": "p", "layout": png_b64(layout_image()),
                                                  "segments": '{"#ff0000": "a", "#ff0000": "b"}'})
    assert dup.status_code == 422 and "twice" in dup.text


# ------------------------------------------------------------------------------------------------ 4xx
BAD_FIELDS = [
    ({"steps": 0}, "steps"), ({"steps": "many"}, "steps"), ({"steps": True}, "steps"), ({"steps": 5000}, "steps"),
    ({"width": 63}, "width"), ({"height": 0}, "height"), ({"width": 8192, "height": 64}, "width"),
    ({"width": 4096, "height": 4096}, "height"), ({"n": 0}, "n"), ({"n": 100}, "n"),
    ({"guidance_scale": -1}, "guidance_scale"), ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"guidance_scale": float("inf")}, "guidance_scale"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"),
    ({"sampler": "nope"}, "sampler"), ({"response_format": "jpeg"}, "response_format"),
    ({"response_format": "png", "n": 2}, "response_format"), ({"deadline_s": 0}, "deadline_s"),
    ({"priority": "high"}, "priority"), ({"stepz": 3}, "stepz"), ({"prompt": ""}, "prompt"),
    ({"prompt": None}, "prompt"), ({"prompt": "x" * 20_000}, "prompt"), ({"negative_prompt": 5}, "negative_prompt"),
    ({"negative_prompt": "x" * 20_000}, "negative_prompt"), ({"ip_image": "!!!"}, "ip_image"),
    ({"ip_image": base64.b64encode(b"not an image").decode()}, "ip_image"), ({"ip_scale": -0.5}, "ip_scale"),
    ({"size": "64x64", "width": 64}, "size"), ({"size": "63x64"}, "size"), ({"wait": "maybe"}, "wait"),
]


@pytest.mark.parametrize("change,field", BAD_FIELDS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_FIELDS)])
def test_400_names_the_field(client, change, field):
    """The generations route answers as OpenAI does: 400, an error object whose param is the field."""
    body = {"prompt": "a cat", **SMALL, **change}
    if body.get("prompt") is None:
        del body["prompt"]
    r = client.post(GEN, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert _param(r) == field, r.json()
    assert r.headers["x-should-retry"] == "false" and r.json()["error"]["type"] == "invalid_request_error"


def test_bodies_and_uploads_refused(sched):
    c = TestClient(create_app(sched, max_upload_bytes=2000, limits=Limits(max_input_pixels=32 * 32)), base_url=LOCAL)
    big = png_bytes(reference_image(3))  # a 64x64 noise PNG: > 2000 bytes
    assert len(big) > 2000
    r = c.post(GEN, json={"prompt": "a", "ip_image": base64.b64encode(big).decode()})
    assert r.status_code == 413 and _param(r) == "ip_image"
    r = c.post(GEN, data={"prompt": "a"}, files={"ip_image": ("x.png", big, "image/png")})
    assert r.status_code == 413 and _param(r) == "ip_image"
    small = png_bytes(layout_image())  # 64x64 flat colours: a few hundred bytes, but 4096 pixels > 1024
    r = c.post(GEN, json={"prompt": "a", "ip_image": png_b64(layout_image())})
    assert len(small) < 2000 and r.status_code == 400 and "pixels" in r.text and _param(r) == "ip_image"
    r = c.post(GEN, content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert c.post(GEN, content=b"prompt=a", headers={"Content-Type": "text/plain"}).status_code == 415
    assert c.post(GEN, content=b"{nope", headers={"Content-Type": "application/json"}).status_code == 400
    r = c.post(GEN, content=b'{"prompt": "a", "prompt": "b"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "twice" in r.text
    r = c.post(GEN, data={"prompt": "a"}, files={"steps": ("s.txt", b"4", "text/plain")})
    assert r.status_code == 400 and _param(r) == "steps"
    r = c.post("/v1/images/compose", data={"prompt": "a"}, files={"steps": ("s.txt", b"4", "text/plain")})
    assert r.status_code == 422 and _detail_fields(r) == ["steps"]  # the native routes keep FastAPI's shape


def test_api_key(sched):
    c = TestClient(create_app(sched, api_key="s3cret"), base_url=LOCAL)
    assert c.post(GEN, json={"prompt": "a", **SMALL}).status_code == 401
    assert c.post(GEN, json={"prompt": "a", **SMALL}, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = c.post(GEN, json={"prompt": "a", **SMALL}, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert c.get("/v1/jobs/x").status_code == 401
    for open_path in ("/healthz", "/readyz", "/metrics", "/"):
        assert c.get(open_path).status_code == 200


def test_404_and_openapi(client):
    assert client.get("/v1/jobs/nope").status_code == 404
    assert client.delete("/v1/jobs/nope").status_code == 404
    assert client.get("/v1/jobs/nope/events").status_code == 404
    spec = client.get("/openapi.json").json()
    assert {"/v1/images/generations", "/v1/images/personalize", "/v1/images/compose", "/v1/jobs/{job_id}",
            "/v1/jobs/{job_id}/events"} <= set(spec["paths"])
    body = spec["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert "prompt" in body["application/json"]["schema"]["properties"]
    assert client.get("/docs").status_code == 200


def test_openapi_describes_answers_and_the_docs_work_offline(client, sched):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/v1/images/compose",
                 "/v1/images/personalize"):
        answers = spec["paths"][path]["post"]["responses"]
        assert {"200", "401", "413", "429", "504"} <= set(answers), (path, sorted(answers))
        assert answers["200"]["content"]["application/json"]["schema"].get("properties"), path
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    keyed = TestClient(create_app(sched, api_key="k"), base_url=LOCAL)
    secured = keyed.get("/openapi.json", headers={"Authorization": "Bearer k"}).json()
    assert secured["paths"]["/v1/images/generations"]["post"]["security"] == [{"bearer": []}]
    page = client.get("/docs").text
    assert "cdn" not in page.lower() and "/docs-assets/swagger-ui-bundle.js" in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        r = client.get(f"/docs-assets/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000, asset
    assert "/docs-assets/redoc.standalone.js" in client.get("/redoc").text
    assert client.get("/docs-assets/..%2Fhttp.py").status_code == 404


def test_429_with_retry_after(engine):
    s = StepScheduler(engine, max_batch_rows=2, max_queue=1)  # one CFG request runs, one waits, the next is refused
    try:
        c = TestClient(create_app(s), base_url=LOCAL)
        first = c.post(GEN, json={"prompt": "a", "steps": 900, "wait": False, **{"width": SIZE, "height": SIZE}})
        wait_for(lambda: s.get(first.json()["id"]).state == "running", what="the first job running")
        assert c.post(GEN, json={"prompt": "b", "steps": 900, "wait": False}).status_code == 202
        r = c.post(GEN, json={"prompt": "c", **SMALL})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert s.stats()["rejected"] == 1
        assert "dreamfuse_requests_rejected_total 1.0" in c.get("/metrics").text
    finally:
        s.shutdown(0)


def test_504_when_the_deadline_passes(client, sched):
    r = client.post(GEN, json={"prompt": "a", "deadline_s": 0.001, "width": SIZE, "height": SIZE, "steps": 50})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded" and "timed_out" in r.json()["error"]["message"]
    assert r.headers["x-should-retry"] == "false"  # a client would only run it again
    assert sched.get(r.headers["x-dreamfuse-job"]).step == 0  # dropped, never computed


# ------------------------------------------------------------------------------------------------ cancel
def test_delete_cancels_between_steps(client):
    job = client.post(GEN, json={"prompt": "a", "steps": 900, "wait": False, "width": SIZE, "height": SIZE}).json()
    wait_for(lambda: client.get(f"/v1/jobs/{job['id']}").json()["step"] >= 1, what="a step")
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    got = client.get(f"/v1/jobs/{job['id']}").json()
    assert got["status"] == "cancelled" and got["error"] and got["step"] < 1000 and "data" not in got
    r = client.get(f"/v1/jobs/{job['id']}/images/0")
    assert r.status_code == 409 and r.json()["detail"]["status"] == "cancelled"
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        kinds = [line.split(": ", 1)[1] for line in stream.iter_lines() if line.startswith("event:")]
    assert kinds[-1] == "cancelled" and kinds.count("cancelled") == 1
    assert client.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"  # idempotent


def test_client_disconnect_cancels_a_synchronous_request(sched):
    spy = Spy(sched)
    with serve(create_app(spy), lifespan="off") as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"prompt": "a", "steps": 900, "width": SIZE, "height": SIZE}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: spy.jobs and spy.jobs[0].step >= 1, what="the job running")
        sock.close()
        job = spy.jobs[0]
        assert job.wait(30), "the job was not cancelled"
        assert job.state == "cancelled" and job.step < 900
        metrics = httpx.get(f"{url}/metrics").text
        assert "dreamfuse_http_client_disconnects_total 1.0" in metrics


def test_client_disconnect_cancels_an_event_stream(sched):
    with serve(create_app(sched), lifespan="off") as url:
        job_id = httpx.post(f"{url}{GEN}", json={"prompt": "a", "steps": 900, "wait": False}).json()["id"]
        with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=30) as r:
            for line in r.iter_lines():
                if line == "event: step":
                    break
        job = sched.get(job_id)
        assert job.wait(30) and job.state == "cancelled"
        # ?cancel_on_disconnect=false keeps the job
        keep = httpx.post(f"{url}{GEN}", json={"prompt": "a", "steps": 6, "wait": False, **{"width": SIZE,
                                                                                            "height": SIZE}}).json()
        with httpx.stream("GET", f"{url}/v1/jobs/{keep['id']}/events?cancel_on_disconnect=false", timeout=30) as r:
            next(line for line in r.iter_lines() if line.startswith("event:"))
        assert sched.get(keep["id"]).wait(60) and sched.get(keep["id"]).state == "done"


# ------------------------------------------------------------------------------------------------ events
def _events(client, job_id, headers=None):
    out, ids = [], []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers or {}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        block = {}
        for line in r.iter_lines():
            if not line:
                if "data" in block:
                    out.append(json.loads(block["data"]))
                    ids.append(int(block["id"]))
                block = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                block[key] = value
    return out, ids


def test_sse_event_order_previews_and_resume(client):
    job_id = client.post(GEN, json={"prompt": "a cat", "steps": 4, "wait": False, "width": SIZE,
                                    "height": SIZE}).json()["id"]
    events, ids = _events(client, job_id)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and "position" in events[0] and kinds[1] == "started" and kinds[-1] == "done"
    assert ids == list(range(len(events)))
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4]
    assert all(e["steps"] == 4 for e in events if e["type"] == "step")
    previews = [e for e in events if e["type"] == "preview"]
    assert [p["step"] for p in previews] == [2, 4]  # preview_every=2
    assert decode_b64(previews[0]["png_b64"]).size[0] >= 8
    assert sum(k in ("done", "cancelled", "timed_out", "failed") for k in kinds) == 1
    rest, rest_ids = _events(client, job_id, headers={"Last-Event-ID": "2"})
    assert rest == events[3:] and rest_ids == ids[3:]


# ------------------------------------------------------------------------------------------------ failures
def test_a_failing_request_fails_alone(client, engine, monkeypatch):
    poison = engine.encode_prompts(["a poisoned prompt"])[0]
    unet_call = engine.unet_call

    def failing(latents, t, embeddings, *args, **kwargs):
        if any(torch.equal(row, poison) for row in embeddings):
            raise FloatingPointError("NaN in the UNet output")
        return unet_call(latents, t, embeddings, *args, **kwargs)

    monkeypatch.setattr(engine, "unet_call", failing)
    body = {"steps": 3, "width": SIZE, "height": SIZE, "wait": False}
    ok_a = client.post(GEN, json={"prompt": "a cat", "seed": 1, **body}).json()["id"]
    bad = client.post(GEN, json={"prompt": "a poisoned prompt", "seed": 2, **body}).json()["id"]
    ok_b = client.post(GEN, json={"prompt": "a dog", "seed": 3, **body}).json()["id"]
    states = {}
    for job_id in (ok_a, bad, ok_b):
        wait_for(lambda job_id=job_id: client.get(f"/v1/jobs/{job_id}").json()["status"] not in ("queued", "running"),
                 what="the jobs to end")
        states[job_id] = client.get(f"/v1/jobs/{job_id}").json()
    assert states[bad]["status"] == "failed" and "NaN" in states[bad]["error"]
    assert states[ok_a]["status"] == states[ok_b]["status"] == "done"
    r = client.post(GEN, json={"prompt": "a poisoned prompt", **SMALL})
    assert r.status_code == 500 and r.json()["error"]["code"] == "server_error" and "failed" in r.text
    assert r.headers["x-should-retry"] == "false"
    assert client.post(GEN, json={"prompt": "still serving", **SMALL}).status_code == 200


# ------------------------------------------------------------------------------------------------ lifecycle
def test_readiness_and_graceful_shutdown(engine):
    s = StepScheduler(engine, max_batch_rows=8, max_queue=8)
    app = create_app(s, shutdown_grace_s=3.0)
    with TestClient(app, base_url=LOCAL) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").status_code == 503
        s.warmup()
        assert c.get("/readyz").status_code == 200
        long = c.post(GEN, json={"prompt": "a", "steps": 900, "wait": False, "width": SIZE, "height": SIZE}).json()
        short = c.post(GEN, json={"prompt": "b", "steps": 2, "wait": False, "width": SIZE, "height": SIZE}).json()
        wait_for(lambda: s.get(long["id"]).step >= 1, what="the long job running")
    # leaving the client ran the app's shutdown: the short job finished within the grace period, the long one
    # was cancelled at its end; nothing new is admitted
    assert s.get(short["id"]).state == "done"
    long_job = s.get(long["id"])
    assert long_job.state == "cancelled" and "shutting down" in long_job.error
    with pytest.raises(SchedulerClosed):
        s.submit("text2img", prompt="late", steps=1)
    r = TestClient(app, base_url=LOCAL).post(GEN, json={"prompt": "late", **SMALL})
    assert r.status_code == 503 and r.headers["retry-after"]


def test_metrics_series(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post(GEN, json={"prompt": "a cat", **SMALL})
    text = client.get("/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}  # parses: the exposition is valid
    for series in ("dreamfuse_ready", "dreamfuse_queue_depth", "dreamfuse_running_requests",
                   "dreamfuse_requests_completed", "dreamfuse_requests_cancelled", "dreamfuse_requests_timed_out",
                   "dreamfuse_requests_failed", "dreamfuse_requests_rejected", "dreamfuse_unet_calls",
                   "dreamfuse_images", "dreamfuse_unet_rows_per_call", "dreamfuse_step_seconds",
                   "dreamfuse_request_seconds", "dreamfuse_time_to_first_step_seconds", "dreamfuse_http_requests"):
        assert series in names, series
    assert 'dreamfuse_requests_completed_total{kind="text2img"}' in text
    assert 'dreamfuse_unet_rows_per_call_bucket{le="+Inf"}' in text
    assert 'dreamfuse_request_seconds_bucket{kind="text2img",le="+Inf"}' in text  # histograms (test_server_metrics)
    assert 'dreamfuse_http_requests_total{route="/v1/images/generations",status="200"}' in text


# ------------------------------------------------------------------------------------------------ dreamfuse serve
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_non_loopback_host_without_key_warns():
    import argparse

    from dreamfuse.engine.cli.serve import check_serve_args

    base = dict(port=8000, replicas=None, autoscale=None, ray_address=None, ray=False, preload_relation=None,
                ip_adapter=None, image_encoder=None)
    env = {k: v for k, v in os.environ.items() if k != "DREAMFUSE_API_KEY"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "environ", env)
        with pytest.warns(UserWarning, match="api-key"):
            check_serve_args(argparse.Namespace(host="0.0.0.0", api_key=None, **base))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_serve_args(argparse.Namespace(host="127.0.0.1", api_key=None, **base))
            check_serve_args(argparse.Namespace(host="0.0.0.0", api_key="k", **base))


def test_dreamfuse_serve_answers_the_readme_examples(tmp_path, engine):
    """`dreamfuse serve --model tiny` in a subprocess (with a relation token and the tiny IP-Adapter preloaded):
    ready, the README's requests, Ctrl-C exits cleanly."""
    relation = tmp_path / "learned_embeds.bin"
    torch.save({"<S>": torch.randn(engine.text_encoder.config.hidden_size)}, relation)
    port = _free_port()
    env = dict(os.environ, DREAMFUSE_API_KEY="")
    proc = subprocess.Popen([sys.executable, "-m", "dreamfuse.engine.cli", "serve", "--model", "tiny", "--port",
                             str(port), "--device", "cpu", "--backend", "torch", "--max-batch-rows", "8",
                             "--preload-relation", str(relation), "--ip-adapter", "tiny", "--image-encoder", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, proc.communicate()[1]
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=180, what="dreamfuse serve to be ready")
        r = httpx.post(f"{url}{GEN}", json={"prompt": "a photo of a cat", "steps": 4, "seed": 1,
                                            "response_format": "png"}, timeout=60)
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
        r = httpx.post(f"{url}{GEN}", json={"prompt": "a red car", "n": 2, "steps": 4, "seed": 7}, timeout=60)
        assert [d["seed"] for d in r.json()["data"]] == [7, 8]
        r = httpx.post(f"{url}{GEN}", data={"prompt": "a dog", "steps": "4", "ip_scale": "0.8",
                                            "response_format": "png"},
                       files={"ip_image": ("cat.png", png_bytes(reference_image(2)), "image/png")}, timeout=60)
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
        r = httpx.post(f"{url}{GEN}", json={"prompt": "a cat <S> a box", "steps": 2, "seed": 1}, timeout=60)
        assert r.status_code == 200
        job = httpx.post(f"{url}{GEN}", json={"prompt": "a dog", "steps": 4, "wait": False}).json()
        with httpx.stream("GET", f"{url}/v1/jobs/{job['id']}/events", timeout=60) as events:
            kinds = [line.split(": ", 1)[1] for line in events.iter_lines() if line.startswith("event:")]
        assert kinds[-1] == "done"
        assert httpx.get(f"{url}/v1/jobs/{job['id']}").json()["status"] == "done"
        assert "dreamfuse_images_total" in httpx.get(f"{url}/metrics").text
        long = httpx.post(f"{url}{GEN}", json={"prompt": "a", "steps": 150, "wait": False}).json()
        assert httpx.delete(f"{url}/v1/jobs/{long['id']}").json()["status"] == "cancelled"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()



def test_serve_help_lists_the_examples(capsys):
    from dreamfuse.engine.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--max-batch-rows", "--max-queue", "--preload-relation", "--ip-adapter", "--api-key", "--ray",
                 "--replicas", "--autoscale", "--unet", "ray start --head"):
        assert flag in out, flag
