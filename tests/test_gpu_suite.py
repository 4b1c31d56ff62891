"""The GPU suite without a GPU: its dry run (the plan, the install as a pip dry run, every stage's argv parsed by
its own parser), the runner's gating and rerun logic on stand-in stages, and the results writer on a fake run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench` is a folder of the checkout, not an installed package

from bench import suite  # noqa: E402
from bench._util import Timing, print_table  # noqa: E402
from bench.carry import make_stub_wheel  # noqa: E402


def test_suite_dry_run(tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    make_stub_wheel(wheels, "dreamfuse-stub", "1.0")  # the install step runs for real, as pip --dry-run
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0"}  # conftest sets it to 1
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "bench.suite", "--dry-run", "--out", str(out), "--wheels", str(wheels),
                        "--state", str(tmp_path / "state")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert time.perf_counter() - t0 < 120  # seconds, not the minutes of running the benchmarks

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files  # what the device tool brings back
    assert {"suite.md", "suite.json", "env.txt", "results.md"} <= set(files), files

    summary = json.loads((out / "suite.json").read_text())
    assert summary["mode"] == "dry-run"
    by_name = {s["name"]: s for s in summary["results"]}
    plan = suite.gpu_plan(out, tmp_path / "work")
    assert [s.name for s in plan] == [n for n in by_name if n != "install"]
    for name in ("native", "pytest-gpu", "warm", "aoti-build", "check-kernels", "attention", "ama_attention",
                 "match_argmax", "text2img-sd15", "text2img-sd15-compiled", "personalize_step", "text2img-sdxl",
                 "serve_load", "export-aoti", "overhead", "multi_lora_kernel"):
        assert name in by_name, name
    for s in summary["results"]:
        assert s["status"] == "passed", (s["name"], s["stdout"], s["stderr_tail"])
    assert "--dry-run" not in by_name["install"]["command"] and by_name["install"]["returncode"] == 0
    collected = by_name["pytest-gpu"]["stdout"]
    assert collected.startswith("collected ") and " 0 tests" not in collected
    assert "cuda_graphs=True" in by_name["text2img-sd15-compiled"]["stdout"]
    assert "res=[512, 1024]" in by_name["attention"]["stdout"]
    # the plan's own estimate fits the budget (the docstring's table is this sum)
    assert suite.planned_seconds(plan) <= summary["budget"] <= 480 - 10
    assert f"**{suite.planned_seconds(plan):.0f}**" in suite.__doc__


def test_suite_refuses_real_shapes_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    r = subprocess.run([sys.executable, "-m", "bench.suite", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--dry-run" in r.stderr


def _py(code: str) -> list[str]:
    return ["-c", code]


def test_runner_gates_timing_on_failed_checks_and_waits_for_background(tmp_path):
    """Stand-in stages through the real runner: a prepare phase in parallel (one stage in the background), a check
    that fails one family, a timing stage it gates, one it does not, a quiet one that waits for the background."""
    out = tmp_path / "out"
    out.mkdir()
    check = out / "check.json"
    mark = tmp_path / "background-done"
    plan = [
        suite.Stage("p1", _py("import time; time.sleep(0.3)"), 1, 20, "prepare"),
        suite.Stage("bg", _py(f"import time, pathlib; time.sleep(1.0); pathlib.Path({str(mark)!r}).touch()"), 1, 20,
                    "prepare", background=True),
        suite.Stage("check-kernels", _py(f"import json; json.dump({{'families': {{'attention': False, "
                                         f"'matching': True}}}}, open({str(check)!r}, 'w')); raise SystemExit(1)"),
                    1, 20, "check"),
        suite.Stage("attention", _py("print('never')"), 1, 20, "time", needs=("attention",)),
        suite.Stage("match_argmax", _py("print('| a |\\n|---|\\n| 1 |')"), 1, 20, "time", needs=("matching",)),
        suite.Stage("e2e", _py(f"import pathlib; assert pathlib.Path({str(mark)!r}).exists()"), 1, 20, "time",
                    quiet=True),
        suite.Stage("slow", _py("import time; time.sleep(30)"), 1, 0.5, "time"),
        suite.Stage("extra", _py("pass"), 1000, 20, "extra"),
    ]
    results = {r["name"]: r for r in suite.run_plan(plan, out, budget=60, t_start=time.perf_counter(),
                                                    say=lambda line: None)}
    assert results["p1"]["status"] == results["bg"]["status"] == "passed"
    assert results["check-kernels"]["status"] == "failed"
    assert results["attention"]["status"] == "not measured" and "check_kernels" in results["attention"]["stderr_tail"]
    assert results["match_argmax"]["status"] == "passed"
    assert results["e2e"]["status"] == "passed"  # it ran after the background stage had finished
    assert results["slow"]["status"] == "timeout" and results["slow"]["returncode"] == 124
    assert results["extra"]["status"] == "skipped" and "budget" in results["extra"]["stderr_tail"]


def test_pytest_failures_gate_their_kernel_families(tmp_path):
    (tmp_path / "pytest_gpu.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_kernel_matching" name="test_x"><failure/></testcase>'
        '<testcase classname="tests.test_kernel_attention" name="test_y"/></testsuite></testsuites>')
    bad = suite.failed_families(tmp_path, {"pytest-gpu": {"status": "failed"}})
    assert set(bad) == {"matching"} and "test_x" in bad["matching"]
    # a check stage that died without a verdict gates every kernel family
    bad = suite.failed_families(tmp_path, {"check-kernels": {"status": "timeout"}})
    assert {"attention", "ama", "matching", "composite", "lora"} <= set(bad)


def test_rerun_selects_failures_and_their_gates(tmp_path):
    plan = suite.gpu_plan(tmp_path, tmp_path / "work")
    status = {s.name: "passed" for s in plan}
    status.update({"attention": "not measured", "serve_load": "timeout", "compose_step": "skipped",
                   "check-kernels": "failed"})
    previous = {"results": [dict(name=n, status=st, phase="time", est=1, seconds=1, returncode=0, stdout="",
                                 stderr_tail="", command="") for n, st in status.items()]}
    again, keep = suite.select_rerun(plan, previous)
    names = {s.name for s in again}
    assert {"attention", "serve_load", "compose_step", "check-kernels", "warm", "preflight"} <= names
    assert "text2img-sd15" not in names and keep["text2img-sd15"]["earlier"]
    assert "pytest-gpu" not in names  # it passed: its verdict still stands


def _table(title, header, rows) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_table(title, header, rows)
    return buf.getvalue()


def _fake_run() -> dict:
    """A GPU run as the suite would record it, with the benchmarks' own table headers."""
    T = lambda m: Timing(m, m * 0.95, 20)  # noqa: E731
    attn = _table("fused attention vs SDPA", ["shape", "ms kernel", "ms sdpa", "TFLOP/s kernel", "SDPA/kernel",
                                              "best peer/kernel", "max abs diff vs SDPA"],
                  [["SD1.5 512² self B2 H8 4096x4096 d40", T(0.1), T(0.13), 400.0, T(1.3), T(1.1), 1e-3],
                   ["SD1.5 512² cross B2 H8 4096x77 d40", T(0.02), T(0.023), 100.0, T(1.15), T(1.0), 1e-3],
                   ["SDXL 1024² self B2 H10 4096x4096 d64", T(0.2), T(0.2), 400.0, T(1.0), T(0.9), 1e-3],
                   ["SD1.5 512² self B2 H8 1024x1024 d80", T(0.05), T(0.06), 300.0, T(1.2), T(1.0), 1e-3],
                   ["SD1.5 512² self B2 H8 256x256 d160", T(0.01), T(0.009), 100.0, T(0.9), T(0.8), 1e-3]])
    ama = _table("fused AMA vs gather+attention", ["shape", "ms fused", "ms unfused", "ms plain attention",
                                                   "unfused/fused", "warp overhead % vs plain", "max abs diff"],
                 [["B2 32x32 (1024 tok) h8 d80", T(1.1), T(1.5), T(1.0), T(1.36), T(10.0), 1e-4]])
    t2i = _table("seconds per denoising step", ["batch", "size", "steps", "dreamfuse s/step, warm prompt cache",
                                                "dreamfuse s/step, cold (cache cleared)", "diffusers s/step",
                                                "diffusers/dreamfuse warm", "diffusers/dreamfuse cold"],
                 [[1, "512x512", 10, T(0.005), T(0.0055), T(0.008), T(1.6), T(1.45)]])
    ok = lambda name, stdout: dict(name=name, phase="time", status="passed", returncode=0, seconds=12.0, est=10,  # noqa: E731
                                   command=f"python -m bench.{name}", stdout=stdout, stderr_tail="")
    return {"mode": "gpu", "seconds": 461.0, "budget": 470, "rerun_of": None, "command": "bash bench/gpu_suite.sh "
            "--out $OUT", "environment": {"date": "2027-01-05 10:00:00 UTC", "gpu": "NVIDIA H100 80GB HBM3",
                                           "versions": {"torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.6.0",
                                                        "diffusers": "0.42.1", "driver": "580.159.04",
                                                        "commit": "abc1234"}},
            "results": [ok("attention", attn), ok("ama_attention", ama), ok("text2img-sd15-compiled", t2i),
                        dict(ok("match_argmax", ""), status="not measured",
                             stderr_tail="matching: check_kernels: a case exceeded its error bound"),
                        dict(ok("serve_load", ""), status="timeout", returncode=124, stderr_tail="killed")]}


