"""The GPU suite (issues 14, 29): correctness first, then every benchmark at real shapes, in one device call of
at most 8 minutes, and its results as a new section of bench/RESULTS.md.

    bash bench/gpu_suite.sh --out $OUT                     # on the GPU machine: the whole plan below (≤ 480 s)
    bash bench/gpu_suite.sh --rerun --out $OUT             # then, on the same warm machine: what failed or was cut
    python -m bench.suite --dry-run --out DIR              # here, no GPU, seconds: plan, install, every stage's argv
    python -m bench.suite --record DIR/suite.json          # here, after a run: its section into bench/RESULTS.md
    python -m bench.suite --only attention match_argmax    # a subset (names as in the plan)

``bench/gpu_suite.sh`` puts the carried wheels (``wheels/``, ``python -m bench.carry download``) and this checkout on
the path and calls this module; its header has the device tool's call.

Phases. *setup*: install the carried wheels into a private site folder (``pip install --no-index --no-deps
--target``), then ``python -m bench.carry preflight`` (every requirement against what is importable there).
*prepare*, in parallel since nothing in it is timed: the native library built for sm_90 and ctest's ``dfk_*``
tests (the AOT cubins loaded and launched through the C library: ``dfk_gpu``); ``pytest -m gpu``; the Triton
warm-up (every autotune config compiled by 10 processes into the on-disk cache: ``bench.check_kernels --warm``); and,
in the background until the first end-to-end stage needs a quiet machine, the AOTInductor CUDA package of the SD
1.5 UNet. *check*: ``bench.check_kernels`` runs every kernel against a float64 oracle at the shapes the benchmarks
time, autotuning once for the whole suite (``TRITON_CACHE_AUTOTUNING=1`` keeps the choices on disk). *time*: the
benchmarks, in the order of the issue's goals. A timing stage whose kernels failed a check (``pytest -m gpu`` or
``check_kernels``) is *not measured*: it does not run and the results say why. A stage that fails or runs out of
time is recorded and the suite goes on; a stage whose estimate no longer fits the budget is skipped, to be rerun.

Budget (``--budget``, default 470 s + ~10 s of gpu_suite.sh = 480 s). The seconds are ESTIMATES for an H100, made
without a GPU from counted FLOPs and bytes (torch.utils.flop_counter on the real configs: SD 1.5 UNet 0.80 TFLOP
a row at 512², SDXL 6.76 at 1024², the SD VAE decoder 2.5 TFLOP an image), ~400 TFLOP/s achieved of the ~800
measured bf16 peak, ~3 TB/s of copy bandwidth, ~0.5 s a Triton compile (measured here with Triton 3.6 for sm_90),
~0.13 s a config for autotuning (triton's do_bench: 25 ms warm-up + 100 ms), and guesses for torch.compile:

| phase | stage | est. s | what dominates |
|---|---|---|---|
| setup | install + preflight | 10 | pip of 19 wheels (11 MiB), imports |
| prepare | native ‖ pytest-gpu ‖ warm (‖ aoti-build) | 80 | the longest: pytest -m gpu (50 tests, ~40 compiles) |
| check | check-kernels | 55 | autotuning ~14 keys x ~18 configs x 0.13 s; float64 oracles (4096² attention: 43 GFLOP) |
| time | attention | 45 | 12 shapes x 7 implementations x >= 0.2 s; 6 FlexAttention compiles |
| time | ama_attention | 10 | 2 shapes x 3 x 0.2 s |
| time | match_argmax | 15 | N = 9216: 87 GFLOP + a 680 MB cost volume for the baseline |
| time | text2img-sd15 | 20 | imports + model build ~8; 12 calls x 10 steps at 2 and 16 rows (1.6 / 12.8 TFLOP a step) |
| time | text2img-sd15-compiled | 90 | two UNet compiles (dreamfuse, diffusers), kernels cached by aoti-build |
| time | personalize_step | 25 | 4 + 2 rows a step, matching, PCA, AMA; DDIM inversion once |
| time | text2img-sdxl | 25 | 3.5 B parameters built on the GPU; 13.5 TFLOP a step (~34 ms) x 10 steps x 12 calls |
| time | serve_load | 25 | 16 requests x 10 steps x 3 servers, solo references, 16 VAE decodes (40 TFLOP) |
| time | export-aoti | 20 | eager vs the package, 10 steps x 8 calls; the package built in prepare |
| time | overhead | 20 | zero-cost UNet: pipeline loops, scheduler ticks, kernel launches counted |
| time | multi_lora_kernel | 15 | 5 layers x 5 columns, tuned in check |
| time | composite_blend | 8 | bandwidth-bound, µs kernels |
| | **total** | **463** | (the dry run prints this sum from the plan itself) |

Prepare, in detail: native = 162 cubins (sm_80, sm_90) / 16 jobs (~0.5 s each) + the C++ library + ctest (its data
writer ~12-20 s on CPU); warm = ~250 compiles / 10 processes; aoti-build = export + AOTInductor lowering + the C++
wrapper's compile, ~150 s (a guess), hidden behind prepare, check and the kernel benchmarks (all device-side
timings).

Beyond the budget, run when time is left (else by the rerun): compose_step, bench/multi_lora.py when it exists,
the pytest-benchmark kernels file.

Output (``--out``, at most 8 files: what the device tool brings back): ``suite.json`` (per stage: command, status,
return code, seconds, estimate, stdout, stderr tail), ``suite.md`` (every table), ``results.md`` (the section for
bench/RESULTS.md: GPU, date, versions, command, the goals, every table), ``env.txt``, ``pytest_gpu.log``,
``pytest_gpu.xml``, ``check.json``. State for ``--rerun`` also goes to ``--state`` (default /tmp/dreamfuse-suite), which
outlives $OUT on a warm machine. Exit status 0 when every stage that ran passed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "wheels"
NATIVE_BUILD = "build-gpu"  # git-ignored (build-*/); kept between calls on a warm machine
FAMILIES = ("attention", "ama", "matching", "composite", "lora", "native")
# the -m gpu test files and the kernel families their failures gate
TEST_FAMILIES = {
    "test_kernel_attention.py": ("attention", "ama"), "test_kernel_matching.py": ("matching",),
    "test_kernel_composite.py": ("composite",), "test_compose.py": ("composite",), "test_kernel_lora.py": ("lora",),
    "test_native.py": ("native",), "test_backends.py": ("attention",),
}


@dataclass
class Stage:
    name: str
    argv: list[str]  # after `python` ("python" kind) or the whole command ("cmd" kind)
    est: float  # expected seconds on an H100 (an estimate: see the module docs)
    timeout: float
    phase: str  # setup | prepare | check | time | extra
    needs: tuple[str, ...] = ()  # kernel families whose correctness checks gate it
    kind: str = "python"
    env: dict[str, str] = field(default_factory=dict)
    background: bool = False  # prepare: may run on past the phase, until a quiet stage starts
    quiet: bool = False  # time: waits for background stages first (end-to-end figures feel CPU load)
    goal: str = ""


def _b(name, module, *args, est, timeout, phase="time", needs=(), **kw) -> Stage:
    return Stage(name, ["-m", module, *args], est, timeout, phase, tuple(needs), **kw)


def gpu_plan(out: Path, work: Path) -> list[Stage]:
    """The stages in order (see the module docs for the budget)."""
    sd15 = ["--model", "random-sd15"]
    t2i = [*sd15, "--height", "512", "--width", "512", "--steps", "10", "--iters", "3"]
    aoti = str(work / "aoti-sd15")
    files = gpu_test_files()
    plan = [
        _b("preflight", "bench.carry", "preflight", est=6, timeout=60, phase="setup"),
        Stage("native", ["bash", "-c", native_script(NATIVE_BUILD)], 45, 200, "prepare", kind="cmd"),
        _b("pytest-gpu", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'pytest_gpu.xml'}",
           *files, est=80, timeout=240, phase="prepare",
           # the native test's binary is built by the native stage running beside this one: ctest runs it
           env={"TRITON_INTERPRET": "0", "DREAMFUSE_NATIVE_BUILD": str(work / "no-native-build")}),
        _b("warm", "bench.check_kernels", "--warm", "10", "--warm-timeout", "150", est=30, timeout=180,
           phase="prepare"),
        _b("aoti-build", "dreamfuse.engine.cli", "export", "aoti", *sd15, "--device", "cuda", "--fp16", "--size", "512",
           "--static", "--batch", "2", "--out", aoti, "--no-progress", est=150, timeout=300, phase="prepare",
           background=True),
        _b("check-kernels", "bench.check_kernels", "--json", str(out / "check.json"), est=55, timeout=150,
           phase="check"),
        _b("attention", "bench.attention", "--dtype", "fp16", "--res", "512", "1024", "--batch", "2", est=45,
           timeout=120, needs=("attention",), goal="attention"),
        _b("ama_attention", "bench.ama_attention", "--dtype", "fp16", est=10, timeout=60, needs=("attention", "ama")),
        _b("match_argmax", "bench.match_argmax", "--dtype", "fp16", "--sizes", "1024", "4096", "9216", est=15,
           timeout=60, needs=("matching",)),
        _b("text2img-sd15", "bench.text2img", *t2i, "--batch", "1", "8", est=20, timeout=90, needs=("attention",),
           quiet=True),
        _b("text2img-sd15-compiled", "bench.text2img", *t2i, "--batch", "1", "--compile", "--cuda-graphs",
           "--diffusers-compile", est=90, timeout=200, needs=("attention",), quiet=True),
        _b("personalize_step", "bench.personalize_step", *sd15, "--size", "512", "--targets", "1", "--steps", "10",
           "--lambda-g", "0", "--iters", "3", est=25, timeout=90, needs=("attention", "ama", "matching"), quiet=True),
        _b("text2img-sdxl", "bench.text2img", "--model", "random-sdxl", "--height", "1024", "--width", "1024",
           "--batch", "1", "--steps", "10", "--iters", "3", est=25, timeout=120, needs=("attention",), quiet=True),
        _b("serve_load", "bench.serve_load", *sd15, "--sizes", "512", "--steps", "10", "--rates", "1000", "--requests",
           "16", "--timeout", "120", est=25, timeout=120, needs=("attention",), quiet=True),
        _b("export-aoti", "bench.export", *sd15, "--dtype", "fp16", "--height", "512", "--width", "512", "--batch", "1",
           "--steps", "10", "--iters", "3", "--skip", "torch.compile", "--skip", "onnxruntime", "--aoti", aoti,
           est=20, timeout=90, needs=("attention",), quiet=True),
        _b("overhead", "bench.overhead", *sd15, "--size", "512", "--device", "cuda", "--steps-long", "30",
           "--steps-short", "10", "--iters", "3", "--requests", "1", "16", est=20, timeout=90, quiet=True),
        _b("multi_lora_kernel", "bench.multi_lora_kernel", "--dtype", "fp16", est=15, timeout=90, needs=("lora",)),
        _b("composite_blend", "bench.composite_blend", "--dtype", "fp16", "--quick", est=8, timeout=45,
           needs=("composite",)),
        # beyond the budget: only when time is left, else by --rerun
        _b("compose_step", "bench.compose_step", *sd15, "--size", "512", "--segments", "2", "--steps", "10",
           "--iters", "3", est=30, timeout=90, phase="extra", needs=("attention", "composite"), quiet=True),
        _b("pytest-benchmark", "pytest", str(ROOT / "bench" / "test_bench_kernels.py"), "--benchmark-only", "-q",
           "-p", "no:cacheprovider", est=30, timeout=90, phase="extra", needs=("attention", "composite")),
    ]
    if (ROOT / "bench" / "multi_lora.py").exists():  # another engineer's benchmark: its defaults pick CUDA
        plan.insert(-1, _b("multi_lora", "bench.multi_lora", est=60, timeout=150, phase="extra", needs=("lora",)))
    return plan


def native_script(build: str) -> str:
    """Configure (the default archs, sm_80 and sm_90: dfk_host's dry runs pick sm_80 cubins for sm_86), build the
    kernel library and its test programs, run ctest's dfk_* tests. The AOTInductor runner is left out (its ctest
    fixture exports a model: minutes), and so is libtorch's CMake config, which a CUDA build of torch may fail
    to configure against that machine's toolkit (CMAKE_DISABLE_FIND_PACKAGE_Torch: the runner's folder then
    skips itself in one line)."""
    return (f'cmake -S . -B {build} -DDREAMFUSE_PYTHON="$(command -v python3)" '
            f"-DDREAMFUSE_REQUIRE_KERNELS=ON -DDREAMFUSE_AOT_JOBS=16 -DCMAKE_DISABLE_FIND_PACKAGE_Torch=ON "
            f">/dev/null && "
            f"cmake --build {build} -j16 --target dfk_host_test dfk_gpu_test && "
            f"ctest --test-dir {build} -R '^dfk_' --output-on-failure")


def planned_seconds(plan: list[Stage]) -> float:
    """The plan's estimate: install, the serial stages, and the prepare phase as its longest foreground stage (a
    background stage overlaps the check and the kernel benchmarks); extra stages are not counted."""
    prepare = [s.est for s in plan if s.phase == "prepare" and not s.background]
    return 4 + max(prepare, default=0) + sum(s.est for s in plan if s.phase in ("setup", "check", "time"))


def gpu_test_files() -> list[str]:
    """The test files holding `-m gpu` tests (collecting only these keeps pytest off modules that import what the
    GPU machine lacks)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


