"""The repository's `kernels/` folder and Hugging Face's PyPI package `kernels`.

transformers (>= 5.25) requires the PyPI `kernels` and imports it. Any Python whose sys.path starts with the
repository root (`python -m pytest`, `python -m bench.x`, `python` typed in a checkout) finds the folder `kernels/`
first: that import must give the installed package, and dreamfuse.kernels must stay the only copy of the ops. These
tests start real processes in the repository root, with the package installed and with it hidden.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run from the repository root: `import kernels` must be the installed package, a diffusers model must import, the
# dreamfuse ops must be registered once (by dreamfuse.kernels), and a two-step generation must run.
_CHECKS = """
import sys, importlib.util
assert sys.path[0] in ('', {root!r}), sys.path[:3]
from diffusers import UNet2DConditionModel  # transformers' hub-kernels probe runs here
import kernels
installed = {installed!r}
if installed:
    assert hasattr(kernels, 'CUDAProperties') and hasattr(kernels, '__version__'), dir(kernels)
    assert not kernels.__file__.startswith({folder!r}), kernels.__file__
    assert importlib.util.find_spec('kernels').origin == kernels.__file__
else:  # (transformers' probe is not called here: before 5.25 it cannot parse the version of a package without
    # metadata, and any folder named kernels on sys.path is one; 5.25 and later report it unavailable)
    assert not hasattr(kernels, '__version__') and not hasattr(kernels, 'attention'), dir(kernels)
import dreamfuse.kernels, torch
assert hasattr(torch.ops.dreamfuse, 'attention')
mine = [m for m, mod in sys.modules.items()
        if m.startswith('kernels.') and {folder!r} in str(getattr(mod, '__file__', ''))]
assert not mine, mine
from dreamfuse.engine import Engine
img, = Engine.from_pretrained('tiny').text2img(['a cat'], steps=2, seed=0)
assert img.size == (64, 64), img.size
print('ok')
"""


def _run(args, *, env=None, timeout=600):
    env = {**os.environ, **(env or {})}
    env.pop("PYTHONPATH", None)
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    return run.stdout


def test_repository_root_gets_the_installed_kernels_package():
    # The reproduction of the fresh-install failure: `from kernels import CUDAProperties` (transformers) resolved
    # to this folder and every diffusers model import failed. `python -c` from the root: sys.path[0] is ''.
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("kernels")
    except PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed here (transformers < 5.25)")
    out = _run([sys.executable, "-c", _CHECKS.format(root=str(ROOT), folder=str(ROOT / 'kernels'), installed=True)])
    assert out.strip().endswith("ok")


def test_top_level_kernels_without_the_pypi_package(tmp_path):
    # Where the PyPI package is absent (an older transformers), the folder stays an empty module: no version, no
    # ops, transformers' probe reports it unavailable. Absent for real: a site folder holding everything the
    # environment has except `kernels` and its metadata, in a Python started without its own site-packages.
    site = Path(sysconfig.get_paths()["purelib"])
    hidden = tmp_path / "site"
    hidden.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name == "kernels" or (name.startswith("kernels-") and name.endswith(".dist-info")):
            continue
        (hidden / entry.name).symlink_to(entry)
    code = ("import site, sys; site.addsitedir(sys.argv[1]); sys.path.insert(0, '');"
            + _CHECKS.format(root=str(ROOT), folder=str(ROOT / 'kernels'), installed=False))
    out = _run([sys.executable, "-S", "-c", code, str(hidden)])
    assert out.strip().endswith("ok")


@pytest.mark.parametrize("argv", [
    ["-m", "bench.text2img", "--batch", "1", "--steps", "2", "--iters", "1", "--height", "64", "--width", "64"],
    ["-m", "tools.train_shapes", "--help"],
], ids=["bench.text2img", "tools.train_shapes"])
def test_python_m_from_the_repository_root(argv):
    out = _run([sys.executable, *argv])
    assert out.strip()


def test_console_script_from_the_repository_root(tmp_path):
    exe = Path(sys.executable).with_name("dreamfuse")
    if not exe.exists():
        pytest.skip("the dreamfuse console script is not installed next to this Python")
    out = tmp_path / "cat.png"
    _run([str(exe), "generate", "--prompt", "a cat", "--steps", "2", "--seed", "0", "--out", str(out)])
    assert out.stat().st_size > 0
