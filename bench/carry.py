"""The wheels the GPU suite carries to the lent GPU machine, and the checks that they install and suffice there.

    python -m bench.carry download                 # here, with PyPI: the exact wheels into wheels/ (git-ignored)
    python -m bench.carry check                    # here: will they install there, next to what it has?
    python -m bench.carry preflight                # there (bench/gpu_suite.sh runs it): what is importable, at which
                                                   # version, against every requirement of the suite

The GPU machine (``nvidia-h100-x1`` / ``nvidia-h200``, the workplace's 'cuda' image; see the device tool's KINDS.md)
runs Python 3.12 with torch 2.11, triton 3.6, transformers 5.17 and many more, and reaches no registry. It lacks
diffusers (and so everything dreamfuse runs), torchsde, and the HTTP stack of ``dreamfuse serve`` (fastapi,
starlette, pydantic, uvicorn, python-multipart, fastapi-offline). :data:`CARRY` is what travels: those, the
pure-Python packages they need that the image lacks, and the few whose version there is unknown while our
requirement on it is recent (peft >= 0.18, typing-extensions >= 4.16, zipp >= 3.20, anyio >= 4.1: carried so that
nothing rests on a guess). All are pure Python except pydantic-core (a cp312 manylinux wheel); 19 wheels, 11 MiB.
The project itself is not a wheel: the device tool sends the working tree, and ``bench/gpu_suite.sh`` puts it on
the path as ``dreamfuse``.

``check`` answers "will the carried set install there, next to what it has" in two ways:

1. every ``Requires-Dist`` of every carried wheel and every requirement of dreamfuse (its dependencies, the
   ``serve`` extra, the benchmarks' httpx) is evaluated for CPython 3.12 on Linux against the carried versions
   and :data:`MACHINE` (versions read there, from KINDS.md's ``pip list``) -- a requirement on a package the
   image holds at a version nobody recorded is listed as *unverified* (the preflight checks it there);
2. pip's own resolver: a simulated environment of stub wheels (name and version only) for the machine's packages,
   the carried wheels beside them, and ``pip install --dry-run --no-index --find-links ... --python-version 3.12
   --only-binary=:all: --target`` of dreamfuse's requirements plus the carried pins; it must resolve, and every
   package it picks must be a carried wheel or one the machine has.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import json
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "wheels"

# what travels, exact versions (the tested ones of constraints.txt where it lists them)
CARRY = (
    "diffusers==0.42.1", "importlib-metadata==10.2.0", "lazy-importer==0.1.0", "zipp==4.1.2",
    "peft==0.21.2", "torchsde==0.2.6", "trampoline==0.1.2",
    "fastapi==0.165.0", "starlette==1.10.0", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "typing-extensions==4.16.0", "opentelemetry-api==1.45.2", "anyio==4.16.0",
    "uvicorn==0.55.0", "python-multipart==0.0.34", "fastapi-offline==1.7.7",
)
# the machine's packages at the versions read there (KINDS.md, 'pip list, as a session saw it', 2026-11)
MACHINE = {
    "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "tokenizers": "0.23.2", "safetensors": "0.8.0",
    "huggingface-hub": "1.33.0", "numpy": "2.5.2", "accelerate": "1.15.0", "onnx": "1.23.1", "onnx-ir": "1.0.0",
    "onnxruntime": "1.30.0", "onnxscript": "0.7.2", "sentencepiece": "0.2.2", "torchvision": "0.26.0",
    "jaxtyping": "0.3.11", "tiktoken": "0.14.0", "cupy-cuda13x": "14.2.0",
}
# there too (KINDS.md's package list), at versions nobody recorded
MACHINE_UNVERSIONED = (
    "pillow", "tqdm", "pyyaml", "psutil", "packaging", "filelock", "regex", "requests", "scipy", "click", "h11",
    "httpx", "httpcore", "idna", "certifi", "prometheus-client", "pytest", "pytest-benchmark", "jinja2", "networkx",
    "sympy", "fsspec", "hf-xet", "urllib3", "charset-normalizer", "annotated-doc", "setuptools", "wheel", "pip",
    "markupsafe", "mpmath", "cmake", "ninja",
)
PY = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# dreamfuse's requirements the suite needs beyond its dependencies: the serve extra and the load test's client
EXTRAS = ("serve",)
EXTRA_REQUIREMENTS = ("httpx>=0.27",)


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried() -> dict[str, str]:
    return {canon(n): v for n, v in (c.split("==") for c in CARRY)}


def dreamfuse_requirements() -> list[str]:
    """dreamfuse's dependencies and the suite's extras, from pyproject.toml (the single source)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += [r for r in project["optional-dependencies"][extra] if not r.startswith("dreamfuse")]
    return reqs + list(EXTRA_REQUIREMENTS)