# --------------------------------------------------------------------------------------------- install
def install_command(site: Path, wheels: list[Path], dry_run: bool) -> list[str]:
    """The install the GPU machine runs; ``dry_run``: the same with ``--dry-run``, for that machine's interpreter
    (CPython 3.12, manylinux x86_64: the carried pydantic-core is a cp312 wheel) wherever this runs."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--disable-pip-version-check", "--target", str(site)]
    if dry_run:
        from bench.carry import PLATFORMS, PY

        cmd += ["--dry-run", "--only-binary=:all:", "--python-version", PY, "--implementation", "cp"]
        cmd += [a for p in PLATFORMS for a in ("--platform", p)]
    return cmd + [str(w) for w in wheels]


def install(site: Path, wheels_dir: Path, dry_run: bool) -> dict:
    """The carried wheels into ``site`` (skipped when that exact set is already there: a warm machine's rerun)."""
    t0 = time.perf_counter()
    wheels = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
    r = dict(name="install", phase="setup", est=4, timeout=120, command="", returncode=None, stdout="",
             stderr_tail="")
    if not wheels:
        r.update(status="skipped", stderr_tail=f"no wheels in {wheels_dir} (python -m bench.carry download)")
        return {**r, "seconds": 0.0}
    digest = hashlib.sha256("\n".join(f"{w.name}:{w.stat().st_size}" for w in wheels).encode()).hexdigest()[:16]
    marker = site / ".dreamfuse-wheels"
    cmd = install_command(site, wheels, dry_run)
    r["command"] = " ".join(["python", *cmd[1:3], "..."]) + f" ({len(wheels)} wheels)"
    if not dry_run and marker.is_file() and marker.read_text() == digest:
        r.update(status="passed", returncode=0, stdout=f"already installed in {site} ({len(wheels)} wheels)")
        return {**r, "seconds": round(time.perf_counter() - t0, 2)}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    r.update(returncode=p.returncode, status="passed" if p.returncode == 0 else "failed", stdout=p.stdout[-3000:],
             stderr_tail=p.stderr[-3000:], seconds=round(time.perf_counter() - t0, 2))
    if p.returncode == 0 and not dry_run:
        marker.write_text(digest)
    return r


# --------------------------------------------------------------------------------------------- environment
def _cmd_out(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"({cmd[0]}: {e})"


def environment() -> dict:
    """Versions and the GPU: ``{"text": ..., "gpu": name, "versions": {...}}``."""
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count(), "gpu": None, "versions": {}}
    lines = [f"date: {info['date']}", f"python: {info['python']} ({sys.executable})", f"platform: {info['platform']}",
             f"cpus: {info['cpus']}"]
    try:
        import torch

        info["versions"]["torch"] = torch.__version__
        info["versions"]["cuda"] = torch.version.cuda
        lines.append(f"torch: {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
                     f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None})")
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = p.name
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                lines.append(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
                             f"{p.multi_processor_count} SMs")
        else:
            lines.append("gpu: none (torch.cuda.is_available() is False)")
    except Exception as e:  # noqa: BLE001 - the suite records, never stops
        lines.append(f"torch: import failed: {e!r}")
    for mod in ("triton", "diffusers", "transformers", "peft", "torchsde", "fastapi", "onnxruntime"):
        try:
            m = __import__(mod)
            info["versions"][mod] = getattr(m, "__version__", "?")
            lines.append(f"{mod}: {info['versions'][mod]}")
        except Exception as e:  # noqa: BLE001
            lines.append(f"{mod}: not importable ({type(e).__name__})")
    git = _cmd_out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _cmd_out(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    info["versions"]["commit"] = git + (" (modified)" if dirty and not dirty.startswith("(") else "")
    lines.append(f"commit: {info['versions']['commit']}")
    if shutil.which("nvidia-smi"):
        q = _cmd_out(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                      "--format=csv,noheader"])
        info["versions"]["driver"] = q.split(",")[1].strip() if q.count(",") >= 2 else q
        lines += [f"nvidia-smi: {q}", "", _cmd_out(["nvidia-smi"])]
    info["text"] = "\n".join(lines) + "\n"
    return info


