"""``dreamfuse export onnx|tensorrt|refit|aoti``: ONNX graphs of the pipeline, TensorRT engines built from them,
refitting an engine with new weights, and AOTInductor packages of the UNet. Thin: checks the options, calls
:mod:`dreamfuse.export`."""

from __future__ import annotations

import argparse

from .common import CLIError, add_model_args, check_dir, finite_float, output_folder

LAYOUTS = ("dreamfuse", "optimum")  # dreamfuse.export.onnx.LAYOUTS (not imported: the CLI's help loads no torch)

EXAMPLES_ONNX = """\
examples:
  dreamfuse export onnx --model tiny --out ./tiny-onnx                       # UNet, text encoder, VAE decoder
  dreamfuse generate --unet ./tiny-onnx --prompt "a photo of a cat" --out cat.png    # run it in onnxruntime
  dreamfuse export onnx --model ./sd15 --out ./sd15-onnx --fp16 --batch 1-8 --min-size 512 --max-size 768
  dreamfuse export onnx --model ./sd15 --out ./sd15-onnx --personalize       # + the DreamMatcher UNet graph
  dreamfuse export onnx --model ./sd15 --out ./sd15-plug --personalize --plugins   # AMA as dreamfuse plugin nodes
  dreamfuse export onnx --model ./sd15 --out ./sd15-ip --ip-adapter ip-adapter_sd15.safetensors \\
      --image-encoder ./image_encoder                                        # IP-Adapter image tokens as input
  dreamfuse export onnx --model ./sdxl --out ./sdxl-onnx --fp16 --size 1024 --batch 2 --static   # CUDA graphs
  dreamfuse export onnx --model ./sd15 --out ./sd15-ort --layout optimum    # for diffusers' / optimum's pipelines
"""

EXAMPLES_TRT = """\
examples:
  dreamfuse export tensorrt --onnx ./sd15-onnx --out ./sd15-trt              # one profile over the export's range
  dreamfuse export tensorrt --onnx ./sd15-onnx --out ./sd15-trt --profile 1,512,512:2,512,512:8,768,768 \\
      --timing-cache ./trt.cache --workspace 8
  dreamfuse export tensorrt --onnx ./tiny-onnx --out ./tiny-trt --compute-capability 8.9   # TensorRT-RTX, no GPU
  dreamfuse generate --model ./sd15 --unet ./sd15-trt --prompt "a red car" --out car.png
"""

EXAMPLES_REFIT = """\
examples:
  dreamfuse export onnx --model ./dreambooth-dog --out ./dog-onnx --fp16     # same architecture, new weights
  dreamfuse export refit --engine ./sd15-trt --onnx ./dog-onnx               # engine built with --refit
"""

EXAMPLES_AOTI = """\
examples:
  dreamfuse export aoti --model tiny --out ./tiny-aoti --batch 1-2 --size 64 --static   # CPU, about a minute
  dreamfuse generate --unet ./tiny-aoti --prompt "a photo of a cat" --height 64 --width 64 --out cat.png
  dreamfuse export aoti --model ./sd15 --out ./sd15-aoti --device cuda --fp16 --batch 1-8 --min-size 512 \\
      --max-size 768                                                         # CUDA: the Triton kernels embedded
"""


def register(sub, name: str, help_: str, rest: list[str]) -> None:
    from . import first_positional

    p = sub.add_parser(name, help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Export the pipeline's graphs to ONNX, build TensorRT engines from them, refit an "
                                   "engine, compile the UNet into an AOTInductor package. `--unet DIR` on "
                                   "generate/personalize/compose/serve runs the result. An export folder is a "
                                   "program (a package's library and a plan folder's plugin libraries are native "
                                   "code): share and load only folders you trust; dreamfuse.json records the sha256 "
                                   "of every file, checked before anything loads.",
                       epilog=EXAMPLES_ONNX + "\n" + EXAMPLES_TRT + "\n" + EXAMPLES_AOTI)
    targets = p.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True
    chosen = first_positional(rest)
    helps = {"onnx": "ONNX graphs: UNet (dynamic batch/size, per-row timesteps), text encoder(s), VAE decoder",
             "tensorrt": "TensorRT engines from an ONNX export (TensorRT or TensorRT-RTX)",
             "refit": "swap the weights of a refittable TensorRT engine for another export's",
             "aoti": "an AOTInductor package of the UNet (torch.export + AOTInductor; CPU or CUDA)"}
    for target, register_target in (("onnx", _register_onnx), ("tensorrt", _register_tensorrt),
                                    ("refit", _register_refit), ("aoti", _register_aoti)):
        if target == chosen:
            register_target(targets, target, helps[target])
        else:
            targets.add_parser(target, help=helps[target])


