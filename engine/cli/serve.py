"""``dreamfuse serve``: the HTTP generation server (step-level continuous batching), or a Ray Serve cluster of
them with ``--ray``."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import warnings

from .common import CLIError, add_model_args, check_dir, check_file, finite_float, int_at_least, positive_int
from .generate import check_adapter_args, load_adapter

API_KEY_ENV = "DREAMFUSE_API_KEY"

EXAMPLES = """\
examples:
  dreamfuse serve --model tiny                                   # http://127.0.0.1:8000 (the page at /)
  dreamfuse serve --model ./stable-diffusion-v1-5 --max-batch-rows 16 --max-queue 128
  dreamfuse serve --model ./sd15 --ip-adapter ip-adapter-plus_sd15.safetensors --image-encoder ./image_encoder
  dreamfuse serve --model ./sd15 --preload-relation ./out/learned_embeds.bin      # prompts may use <R>
  dreamfuse serve --model ./sd15 --adapters ./loras --adapter-cache-mb 2048       # per-request LoRAs by name
  dreamfuse serve --model ./sd15 --unet ./sd15-trt          # an exported UNet (dreamfuse export tensorrt)
  DREAMFUSE_API_KEY=secret dreamfuse serve --model ./sd15 --host 0.0.0.0          # bearer token required
  dreamfuse serve --model ./sd15 --ray --replicas 4              # Ray Serve: one replica per GPU
  dreamfuse serve --model ./sd15 --ray --autoscale 1-8 --ray-address auto         # on a running Ray cluster

  curl -s localhost:8000/v1/images/generations -H 'Content-Type: application/json' \\
       -d '{"prompt": "a photo of a cat", "steps": 4, "seed": 1, "response_format": "png"}' -o cat.png