# --------------------------------------------------------------------------------------------- running
def _stage_env(stage: Stage) -> dict:
    # TRITON_INTERPRET=0: compiled kernels on CUDA, the references on CPU (tests/conftest.py would turn the
    # interpreter on); TRITON_CACHE_AUTOTUNING=1: each (kernel, key) is tuned once for the whole suite
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0", "TRITON_CACHE_AUTOTUNING": "1",
            **stage.env}


def _command(stage: Stage) -> list[str]:
    return [sys.executable, *stage.argv] if stage.kind == "python" else list(stage.argv)


def _shown(stage: Stage) -> str:
    return " ".join(["python", *stage.argv]) if stage.kind == "python" else " ".join(stage.argv)


class Running:
    """One stage's process (its own process group: a timeout kills it and anything it started)."""

    def __init__(self, stage: Stage, timeout: float):
        self.stage, self.timeout, self.t0 = stage, timeout, time.perf_counter()
        self.log = tempfile.TemporaryFile("w+")
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(_command(stage), cwd=ROOT, env=_stage_env(stage), stdout=self.log,
                                     stderr=self.err, text=True, start_new_session=True)

    def poll(self) -> bool:
        if self.proc.poll() is not None:
            return True
        if time.perf_counter() - self.t0 > self.timeout:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.killed = True
            return True
        return False

    def wait(self, timeout: float | None = None) -> dict:
        end = time.perf_counter() + (timeout if timeout is not None else 1e9)
        while not self.poll():
            if time.perf_counter() > end:
                self.timeout = 0  # past the caller's deadline: the next poll kills it
            time.sleep(0.2)
        return self.result()

    def result(self) -> dict:
        self.log.seek(0)
        self.err.seek(0)
        out, err = self.log.read(), self.err.read()
        rc = 124 if getattr(self, "killed", False) else self.proc.returncode
        if rc == 124:
            err += f"\n[suite] killed after {time.perf_counter() - self.t0:.0f} s (timeout)\n"
        return _result(self.stage, status="passed" if rc == 0 else "timeout" if rc == 124 else "failed",
                       returncode=rc, seconds=time.perf_counter() - self.t0, stdout=out, stderr_tail=err[-4000:])


