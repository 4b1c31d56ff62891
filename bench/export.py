"""Exported UNets against eager PyTorch: seconds per denoising step at the same model, size and batch, side by side
in one run, plus the export and build times.

    python -m bench.export                                   # tiny, CPU: eager, torch.compile, aoti, onnxruntime
    python -m bench.export --height 64 --width 64 --batch 1  # the README's figures (tiny, 64², 2 UNet rows)
    python -m bench.export --model random-sd15 --height 64 --width 64 --batch 1 --steps 4   # SD 1.5-sized UNet
    python -m bench.export --model ./sd15 --dtype fp16 --height 512 --width 512 --tensorrt  # on a GPU
    python -m bench.export --onnx ./tiny-onnx --aoti ./tiny-aoti   # reuse exports (no export time then)
    python -m bench.export --skip torch.compile --skip aoti  # leave columns out (the compiles take minutes)

Columns: eager (the engine's PyTorch UNet), torch.compile (``torch.compile(unet, dynamic=False)``, what
``EngineConfig(compile=True)`` runs), aoti (``AotiUNet`` on an AOTInductor package compiled for this device, batch
and size), onnxruntime (``OnnxRuntimeUNet`` on the export, CPU provider on CPU, CUDA provider on CUDA) and, with
``--tensorrt`` where TensorRT and a GPU are present, ``TensorRTUNet``. Each call is
one text-to-image run of ``--steps`` steps with CFG (2 UNet rows per prompt) and ``output_type="latent"`` (VAE
excluded); the columns are timed interleaved, call by call (``bench._util.compare``), and every cell is ``median /
min`` s/step; ratios are eager / backend (> 1: the backend is faster). The outputs of every backend are compared
with eager's in the same run (max abs difference of the latents). With ``--tensorrt`` and TensorRT-RTX but no GPU
the engine is built (its build time is reported) and not run. The second table gives each column's one-off cost:
the ONNX export, the AOTInductor trace + compile, torch.compile's first call (compiling; minus nothing: it includes
that call's own steps), the TensorRT build.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
from dreamfuse.engine import Engine, EngineConfig

from bench._util import add_model_args, compare, hardware, print_table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=2, help="prompts per call (default 2: 4 UNet rows with CFG)")
    ap.add_argument("--steps", type=int, default=5, help="denoising steps per call (default 5)")
    ap.add_argument("--height", type=int, default=None, help="default: the model's native size")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--onnx", default=None, metavar="DIR", help="an existing export of --model (skips the export)")
    ap.add_argument("--aoti", default=None, metavar="DIR",
                    help="an existing `dreamfuse export aoti` package of --model (skips the compile)")
    ap.add_argument("--skip", action="append", default=[], choices=("torch.compile", "aoti", "onnxruntime"),
                    help="leave a column out (repeat for several)")
    ap.add_argument("--tensorrt", action="store_true", help="also build (and, with a GPU, run) a TensorRT engine")
    ap.add_argument("--compute-capability", default=None, help="TensorRT-RTX's build target without a GPU (8.9)")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per column, interleaved (default 5)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and onnxruntime (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()

    from dreamfuse.export.aoti import export_aoti
    from dreamfuse.export.onnx import export_onnx
    from dreamfuse.export.runtime import AotiUNet, OnnxRuntimeUNet

    eng = Engine.from_pretrained(args.model, EngineConfig(device=args.device, dtype=args.dtype, progress=False))
    device = eng.device
    h = args.height or eng.default_size
    w = args.width or eng.default_size
    rows = 2 * args.batch
    times = []
    work = tempfile.TemporaryDirectory(prefix="dreamfuse-bench-export-")
    folder = Path(args.onnx) if args.onnx else Path(work.name) / "onnx"
    backends = {}
    if "torch.compile" not in args.skip:
        backends["torch.compile"] = _torch_compile(eng, prompts=["a photo of a cat"] * args.batch, h=h, w=w,
                                                   steps=args.steps, times=times)
    if "aoti" not in args.skip:
        aoti_dir = Path(args.aoti) if args.aoti else Path(work.name) / "aoti"
        if not args.aoti:
            t0 = time.perf_counter()
            sizes = dict(size=h, static=True) if h == w else dict(min_size=min(h, w), max_size=max(h, w))
            manifest = export_aoti(eng, aoti_dir, batch=(rows, rows), model_name=args.model, **sizes)
            g = manifest["graphs"]["unet"]
            times.append([f"aoti export + compile (unet, {device.type})", f"{time.perf_counter() - t0:.1f}",
                          f"trace {g['trace_s']} s, lower {g['lower_s']} s, AOTInductor {g['compile_s']} s"])
        backends["aoti"] = AotiUNet(aoti_dir)
        backends["aoti"].bind(eng)
    providers = ["cuda"] if device.type == "cuda" else ["cpu"]
    if "onnxruntime" not in args.skip or args.tensorrt:
        if not args.onnx:
            t0 = time.perf_counter()
            manifest = export_onnx(eng, folder, opset=args.opset, batch=(rows, rows), min_size=min(h, w),
                                   max_size=max(h, w), text_encoders=False, vae=False, model_name=args.model)
            times.append(["onnx export (unet)", f"{time.perf_counter() - t0:.1f}",
                          f"trace {manifest['graphs']['unet']['trace_s']} s + lower/save"])
    if "onnxruntime" not in args.skip:
        backends["onnxruntime"] = OnnxRuntimeUNet(folder, providers=providers, threads=threads)
        backends["onnxruntime"].bind(eng)
    if args.tensorrt:
        trt_backend = _tensorrt(folder, Path(work.name) / "trt", args, times, eng)
        if trt_backend is not None:
            backends["tensorrt"] = trt_backend

    prompts = ["a photo of a cat"] * args.batch
    outputs = {}

    def run(name):
        def call():
            outputs[name] = eng.text2img(prompts, steps=args.steps, height=h, width=w, seed=0, output_type="latent")
        return call

    @contextlib.contextmanager
    def using(fn):
        # swap the engine's UNet callable outside the timed region (set_unet_backend re-hashes the weights)
        before = eng._unet_fn
        eng._unet_fn = fn
        try:
            yield
        finally:
            eng._unet_fn = before

    fns = {"eager": run("eager"), **{name: run(name) for name in backends}}
    around = {name: (lambda b=b: using(b)) for name, b in backends.items()}
    t = compare(fns, device=device, warmup=1, iters=args.iters, around=around)
    eager = t["eager"] / 1e3 / args.steps
    table = [["eager (PyTorch)", eager, 1.0, "-"]]
    for name in backends:
        s = t[name] / 1e3 / args.steps
        diff = (outputs[name].float() - outputs["eager"].float()).abs().max().item()
        table.append([name, s, eager / s, f"{diff:.1e}"])
    print(f"# exported UNets vs eager — {hardware(device)}")
    print(f"model={args.model} dtype={str(eng.dtype).removeprefix('torch.')} backend={eng.config.backend} "
          f"batch {args.batch} prompts ({rows} UNet rows, CFG), {h}x{w}, {args.steps} steps, opset {args.opset}, "
          f"onnxruntime {providers[0]} provider, {threads} threads; {args.iters} interleaved calls per column; "
          f"{time.strftime('%Y-%m-%d')}")
    print_table("seconds per denoising step (whole text2img call / steps, VAE excluded)",
                ["backend", "s/step", "eager/backend", "max |latents - eager|"], table)
    print_table("export and build times (seconds, once)", ["what", "s", "note"], times or [["-", "-", "reused"]])
    work.cleanup()


def _torch_compile(eng, prompts, h: int, w: int, steps: int, times: list):
    """``torch.compile`` of the engine's UNet as ``EngineConfig(compile=True)`` makes it; its first text2img call
    (the compile, plus that call's own steps) goes into the times table."""
    fn = torch.compile(eng.unet, dynamic=False)
    before = eng._unet_fn
    eng._unet_fn = fn
    try:
        t0 = time.perf_counter()
        eng.text2img(prompts, steps=steps, height=h, width=w, seed=0, output_type="latent")
        times.append(["torch.compile (first call: compile + its steps)", f"{time.perf_counter() - t0:.1f}",
                      "dynamic=False, inductor"])
    finally:
        eng._unet_fn = before
    return fn


def _tensorrt(folder: Path, out: Path, args, times: list, eng):
    try:
        from dreamfuse.export.tensorrt import build_tensorrt, import_tensorrt

        trt = import_tensorrt()
    except ImportError as e:
        times.append(["tensorrt build", "-", f"not installed ({str(e)[:60]}...)"])
        return None
    t0 = time.perf_counter()
    built = build_tensorrt(folder, out, compute_capability=args.compute_capability, graphs=("unet",))
    times.append([f"tensorrt build ({trt.__name__} {trt.__version__}, sm {built['tensorrt']['compute_capability']})",
                  f"{time.perf_counter() - t0:.1f}", f"{built['graphs']['unet']['layers']} layers"])
    if not torch.cuda.is_available():
        times.append(["tensorrt run", "-", "no GPU here: built only"])
        return None
    from dreamfuse.export.runtime import TensorRTUNet

    backend = TensorRTUNet(out)
    backend.bind(eng)
    return backend


if __name__ == "__main__":
    main()