def _as_flag(e: Exception, fields) -> str:
    """``"min_size: ..."`` from the library -> ``"--min-size: ..."`` for the options this command has."""
    head, sep, rest = str(e).partition(":")
    return f"--{head.replace('_', '-')}:{rest}" if sep and head in fields else str(e)


# --------------------------------------------------------------------------------------------- onnx
def _register_onnx(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, epilog=EXAMPLES_ONNX, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write DIR/unet.onnx, text_encoder.onnx (+ text_encoder_2.onnx on SDXL), "
                                   "vae_decoder.onnx and the dreamfuse.json manifest the runtime checks (model hash, "
                                   "profile, dtype, opset). torch.export + the dynamo ONNX exporter; about 30-60 s "
                                   "per UNet graph for tiny on 2 CPU cores. --layout optimum writes the pipeline "
                                   "folder diffusers' OnnxStableDiffusionPipeline and optimum's "
                                   "ORTStableDiffusionPipeline load instead (SD 1.x/2.x).")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files in it are replaced)")
    p.add_argument("--layout", default="dreamfuse", choices=LAYOUTS,
                   help="dreamfuse (default): unet.onnx, text_encoder.onnx, vae_decoder.onnx + dreamfuse.json, run "
                        "with --unet DIR; optimum: model_index.json and text_encoder/, unet/, vae_decoder/, "
                        "vae_encoder/ (model.onnx + config.json each), tokenizer/, scheduler/ with the input/output "
                        "names of diffusers' and optimum's ONNX pipelines (SD 1.x/2.x; not with --personalize, "
                        "--plugins, --static, --ip-adapter, --no-text-encoders, --no-vae)")
    p.add_argument("--opset", type=int, default=18, choices=range(18, 24), metavar="18..23",
                   help="ONNX opset (default 18: MatMul/Softmax attention; 23: the ONNX Attention op)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_const", const="fp16", dest="export_dtype",
                      help="fp16 graphs (what a TensorRT fp16 engine is built from; onnxruntime's CPU provider "
                           "lacks fp16 kernels)")
    prec.add_argument("--export-dtype", dest="export_dtype", default=None, choices=("fp32", "fp16", "bf16"),
                      help="the graphs' dtype (default: the model's dtype, fp32 on CPU)")
    g = p.add_argument_group("profile (what the graphs accept; calls outside it are refused)")
    g.add_argument("--batch", default="1-16", metavar="MIN-MAX",
                   help="UNet batch rows, N or MIN-MAX (CFG doubles the prompts; dynamic at most 63; default 1-16)")
    g.add_argument("--size", type=int, default=None, metavar="PX", help="one square image size in pixels")
    g.add_argument("--min-size", type=int, default=None, metavar="PX",
                   help="smallest height/width in pixels, a multiple of 64 (default: native / 2, at least 64)")
    g.add_argument("--max-size", type=int, default=None, metavar="PX",
                   help="largest height/width in pixels, a multiple of 64 (default: native x 2)")
    g.add_argument("--static", action="store_true",
                   help="one batch and one size, no dynamic dimension (with --batch N --size PX; for CUDA graphs)")
    w = p.add_argument_group("graphs")
    w.add_argument("--personalize", action="store_true",
                   help="also unet_personalize.onnx: DreamMatcher's AMA and foreground layers with the flows and "
                        "masks as inputs, so `personalize --unet DIR` runs through the graph")
    w.add_argument("--plugins", action="store_true",
                   help="with --personalize: each AMA layer as one dreamfuse::AmaAttention plugin node instead of "
                        "standard ops (TensorRT: build with `export tensorrt --plugins LIB`; onnxruntime: needs "
                        "onnxruntime-extensions, fp32)")
    w.add_argument("--no-text-encoders", action="store_true", help="skip the text encoder graph(s)")
    w.add_argument("--no-vae", action="store_true", help="skip the VAE decoder graph")
    ipa = p.add_argument_group("image prompt (bakes the IP-Adapter's layers in; image tokens become an input)")
    ipa.add_argument("--ip-adapter", default=None, metavar="WEIGHTS",
                     help="IP-Adapter weights (.bin/.safetensors), or 'tiny' / 'tiny-base' with a tiny model")
    ipa.add_argument("--image-encoder", default=None, metavar="DIR", help="its CLIP image encoder ('tiny' for tiny)")
    add_model_args(p, compile_option=False, unet_option=False)
    p.set_defaults(func=run_onnx)