def _result(stage: Stage, **kw) -> dict:
    base = dict(name=stage.name, phase=stage.phase, command=_shown(stage), env=stage.env, est=stage.est,
                timeout=stage.timeout, returncode=None, seconds=0.0, stdout="", stderr_tail="", status="skipped")
    base.update(kw)
    base["seconds"] = round(base["seconds"], 2)
    return base


def failed_families(out: Path, results: dict[str, dict]) -> dict[str, str]:
    """``{family: why}`` for every kernel family a correctness stage found broken."""
    bad: dict[str, str] = {}
    xml = out / "pytest_gpu.xml"
    if "pytest-gpu" in results and xml.is_file():
        try:
            for case in ET.parse(xml).getroot().iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    file = (case.get("classname") or "").split(".")[-1] + ".py"
                    for fam in TEST_FAMILIES.get(file, ()):
                        bad.setdefault(fam, f"pytest -m gpu: {case.get('classname')}::{case.get('name')} failed")
        except ET.ParseError as e:
            bad.setdefault("attention", f"pytest -m gpu: unreadable junit xml ({e})")
    check = out / "check.json"
    if "check-kernels" in results:
        r = results["check-kernels"]
        if check.is_file():
            for fam, ok in json.loads(check.read_text())["families"].items():
                if not ok:
                    bad.setdefault(fam, "check_kernels: a case exceeded its error bound (see its table)")
        elif r["status"] != "skipped":
            for fam in FAMILIES[:-1]:  # no verdict at all: nothing of it may be timed
                bad.setdefault(fam, f"check_kernels {r['status']} without a verdict")
    if results.get("native", {}).get("status") in ("failed", "timeout"):
        bad.setdefault("native", "ctest dfk_* failed")
    return bad