# --------------------------------------------------------------------------------------------- download
def download_command(dest: Path, specs=CARRY) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PY,
           "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return cmd + list(specs)


def wheel_files(folder: Path) -> dict[str, Path]:
    """``{canonical name: wheel}`` of a folder (one version of each, as the install needs)."""
    out: dict[str, Path] = {}
    for w in sorted(folder.glob("*.whl")):
        name = canon(w.name.split("-")[0])
        if name in out:
            raise SystemExit(f"{folder}: two wheels of {name} ({out[name].name}, {w.name}): keep one")
        out[name] = w
    return out


def wheel_metadata(w: Path) -> tuple[str, str, list[str], str | None]:
    """(name, version, Requires-Dist lines, Requires-Python) of a wheel."""
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    head = text.split("\n\n")[0]
    get = lambda key: [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith(key + ":")]  # noqa: E731
    rp = get("Requires-Python")
    return get("Name")[0], get("Version")[0], get("Requires-Dist"), rp[0] if rp else None


# --------------------------------------------------------------------------------------------- evaluation
def evaluate(requirements: dict[str, list[str]], have: dict[str, tuple[str, str]], unversioned=()) -> list[dict]:
    """Each requirement (``{who: [requirement, ...]}``) against ``have`` (``{name: (version, where)}``) for CPython
    3.12 on Linux: status ``ok`` / ``unverified`` (present at an unknown version) / ``missing`` / ``conflict``."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "python_version": PY, "python_full_version": f"{PY}.3",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    rows = []
    for who, reqs in requirements.items():
        for text in reqs:
            r = Requirement(text)
            if r.marker is not None and not r.marker.evaluate(env):
                continue
            name = canon(r.name)
            row = dict(who=who, requirement=text, name=name)
            if name in have:
                version, where = have[name]
                ok = r.specifier.contains(version, prereleases=True)
                rows.append(dict(row, status="ok" if ok else "conflict", found=f"{version} ({where})"))
            elif name in {canon(u) for u in unversioned}:
                rows.append(dict(row, status="ok" if not str(r.specifier) else "unverified",
                                 found="on the machine, version not recorded"))
            else:
                rows.append(dict(row, status="missing", found="-"))
    return rows


def make_stub_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal valid wheel of ``name==version`` (metadata only): a stand-in for a package the machine has."""
    dist = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    files = {
        f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}\n".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: dreamfuse-bench-carry\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return out


def pip_resolve(wheels: Path, requirements: list[str], machine: dict[str, str]) -> tuple[int, dict | None, str]:
    """pip's resolver over stub wheels of ``machine`` plus the carried wheels, for CPython 3.12 / manylinux."""
    with tempfile.TemporaryDirectory(prefix="dreamfuse-carry-") as tmp:
        stubs = Path(tmp) / "stubs"
        for name, version in machine.items():
            make_stub_wheel(stubs, name, version)
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(stubs),
               "--find-links", str(wheels), "--only-binary=:all:", "--python-version", PY, "--implementation", "cp",
               "--target", str(Path(tmp) / "target"), "--report", str(report), "--quiet", "--no-cache-dir",
               "--disable-pip-version-check"]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        r = subprocess.run([*cmd, *requirements], capture_output=True, text=True)
        data = json.loads(report.read_text()) if report.exists() else None
        return r.returncode, data, (r.stdout + r.stderr).strip()


