"""The attention backend a config resolves to, and the kernel package's names.

``backend="triton"`` only means the fused kernels where they run (CUDA, or the CPU under ``TRITON_INTERPRET=1``,
which tests/conftest.py switches on); elsewhere the ops would run their PyTorch references, so the config
resolves to ``"torch"`` and says so.
"""

import importlib
import types
import warnings

import dreamfuse.kernels
import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.config import BackendFallbackWarning
from dreamfuse.kernels import _common


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_triton_on_cpu_without_the_interpreter_resolves_to_torch(no_interpreter):
    with pytest.warns(BackendFallbackWarning, match="TRITON_INTERPRET") as record:
        cfg = EngineConfig(device="cpu", backend="triton").resolved()
    ours = [w for w in record if w.category is BackendFallbackWarning]
    assert cfg.backend == "torch" and len(ours) == 1
    assert issubclass(BackendFallbackWarning, UserWarning)
    assert "\n" not in str(ours[0].message)  # one line


def test_engine_built_with_triton_on_cpu_runs_torch_and_warns_once(no_interpreter):
    with pytest.warns(BackendFallbackWarning) as record:
        eng = Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="triton", progress=False))
    # resolved twice (from_pretrained, then __init__), warned once
    assert sum(w.category is BackendFallbackWarning for w in record) == 1
    assert eng.config.backend == "torch"
    assert {p.backend for p in eng.processors.values()} == {"torch"}


def test_triton_stays_under_the_interpreter_and_torch_never_warns():
    assert _common.interpreting()  # tests/conftest.py
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        assert EngineConfig(device="cpu", backend="triton").resolved().backend == "triton"
        assert EngineConfig(device="cpu", backend="torch").resolved().backend == "torch"
        assert EngineConfig(device="cpu").resolved().backend == "torch"  # the CPU default


def test_triton_without_triton_installed_resolves_to_torch(monkeypatch):
    monkeypatch.setattr(_common, "HAS_TRITON", False)
    with pytest.warns(BackendFallbackWarning):
        assert EngineConfig(device="cpu", backend="triton").resolved().backend == "torch"


@pytest.mark.gpu
def test_triton_is_the_cuda_default():
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        assert EngineConfig(device="cuda").resolved().backend == "triton"


# --------------------------------------------------------------------------------------------- kernel names
SUBMODULES = ("attention", "composite", "matching")


@pytest.mark.parametrize("name", SUBMODULES)
def test_kernel_submodules_import_as_modules(name):
    by_import = importlib.import_module(f"dreamfuse.kernels.{name}")
    by_attribute = getattr(dreamfuse.kernels, name)
    assert isinstance(by_attribute, types.ModuleType) and by_attribute is by_import
    ns = {}
    exec(f"import dreamfuse.kernels.{name} as m", ns)  # the statement that returned the function before
    assert ns["m"] is by_import


def test_public_kernel_functions_are_still_reachable():
    from dreamfuse.kernels import attention, composite, matching

    for name in dreamfuse.kernels.__all__:
        assert getattr(dreamfuse.kernels, name) is not None, name
    assert dreamfuse.kernels.fused_attention is attention.attention
    for mod in (attention, composite, matching):
        for name in mod.__all__:
            if name != "attention":
                assert getattr(dreamfuse.kernels, name) is getattr(mod, name), name
    assert dreamfuse.kernels.match_argmax is matching.match_argmax
    assert dreamfuse.kernels.composite_blend is composite.composite_blend
    from dreamfuse.kernels.attention import attention as fn  # the documented import still gives the function

    q = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(fn(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q),
                               atol=1e-5, rtol=1e-5)
