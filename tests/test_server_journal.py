"""Accepted work survives the process (issue 25, finding 9): the journal records every accepted job before it is
queued; after a crash the next start runs the unfinished ones again under their ids, and they end with the images
they would have had. The last test kills a real `dreamfuse serve` with SIGKILL under load and restarts it."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from dreamfuse.engine import Engine, EngineConfig  # noqa: E402
from dreamfuse.engine.server import StepScheduler  # noqa: E402
from dreamfuse.engine.server.http import create_app  # noqa: E402
from dreamfuse.engine.server.journal import LOST, Journal  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from server_helpers import SIZE, layout_image, png_bytes, wait_for  # noqa: E402

GEN = "/v1/images/generations"
LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))


def _image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), np.int16)


def _same(a: np.ndarray, b) -> bool:
    return int(np.abs(a - np.asarray(b.convert("RGB"), np.int16)).max()) <= 1


def test_unfinished_jobs_run_again_under_their_ids(engine, tmp_path):
    """A journal left with an accepted, unfinished job (its process died): a new app resumes it, and the job ends
    with the image a solo run gives."""
    journal = Journal(tmp_path / "state", model="tiny")
    fields = {"prompt": "a cat", "n": 2, "steps": 3, "width": SIZE, "height": SIZE}
    journal.accept("a" * 32, "text2img", fields, {}, [5, 6], 0, None)
    layout = png_bytes(layout_image())
    cfields = {"prompt": "two pets", "segments": {"#ff0000": "a cat", "#0000ff": "a dog"}, "steps": 3, "n": 1}
    journal.accept("b" * 32, "compose", cfields, {"layout": layout}, [9], 0, None)
    journal.accept("c" * 32, "text2img", {**fields, "n": 1}, {}, [1], 0, time.time() - 1)  # its deadline passed
    journal.close()
    s = StepScheduler(engine, max_batch_rows=8)
    try:
        journal = Journal(tmp_path / "state", model="tiny")
        app = create_app(s, journal=journal)
        assert app.state.dreamfuse.recovered == {"resumed": 2, "lost": 0, "timed_out": 1}
        c = TestClient(app, base_url=LOCAL)
        wait_for(lambda: c.get(f"/v1/jobs/{'a' * 32}").json()["status"] == "done", 60, "job a")
        wait_for(lambda: c.get(f"/v1/jobs/{'b' * 32}").json()["status"] == "done", 60, "job b")
        got = c.get(f"/v1/jobs/{'a' * 32}").json()
        solo = engine.text2img(["a cat"] * 2, seed=[5, 6], steps=3, width=SIZE, height=SIZE)
        assert got["seeds"] == [5, 6] and all(_same(_image(d["b64_json"]), ref) for d, ref in zip(got["data"], solo))
        from dreamfuse.engine.pipelines.composite import ComposeRequest, compose_batch

        csolo = compose_batch(engine, [ComposeRequest(layout_image(), cfields["segments"], "two pets")], seed=[9],
                              steps=3)
        assert _same(_image(c.get(f"/v1/jobs/{'b' * 32}").json()["data"][0]["b64_json"]), csolo[0])
        assert c.get(f"/v1/jobs/{'c' * 32}").json()["status"] == "timed_out"
        app.state.dreamfuse.shutdown()
    finally:
        s.shutdown(0)
    # finished jobs stay answerable from the journal alone (a scheduler that never saw them)
    s2 = StepScheduler(engine, max_batch_rows=8)
    try:
        c = TestClient(create_app(s2, journal=Journal(tmp_path / "state", model="tiny")), base_url=LOCAL)
        r = c.get(f"/v1/jobs/{'a' * 32}")
        assert r.json()["status"] == "done" and len(r.json()["data"]) == 2
        assert c.get(f"/v1/jobs/{'a' * 32}/images/1").content[:4] == b"\x89PNG"
        assert [e for e in c.get(f"/v1/jobs/{'a' * 32}/events").text.split("\n\n") if "event: done" in e]
    finally:
        s2.shutdown(0)


def test_a_job_accepted_for_another_model_is_lost_and_says_so(engine, tmp_path):
    journal = Journal(tmp_path / "state", model="tiny")
    journal.accept("d" * 32, "text2img", {"prompt": "a", "steps": 2}, {}, [1], 0, None)
    journal.close()
    s = StepScheduler(engine)
    try:
        app = create_app(s, journal=Journal(tmp_path / "state", model="shapes"))
        assert app.state.dreamfuse.recovered["lost"] == 1
        job = TestClient(app, base_url=LOCAL).get(f"/v1/jobs/{'d' * 32}").json()
        assert job["status"] == "failed" and LOST in job["error"] and "another model" in job["error"]
    finally:
        s.shutdown(0)


def test_jobs_a_shutdown_cancels_resume_at_the_next_start(engine, tmp_path):
    s = StepScheduler(engine, max_batch_rows=2)
    app = create_app(s, journal=Journal(tmp_path / "state", model="tiny"), shutdown_grace_s=0)
    c = TestClient(app, base_url=LOCAL)
    job = c.post(GEN, json={"prompt": "a", "steps": 150, "wait": False, "seed": 4, "width": SIZE,
                            "height": SIZE}).json()
    wait_for(lambda: c.get(f"/v1/jobs/{job['id']}").json()["step"] >= 1, 60, "the job to start")
    app.state.dreamfuse.shutdown()
    (rec,) = Journal(tmp_path / "state", model="tiny").unfinished()
    assert rec.id == job["id"] and rec.seeds == [4]


def test_refused_requests_leave_no_trace(engine, tmp_path):
    s = StepScheduler(engine)
    try:
        journal = Journal(tmp_path / "state", model="tiny")
        c = TestClient(create_app(s, journal=journal), base_url=LOCAL)
        assert c.post(GEN, json={"prompt": "a", "steps": 2, "sampler": "nope"}).status_code == 400
        assert journal.unfinished() == [] and not any((tmp_path / "state" / "inputs").iterdir())
    finally:
        s.shutdown(0)


def test_bad_state_folders_are_one_line(tmp_path, capsys):
    from dreamfuse.engine.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["serve", "--model", "tiny", "--state-dir", str(tmp_path / "file"), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--state-dir" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "journal.sqlite3").write_bytes(b"not a database" * 100)
    assert main(["serve", "--model", "tiny", "--state-dir", str(bad), "--port", "1"]) == 2
    assert "not a readable journal" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(state: Path, port: int):
    env = dict(os.environ, DREAMFUSE_API_KEY="", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "dreamfuse.engine.cli", "serve", "--model", "tiny", "--port",
                             str(port), "--device", "cpu", "--backend", "torch", "--max-batch-rows", "4",
                             "--state-dir", str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _ready(proc, url):
    def check():
        assert proc.poll() is None, proc.communicate()[1]
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(check, timeout=180, what="dreamfuse serve to be ready")


def test_kill_9_under_load_then_restart_every_accepted_job_ends_done(engine, tmp_path):
    state, port = tmp_path / "state", _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(state, port)
    try:
        _ready(proc, url)
        jobs = [httpx.post(f"{url}{GEN}", json={"prompt": f"a cat {i}", "steps": 12, "seed": 10 * i, "n": 1 + i % 2,
                                                "width": SIZE, "height": SIZE, "wait": False}, timeout=30).json()
                for i in range(4)]
        layout = png_bytes(layout_image())
        jobs.append(httpx.post(f"{url}/v1/images/compose", data={"prompt": "pets", "steps": "12", "seed": "3",
                                                                 "wait": "false", "segments":
                                                                 '{"#ff0000": "a cat", "#0000ff": "a dog"}'},
                               files={"layout": ("l.png", layout, "image/png")}, timeout=30).json())
        assert all("id" in j for j in jobs), jobs
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{jobs[0]['id']}").json()["step"] >= 2, 120, "progress")
        states = [httpx.get(f"{url}/v1/jobs/{j['id']}").json()["status"] for j in jobs]
        assert "done" not in states[1:], states  # killed mid-run: work is in flight and queued
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        proc = _start(state, port)
        _ready(proc, url)
        for j in jobs:
            wait_for(lambda j=j: httpx.get(f"{url}/v1/jobs/{j['id']}").json()["status"] in ("done", "failed"), 180,
                     "the resumed jobs")
        for i, j in enumerate(jobs):
            got = httpx.get(f"{url}/v1/jobs/{j['id']}").json()
            assert got["status"] == "done", got
            assert got["seeds"] == j["seeds"]
            if i < 4:
                solo = engine.text2img([f"a cat {i}"] * len(j["seeds"]), seed=j["seeds"], steps=12, width=SIZE,
                                       height=SIZE)
            else:
                from dreamfuse.engine.pipelines.composite import ComposeRequest, compose_batch

                solo = compose_batch(engine, [ComposeRequest(layout_image(), {"#ff0000": "a cat",
                                                                              "#0000ff": "a dog"}, "pets")],
                                     seed=j["seeds"], steps=12)
            assert all(_same(_image(d["b64_json"]), ref) for d, ref in zip(got["data"], solo)), i
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in err, err
        assert "resumed" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
