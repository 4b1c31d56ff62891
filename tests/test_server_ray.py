"""Ray Serve (engine/server/ray_app.py) on this machine's CPU: a local Ray cluster, the worker deployment with 2
replicas on the tiny model (each its own StepScheduler), the same HTTP API through Serve's FastAPI ingress on
127.0.0.1. Skips when Ray Serve is not installed (pip install 'dreamfuse[ray]')."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from server_helpers import SIZE, decode_b64, max_diff, wait_for  # noqa: E402

GEN = "/v1/images/generations"
APP = "dreamfuse-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    from dreamfuse.engine.server.ray_app import build_app

    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"TRITON_INTERPRET": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        model_args = {"model": "tiny", "config": None, "device": "cpu", "dtype": None, "backend": "torch",
                      "compile": False, "lora": None, "no_progress": True, "preload_relation": None,
                      "ip_adapter": None, "image_encoder": None}
        options = {"model_args": model_args, "scheduler": {"max_batch_rows": 8, "max_queue": 16, "preview_every": 0},
                   "app": {"api_key": None, "shutdown_grace_s": 2.0}, "replicas": 2, "autoscale": None,
                   "app_name": APP}
        serve.run(build_app(options, use_gpu=False), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200, timeout=120, what="readyz")
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def engine():
    from dreamfuse.engine import Engine, EngineConfig

    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))


def test_two_replicas_serve_images_equal_to_text2img(url, engine):
    bodies = [{"prompt": f"a photo of thing {i}", "seed": 100 + i, "steps": 4, "width": SIZE, "height": SIZE}
              for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{url}{GEN}", json=b, timeout=120), bodies))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert len({r.headers["x-dreamfuse-replica"] for r in answers}) == 2  # both replicas took work
    assert len({r.headers["x-dreamfuse-job"] for r in answers}) == 8
    for body, r in zip(bodies, answers):
        d = r.json()["data"][0]
        assert d["seed"] == body["seed"]
        ref = engine.text2img(body["prompt"], seed=body["seed"], steps=4, height=SIZE, width=SIZE, progress=False)[0]
        assert max_diff(decode_b64(d["b64_json"]), ref) <= 1


def test_jobs_events_cancel_and_errors_through_the_ingress(url):
    r = httpx.post(f"{url}{GEN}", json={"prompt": "a", "steps": 3, "wait": False, "width": SIZE, "height": SIZE})
    assert r.status_code == 202
    job_id = r.json()["id"]
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=60) as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and [e["step"] for e in events if e["type"] == "step"] == [1,
                                                                                                              2, 3]
    got = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    assert got["status"] == "done" and len(got["data"]) == 1

    long = httpx.post(f"{url}{GEN}", json={"prompt": "a", "steps": 900, "wait": False}).json()
    wait_for(lambda: httpx.get(f"{url}/v1/jobs/{long['id']}").json()["step"] >= 1, timeout=60, what="a step")
    assert httpx.delete(f"{url}/v1/jobs/{long['id']}", timeout=30).json()["status"] == "cancelled"

    bad = httpx.post(f"{url}{GEN}", json={"prompt": "a", "sampler": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sampler"  # the OpenAI route's error object
    assert httpx.post(f"{url}{GEN}", json={"prompt": "a", "steps": 0}).status_code == 400

    time.sleep(0.5)
    metrics = httpx.get(f"{url}/metrics").text
    assert 'dreamfuse_requests_completed_total{kind="text2img"}' in metrics
    assert "dreamfuse_requests_cancelled_total 1.0" in metrics
    calls = [line for line in metrics.splitlines() if line.startswith("dreamfuse_unet_calls_total")]
    assert calls and float(calls[0].split()[-1]) > 0

    # the replicas' histograms, summed by the ingress: every done request (and each replica's warm-up) counted
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics) for s in f.samples}
    text2img = (("kind", "text2img"),)
    done = samples[("dreamfuse_requests_completed_total", text2img)]
    assert samples[("dreamfuse_request_seconds_count", text2img)] >= done >= 9
    assert samples[("dreamfuse_request_seconds_bucket", text2img + (("le", "+Inf"),))] >= done
    assert samples[("dreamfuse_time_to_first_step_seconds_count", text2img)] >= done
    assert samples[("dreamfuse_unet_rows_per_call_count", ())] == float(calls[0].split()[-1])
    assert samples[("dreamfuse_step_seconds_count", ())] >= samples[("dreamfuse_unet_calls_total", ())] / 2
