#!/usr/bin/env bash
# The GPU verification suite (issue 14) on a CUDA machine: installs the carried wheels, then `python -m bench.suite`.
#
#   bash bench/gpu_suite.sh [--out DIR] [--budget S] [--only NAME ...] [--dry-run [--fast]]
#
# The GPU machine has torch, triton, transformers, peft and onnxruntime but not diffusers (nor torchsde,
# trampoline, importlib_metadata) and no network. Prepare the wheels once, here, in the repository root (wheels/
# is git-ignored; all are pure-Python, ~7 MiB):
#
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d wheels \
#       diffusers==0.42.1 peft==0.21.2 torchsde==0.2.6 trampoline importlib_metadata
#
# Then, through the device tool (files under $OUT come back; the suite writes at most 8 there):
#
#   run(command="bash bench/gpu_suite.sh --out $OUT", carry=["wheels"], timeout_s=600)
#
# The suite's own budget (--budget, default 480 s) keeps it inside the 600 s limit of one call; a step that fails
# or times out is recorded in $OUT/suite.json and the rest still run.
#
# The checkout is not pip-installed there: this script puts it on PYTHONPATH as the package `dreamfuse`
# (dreamfuse/{engine,kernels,export} -> the repository's folders, as pyproject's package-dir maps them), the carried
# wheels in /tmp/dreamfuse-site, without touching the machine's own environment.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
SITE=${DREAMFUSE_SITE:-/tmp/dreamfuse-site}
mkdir -p "$SITE"

if compgen -G "wheels/*.whl" >/dev/null; then
    echo "[gpu_suite] installing carried wheels: $(ls wheels | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --find-links wheels --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" wheels/*.whl || echo "[gpu_suite] wheel install failed; going on with what is installed"
fi

if ! "$PY" -c "import dreamfuse.kernels" 2>/dev/null; then
    mkdir -p "$SITE/dreamfuse"
    for d in engine kernels export; do ln -sfn "$ROOT/$d" "$SITE/dreamfuse/$d"; done
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

exec "$PY" -m bench.suite "$@"