_ONNX_FIELDS = ("batch", "size", "min_size", "max_size", "static", "opset", "dtype", "personalize", "plugins",
                "layout", "model", "ip_adapter", "no_text_encoders", "no_vae")


def _check_sizes(args) -> None:
    """The profile's pixel sizes (``--size``, ``--min-size``, ``--max-size``) of ``export onnx`` and ``export aoti``."""
    for flag in ("size", "min_size", "max_size"):
        v = getattr(args, flag)
        if v is not None and (v < 64 or v % 8):
            raise CLIError(f"--{flag.replace('_', '-')}: {v} px must be a multiple of 8 and >= 64")
    if args.size is not None and (args.min_size is not None or args.max_size is not None):
        raise CLIError("--size: give --size or --min-size/--max-size, not both")


def run_onnx(args) -> None:
    from .common import check_file, load_engine

    out = output_folder(args.out)
    _check_sizes(args)
    batch = args.batch
    if args.layout == "optimum":
        from dreamfuse.export.optimum import refused

        why = refused(personalize=args.personalize, plugins=args.plugins, static=args.static,
                      ip_adapter=args.ip_adapter or args.image_encoder, no_text_encoders=args.no_text_encoders,
                      no_vae=args.no_vae)
        if why:
            raise CLIError(f"--layout optimum with {_as_flag(ValueError(why), _ONNX_FIELDS)}")
    if args.plugins and not args.personalize:
        raise CLIError("--plugins: only the personalize graph has plugin nodes (AMA attention); add --personalize")
    if args.ip_adapter or args.image_encoder:
        if not (args.ip_adapter and args.image_encoder):
            raise CLIError("--ip-adapter and --image-encoder go together")
        from ..tiny_adapters import TINY_ADAPTERS

        if args.ip_adapter not in TINY_ADAPTERS:
            check_file("--ip-adapter", args.ip_adapter)
    engine = load_engine(args)
    if args.ip_adapter:
        from ..tiny_adapters import TINY_ADAPTERS, build_tiny_ip_adapter

        if args.ip_adapter in TINY_ADAPTERS:
            engine.load_ip_adapter(build_tiny_ip_adapter(engine, plus=args.ip_adapter == "tiny"))
        else:
            engine.load_ip_adapter(args.ip_adapter, args.image_encoder)
    from dreamfuse.export.onnx import export_onnx

    try:
        manifest = export_onnx(engine, out, opset=args.opset, dtype=args.export_dtype, batch=batch, size=args.size,
                               min_size=args.min_size, max_size=args.max_size, static=args.static,
                               personalize=args.personalize, plugins=args.plugins,
                               text_encoders=not args.no_text_encoders,
                               vae=not args.no_vae, model_name=args.model, layout=args.layout, progress=print)
    except ValueError as e:
        msg = _as_flag(e, _ONNX_FIELDS)
        raise CLIError(f"--layout optimum with {msg}" if args.layout == "optimum" and msg.startswith("--model")
                       else msg) from None
    if args.layout == "optimum":
        print(f"wrote {out} ({', '.join(manifest['graphs'])}, tokenizer, scheduler, model_index.json; "
              f"{manifest['dtype']}, opset {manifest['opset']}): diffusers.OnnxStableDiffusionPipeline / "
              "optimum's ORTStableDiffusionPipeline .from_pretrained(DIR)")
        return
    prof = manifest["profile"]
    scale = manifest["model"]["vae_scale_factor"]
    sizes = "-".join(str(v * scale) for v in dict.fromkeys(prof["latent_height"]))
    print(f"wrote {out} ({', '.join(manifest['graphs'])}; {manifest['dtype']}, opset {manifest['opset']}, batch "
          f"{prof['batch'][0]}-{prof['batch'][1]} rows, {sizes} px)")


