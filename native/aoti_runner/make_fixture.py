"""The ctest fixture of ``dreamfuse_aoti_runner``: an AOTInductor package of the tiny UNet, inputs, and the PyTorch
eager outputs the runner's results are compared with.

    python native/aoti_runner/make_fixture.py --out build/native/aoti_runner/fixture

writes, under ``--out``:

* ``tiny/``: ``dreamfuse export aoti --model tiny --batch 1-2 --size 64 --static`` (``unet.pt2``,
  ``dreamfuse.json``; 64 px = 8x8 latents, batch dynamic over 1-2 rows), reused while ``tiny/.fixture-key``
  matches (torch version, the tiny UNet's weights hash, the export command and code); otherwise exported again
  into a temporary folder that replaces it (about 1-2 min on 2 CPU cores);
* ``inputs/<name>.npy``: one per manifest input at batch 2 (random latents and text states, a different timestep
  per row), ``inputs_b1/``: the same at batch 1;
* ``expected/<output>.npy``, ``expected_b1/``: the eager PyTorch UNet on those inputs (fp32, CPU);
* ``bad_missing/``, ``bad_shape/``, ``bad_dtype/``, ``bad_batch/``: inputs the runner must refuse (one missing,
  the sample at 16x16 latents, a float64 timestep, 3 rows); ``names_only.json``: the manifest's input names
  without shapes (the package's own input check must then refuse ``bad_shape``); ``expected_off/``: the eager
  outputs + 1e-3, which the runner's comparison must reject at ``--atol 1e-4``;
* ``custom_op/``: a small package that calls a Python-only custom op (``dreamfuse_fixture::scale``), with its
  manifest and input: what the runner must refuse with its "export with the ops lowered" line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
SIZE = 64
EXPORT_ARGS = ["export", "aoti", "--model", "tiny", "--batch", "1-2", "--size", str(SIZE), "--static"]
MANIFEST = "dreamfuse.json"
# What the package depends on besides torch and the weights: a change here exports it again.
KEY_SOURCES = [
    "export/aoti.py",
    "export/onnx.py",
    "export/manifest.py",
    "engine/cli/export.py",
    "engine/processors.py",
    "kernels/attention.py",
]


def say(line: str) -> None:
    print(f"make_fixture: {line}", flush=True)


def save(path: Path, array: np.ndarray) -> None:
    """``numpy.save`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".npy-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".json-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def fill_dir(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """``folder`` holds exactly ``arrays`` as ``<name>.npy`` (stale files from an older fixture removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npy"):
        if old.stem not in arrays:
            old.unlink()
    for name, a in arrays.items():
        save(folder / f"{name}.npy", a)


def fixture_key(extra: str, engine=None, sources=()) -> str:
    """What a fixture package is built from: torch, ``extra`` (the export command), the engine's UNet weights and
    ``sources`` (files relative to the repository)."""
    h = hashlib.sha256()
    h.update(f"torch {torch.__version__}\n{extra}\n".encode())
    if engine is not None:
        from dreamfuse.export.manifest import weights_hash

        h.update(weights_hash(engine.unet).encode())
    for rel in sources:
        p = REPO / rel
        h.update(f"{rel}\n".encode())
        h.update(p.read_bytes() if p.is_file() else b"<absent>")
    return h.hexdigest()


def reuse_or_build(folder: Path, key: str, files: list[str], build) -> None:
    """Keep ``folder`` when its ``.fixture-key`` is ``key`` and ``files`` are there; else ``build(tmp)`` into a
    temporary sibling and swap it in (a killed build leaves the old folder or none, never half of one)."""
    stamp = folder / ".fixture-key"
    if stamp.is_file() and stamp.read_text().strip() == key and all((folder / f).is_file() for f in files):
        say(f"{folder.name}: up to date, reused")
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(tmp)
        missing = [f for f in files if not (tmp / f).is_file()]
        if missing:
            raise SystemExit(f"make_fixture: {folder.name}: the build wrote no {', '.join(missing)}")
        (tmp / ".fixture-key").write_text(key + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------- tiny package
def export_tiny(out: Path) -> None:
    cmd = [sys.executable, "-m", "dreamfuse.engine.cli", *EXPORT_ARGS, "--out", str(out)]
    say("exporting: dreamfuse " + " ".join(EXPORT_ARGS) + " (about 1-2 min on 2 CPU cores)")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"make_fixture: `dreamfuse {' '.join(EXPORT_ARGS)}` failed with exit status {done.returncode}")
    say(f"exported in {time.perf_counter() - t0:.0f} s")


def manifest_inputs(manifest: dict) -> tuple[list[dict], list[str]]:
    """The manifest's inputs as ``{"name", "shape", "dtype"}`` and its output names (the runner reads the same)."""
    graph = manifest.get("graphs", {}).get("unet", {})
    inputs = graph.get("inputs")
    outputs = graph.get("outputs") or ["noise_pred"]
    if not inputs:
        raise SystemExit("make_fixture: the package's manifest lists no inputs")
    specs = [i if isinstance(i, dict) else {"name": i} for i in inputs]
    return specs, [o["name"] if isinstance(o, dict) else o for o in outputs]


def concrete_shape(spec: dict, unet, batch: int) -> list[int]:
    """The input's shape at ``batch`` rows and the fixture's size (the manifest's numbers; named axes resolved)."""
    lat = SIZE // 8
    cfg = unet.config
    known = {
        "sample": [batch, int(cfg.in_channels), lat, lat],
        "timestep": [batch],
        "encoder_hidden_states": [batch, 77, int(cfg.cross_attention_dim)],
    }
    shape = spec.get("shape")
    if shape is None:
        return known[spec["name"]]
    fallback = known.get(spec["name"])
    dims = []
    for k, d in enumerate(shape):
        if isinstance(d, int):
            dims.append(d)
        elif fallback is not None:
            dims.append(fallback[k])
        elif k == 0:
            dims.append(batch)
        else:
            raise SystemExit(f"make_fixture: {spec['name']}: cannot choose a size for dimension {k} ({d!r})")
    return dims


def make_inputs(specs: list[dict], engine, batch: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for spec in specs:
        name, shape = spec["name"], concrete_shape(spec, engine.unet, batch)
        dtype = getattr(torch, spec.get("dtype", "float32").removeprefix("torch."))
        if name == "timestep":  # per-row timesteps: rows at different steps must come out as separate calls would
            t = torch.linspace(50.0, 850.0, shape[0]) if shape[0] > 1 else torch.tensor([420.0])
        elif name == "time_ids":
            t = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * shape[0], dtype=torch.float32)
        else:
            t = torch.randn(*shape, generator=gen)
        tensors[name] = t.to(dtype)
    return tensors


def eager(engine, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The PyTorch UNet (fp32, CPU, SDPA attention) on the package's inputs: the reference."""
    kw = {}
    if "text_embeds" in tensors:
        kw["added_cond_kwargs"] = {"text_embeds": tensors["text_embeds"], "time_ids": tensors["time_ids"]}
    with torch.no_grad():
        states = tensors["encoder_hidden_states"]
        want = engine.unet(
            tensors["sample"], tensors["timestep"], encoder_hidden_states=states, return_dict=False, **kw
        )[0]
    if not torch.isfinite(want).all() or want.abs().max() == 0:
        raise SystemExit("make_fixture: the eager UNet output is not a usable reference (non-finite or all zero)")
    return want.float()


def tiny_fixture(out: Path, engine) -> None:
    pkg = out / "tiny"
    reuse_or_build(pkg, fixture_key(" ".join(EXPORT_ARGS), engine, KEY_SOURCES), ["unet.pt2", MANIFEST], export_tiny)
    manifest = json.loads((pkg / MANIFEST).read_text())
    specs, outputs = manifest_inputs(manifest)
    for batch, suffix in ((2, ""), (1, "_b1")):
        tensors = make_inputs(specs, engine, batch, seed=1234 + batch)
        want = eager(engine, tensors)
        arrays = {k: v.numpy() for k, v in tensors.items()}
        fill_dir(out / f"inputs{suffix}", arrays)
        fill_dir(out / f"expected{suffix}", {outputs[0]: want.numpy()})
        say(
            f"inputs{suffix}: {', '.join(f'{k} {tuple(v.shape)}' for k, v in arrays.items())}; expected "
            f"{outputs[0]} {tuple(want.shape)}"
        )
        if batch == 2:
            two = arrays

    # Inputs the runner refuses: one missing, a sample outside the package's static 8x8 latents, a float64 timestep,
    # 3 rows (the batch range is 1-2).
    fill_dir(out / "bad_missing", {k: v for k, v in two.items() if k != "encoder_hidden_states"})
    fill_dir(out / "bad_shape", dict(two, sample=np.zeros((2, two["sample"].shape[1], 16, 16), np.float32)))
    fill_dir(out / "bad_dtype", dict(two, timestep=two["timestep"].astype(np.float64)))
    fill_dir(out / "bad_batch", {k: np.concatenate([v, v[:1]]) for k, v in two.items()})
    # A manifest with names only: the runner then relies on the package's own input check.
    write_json(out / "names_only.json", {"inputs": [s["name"] for s in specs], "outputs": outputs})
    # Outputs off by 1e-3: the runner's --expect comparison must fail on them at atol 1e-4.
    want = np.load(out / "expected" / f"{outputs[0]}.npy")
    fill_dir(out / "expected_off", {outputs[0]: want + np.float32(1e-3)})


# --------------------------------------------------------------------------------------------- custom-op package
def build_custom_op(out: Path) -> None:
    """A package whose graph calls a Python custom op: AOTInductor keeps it as a call through its proxy executor,
    which a C++ process cannot resolve (no Python registration there)."""

    @torch.library.custom_op("dreamfuse_fixture::scale", mutates_args=())
    def scale(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @scale.register_fake
    def _(x):
        return torch.empty_like(x)

    class Model(torch.nn.Module):
        def forward(self, x):
            return torch.ops.dreamfuse_fixture.scale(x) + 1

    say("compiling the custom-op package (about 15 s)")
    x = torch.randn(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's deprecation chatter about pytree specs
        ep = torch.export.export(Model(), (x,), strict=False)
    torch._inductor.aoti_compile_and_package(ep, package_path=str(out / "op.pt2"))
    write_json(
        out / "manifest.json", {"inputs": [{"name": "x", "shape": [2, 3], "dtype": "float32"}], "outputs": ["y"]}
    )
    fill_dir(out / "inputs", {"x": x.numpy()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="the fixture folder (in the build tree)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from dreamfuse.engine import Engine
    from dreamfuse.engine.config import EngineConfig

    engine = Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch"))
    tiny_fixture(out, engine)
    reuse_or_build(
        out / "custom_op",
        fixture_key("custom_op", sources=[Path(__file__).relative_to(REPO).as_posix()]),
        ["op.pt2", "manifest.json", "inputs/x.npy"],
        build_custom_op,
    )
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