def test_results_section_from_a_fake_run(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmark results\n\nEvery table is a ratio.\n\n## 2026-12-02 — CPU only\n\nold\n")
    run = tmp_path / "suite.json"
    run.write_text(json.dumps(_fake_run()))
    r = subprocess.run([sys.executable, "-m", "bench.suite", "--record", str(run), "--results-file", str(results_md)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = results_md.read_text()
    # newest first: the new section sits between the header and the older sections
    assert text.index("## 2027-01-05 — NVIDIA H100 80GB HBM3: the GPU suite") < text.index("## 2026-12-02")
    section = text[text.index("## 2027-01-05"):text.index("## 2026-12-02")]
    for needle in ("torch 2.11.0+cu130", "triton 3.6.0", "driver 580.159.04", "`bash bench/gpu_suite.sh --out $OUT`",
                   "461 s of a 470 s budget"):
        assert needle in section, needle
    goal = {row.split(" | ")[0].strip("| "): row for row in section.splitlines() if row.startswith("| ")}
    assert "1.15" in goal["attention vs SDPA, head dim 40: ≥ 1.2×"] and "**no**" in goal[
        "attention vs SDPA, head dim 40: ≥ 1.2×"]  # the worst d40 row (cross, 1.15) misses 1.2
    assert "| yes |" in goal["attention vs SDPA, head dim 80: ≥ 1.0×"]
    assert "**no**" in goal["attention vs SDPA, head dim 160: ≥ 1.0×"]
    assert "1.10 | yes" in goal["AMA vs plain attention: ≤ 1.15×"]
    assert "200 it/s | yes" in goal["text2img SD 1.5 512² batch 1, compile + CUDA graphs: ≥ 150 it/s"]
    assert "not measured (not measured)" in goal["match_argmax vs materialized cost volume at N = 4096: ≥ 10×"]
    assert "not measured (timeout)" in goal["server throughput, 16 concurrent requests (continuous)"]
    assert "Not measured: matching: check_kernels" in section
    assert "#### fused attention vs SDPA" in section  # the benchmark's tables, one level down


def test_dry_rerun_merges_the_earlier_run_and_keeps_its_verdicts(tmp_path):
    prev_dir, out = tmp_path / "came-back", tmp_path / "out"
    prev_dir.mkdir()
    names = [s.name for s in suite.gpu_plan(tmp_path, tmp_path / "work")]
    status = {n: "passed" for n in names}
    status["attention"] = "timeout"
    (prev_dir / "suite.json").write_text(json.dumps({"results": [
        dict(name=n, status=st, phase="time", est=1, seconds=1.0, returncode=0, stdout="", stderr_tail="",
             command="") for n, st in status.items()]}))
    (prev_dir / "check.json").write_text(json.dumps({"families": {"attention": True}}))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-m", "bench.suite", "--dry-run", "--rerun", str(prev_dir / "suite.json"),
                        "--out", str(out), "--wheels", str(tmp_path / "none"), "--state", str(tmp_path / "state")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = {x["name"]: x for x in json.loads((out / "suite.json").read_text())["results"]}
    assert not results["attention"].get("earlier") and results["attention"]["status"] == "passed"  # parsed again
    assert results["preflight"]["status"] == "passed" and not results["preflight"].get("earlier")
    assert results["text2img-sd15"]["earlier"] and results["check-kernels"]["earlier"]
    assert json.loads((out / "check.json").read_text())["families"] == {"attention": True}
    assert [x for x in results if x != "install"] == names  # merged back into the plan's order
