"""The ``dreamfuse`` command line. Thin: parses, validates, calls the Python API, saves images.

One small module per subcommand (``generate``, ``edit``, ``personalize``, ``compose``, ``relation-prompts``,
``patch-quality``, ``train reversion``, ``train patchdpo``); only the module of the subcommand being run is
imported, so ``dreamfuse --help``, ``--version`` and ``relation-prompts`` start without importing torch.

Bad input exits with status 2 and one line on stderr (``dreamfuse: error: ...``), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import CLIError, user_error_message

_EXAMPLES = """\
examples:
  dreamfuse generate --prompt "a photo of a cat" --steps 4 --out cat.png       # embedded tiny model
  dreamfuse generate --model ./stable-diffusion-v1-5 --prompt "a red car" --seed 7 --num-images 4 --out car.png
  dreamfuse edit --image photo.png --mask mask.png --prompt "a red car" --out car.png   # inpaint (no mask: img2img)
  dreamfuse personalize --reference dog.png --prompt "a sks dog on the beach" --subject-token sks --out dog.png
  dreamfuse compose --layout layout.png --segments segments.json --prompt "a dog next to a car" --out scene.png
  dreamfuse train reversion --data ./painted_on --out ./painted_on-out --max-steps 20
  dreamfuse <command> --help                                                  # every option of a command
"""

# name -> (module under dreamfuse.engine.cli, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "generate": ("generate", "text-to-image (optionally with an IP-Adapter image prompt or a relation token)"),
    "edit": ("edit", "img2img and inpainting: change an image with a prompt (--strength), or repaint a --mask"),
    "personalize": ("personalize", "DreamMatcher: put a reference subject into new scenes"),
    "compose": ("compose", "MSP / Composite Diffusion: a colour layout with a prompt per segment"),
    "relation-prompts": ("relation_prompts", "ReVersion: expand entity lists into '<A> <R> <B>' inference prompts"),
    "patch-quality": ("patch_quality", "PatchDPO patch quality: a heat map of how well each patch matches the "
                                       "reference"),
    "train": ("train", "training paths (eager PyTorch): ReVersion relation tokens, PatchDPO IP-Adapters"),
    "export": ("export", "ONNX graphs, TensorRT engines, refit, AOTInductor packages; run them with --unet DIR"),
    "serve": ("serve", "HTTP generation server (continuous batching; --ray for many GPUs or machines)"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("dreamfuse")
    except PackageNotFoundError:  # a checkout on sys.path without an install
        return "unknown (not installed)"


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error style: one line, exit status 2, a pointer to ``--help`` instead of the usage
    dump."""

    def error(self, message: str):
        self.exit(2, f"dreamfuse: error: {message} (see: {self.prog} --help)\n")


def first_positional(argv: list[str]) -> str | None:
    """The first argument that is not an option: the (sub)command name argparse will dispatch on."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser. Only the command named in ``argv`` gets its full parser (its module imported);
    the others are listed with their one-line help."""
    parser = Parser(
        prog="dreamfuse",
        description="dreamfuse: a compact inference engine for personalized, relational and compositional "
                    "diffusion on Stable Diffusion UNets, with fused Triton attention kernels.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dreamfuse {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = first_positional(argv or [])
    for name, (module, help_) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(f"{__name__}.{module}").register(sub, name, help_, argv[argv.index(name) + 1:])
        else:
            sub.add_parser(name, help=help_)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each (``dreamfuse: warning: ...``), not the source line that raised them. Pillow's
    decompression-bomb warning is dropped: dreamfuse checks every input image against its own, lower limit
    (``Limits.max_input_pixels``) and refuses it with an error."""
    from PIL import Image

    if issubclass(category, Image.DecompressionBombWarning):
        return
    text = " ".join(str(message).split())
    print(f"dreamfuse: warning: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.showwarning = _show_warning
    # Deprecation notices raised by the libraries (torch's TorchScript notice for compose --sal-model, tokenizers'
    # BPE constructor, ...) are about their APIs, for developers, not about the user's input; dreamfuse's own stay.
    for category in (DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!dreamfuse(\.|$))")
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("dreamfuse: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user errors become one line; anything else is a bug and re-raised
        message = user_error_message(e)
        if message is None:
            raise
        print(f"dreamfuse: error: {message}", file=sys.stderr)
        return 2
    return 0


__all__ = ["CLIError", "COMMANDS", "build_parser", "main", "version"]