# --------------------------------------------------------------------------------------------- tensorrt
def _register_tensorrt(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, epilog=EXAMPLES_TRT, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Build DIR/unet.plan (and unet_personalize.plan) from an ONNX export with the "
                                   "TensorRT Python API: strongly typed (the ONNX graph's precision), optimization "
                                   "profiles, timing cache, refittable engines. Works with `tensorrt` or "
                                   "`tensorrt_rtx` (TensorRT-RTX builds without a GPU for --compute-capability).")
    p.add_argument("--onnx", required=True, metavar="DIR", help="a `dreamfuse export onnx` folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the plan folder to write")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_const", const="fp16", dest="dtype",
                      help="require fp16 (the ONNX must be exported with --fp16: the network is strongly typed)")
    prec.add_argument("--bf16", action="store_const", const="bf16", dest="dtype",
                      help="require bf16 (export the ONNX with --export-dtype bf16)")
    p.add_argument("--profile", action="append", default=None, metavar="B,H,W:B,H,W:B,H,W",
                   help="an optimization profile, min:opt:max of batch rows and image height/width in pixels; repeat "
                        "for several (default: one over the ONNX export's range)")
    p.add_argument("--static", action="store_true",
                   help="one shape (--profile B,H,W): TensorRTUNet replays it as a CUDA graph")
    p.add_argument("--timing-cache", default=None, metavar="FILE",
                   help="timing cache to read and update (full TensorRT; TensorRT-RTX has none)")
    p.add_argument("--refit", action="store_true",
                   help="refittable engine (`dreamfuse export refit` swaps its weights without a rebuild)")
    p.add_argument("--workspace", type=finite_float("--workspace", low=0, low_open=True), default=None,
                   metavar="GB", help="builder workspace memory limit in GB (default: TensorRT's)")
    p.add_argument("--compute-capability", default=None, metavar="X.Y",
                   help="TensorRT-RTX's target GPU (e.g. 8.9); default: the GPU present")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="engine cache keyed by model hash, TensorRT version, compute capability and profile")
    p.add_argument("--module", default=None, choices=("tensorrt", "tensorrt_rtx"),
                   help="which TensorRT to use (default: tensorrt if importable, else tensorrt_rtx)")
    p.add_argument("--plugins", default=None, metavar="LIB",
                   help="the TensorRT plugin library (built from native/trt_plugins/) for an export made with "
                        "--plugins: native code loaded into this process (a program: use only a library you trust); "
                        "loaded before parsing, copied into the plan folder with its sha256 for the runtime")
    p.add_argument("--verbose", action="store_true", help="TensorRT's informational log")
    p.set_defaults(func=run_tensorrt)


def run_tensorrt(args) -> None:
    onnx_dir = check_dir("--onnx", args.onnx)
    out = output_folder(args.out)
    if out.resolve() == onnx_dir.resolve():
        raise CLIError("--out: write the plans to another folder than --onnx (each folder has its own manifest)")
    from dreamfuse.export.manifest import read_manifest
    from dreamfuse.export.tensorrt import build_tensorrt, import_tensorrt, parse_profile

    if args.plugins:
        from .common import check_file

        check_file("--plugins", args.plugins)

    manifest = read_manifest(onnx_dir, "--onnx")
    scale = int(manifest["model"].get("vae_scale_factor", 8))
    try:
        profiles = [parse_profile(p, scale) for p in args.profile] if args.profile else None
    except ValueError as e:
        raise CLIError(_as_flag(e, ("profile",))) from None
    if args.static and profiles is None and not manifest["profile"]["static"]:
        raise CLIError("--static: give the one shape with --profile B,H,W (the ONNX export is dynamic)")
    if args.static and profiles is None:
        p = manifest["profile"]
        profiles = [{k: [p[k][0]] * 3 for k in ("batch", "latent_height", "latent_width")}]
    try:
        import_tensorrt(args.module)
    except ImportError as e:
        raise CLIError(str(e)) from None
    try:
        built = build_tensorrt(onnx_dir, out, profiles=profiles, static=args.static, dtype=args.dtype,
                               timing_cache=args.timing_cache, refit=args.refit, workspace_gb=args.workspace,
                               compute_capability=args.compute_capability, cache_dir=args.cache, module=args.module,
                               plugins=args.plugins,
                               verbose=args.verbose, progress=print)
    except ValueError as e:
        raise CLIError(_as_flag(e, ("profile", "static", "dtype", "compute_capability", "workspace", "refit",
                                    "plugins", "onnx"))) \
            from None
    except MemoryError as e:
        raise CLIError(str(e)) from None
    info = built["tensorrt"]
    print(f"wrote {out} ({', '.join(built['graphs'])}; {info['module']} {info['version']}, compute capability "
          f"{info['compute_capability']}, {len(info['profiles'])} profile(s), "
          f"{sum(info['build_s'].values()):.0f} s)")


