"""The page at `/` in headless Chromium (Debian's `chromium`), against a real server on 127.0.0.1 with the tiny
model: fill the form, submit, wait for the image (progress from the event stream), take a screenshot and check
that the image shown is the one generated, at its size, not blank. Skips when Chromium is absent.

The browser is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: NUL-delimited JSON on
file descriptors 3 and 4), so the test needs no websocket client and no browser-automation package."""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install -y chromium)")


class Browser:
    """Headless Chromium driven over ``--remote-debugging-pipe``."""

    def __init__(self, binary: str, width: int = 900, height: int = 600):
        self._profile = tempfile.mkdtemp(prefix="dreamfuse-chromium-")
        child_in, self._out = os.pipe()
        self._in, child_out = os.pipe()

        def fds_3_and_4():  # the protocol's pipe: the browser reads fd 3 and writes fd 4
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={self._profile}", f"--window-size={width},{height}",
             "--force-device-scale-factor=1", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio",
             "about:blank"],
            preexec_fn=fds_3_and_4, pass_fds=(3, 4), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(child_in)
        os.close(child_out)
        self._id, self._buffer, self.session = 0, b"", None

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([self._in], [], [], 0.5)
            if not ready:
                assert self.proc.poll() is None, "chromium exited"
                continue
            chunk = os.read(self._in, 1 << 20)
            assert chunk, "chromium closed the protocol pipe"
            self._buffer += chunk
            *messages, self._buffer = self._buffer.split(b"\0")
            for raw in messages:
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
        raise TimeoutError(method)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_js("document.readyState === 'complete' && !!document.getElementById('go')", 30)

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_js(self, expression: str, timeout: float):
        end = time.monotonic() + timeout
        while not self.js(expression):
            assert time.monotonic() < end, f"timed out waiting for {expression}"
            time.sleep(0.1)

    def screenshot(self):
        from PIL import Image

        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        os.close(self._in)
        shutil.rmtree(self._profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    from dreamfuse.engine import Engine, EngineConfig
    from dreamfuse.engine.server import StepScheduler
    from dreamfuse.engine.server.http import create_app
    from server_helpers import serve

    engine = Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))
    sched = StepScheduler(engine, max_batch_rows=8, max_queue=8, preview_every=1)
    sched.warmup()
    with serve(create_app(sched)) as url:
        yield url, engine


@pytest.fixture
def browser():
    b = Browser(CHROMIUM)
    yield b
    b.close()


def test_page_generates_and_shows_the_image(server, browser, tmp_path):
    url, engine = server
    browser.open(url + "/")
    browser.js("""(() => {
        const set = (id, v) => { document.getElementById(id).value = v; };
        set('prompt', 'a photo of a cat'); set('width', 64); set('height', 64); set('steps', 4); set('seed', 1234);
        document.getElementById('go').click(); return true; })()""")
    browser.wait_js("['done', 'error'].includes(document.body.dataset.state)", 120)
    status = browser.js("document.getElementById('status').textContent")
    assert browser.js("document.body.dataset.state") == "done", status
    assert "seed 1234" in status
    assert browser.js("document.getElementById('progress').value") == 4
    info = browser.js("""(() => { const img = document.getElementById('result'); const r = img.getBoundingClientRect();
        return {w: img.naturalWidth, h: img.naturalHeight, complete: img.complete, x: r.left, y: r.top,
                cw: r.width, ch: r.height}; })()""")
    assert info["complete"] and (info["w"], info["h"]) == (64, 64) and (info["cw"], info["ch"]) == (64, 64)

    shot = browser.screenshot()
    shot.save(tmp_path / "page.png")
    x, y = round(info["x"]), round(info["y"])
    shown = np.asarray(shot.crop((x, y, x + 64, y + 64)), np.int16)
    assert shown.std() > 2.0, "the image area is blank"
    expected = np.asarray(engine.text2img("a photo of a cat", seed=1234, steps=4, height=64, width=64,
                                          progress=False)[0], np.int16)
    # the screenshot shows the generated image pixel for pixel (within PNG/colour-management rounding)
    assert np.abs(shown - expected).mean() < 3.0, np.abs(shown - expected).mean()
    page_bg = np.asarray(shot.crop((shot.width - 40, shot.height - 40, shot.width - 10, shot.height - 10)), np.int16)
    assert page_bg.std() < 1.0  # and the rest of the page rendered (a flat background, not noise)


def test_page_shows_a_field_error(server, browser):
    url, _ = server
    browser.open(url + "/")
    browser.js("document.getElementById('steps').value = 5000; document.getElementById('go').click(); true")
    browser.wait_js("document.body.dataset.state === 'error'", 60)
    assert "steps" in browser.js("document.getElementById('status').textContent")