def run_plan(plan: list[Stage], out: Path, budget: float, t_start: float, say) -> list[dict]:
    results: dict[str, dict] = {}
    background: list[Running] = []
    left = lambda: budget - (time.perf_counter() - t_start)  # noqa: E731

    def record(r: dict) -> None:
        results[r["name"]] = r
        extra = f" ({r['stderr_tail'].strip().splitlines()[-1][:200]})" if r["status"] not in ("passed",) and \
            r["stderr_tail"].strip() else ""
        say(f"[suite] {r['name']}: {r['status']} (rc {r['returncode']}) in {r['seconds']:.1f} s, est. {r['est']:.0f} s"
            + extra)
        if r["name"] == "pytest-gpu":
            (out / "pytest_gpu.log").write_text(f"$ {r['command']}\n{r['stdout']}\n--- stderr ---\n{r['stderr_tail']}")

    def finish_background(deadline: float | None = None) -> None:
        for run in background:
            say(f"[suite] waiting for {run.stage.name} (background)")
            record(run.wait(deadline))
        background.clear()

    prepare = [s for s in plan if s.phase == "prepare"]
    for stage in plan:
        if stage.phase == "prepare":
            if stage is not prepare[0]:
                continue
            runs = []
            for s in prepare:
                say(f"[suite] {s.name} (prepare, parallel): {_shown(s)[:300]}")
                runs.append(Running(s, min(s.timeout, max(left(), 1))))
            for run in runs:
                if run.stage.background:
                    background.append(run)
                else:
                    record(run.wait())
            continue
        if stage.quiet and background:
            finish_background(max(left(), 1))
        gate = {f: why for f, why in failed_families(out, results).items() if f in stage.needs}
        if gate:
            record(_result(stage, status="not measured", stderr_tail="; ".join(f"{f}: {w}" for f, w in gate.items())))
            continue
        if left() < stage.est:  # it would be cut midway: leave its time to the rest, and it to --rerun
            record(_result(stage, status="skipped", stderr_tail=f"budget: {left():.0f} s left, est. {stage.est:.0f} s"))
            continue
        say(f"[suite] {stage.name}: {_shown(stage)[:300]} (timeout {min(stage.timeout, left()):.0f} s)")
        r = Running(stage, min(stage.timeout, max(left(), 1))).wait()
        record(r)
        if r["status"] != "passed":
            print(r["stderr_tail"][-1500:], file=sys.stderr, flush=True)
    finish_background(0)
    return [results[s.name] for s in plan if s.name in results]


# --------------------------------------------------------------------------------------------- dry run
class _Parsed(Exception):
    pass


def parse_only(stage: Stage) -> dict:
    """Import a python stage's module in this process and parse its exact argv with its own parser, stopping right
    after (pytest: collection only). Nothing runs; seconds for the whole plan."""
    t0 = time.perf_counter()
    args = stage.argv[1:]
    module = stage.argv[1] if stage.argv[0] == "-m" else None
    if module == "pytest":
        p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            *[a for a in args[1:] if not a.startswith("--junitxml") and a != "--benchmark-only"]],
                           cwd=ROOT, env=_stage_env(stage), capture_output=True, text=True, timeout=120)
        counts = re.findall(r"^(\S+\.py): (\d+)$", p.stdout, re.M)
        return _result(stage, status="passed" if p.returncode == 0 else "failed", returncode=p.returncode,
                       seconds=time.perf_counter() - t0,
                       stdout=f"collected {sum(int(n) for _, n in counts)} tests in {len(counts)} files",
                       stderr_tail=p.stderr[-2000:])
    original = __import__("argparse").ArgumentParser.parse_args

    def stop(self, a=None, namespace=None):
        raise _Parsed(original(self, a, namespace))

    err = io.StringIO()
    __import__("argparse").ArgumentParser.parse_args = stop
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            importlib.import_module(module).main(args[1:])
        status, text = "failed", "main() returned without parsing its arguments"
    except _Parsed as p:
        ns = vars(p.args[0])
        status, text = "passed", "parsed: " + ", ".join(f"{k}={v}" for k, v in ns.items() if k != "func")[:600]
    except SystemExit as e:
        status, text = "failed", f"argparse exited {e.code}"
    except Exception as e:  # noqa: BLE001 - recorded
        status, text = "failed", f"{type(e).__name__}: {e}"
    finally:
        __import__("argparse").ArgumentParser.parse_args = original
    return _result(stage, status=status, returncode=0 if status == "passed" else 2, seconds=time.perf_counter() - t0,
                   stdout=text, stderr_tail=err.getvalue()[-2000:])


