"""What the server tests share: a uvicorn server in a thread on 127.0.0.1, a scheduler spy, image helpers."""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time

import numpy as np
from PIL import Image

SIZE = 64
STEPS = 2


@contextlib.contextmanager
def serve(app, lifespan: str = "on"):
    """Run ``app`` under uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


class Spy:
    """A scheduler whose submitted jobs the test can see (everything else delegated)."""

    def __init__(self, scheduler):
        self._scheduler = scheduler
        self.jobs = []

    def submit(self, kind, **kwargs):
        job = self._scheduler.submit(kind, **kwargs)
        self.jobs.append(job)
        return job

    def __getattr__(self, name):
        return getattr(self._scheduler, name)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_b64(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def max_diff(a: Image.Image, b: Image.Image) -> int:
    x, y = np.asarray(a.convert("RGB"), np.int16), np.asarray(b.convert("RGB"), np.int16)
    assert x.shape == y.shape, (x.shape, y.shape)
    return int(np.abs(x - y).max())


def reference_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def layout_image() -> Image.Image:
    a = np.zeros((SIZE, SIZE, 3), np.uint8)
    a[:, : SIZE // 2] = (255, 0, 0)
    a[:, SIZE // 2:] = (0, 0, 255)
    return Image.fromarray(a)