def check(wheels: Path, assume: dict[str, str]) -> int:
    files = wheel_files(wheels)
    want = carried()
    problems = []
    missing = sorted(set(want) - set(files))
    extra = sorted(set(files) - set(want))
    if missing:
        problems.append(f"not in {wheels}: {', '.join(missing)} (python -m bench.carry download)")
    if extra:
        problems.append(f"in {wheels} but not in CARRY: {', '.join(extra)}")
    have = {canon(k): (v, "machine") for k, v in MACHINE.items()}
    reqs: dict[str, list[str]] = {"dreamfuse": dreamfuse_requirements()}
    for name, w in files.items():
        n, v, requires, requires_python = wheel_metadata(w)
        if v != want.get(name, v):
            problems.append(f"{w.name}: version {v}, CARRY says {want[name]}")
        have[canon(n)] = (v, "carried")
        reqs[f"{n} {v}"] = requires  # `extra == ...` markers evaluate false there (no extra is asked for)
        if requires_python:
            from packaging.specifiers import SpecifierSet

            if not SpecifierSet(requires_python).contains(f"{PY}.3"):
                problems.append(f"{w.name}: Requires-Python {requires_python} excludes {PY}")
    rows = evaluate(reqs, have, MACHINE_UNVERSIONED)
    print("# carried wheels vs the GPU machine (CPython 3.12, Linux x86_64)\n")
    print(f"{len(files)} wheels, {sum(w.stat().st_size for w in files.values()) / 2**20:.1f} MiB in {wheels}\n")
    print("| required by | requirement | satisfied by | status |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['who']} | `{r['requirement']}` | {r['found']} | {r['status']} |")
    bad = [r for r in rows if r["status"] in ("missing", "conflict")]
    problems += [f"{r['who']}: {r['requirement']}: {r['status']} ({r['found']})" for r in bad]
    unverified = sorted({r["requirement"] for r in rows if r["status"] == "unverified"})

    # pip's resolver: machine stubs (known versions; the unversioned ones at the versions in `assume`) + carried
    machine = {**MACHINE, **{n: assume[n] for n in MACHINE_UNVERSIONED if n in assume}}
    pins = [f"{n}=={v}" for n, v in want.items()]
    rc, report, log = pip_resolve(wheels, dreamfuse_requirements() + pins, machine)
    print(f"\npip install --dry-run --no-index (stubs of {len(machine)} machine packages + {len(files)} carried "
          f"wheels), CPython {PY} manylinux: exit {rc}")
    if rc != 0 or report is None:
        problems.append(f"pip could not resolve: {log[-1500:]}")
    else:
        picked = {canon(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
        from_wheels = sorted(n for n in picked if n in files)
        stubbed = sorted(n for n in picked if n not in files)
        assumed = sorted(n for n in stubbed if n not in {canon(k) for k in MACHINE})
        print(f"resolved {len(picked)} packages: {len(from_wheels)} carried, {len(stubbed)} from the machine"
              + (f" (of which at assumed versions: {', '.join(f'{n} {picked[n]}' for n in assumed)})" if assumed
                 else ""))
        off = [n for n in from_wheels if picked[n] != want[n]]
        if off:
            problems.append(f"pip picked other versions than CARRY for {off}")
    if unverified:
        print(f"\nunverified here (the machine has them at versions nobody recorded; `python -m bench.carry preflight`"
              f" checks them there): {', '.join(unverified)}")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    print(f"\n{'OK' if not problems else 'FAILED'}: {len(problems)} problem(s)")
    return 1 if problems else 0


# --------------------------------------------------------------------------------------------- preflight
PREFLIGHT_IMPORTS = ("torch", "triton", "diffusers", "transformers", "peft", "torchsde", "fastapi", "uvicorn",
                     "pydantic", "httpx", "dreamfuse.kernels", "dreamfuse.engine", "dreamfuse.export",
                     "dreamfuse.engine.server.http")


def preflight() -> int:
    """On the GPU machine: every requirement of dreamfuse and of the carried wheels against what this Python
    actually imports (the carried site first on the path), and the imports the suite needs."""
    import importlib

    have = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and canon(name) not in have:  # the first on sys.path wins, as imports do
            have[canon(name)] = (dist.version, Path(str(dist._path)).parent.name if hasattr(dist, "_path") else "?")
    reqs = {"dreamfuse": dreamfuse_requirements()}
    for spec in CARRY:
        name = spec.split("==")[0]
        try:
            reqs[spec] = md.requires(name) or []
        except md.PackageNotFoundError:
            pass
    rows = evaluate(reqs, have)
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"# preflight: {sys.executable} (Python {sys.version.split()[0]})")
    print(f"{len(rows)} requirements checked, {len(bad)} not met")
    for r in bad:
        print(f"  NOT MET: {r['who']}: {r['requirement']} ({r['status']}; found {r['found']})")
    failed = []
    for mod in PREFLIGHT_IMPORTS:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - reported, exit 1
            failed.append(mod)
            print(f"  IMPORT FAILED: {mod}: {type(e).__name__}: {str(e)[:200]}")
    print("versions: " + ", ".join(f"{n} {have.get(canon(n), ('-',))[0]}" for n in (
        "torch", "triton", "diffusers", "transformers", "peft", "huggingface-hub", "numpy", "fastapi", "pydantic")))
    return 1 if bad or failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="pip download the carried wheels (exact versions, no deps)")
    d.add_argument("--dest", type=Path, default=WHEELS)
    c = sub.add_parser("check", help="will the carried wheels install there, next to what it has?")
    c.add_argument("--wheels", type=Path, default=WHEELS)
    c.add_argument("--assume-from", type=Path, default=ROOT / "constraints.txt",
                   help="versions to give the machine's unrecorded packages in pip's simulation (default: "
                        "constraints.txt's)")
    sub.add_parser("preflight", help="on the GPU machine: requirements and imports, as installed there")
    args = ap.parse_args(argv)
    if args.cmd == "download":
        args.dest.mkdir(parents=True, exist_ok=True)
        return subprocess.call(download_command(args.dest))
    if args.cmd == "check":
        assume = {}
        for line in args.assume_from.read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                n, v = line.split("==")
                assume[canon(n)] = v.strip()
        return check(args.wheels, assume)
    return preflight()


if __name__ == "__main__":
    sys.exit(main())