def dry_run(plan: list[Stage], say) -> list[dict]:
    results = []
    for stage in plan:
        if stage.kind == "cmd":
            missing = [t for t in ("cmake", "ctest") if t in " ".join(stage.argv) and not shutil.which(t)]
            results.append(_result(stage, status="passed", returncode=0, stdout="would run: " + _shown(stage)
                                   + (f" (not on this machine: {', '.join(missing)})" if missing else "")))
        else:
            results.append(parse_only(stage))
        r = results[-1]
        say(f"[suite] {r['name']}: {r['status']} ({r['seconds']:.1f} s) {r['stdout'][:160]}")
    return results


# --------------------------------------------------------------------------------------------- results
def md_tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """The Markdown tables of a benchmark's stdout: ``(title, header, rows)``, the title being the last ``###``
    heading above each."""
    out, title, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("###"):
            title = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            cells = lambda s: [c.strip() for c in s.strip().strip("|").split("|")]  # noqa: E731
            header, rows = cells(line), []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            out.append((title, header, rows))
            continue
        i += 1
    return out


def first_number(cell: str) -> float | None:
    m = re.search(r"-?\d+(\.\d+)?(e-?\d+)?", cell.replace(",", ""))
    return float(m.group(0)) if m else None


def _column(results: dict, stage: str, column: str, row_filter=lambda row: True) -> list[tuple[str, float]]:
    """``(row label, median)`` of ``column`` over the rows of ``stage``'s tables that pass ``row_filter``."""
    r = results.get(stage)
    if r is None or r["status"] != "passed":
        return []
    vals = []
    for _, header, rows in md_tables(r["stdout"]):
        if column not in header:
            continue
        j = header.index(column)
        for row in rows:
            d = dict(zip(header, row))
            if j < len(row) and row_filter(d) and first_number(row[j]) is not None:
                vals.append((row[0], first_number(row[j])))
    return vals


def goals(results: dict) -> list[list[str]]:
    """The issue's goals against the figures of this run: ``[goal, stage, measured, met]``."""
    rows = []

    def add(goal, stage, vals, met=None, fmt="{:.2f}", how="worst of"):
        r = results.get(stage)
        if not vals:
            why = "not run" if r is None else r["status"]
            rows.append([goal, stage, f"not measured ({why})", "-"])
            return
        shown = ", ".join(f"{fmt.format(v)}" for _, v in vals) if len(vals) <= 3 else \
            f"{how} {len(vals)}: " + fmt.format(min(v for _, v in vals) if how == "worst of" else vals[0][1])
        rows.append([goal, stage, shown, "-" if met is None else ("yes" if met else "**no**")])

    for d, target in ((40, 1.2), (64, None), (80, 1.0), (160, 1.0)):
        v = _column(results, "attention", "SDPA/kernel", lambda row, d=d: row["shape"].endswith(f" d{d}"))
        goal = f"attention vs SDPA, head dim {d}: ≥ {target}×" if target else f"attention vs SDPA, head dim {d} (SDXL)"
        add(goal, "attention", v, None if target is None or not v else min(x for _, x in v) >= target)
    v = [(k, 1 + x / 100) for k, x in _column(results, "ama_attention", "warp overhead % vs plain")]
    add("AMA vs plain attention: ≤ 1.15×", "ama_attention", v, bool(v) and max(x for _, x in v) <= 1.15)
    v = _column(results, "match_argmax", "materialized/kernel", lambda row: row.get("N=M") == "4096")
    add("match_argmax vs materialized cost volume at N = 4096: ≥ 10×", "match_argmax", v,
        bool(v) and min(x for _, x in v) >= 10)
    v = _column(results, "match_argmax", "memory ratio", lambda row: row.get("N=M") == "4096")
    add("match_argmax memory, materialized / kernel at N = 4096 (O(N) scratch)", "match_argmax", v, fmt="{:.0f}×")
    for stage, label in (("text2img-sd15", "eager"), ("text2img-sd15-compiled", "compile + CUDA graphs")):
        col = "dreamfuse s/step, warm prompt cache"
        v = [(k, 1 / x) for k, x in _column(results, stage, col, lambda row: row.get("batch") == "1") if x > 0]
        add(f"text2img SD 1.5 512² batch 1, {label}: ≥ 150 it/s", stage, v, bool(v) and v[0][1] >= 150,
            fmt="{:.0f} it/s")
        for b in ("1", "8"):
            v = _column(results, stage, "diffusers/dreamfuse cold", lambda row, b=b: row.get("batch") == b)
            if v or b == "1":
                add(f"text2img SD 1.5 512² batch {b}, {label}: diffusers / dreamfuse (like for like)", stage, v)
    v = [(k, 1 / x) for k, x in _column(results, "text2img-sdxl", "dreamfuse s/step, warm prompt cache") if x > 0]
    add("text2img SDXL 1024² batch 1 (it/s)", "text2img-sdxl", v, fmt="{:.1f} it/s")
    add("text2img SDXL 1024² batch 1: diffusers / dreamfuse", "text2img-sdxl",
        _column(results, "text2img-sdxl", "diffusers/dreamfuse cold"))
    v = _column(results, "personalize_step", "overhead x")
    add("personalize (DreamMatcher) step vs a CFG step: ≤ 1.5×", "personalize_step", v,
        bool(v) and max(x for _, x in v) <= 1.5)
    for mode in ("continuous", "whole-request"):
        v = _column(results, "serve_load", "images/s", lambda row, m=mode: row.get("mode") == m)
        add(f"server throughput, 16 concurrent requests ({mode})", "serve_load", v, fmt="{:.2f} img/s")
    v = _column(results, "export-aoti", "eager/backend", lambda row: row.get("backend") == "aoti")
    add("AOTInductor package vs eager (eager / package)", "export-aoti", v)
    return rows


