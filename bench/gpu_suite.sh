#!/usr/bin/env bash
# The GPU suite (issues 14, 29) on the lent GPU machine: this checkout and the carried wheels on the path, then
# `python -m bench.suite` (its docstring has the plan and the time budget; `--dry-run` runs here, without a GPU).
#
#   bash bench/gpu_suite.sh --out DIR [--budget S] [--only NAME ...]    # the whole plan, <= 480 s
#   bash bench/gpu_suite.sh --rerun --out DIR --budget 170              # what failed, timed out, was cut or gated
#
# Once, here (PyPI reachable), in the repository root: the exact wheels into wheels/ (git-ignored), and the check
# that they install there beside what the machine has (stub wheels of its versions + pip's resolver, CPython 3.12):
#
#   python -m bench.carry download && python -m bench.carry check
#
# Then through the device tool (files under $OUT come back: suite.json, suite.md, results.md, env.txt,
# pytest_gpu.log, pytest_gpu.xml, check.json):
#
#   run(command="bash bench/gpu_suite.sh --out $OUT", carry=["wheels"], timeout_s=540)
#
# and, only if it reported stages to rerun, at once (the machine stays warm 30 s; the rerun reuses the installed
# wheels, the native build, the Triton and inductor caches and the suite's state in /tmp/dreamfuse-suite):
#
#   run(command="bash bench/gpu_suite.sh --rerun --out $OUT --budget 170", carry=["wheels"], timeout_s=200)
#
# On a fresh machine instead, copy the suite.json that came back into the repository (a git-ignored path, carried)
# and pass it: --rerun PATH. Here, afterwards: `python -m bench.suite --record <files_at>/suite.json` writes the
# run's section (GPU, date, versions, command, goals, tables) into bench/RESULTS.md.
#
# The checkout is not pip-installed there: the folders engine/, kernels/, export/ are linked into the private site
# folder as the package `dreamfuse` (as pyproject's package-dir maps them); the suite installs the wheels into the
# same folder with `pip install --no-index --no-deps --target`. The machine's own environment is not touched.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
SITE=${DREAMFUSE_SITE:-/tmp/dreamfuse-site}
mkdir -p "$SITE/dreamfuse"
for d in engine kernels export; do ln -sfn "$ROOT/$d" "$SITE/dreamfuse/$d"; done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DREAMFUSE_SITE="$SITE"
exec "$PY" -m bench.suite --site "$SITE" "$@"
