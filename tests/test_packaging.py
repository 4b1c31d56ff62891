"""The repository's `kernels/` folder must never act as the PyPI package `kernels` that transformers probes."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_kernels_probe_registers_nothing():
    # From a checkout (`python -m ...` puts the repository root on sys.path) transformers' probe imports
    # `kernels`: that import must register no op and report no version, so dreamfuse.kernels stays the only copy.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import transformers.activations;"  # runs the `kernels` availability probe
        "from transformers.utils import is_kernels_available;"
        "import dreamfuse.kernels.matching;"
        "assert not is_kernels_available();"
        "assert not [m for m in sys.modules if m.startswith('kernels.')], sorted(sys.modules);"
        "import kernels; assert not hasattr(kernels, 'attention') and not hasattr(kernels, '__version__')"
    )
    run = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