def results_section(summary: dict, command: str) -> str:
    env, res = summary["environment"], {r["name"]: r for r in summary["results"]}
    v = env.get("versions", {})
    gpu = env.get("gpu") or "no GPU"
    date = env.get("date", time.strftime("%Y-%m-%d"))[:10]
    lines = [f"## {date} — {gpu}: the GPU suite (`bench/suite.py`, {summary['mode']})", "",
             f"Command: `{command}`. {summary['seconds']:.0f} s of a {summary['budget']:.0f} s budget."
             + (" Merged with the run it reran (stages marked `earlier`)." if summary.get("rerun_of") else ""), "",
             "Versions: " + ", ".join(f"{k} {v[k]}" for k in ("torch", "cuda", "triton", "diffusers", "transformers",
                                                             "peft", "driver", "commit") if v.get(k)) + ".", ""]
    lines += ["### Goals", "", "| goal | stage | measured (median) | met |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(g)} |" for g in goals(res)]
    lines += ["", "### Stages", "", "| stage | phase | status | seconds | est. s |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['phase']} | {r['status']}{' (earlier)' if r.get('earlier') else ''} | "
              f"{r['seconds']:.0f} | {r['est']:.0f} |" for r in summary["results"]]
    for r in summary["results"]:
        if r["name"] in ("install", "preflight", "warm", "aoti-build") and r["status"] == "passed":
            continue
        lines += ["", f"### {r['name']} — `{r['command'][:200]}`", ""]
        if r["status"] == "not measured":
            lines.append(f"Not measured: {r['stderr_tail']}")
        elif r["status"] == "skipped":
            lines.append(f"Skipped: {r['stderr_tail']}")
        elif r["name"].startswith("pytest") or r["name"] == "native":
            lines += ["```", r["stdout"].strip()[-1500:], "```"]
        else:
            # the benchmark's own title line (`# ...`) is the stage heading's; its table titles go one level down
            lines += [("#" + ln) if ln.startswith("### ") else ln for ln in r["stdout"].strip().splitlines()
                      if not ln.startswith("# ")]
        if r["status"] in ("failed", "timeout"):
            lines += ["", f"{r['status']} (rc {r['returncode']}):", "```", r["stderr_tail"].strip()[-1200:], "```"]
    return "\n".join(lines) + "\n"


def record_results(suite_json: Path, into: Path, command: str | None = None) -> str:
    """Insert the run's section into ``into`` (bench/RESULTS.md) after its header paragraph: newest first."""
    summary = json.loads(suite_json.read_text())
    section = results_section(summary, command or summary.get("command", "bash bench/gpu_suite.sh --out $OUT"))
    text = into.read_text()
    m = re.search(r"^## ", text, re.M)
    at = m.start() if m else len(text)
    into.write_text(text[:at] + section + "\n" + text[at:])
    return section


