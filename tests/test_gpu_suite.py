"""The GPU suite's dry run (bench/suite.py on CPU, tiny shapes), so the suite never breaks unseen: ~35 s on 2 cores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_suite_dry_run(tmp_path):
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0"}  # conftest sets it to 1
    r = subprocess.run([sys.executable, "-m", "bench.suite", "--dry-run", "--fast", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # what the device tool brings back
    assert all(p.is_file() for p in out.iterdir()), files
    assert {"suite.md", "suite.json", "env.txt", "pytest_benchmark.json"} <= set(files), files

    summary = json.loads((out / "suite.json").read_text())
    assert summary["mode"] == "dry-run"
    names = [s["name"] for s in summary["results"]]
    for bench in ("attention", "ama_attention", "match_argmax", "composite_blend", "text2img", "personalize_step",
                  "compose_step", "pytest-benchmark"):
        assert bench in names, names
    for s in summary["results"]:
        assert s["returncode"] == 0, (s["name"], s["stderr_tail"])
        assert s["command"].startswith("python -m ") and s["seconds"] > 0
        assert s["stdout"].strip(), s["name"]

    md = (out / "suite.md").read_text()
    for s in summary["results"]:
        assert f"## {s['name']}" in md
    # the summary table plus at least one Markdown table per benchmark script (separator rows: |---|, | --- |)
    assert len(re.findall(r"^\| ?-{3}", md, re.M)) >= 8

    bench = json.loads((out / "pytest_benchmark.json").read_text())
    groups = {b["group"] for b in bench["benchmarks"]}
    assert any(g.startswith("attention") for g in groups) and any(g.startswith("composite_blend") for g in groups)
    for g in groups:  # baseline and dreamfuse side by side in each group
        assert len([b for b in bench["benchmarks"] if b["group"] == g]) == 2, g


def test_suite_refuses_real_shapes_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    r = subprocess.run([sys.executable, "-m", "bench.suite", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--dry-run" in r.stderr