many machines (Ray): `ray start --head --port 6379` on the first, `ray start --address HEAD_IP:6379` on each
other, then on the head `dreamfuse serve --ray --ray-address auto --replicas N` (N = the GPUs in the cluster) or
`--autoscale MIN-MAX`. Each replica holds one GPU and runs its own step scheduler.
"""


def _autoscale(s: str) -> tuple[int, int]:
    lo, sep, hi = s.partition("-")
    try:
        a, b = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--autoscale must be MIN-MAX (e.g. 1-4), got {s!r}") from None
    if not sep or a < 0 or b < 1 or a > b:
        raise argparse.ArgumentTypeError(f"--autoscale must be MIN-MAX with 0 <= MIN <= MAX, MAX >= 1, got {s!r}")
    return a, b


def register(sub, name: str, help_: str, rest: list[str]) -> None:
    p = sub.add_parser(
        name, help=help_, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the model over HTTP (FastAPI + uvicorn): OpenAI-shaped /v1/images/generations, "
                    "/v1/images/personalize and /v1/images/compose, jobs with Server-Sent Events, /healthz, "
                    "/readyz, /metrics, a page at /. Requests share UNet calls step by step (continuous "
                    "batching). The model and adapters come from these options only, never from a request.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 for every interface: "
                        "then set --api-key)")
    g.add_argument("--port", type=int_at_least("--port", 0), default=8000, help="TCP port (default 8000)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: the {API_KEY_ENV} environment "
                        "variable; prefer it: a command line is visible to other users)")
    g.add_argument("--max-batch-rows", type=positive_int("--max-batch-rows"), default=16,
                   help="most UNet rows per call across requests (CFG doubles a request's rows; default 16)")
    g.add_argument("--max-queue", type=positive_int("--max-queue"), default=64,
                   help="admission queue bound: beyond it requests get 429 with Retry-After (default 64)")
    g.add_argument("--preview-every", type=int_at_least("--preview-every", 0), default=0,
                   help="send a cheap preview image in the event stream every K steps (default 0: off)")
    g.add_argument("--max-upload-mb", type=finite_float("--max-upload-mb", low=0, low_open=True), default=20.0,
                   help="largest uploaded image in MiB (default 20); pixels are bounded by the engine's limits")
    g.add_argument("--max-upload-side", type=positive_int("--max-upload-side"), default=2048, metavar="PX",
                   help="uploaded images whose longer side is larger are downscaled to it on arrival (default 2048)")
    g.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a host name this server answers to besides localhost and IP addresses (e.g. gen.lan); "
                        "'*' for any. Requests naming another host are refused (421): a web page cannot reach the "
                        "server through DNS rebinding. Repeat for several")
    g.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="a web origin (https://app.example) whose pages may call the API from a browser (CORS); "
                        "'*' for any. Other cross-origin browser requests are refused (403): without this option "
                        "only the server's own page at / can. Repeat for several")
    g.add_argument("--public-docs", action="store_true",
                   help="with --api-key: /docs, /redoc and /openapi.json answer without the key (default: they "
                        "need it too)")
    g = p.add_argument_group("per-request limits (below the engine's own; a request beyond one gets a 422 naming "
                             "the field)")
    g.add_argument("--max-n", type=positive_int("--max-n"), default=10,
                   help="most images one request may ask for (default 10)")
    g.add_argument("--max-steps", type=positive_int("--max-steps"), default=150,
                   help="most sampler steps one request may ask for (default 150)")
    g.add_argument("--max-pixels", type=positive_int("--max-pixels"), default=2048 * 1024, metavar="PX",
                   help="most pixels (width x height) of one image (default 2097152 = 2048x1024; sides at most "
                        "2048)")
    g = p.add_argument_group("server lifecycle")
    g.add_argument("--state-dir", default=None, metavar="DIR",
                   help="the journal of accepted jobs (SQLite, the uploads and the finished images): after a crash "
                        "or a restart, jobs that were accepted and not finished run again under their ids and "
                        "finished ones stay answerable (default: $XDG_STATE_HOME/dreamfuse/serve-HOST-PORT, i.e. "
                        "~/.local/state/...; not with --ray)")
    g.add_argument("--no-state", action="store_true",
                   help="no journal: accepted jobs die with the process")
    g.add_argument("--keep-jobs", type=positive_int("--keep-jobs"), default=1024,
                   help="finished jobs the journal keeps answerable, with their images (default 1024)")
    g.add_argument("--shutdown-grace", type=finite_float("--shutdown-grace", low=0), default=10.0,
                   help="on Ctrl-C / SIGTERM running requests get this many seconds to finish; the rest are "
                        "cancelled (default 10)")
    g = p.add_argument_group("what the model serves (loaded at start)")
    g.add_argument("--preload-relation", action="append", default=None, metavar="FILE",
                   help="a learned-token file whose token prompts may use: a ReVersion learned_embeds.bin (e.g. <R>) "
                        "or a textual inversion (diffusers, AUTOMATIC1111 .pt/.safetensors); repeat")
    g.add_argument("--ip-adapter", default=None, metavar="WEIGHTS",
                   help="IP-Adapter weights (.bin/.safetensors), or 'tiny' / 'tiny-base' with --model tiny: "
                        "requests may then send ip_image")
    g.add_argument("--image-encoder", default=None, metavar="DIR",
                   help="the IP-Adapter's CLIP image encoder folder ('tiny' with a tiny adapter)")
    g.add_argument("--adapters", default=None, metavar="DIR",
                   help="per-request adapters: a folder of LoRA .safetensors and learned-token files, named by their "
                        "file stems; requests name them in 'loras': [{\"name\": ..., \"scale\": ...}] and "
                        "'learned_tokens': [...], each applied to its own rows only (files added later are found by "
                        "name; GET /v1/adapters lists them)")
    g.add_argument("--adapter-cache-mb", type=finite_float("--adapter-cache-mb", low=0, low_open=True),
                   default=1024.0, metavar="MB",
                   help="device memory for loaded adapters (default 1024): least recently used ones no running "
                        "request holds are evicted to stay within it")
    g = p.add_argument_group("Ray Serve (many GPUs or machines; pip install 'dreamfuse[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: one replica per GPU, each with its own step scheduler")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--replicas", type=positive_int("--replicas"), default=None,
                     help="fixed number of replicas (default 1)")
    how.add_argument("--autoscale", type=_autoscale, default=None, metavar="MIN-MAX",
                     help="autoscale between MIN and MAX replicas on ongoing requests per replica")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join ('auto' = the one `ray start` runs here; default: RAY_ADDRESS, else a "
                        "local one)")
    add_model_args(p)
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_serve_args(args) -> None:
    """Everything checkable before the model loads."""
    if args.port > 65535:
        raise CLIError(f"--port: must be <= 65535, got {args.port}")
    if (args.replicas is not None or args.autoscale is not None or args.ray_address is not None) and not args.ray:
        raise CLIError("--replicas / --autoscale / --ray-address go with --ray")
    for path in args.preload_relation or ():
        check_file("--preload-relation", path)
    check_dir("--adapters", getattr(args, "adapters", None))
    check_adapter_args(args.ip_adapter, args.image_encoder)
    if not args.api_key and os.environ.get(API_KEY_ENV):
        args.api_key = os.environ[API_KEY_ENV]
    if getattr(args, "ray", False) and getattr(args, "state_dir", None):
        raise CLIError("--state-dir: the journal is for a single server; a Ray deployment does not use it")
    if getattr(args, "no_state", False) and getattr(args, "state_dir", None):
        raise CLIError("--state-dir and --no-state contradict each other")
    if getattr(args, "public_docs", False) and not args.api_key:
        raise CLIError("--public-docs goes with --api-key (without a key the docs are public anyway)")
    for origin in getattr(args, "allow_origin", None) or ():
        if origin not in ("*", "null") and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise CLIError(f"--allow-origin: expected an origin such as https://app.example (scheme and host, no "
                           f"path), got {origin!r}")
    if not is_loopback(args.host) and not args.api_key:
        warnings.warn(f"--host {args.host} accepts connections from other machines and no --api-key (or "
                      f"{API_KEY_ENV}) is set: anyone who reaches this port can generate", stacklevel=1)


def prepare_engine(args):
    """The engine with the adapters and relation tokens the options name (shared with the Ray replicas)."""
    from .common import load_engine

    engine = load_engine(args)
    for path in args.preload_relation or ():
        token = engine.load_relation(path)
        print(f"relation token {token} from {path}", file=sys.stderr)
    if args.ip_adapter:
        load_adapter(engine, args.ip_adapter, args.image_encoder)
    if getattr(args, "adapters", None):
        from ..adapters import DEFAULT_CACHE_MB

        registry = engine.adapters
        registry.set_budget(getattr(args, "adapter_cache_mb", None) or DEFAULT_CACHE_MB)
        registry.set_folder(args.adapters)
        print(f"adapters: {len(registry.names())} in {args.adapters}", file=sys.stderr)
    return engine


def model_fingerprint(args) -> str:
    """What the server serves, as the journal records it: a job accepted for another model is not run again."""
    parts = [f"model={args.model}"]
    for key in ("variant", "config", "unet", "lora", "preload_relation", "ip_adapter", "image_encoder", "dtype",
                "adapters"):
        value = getattr(args, key, None)
        if value:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def open_journal(args):
    """The journal the options ask for (None with --no-state or --ray)."""
    if args.no_state or args.ray:
        return None
    from ..server.journal import Journal, default_state_dir

    folder = args.state_dir or default_state_dir(args.host, args.port)
    try:
        return Journal(folder, model_fingerprint(args), keep=args.keep_jobs)
    except ValueError as e:
        raise CLIError(str(e).replace("state_dir:", "--state-dir:", 1)) from None


def server_limits(args) -> dict:
    """The per-request limits the options set (plain data: the Ray replicas receive it pickled)."""
    return {"max_images": args.max_n, "max_steps": args.max_steps, "max_pixels": args.max_pixels,
            "max_side": min(2048, args.max_pixels)}


def scheduler_options(args) -> dict:
    return {"max_batch_rows": args.max_batch_rows, "max_queue": args.max_queue, "preview_every": args.preview_every,
            "limits": server_limits(args)}


def app_options(args) -> dict:
    return {"api_key": args.api_key, "max_upload_bytes": int(args.max_upload_mb * (1 << 20)),
            "shutdown_grace_s": args.shutdown_grace, "allowed_hosts": tuple(args.allowed_host or ()),
            "allowed_origins": tuple(args.allow_origin or ()), "public_docs": args.public_docs,
            "max_upload_side": args.max_upload_side}


def run(args) -> None:
    check_serve_args(args)
    if args.ray:
        from ..server.ray_app import run_ray

        run_ray(args)
        return
    import threading

    import uvicorn

    from ..server import StepScheduler
    from ..server.http import create_app

    journal = open_journal(args)  # before the model loads: a bad --state-dir fails in milliseconds
    engine = prepare_engine(args)
    scheduler = StepScheduler(engine, **scheduler_options(args))
    app = create_app(scheduler, **app_options(args), journal=journal)
    state = app.state.dreamfuse
    if journal is not None:
        counts = state.recovered
        note = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "nothing to resume"
        print(f"dreamfuse: journal {journal.folder} ({note})", file=sys.stderr)

    def warm():
        scheduler.warmup()
        print("dreamfuse: ready", file=sys.stderr)

    threading.Thread(target=warm, name="dreamfuse-warmup", daemon=True).start()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.begin_shutdown()  # stop admitting now; running work gets the grace period
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=int(args.shutdown_grace) + 5)
    print(f"dreamfuse: serving {args.model} on http://{args.host}:{args.port} (warming up; /readyz says when "
          "ready)", file=sys.stderr)
    server = Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it has already handled gracefully
        if not server.should_exit:
            raise
    print("dreamfuse: stopped", file=sys.stderr)
