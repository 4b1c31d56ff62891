"""The GPU verification suite (issue 14): versions, the ``-m gpu`` tests and every benchmark, in one prepared run.

    python -m bench.suite --out /tmp/suite               # on a CUDA machine: real shapes, ~8 minutes in all
    python -m bench.suite --dry-run --out /tmp/suite     # on CPU: the scripts' smallest CPU settings, no pytest
    python -m bench.suite --dry-run --fast --out DIR     # the fastest dry run (what tests/test_gpu_suite.py runs)
    python -m bench.suite --only attention match_argmax  # a subset (names as in the "suite" table)

On the GPU machine use ``bench/gpu_suite.sh`` (it installs the carried wheels, puts this checkout on the path as
``dreamfuse`` and calls this module); its header gives the device tool's command and carry list.

Steps, each a subprocess with its own timeout, all inside one total budget (``--budget``, default 480 s): print
and record the GPU, driver, CUDA, torch and triton versions; unless ``--dry-run``, ``TRITON_INTERPRET=0 python -m
pytest -m gpu -x -q``; then each benchmark script of ``bench/`` (their Markdown tables are their stdout), and the
pytest-benchmark kernels file (``bench/test_bench_kernels.py``). A step that fails or runs out of time is recorded
with its return code (``timeout`` → 124, skipped for want of budget → ``null``) and the suite goes on.

The output folder gets at most 8 files (what the device tool brings back): ``suite.md`` (every table),
``suite.json`` (per step: command, return code, seconds, stdout, stderr tail), ``pytest_gpu.log``, ``env.txt``,
``pytest_benchmark.json``. The exit status is 0 when every step that ran returned 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Step:
    name: str
    args: list[str]  # after `python`
    timeout: float
    env: dict[str, str] = field(default_factory=dict)


def _bench(name: str, module: str, *args: str, timeout: float = 60) -> Step:
    return Step(name, ["-m", f"bench.{module}", *args], timeout)


def gpu_steps(out: Path) -> list[Step]:
    """Real shapes, in the order of the issue's targets (the budget cuts the tail first)."""
    sd15 = ["--model", "random-sd15"]
    t2i = [*sd15, "--height", "512", "--width", "512", "--batch", "1", "8", "--steps", "10", "--iters", "3"]
    return [
        Step("pytest-gpu", ["-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider"], 180,
             {"TRITON_INTERPRET": "0"}),
        _bench("attention-fp16", "attention", "--dtype", "fp16", "--batch", "2", "8", timeout=90),
        _bench("ama_attention", "ama_attention", "--dtype", "fp16", timeout=45),
        _bench("match_argmax", "match_argmax", "--dtype", "fp16", timeout=60),
        _bench("composite_blend", "composite_blend", "--dtype", "fp16", timeout=45),
        _pytest_benchmark(out, 60),
        _bench("personalize_step", "personalize_step", *sd15, "--size", "512", "--targets", "1", "4",
               "--steps", "10", "--iters", "3", timeout=90),
        _bench("text2img-sd15", "text2img", *t2i, timeout=120),
        _bench("compose_step", "compose_step", *sd15, "--size", "512", "--segments", "2", "4", "--steps", "10",
               "--iters", "3", timeout=90),
        _bench("text2img-sd15-compile", "text2img", *t2i, "--compile", timeout=180),
        _bench("attention-bf16", "attention", "--dtype", "bf16", "--batch", "2", "8", "--quick", timeout=60),
        _bench("text2img-sdxl", "text2img", "--model", "random-sdxl", "--height", "1024", "--width", "1024",
               "--batch", "1", "--steps", "10", "--iters", "3", timeout=150),
        # last, so that it never pushes the earlier targets out of the budget: its first calls autotune 8 keys
        # (~30 configs each, minutes of compiling), inside its warmup
        _bench("multi_lora_kernel", "multi_lora_kernel", "--dtype", "fp16", timeout=240),
    ]


def dry_steps(out: Path, fast: bool) -> list[Step]:
    """The scripts' smallest CPU settings (``--fast``: one timed call where a script takes ``--iters``)."""
    cpu = ["--device", "cpu"]
    it = ["--iters", "1"] if fast else ["--iters", "2"]
    return [
        _bench("attention", "attention", *cpu, "--quick"),
        _bench("ama_attention", "ama_attention", *cpu, "--quick"),
        _bench("match_argmax", "match_argmax", *cpu, "--quick"),
        _bench("composite_blend", "composite_blend", *cpu, "--quick", "--threads", "1"),
        _bench("text2img", "text2img", *cpu, "--batch", "1", "--steps", "2", *it, "--threads", "1", timeout=120),
        _bench("personalize_step", "personalize_step", *cpu, "--targets", "1", "--steps", "2", "--lambda-g", "0",
               *it, timeout=120),
        _bench("compose_step", "compose_step", *cpu, "--segments", "2", "--steps", "2", *it, timeout=120),
        _pytest_benchmark(out, 90, cpu=True),
    ]


def _pytest_benchmark(out: Path, timeout: float, cpu: bool = False) -> Step:
    args = ["-m", "pytest", str(ROOT / "bench" / "test_bench_kernels.py"), "--benchmark-only", "-q",
            "-p", "no:cacheprovider", f"--benchmark-json={out / 'pytest_benchmark.json'}"]
    return Step("pytest-benchmark", args, timeout, {"DREAMFUSE_BENCH_DEVICE": "cpu"} if cpu else {})


