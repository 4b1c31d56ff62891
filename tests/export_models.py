"""The tiny export the export tests share: made once per test session (a minute or two on 2 cores), under pytest's
session temp folder, whichever export test module asks first."""

from __future__ import annotations

import threading

import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig

PROFILE = dict(batch="1-8", min_size=64, max_size=128)  # latents 8..16: trace at 16x16 (8x8 would specialize)
_lock = threading.Lock()
_made: dict = {}


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    """At most 2 intra-op threads (this machine class has 2 cores) in a module that imports this fixture; restored
    after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


def tiny_engine(name: str = "tiny", ip: bool = True) -> Engine:
    """A CPU fp32 engine of ``name`` with the tiny IP-Adapter(-Plus) loaded (``ip``)."""
    from dreamfuse.engine.tiny_adapters import build_tiny_ip_adapter

    engine = Engine.from_pretrained(name, EngineConfig(device="cpu", backend="torch", progress=False))
    if ip:
        engine.load_ip_adapter(build_tiny_ip_adapter(engine, plus=True))
    return engine


def shared_export(tmp_path_factory, name: str = "tiny", **kwargs):
    """``(engine, folder, manifest)``: ``name`` exported with its IP-Adapter, the personalize graph (tiny only),
    the text encoder(s) and the VAE decoder."""
    from dreamfuse.export.onnx import export_onnx

    key = (name, tuple(sorted(kwargs.items())))
    with _lock:
        if key not in _made:
            engine = tiny_engine(name, ip=name == "tiny")
            folder = tmp_path_factory.getbasetemp() / f"{name}-onnx"
            n = torch.get_num_threads()
            torch.set_num_threads(min(n, 2))
            try:
                manifest = export_onnx(engine, folder, personalize=name == "tiny", model_name=name,
                                       **{**PROFILE, **kwargs})
            finally:
                torch.set_num_threads(n)
            _made[key] = (engine, folder, manifest)
        return _made[key]
