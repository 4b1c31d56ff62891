"""Write ``constraints.txt``, the tested dependency set, from an environment the suite passed in.

    make test-latest          # a fresh .venv-latest with the newest releases, then the whole suite in it
    make lock                 # then: this script on .venv-latest -> constraints.txt (review the diff, commit it)
    python -m tools.lock --python .venv-latest/bin/python --out constraints.txt --tested "make test-latest, 1519 s"

The README's install command and ``.ci/run`` install with ``pip install -c constraints.txt ...``: a constraints file
only caps what is installed, it installs nothing by itself, so one file serves every extra. It pins every
distribution of the environment except

* dreamfuse itself (the editable install),
* torch and the CUDA stack around it (``nvidia-*``, ``cuda-*``): the build depends on the machine -- the README
  installs the CPU build (``torch==2.13.0``) first, a GPU machine the wheel for its driver,
* pip, setuptools and wheel (the installer's own tools).

No torch import here: this reads ``pip list`` of the given interpreter.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

UNPINNED = re.compile(r"^(dreamfuse|torch|pip|setuptools|wheel|nvidia-.*|cuda-.*)$")
"""Distributions the constraints leave to the machine (normalized names)."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(python: str) -> dict[str, str]:
    """``{normalized name: version}`` of every distribution ``python``'s environment holds, editable ones aside."""
    out = subprocess.run([python, "-m", "pip", "list", "--format=json", "--exclude-editable",
                          "--disable-pip-version-check"], capture_output=True, text=True, check=True).stdout
    return {_normalize(d["name"]): d["version"] for d in json.loads(out)}


def describe(python: str) -> str:
    """``CPython 3.11.7, Linux x86_64, torch 2.13.0+cpu`` for the interpreter that ran the suite."""
    code = ("import platform, sys; from importlib.metadata import version as v\n"
            "try: t = v('torch')\nexcept Exception: t = 'absent'\n"
            "print(f'{platform.python_implementation()} {platform.python_version()}, {platform.system()} "
            "{platform.machine()}, torch {t}')")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def summarize_junit(path: Path) -> str:
    """``python -m pytest: 812 passed, 41 skipped in 1519 s`` from a JUnit report; ValueError when it records a
    failure or an error (a set the suite did not pass on is not locked) or cannot be read."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise ValueError(f"cannot read the JUnit report {str(path)!r} ({e})") from None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    if not suites:
        raise ValueError(f"{str(path)!r} holds no testsuite")

    def total(key: str) -> float:
        return sum(float(s.get(key, 0) or 0) for s in suites)

    failed, errors = int(total("failures")), int(total("errors"))
    if failed or errors:
        raise ValueError(f"the suite in {str(path)!r} had {failed} failure(s) and {errors} error(s): not locking")
    tests, skipped = int(total("tests")), int(total("skipped"))
    return f"python -m pytest: {tests - skipped} passed, {skipped} skipped in {total('time'):.0f} s"


def render(pins: dict[str, str], *, environment: str, tested: str, date: str) -> str:
    lines = [
        "# dreamfuse's tested dependency set (written by `make lock`, python -m tools.lock; edit by re-running it).",
        f"# Resolved and tested on {date}: {environment}; the suite: {tested}.",
        "# Used by the README's install command and by .ci/run: pip install -c constraints.txt -e \".[dev,serve]\"",
        "# (a constraints file caps versions and installs nothing by itself: one file serves every extra).",
        "# Not pinned: torch and its CUDA stack (nvidia-*, cuda-*) -- install the build for your machine first --,",
        "# dreamfuse itself, pip/setuptools/wheel. `make test-latest` runs the suite against the newest releases;",
        "# `make lock` then rewrites this file from that environment.",
    ]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.lock", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter of the environment the suite passed in (default: this one)")
    p.add_argument("--out", type=Path, default=Path("constraints.txt"), help="where to write (default: %(default)s)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--junit", type=Path, metavar="XML",
                   help="the JUnit report of the suite's run in that environment (make test-latest writes one); "
                        "refused unless it records no failure and no error")
    g.add_argument("--tested", metavar="TEXT",
                   help="what passed in that environment, for the header (e.g. 'make test, 1519 s')")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="the date in the header (default: today)")
    args = p.parse_args(argv)
    tested = args.tested
    if args.junit is not None:
        try:
            tested = summarize_junit(args.junit)
        except ValueError as e:
            print(f"lock: {e}", file=sys.stderr)
            return 2
    try:
        pins = {n: v for n, v in installed(args.python).items() if not UNPINNED.match(n)}
        environment = describe(args.python)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"lock: cannot read the environment of {args.python!r}: {e}", file=sys.stderr)
        return 2
    if not pins:
        print(f"lock: {args.python!r} has no installed distribution to pin", file=sys.stderr)
        return 2
    args.out.write_text(render(pins, environment=environment, tested=tested, date=args.date))
    print(f"lock: {len(pins)} pins -> {args.out} ({environment}; {platform.node() or 'this machine'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