def _cmd_out(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"({cmd[0]}: {e})"


def environment() -> str:
    lines = [f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"python: {sys.version.split()[0]} ({sys.executable})",
             f"platform: {platform.platform()}", f"cpus: {os.cpu_count()}"]
    try:
        import torch

        lines.append(f"torch: {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
                     f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None})")
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                lines.append(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
                             f"{p.multi_processor_count} SMs")
        else:
            lines.append("gpu: none (torch.cuda.is_available() is False)")
    except Exception as e:  # noqa: BLE001 - the suite records, never stops
        lines.append(f"torch: import failed: {e!r}")
    for mod in ("triton", "diffusers", "transformers", "peft", "torchsde", "pytest_benchmark", "onnxruntime"):
        try:
            m = __import__(mod)
            lines.append(f"{mod}: {getattr(m, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001
            lines.append(f"{mod}: not importable ({type(e).__name__})")
    git = _cmd_out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _cmd_out(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    lines.append(f"commit: {git}{' (modified)' if dirty and not dirty.startswith('(') else ''}")
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
        lines.append("nvidia-smi: " + _cmd_out(["nvidia-smi", query, "--format=csv,noheader"]))
        lines += ["", _cmd_out(["nvidia-smi"])]
    return "\n".join(lines) + "\n"


def run_step(step: Step, timeout: float) -> dict:
    cmd = [sys.executable, *step.args]
    # TRITON_INTERPRET=0 always: compiled kernels on CUDA, the PyTorch references on CPU (the interpreter, which
    # tests/conftest.py turns on, is a correctness tool and would make the dry run take minutes)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0", **step.env}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the benchmark and anything it started (compile workers)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        rc, err = 124, (err or "") + f"\n[suite] killed after {timeout:.0f} s\n"
    return {"name": step.name, "command": " ".join(["python", *step.args]), "env": step.env, "returncode": rc,
            "seconds": round(time.perf_counter() - t0, 2), "timeout": round(timeout, 1), "stdout": out,
            "stderr_tail": (err or "")[-4000:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, the scripts' smallest settings, no pytest -m gpu")
    ap.add_argument("--fast", action="store_true", help="with --dry-run: the fastest settings (one timed call)")
    ap.add_argument("--out", default="suite-out", help="output folder (created; at most 8 files written)")
    ap.add_argument("--budget", type=float, default=480, help="total seconds for all steps (default 480)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these steps")
    args = ap.parse_args(argv)

    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device: the real shapes need a GPU; use --dry-run on CPU")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = dry_steps(out, args.fast) if args.dry_run else gpu_steps(out)
    if args.only:
        unknown = set(args.only) - {s.name for s in steps}
        if unknown:
            ap.error(f"unknown steps {sorted(unknown)}; known: {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in args.only]

    t_start = time.perf_counter()
    env = environment()
    (out / "env.txt").write_text(env)
    print(env, flush=True)
    results = []
    for step in steps:
        left = args.budget - (time.perf_counter() - t_start)
        if left < 10:
            r = {"name": step.name, "command": " ".join(["python", *step.args]), "env": step.env, "returncode": None,
                 "seconds": 0.0, "timeout": 0.0, "stdout": "", "stderr_tail": "[suite] skipped: budget spent"}
        else:
            print(f"[suite] {step.name}: {' '.join(step.args)} (timeout {min(step.timeout, left):.0f} s)", flush=True)
            r = run_step(step, min(step.timeout, left))
        results.append(r)
        print(f"[suite] {step.name}: rc={r['returncode']} in {r['seconds']:.1f} s", flush=True)
        if step.name == "pytest-gpu":
            (out / "pytest_gpu.log").write_text(f"$ {r['command']}\n{r['stdout']}\n--- stderr ---\n{r['stderr_tail']}")
        elif r["stdout"]:
            print(r["stdout"], flush=True)
        if r["returncode"] not in (0, None):
            print(r["stderr_tail"][-1500:], file=sys.stderr, flush=True)

    total = time.perf_counter() - t_start
    summary = {"mode": "dry-run" if args.dry_run else "gpu", "fast": args.fast, "seconds": round(total, 1),
               "budget": args.budget, "environment": env, "results": results}
    (out / "suite.json").write_text(json.dumps(summary, indent=1))

    head = env.split("\n\n")[0].strip()
    md = [f"# dreamfuse suite ({summary['mode']}), {time.strftime('%Y-%m-%d')}", "", "```", head, "```", "",
          "| step | rc | seconds | command |", "| --- | --- | --- | --- |"]
    md += [f"| {r['name']} | {r['returncode']} | {r['seconds']:.1f} | `{r['command']}` |" for r in results]
    md.append(f"\nTotal {total:.0f} s of a {args.budget:.0f} s budget.\n")
    for r in results:
        md += [f"## {r['name']}", "", f"`{r['command']}` → rc {r['returncode']}, {r['seconds']:.1f} s", ""]
        if r["name"].startswith("pytest"):
            md += ["```", r["stdout"][-3000:].strip(), "```", ""]
        else:
            md += [r["stdout"].strip(), ""]
        if r["returncode"] not in (0,):
            md += ["```", r["stderr_tail"][-1500:].strip(), "```", ""]
    (out / "suite.md").write_text("\n".join(md))
    print(f"[suite] {len(results)} steps in {total:.1f} s; wrote {sorted(p.name for p in out.iterdir())} to {out}")
    return 0 if all(r["returncode"] in (0, None) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