# --------------------------------------------------------------------------------------------- main
def select_rerun(plan: list[Stage], previous: dict) -> tuple[list[Stage], dict[str, dict]]:
    """Stages to run again (failed, timed out, skipped, not measured) plus the checks that gated them; the rest
    keep their earlier results."""
    prev = {r["name"]: r for r in previous["results"]}
    again = {n for n, r in prev.items() if r["status"] != "passed"}
    gates = {"pytest-gpu", "check-kernels"} & again
    if any(prev[n]["status"] == "not measured" for n in again):
        gates |= {n for n in ("pytest-gpu", "check-kernels") if prev.get(n, {}).get("status") != "passed"}
    again |= gates
    if "check-kernels" in again:
        again.add("warm")  # a fresh machine has an empty Triton cache; on a warm one these are cache hits
    if "export-aoti" in again and not Path(next(a for s in plan if s.name == "export-aoti"
                                               for a in s.argv if "aoti-sd15" in a)).joinpath("unet.pt2").exists():
        again.add("aoti-build")
    again |= {s.name for s in plan if s.phase == "setup"}  # cheap, and the machine may be a fresh one
    keep = {n: dict(r, earlier=True) for n, r in prev.items() if n not in again}
    return [s for s in plan if s.name in again or s.name not in prev], keep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: the plan, the install (pip --dry-run) and every stage's argv parsed, in seconds")
    ap.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)  # the old dry run's flag: same thing now
    ap.add_argument("--out", default="suite-out", help="output folder (created; at most 8 files written)")
    ap.add_argument("--budget", type=float, default=470, help="total seconds for all stages (default 470)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these stages (and setup)")
    ap.add_argument("--rerun", nargs="?", const="", default=None, metavar="SUITE_JSON",
                    help="rerun what failed, timed out, was skipped or not measured in an earlier run (default: the "
                         "last run's state in --state); results are merged")
    ap.add_argument("--state", default="/tmp/dreamfuse-suite", help="where a run keeps its state for --rerun and its "
                    "work files (the AOTInductor package) (default /tmp/dreamfuse-suite)")
    ap.add_argument("--site", default=os.environ.get("DREAMFUSE_SITE", "/tmp/dreamfuse-site"),
                    help="where the carried wheels are installed (gpu_suite.sh puts it on PYTHONPATH)")
    ap.add_argument("--wheels", default=str(WHEELS), help="the carried wheels (default wheels/)")
    ap.add_argument("--record", default=None, metavar="SUITE_JSON",
                    help="write that run's section into --results-file and exit (here, after a GPU run)")
    ap.add_argument("--results-file", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--command", default=None, help="the command to name in the results (default: the run's own)")
    args = ap.parse_args(argv)

    if args.record:
        section = record_results(Path(args.record), Path(args.results_file), args.command)
        print(section)
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device: the real shapes need a GPU; use --dry-run on CPU")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state = Path(args.state)
    work = state / "work"
    work.mkdir(parents=True, exist_ok=True)
    plan = gpu_plan(out, work)
    keep: dict[str, dict] = {}
    rerun_of = None
    if args.rerun is not None:
        path = Path(args.rerun) if args.rerun else state / "suite.json"
        if not path.is_file():
            ap.error(f"--rerun: no earlier run at {path} (pass the suite.json that came back)")
        previous = json.loads(path.read_text())
        plan, keep = select_rerun(plan, previous)
        rerun_of = str(path)
        for name, stage in (("pytest_gpu.xml", "pytest-gpu"), ("check.json", "check-kernels")):
            if stage in keep and (path.parent / name).is_file():  # the verdicts that still gate the rerun's stages
                shutil.copy(path.parent / name, out / name)
    if args.only:
        unknown = set(args.only) - {s.name for s in gpu_plan(out, work)}
        if unknown:
            ap.error(f"unknown stages {sorted(unknown)}; known: {[s.name for s in gpu_plan(out, work)]}")
        plan = [s for s in plan if s.name in args.only or s.phase == "setup"]

    say = lambda line: print(line, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    site = Path(args.site) if not args.dry_run else Path(tempfile.mkdtemp(prefix="dreamfuse-site-dry-"))
    installed = install(site, Path(args.wheels), args.dry_run)
    say(f"[suite] install: {installed['status']} {installed['command'] or installed['stderr_tail']}")
    importlib.invalidate_caches()  # the site folder is on sys.path already: let this process see the new packages
    env = environment()
    (out / "env.txt").write_text(env["text"])
    print(env["text"], flush=True)
    say(f"[suite] plan ({'dry run' if args.dry_run else 'GPU'}), est. seconds: " + ", ".join(
        f"{s.name} {s.est:.0f}" for s in plan) + f"; total {planned_seconds(plan):.0f} (+ extra "
        f"{sum(s.est for s in plan if s.phase == 'extra'):.0f}) of a {args.budget:.0f} s budget")

    results = [installed]
    if args.dry_run:
        results += dry_run(plan, say)
    else:
        results += run_plan(plan, out, args.budget, t_start, say)
    results = [*[r for r in keep.values() if r["name"] not in {x["name"] for x in results}], *results]
    order = [s.name for s in gpu_plan(out, work)]
    results.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else -1)

    total = time.perf_counter() - t_start
    summary = {"mode": "dry-run" if args.dry_run else ("rerun" if rerun_of else "gpu"), "seconds": round(total, 1),
               "budget": args.budget, "environment": env, "results": results, "rerun_of": rerun_of,
               "command": "bash bench/gpu_suite.sh " + " ".join(argv if argv is not None else sys.argv[1:])}
    (out / "suite.json").write_text(json.dumps(summary, indent=1))
    if not args.dry_run:  # for --rerun on this machine ($OUT is emptied before the next call)
        for name in ("suite.json", "pytest_gpu.xml", "check.json"):
            if (out / name).is_file():
                shutil.copy(out / name, state / name)
    md = [f"# dreamfuse suite ({summary['mode']}), {time.strftime('%Y-%m-%d')}", "", "```",
          env["text"].split("\n\n")[0].strip(), "```", "", "| stage | phase | status | rc | seconds | est. s |",
          "| --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['name']} | {r['phase']} | {r['status']} | {r['returncode']} | {r['seconds']:.1f} | {r['est']:.0f} |"
           for r in results]
    md.append(f"\nTotal {total:.0f} s of a {args.budget:.0f} s budget.\n")
    for r in results:
        md += [f"## {r['name']}", "", f"`{r['command']}` → {r['status']}, {r['seconds']:.1f} s", "",
               r["stdout"].strip()]
        if r["status"] != "passed":
            md += ["```", r["stderr_tail"][-1500:].strip(), "```", ""]
    (out / "suite.md").write_text("\n".join(md) + "\n")
    (out / "results.md").write_text(results_section(summary, summary["command"]))
    bad = [r["name"] for r in results if r["status"] in ("failed", "timeout", "not measured")]
    skipped = [r["name"] for r in results if r["status"] == "skipped" and r["name"] != "install"]
    say(f"[suite] {len(results)} stages in {total:.1f} s; wrote {sorted(p.name for p in out.iterdir())} to {out}")
    if bad or skipped:
        say(f"[suite] to rerun: {', '.join(bad + skipped)} -> bash bench/gpu_suite.sh --rerun --out $OUT")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