# --------------------------------------------------------------------------------------------- refit
def _register_refit(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, epilog=EXAMPLES_REFIT, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Refit the engines of a plan folder built with --refit with the weights of another "
                                   "ONNX export of the same architecture (DreamBooth, a fused LoRA); needs the GPU "
                                   "the engines are for.")
    p.add_argument("--engine", required=True, metavar="DIR", help="a `dreamfuse export tensorrt --refit` folder")
    p.add_argument("--onnx", required=True, metavar="DIR", help="the ONNX export holding the new weights")
    p.set_defaults(func=run_refit)


def run_refit(args) -> None:
    plan_dir = check_dir("--engine", args.engine)
    onnx_dir = check_dir("--onnx", args.onnx)
    from dreamfuse.export.tensorrt import import_tensorrt, refit_tensorrt

    try:
        import_tensorrt()
    except ImportError as e:
        raise CLIError(str(e)) from None
    try:
        refit_tensorrt(plan_dir, onnx_dir)
    except ValueError as e:
        raise CLIError(_as_flag(e, ("engine", "onnx"))) from None
    print(f"refitted {plan_dir} with the weights of {onnx_dir}")


# --------------------------------------------------------------------------------------------- aoti
def _register_aoti(sub, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_, epilog=EXAMPLES_AOTI, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write DIR/unet.pt2, an AOTInductor package of the UNet call compiled for --device "
                                   "(torch.export, then torch._inductor.aoti_compile_and_package), and the "
                                   "dreamfuse.json manifest the runtime checks (model hash, profile, device, dtype, "
                                   "the package's inputs in order). On CPU dreamfuse's attention ops are lowered to "
                                   "ATen; on CUDA their Triton kernels are compiled into the package. Runs without "
                                   "dreamfuse: torch._inductor.aoti_load_package or C++ AOTIModelPackageLoader. "
                                   "Compiling takes minutes (about 1 min for tiny on 2 CPU cores).")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files in it are replaced)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_const", const="fp16", dest="export_dtype",
                      help="an fp16 package (the engine that runs it must be fp16 too)")
    prec.add_argument("--export-dtype", dest="export_dtype", default=None, choices=("fp32", "fp16", "bf16"),
                      help="the package's dtype (default: the model's dtype, fp32 on CPU)")
    g = p.add_argument_group("profile (what the package accepts; calls outside it are refused)")
    g.add_argument("--batch", default="1-16", metavar="MIN-MAX",
                   help="UNet batch rows, N or MIN-MAX, dynamic in the package (CFG doubles the prompts; at most 63; "
                        "default 1-16)")
    g.add_argument("--size", type=int, default=None, metavar="PX", help="one square image size in pixels")
    g.add_argument("--min-size", type=int, default=None, metavar="PX",
                   help="smallest height/width in pixels, a multiple of 64 (default: native / 2, at least 64)")
    g.add_argument("--max-size", type=int, default=None, metavar="PX",
                   help="largest height/width in pixels, a multiple of 64 (default: native x 2)")
    g.add_argument("--static", action="store_true",
                   help="static image size (--size PX, any multiple of 8); the batch stays dynamic over --batch")
    add_model_args(p, compile_option=False, unet_option=False, lora_option=True)
    p.set_defaults(func=run_aoti)


def run_aoti(args) -> None:
    out = output_folder(args.out)
    _check_sizes(args)
    if args.static and args.size is None:
        raise CLIError("--static: give the one image size with --size PX")
    if args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        raise CLIError(f"--device: AOTInductor packages are compiled for cpu or cuda, not {args.device!r}")
    from .common import load_engine

    engine = load_engine(args)
    from dreamfuse.export.aoti import export_aoti

    try:
        manifest = export_aoti(engine, out, dtype=args.export_dtype, batch=args.batch, size=args.size,
                               min_size=args.min_size, max_size=args.max_size, static=args.static,
                               model_name=args.model, progress=print)
    except ValueError as e:
        raise CLIError(_as_flag(e, ("batch", "size", "min_size", "max_size", "static", "dtype", "device"))) \
            from None
    prof = manifest["profile"]
    scale = manifest["model"]["vae_scale_factor"]
    sizes = "-".join(str(v * scale) for v in dict.fromkeys(prof["latent_height"]))
    graph = manifest["graphs"]["unet"]
    print(f"wrote {out} ({graph['file']}; {manifest['device']}, {manifest['dtype']}, batch {prof['batch'][0]}-"
          f"{prof['batch'][1]} rows, {sizes} px; inputs {', '.join(i['name'] for i in graph['inputs'])}; "
          f"{graph['export_s']:.0f} s)")
