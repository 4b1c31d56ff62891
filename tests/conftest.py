import os

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before dreamfuse.kernels is
# imported so that CPU tensors run the Triton code through the interpreter. On a CUDA machine
# run `TRITON_INTERPRET=0 pytest -m gpu` to exercise the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
# `dreamfuse serve` journals accepted jobs under $XDG_STATE_HOME by default: the tests' servers (in-process and
# subprocesses) write into a folder of this run, never into the user's home
import tempfile  # noqa: E402

os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="dreamfuse-test-state-")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # `slow` tests (minutes each) run with `-m slow` (or any -m naming slow) or DREAMFUSE_SLOW=1; the default run
    # keeps one representative test per backend.
    if "slow" not in (config.getoption("-m") or "") and os.environ.get("DREAMFUSE_SLOW") != "1":
        skip_slow = pytest.mark.skip(reason="slow: run with -m slow or DREAMFUSE_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """torch's intra-op threads at 1 for the test (timed checks and small training steps: no OpenMP spinning on a
    shared 2-core machine), restored after. Modules use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
