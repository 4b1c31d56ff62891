"""Hostile and careless input on the command line: exit status 2, one line naming the field, no traceback, no
output file, and the error comes in seconds (before any expensive work) on the tiny model."""

import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from dreamfuse.engine.cli import main
from dreamfuse.engine.ip_adapter import save_tiny_ip_adapter
from dreamfuse.engine.tiny import save_tiny
from dreamfuse.engine.tiny_adapters import build_tiny_backbone
from PIL import Image

FAST_S = 15.0  # "seconds, not minutes": generous for a loaded CI machine; the failures it guards took minutes


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG claiming ``width x height`` RGB with almost no pixel data: what a decompression bomb's header says."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def _png_black(path, side: int) -> None:
    """A real, complete ``side x side`` black grayscale PNG (13000²: 160 KB on disk, 169 M pixels decoded)."""
    c = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join([c.compress(row) for _ in range(side)] + [c.flush()])
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    ok = root / "ok.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(ok)
    _png_header_only(root / "bomb.png", 20000, 20000)
    _png_black(root / "big.png", 13000)
    # weights that are not weights
    (root / "garbage.bin").write_bytes(b"\x80\x04not a pickle at all" * 50)
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" * 20)
    from dreamfuse.engine import Engine, EngineConfig

    engine = Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))
    weights, encoder = save_tiny_ip_adapter(engine, root / "ipa", plus=True)
    vit = root / "vit"
    build_tiny_backbone().save_pretrained(vit)  # a vision model, but not a CLIP image encoder
    bad_encoder = root / "bad_encoder"
    bad_encoder.mkdir()
    (bad_encoder / "config.json").write_text((encoder / "config.json").read_text())
    (bad_encoder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" * 20)
    bad_backbone = root / "bad_backbone"
    bad_backbone.mkdir()
    (bad_backbone / "config.json").write_text((vit / "config.json").read_text())
    (bad_backbone / "model.safetensors").write_bytes(b"garbage" * 100)
    model = save_tiny(root / "model")
    bad_model = save_tiny(root / "bad_model")
    (bad_model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 100)
    (root / "bad_single.safetensors").write_bytes(b"garbage" * 100)
    # layouts and segments
    Image.fromarray(np.tile(np.array([[255, 0, 0], [0, 0, 255]], np.uint8)[None].repeat(32, 1), (64, 1, 1))
                    ).save(root / "layout.png")
    (root / "segments.json").write_text(json.dumps({"#ff0000": "a cat", "#0000ff": "a dog"}))
    (root / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "many.json").write_text(json.dumps({f"#{i:06x}": "x" for i in range(10_000)}))
    (root / "dup.json").write_text('{"#ff0000": "a cat", "#ff0000": "a dog"}')
    (root / "latin1.json").write_bytes('{"#ff0000": "caf\xe9"}'.encode("latin-1"))
    (root / "sal.pt").write_bytes(b"not torchscript")
    (root / "existing_file").write_text("x")
    (root / "dir.png").mkdir()
    data = root / "data"
    data.mkdir()
    Image.open(ok).save(data / "1.png")
    (data / "text.json").write_text(json.dumps({"1.png": ["cat {} box"]}))
    return {"root": root, "ok": ok, "weights": weights, "encoder": encoder, "vit": vit, "bad_encoder": bad_encoder,
            "bad_backbone": bad_backbone, "model": model, "bad_model": bad_model, "data": data}


def G(*extra):  # generate, cheap defaults
    return ["generate", "--prompt", "a cat", "--steps", "1", "--no-progress", *extra]


# (id, argv (a function of the files), the field the message must name)
CASES = [
    ("prompt-not-utf8", lambda f: ["generate", "--prompt", "a \udcff\udcfe cat", "--no-progress"], "--prompt"),
    ("negative-not-utf8", lambda f: G("--negative-prompt", "\udcff"), "--negative-prompt"),
    ("prompt-too-long", lambda f: G("--prompt", "cat " * 5000), "--prompt"),
    ("out-is-folder", lambda f: G("--out", str(f["root"] / "dir.png")), "--out"),
    ("out-missing-folder", lambda f: G("--out", str(f["root"] / "nope" / "x.png")), "--out"),
    ("device-meta", lambda f: G("--device", "meta"), "--device"),
    ("device-typo", lambda f: G("--device", "gpu0"), "--device"),
    ("height-huge", lambda f: G("--height", "100000"), "height"),
    ("pixels-huge", lambda f: G("--height", "4096", "--width", "4096"), "pixels"),
    ("steps-huge", lambda f: G("--steps", "100000"), "steps"),
    ("images-per-call", lambda f: G("--num-images", "500"), "images"),
    ("guidance-inf", lambda f: G("--guidance", "inf"), "--guidance"),
    ("guidance-nan", lambda f: G("--guidance", "nan"), "--guidance"),
    ("seed-2-64", lambda f: G("--seed", str(2**64)), "--seed"),
    ("seed-plus-images-2-64", lambda f: G("--seed", str(2**64 - 1), "--num-images", "2"), "--seed"),
    ("config-with-tiny", lambda f: G("--config", str(f["model"])), "--config"),
    ("corrupt-model-folder", lambda f: G("--model", str(f["bad_model"])), "model"),
    ("corrupt-single-file", lambda f: G("--model", str(f["root"] / "bad_single.safetensors"), "--config",
                                        str(f["model"])), "model"),
    ("ip-adapter-corrupt-bin", lambda f: G("--ip-adapter", str(f["root"] / "garbage.bin"), "--image-encoder",
                                           str(f["encoder"]), "--image", str(f["ok"])), "ip_adapter"),
    ("ip-adapter-corrupt-safetensors", lambda f: G("--ip-adapter", str(f["root"] / "garbage.safetensors"),
                                                   "--image-encoder", str(f["encoder"]), "--image", str(f["ok"])),
     "ip_adapter"),
    ("image-encoder-not-clip", lambda f: G("--ip-adapter", str(f["weights"]), "--image-encoder", str(f["vit"]),
                                           "--image", str(f["ok"])), "--image-encoder"),
    ("image-encoder-corrupt", lambda f: G("--ip-adapter", str(f["weights"]), "--image-encoder",
                                          str(f["bad_encoder"]), "--image", str(f["ok"])), "image_encoder"),
    ("ip-image-bomb", lambda f: G("--ip-adapter", str(f["weights"]), "--image-encoder", str(f["encoder"]),
                                  "--image", str(f["root"] / "bomb.png")), "ip_image"),
    ("reference-bomb", lambda f: ["personalize", "--reference", str(f["root"] / "bomb.png"), "--prompt", "a sks dog",
                                  "--subject-token", "sks", "--steps", "1", "--no-progress"], "reference"),
    ("reference-13000", lambda f: ["personalize", "--reference", str(f["root"] / "big.png"), "--prompt", "a sks dog",
                                   "--subject-token", "sks", "--steps", "1", "--no-progress"], "reference"),
    ("lambda-c-nan", lambda f: ["personalize", "--reference", str(f["ok"]), "--prompt", "a sks dog",
                                "--subject-token", "sks", "--lambda-c", "nan"], "--lambda-c"),
    ("subject-token-missing", lambda f: ["personalize", "--reference", str(f["ok"]), "--prompt", "a sks dog"],
     "--subject-token"),
    ("layout-bomb", lambda f: ["compose", "--layout", str(f["root"] / "bomb.png"), "--segments",
                               str(f["root"] / "segments.json"), "--prompt", "x", "--steps", "1"], "layout"),
    ("segments-nested", lambda f: ["compose", "--layout", str(f["root"] / "layout.png"), "--segments",
                                   str(f["root"] / "nested.json"), "--prompt", "x"], "--segments"),
    ("segments-10k-colours", lambda f: ["compose", "--layout", str(f["root"] / "layout.png"), "--segments",
                                        str(f["root"] / "many.json"), "--prompt", "x"], "--segments"),
    ("segments-duplicate-key", lambda f: ["compose", "--layout", str(f["root"] / "layout.png"), "--segments",
                                          str(f["root"] / "dup.json"), "--prompt", "x"], "--segments"),
    ("segments-not-utf8", lambda f: ["compose", "--layout", str(f["root"] / "layout.png"), "--segments",
                                     str(f["root"] / "latin1.json"), "--prompt", "x"], "--segments"),
    ("blur-huge", lambda f: ["compose", "--layout", str(f["root"] / "layout.png"), "--segments",
                             str(f["root"] / "segments.json"), "--prompt", "x", "--blur", "1e6", "--steps", "1",
                             "--no-progress"], "blur"),
    ("sal-model-not-torchscript", lambda f: ["compose", "--layout", str(f["root"] / "layout.png"), "--segments",
                                             str(f["root"] / "segments.json"), "--prompt", "x", "--sal-model",
                                             str(f["root"] / "sal.pt"), "--sal-scale", "1", "--steps", "1",
                                             "--no-progress"], "sal_model"),
    ("train-out-is-file", lambda f: ["train", "reversion", "--data", str(f["data"]), "--out",
                                     str(f["root"] / "existing_file"), "--steps", "1"], "--out"),
    ("train-lr-inf", lambda f: ["train", "reversion", "--data", str(f["data"]), "--out", str(f["root"] / "o"),
                                "--lr", "inf"], "--lr"),
    ("patch-quality-cuda", lambda f: ["patch-quality", "--backbone", str(f["vit"]), "--ref", str(f["ok"]), "--gen",
                                      str(f["ok"]), "--out", str(f["root"] / "m.png"), "--device", "cuda"],
     "--device"),
    ("patch-quality-gpu0", lambda f: ["patch-quality", "--backbone", str(f["vit"]), "--ref", str(f["ok"]), "--gen",
                                      str(f["ok"]), "--out", str(f["root"] / "m.png"), "--device", "gpu0"],
     "--device"),
    ("backbone-corrupt", lambda f: ["patch-quality", "--backbone", str(f["bad_backbone"]), "--ref", str(f["ok"]),
                                    "--gen", str(f["ok"]), "--out", str(f["root"] / "m.png"), "--device", "cpu"],
     "--backbone"),
    ("relation-prompts-not-utf8", lambda f: ["relation-prompts", "-e", "cat,\udcff"], "--entities"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the --device cuda cases assume a machine without CUDA")
@pytest.mark.parametrize("argv_of, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_fast_in_one_line(files, argv_of, needle, capsys, tmp_path):
    out = tmp_path / "out.png"
    argv = argv_of(files)
    if argv[0] in ("generate", "personalize", "compose") and "--out" not in argv:
        argv = [*argv, "--out", str(out)]
    capsys.readouterr()
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    elapsed = time.perf_counter() - start
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, f"exit {code}; stderr: {err}"
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("dreamfuse: error:") and needle in err, err
    assert not out.exists()
    assert elapsed < FAST_S, f"{elapsed:.1f} s to fail"


def test_non_finite_output_is_an_error_not_a_black_image(tmp_path, capsys, monkeypatch):
    """If the sampled latents come out non-finite anyway (here: a VAE that returns NaN), nothing is written."""
    from dreamfuse.engine.engine import Engine

    real = Engine.decode

    def nan_decode(self, latents):
        return real(self, latents) * float("nan")

    monkeypatch.setattr(Engine, "decode", nan_decode)
    out = tmp_path / "x.png"
    assert main(G("--out", str(out))) == 2
    err = capsys.readouterr().err.strip()
    assert "not finite" in err and len(err.splitlines()) == 1 and not out.exists()


def test_truncated_prompt_is_said_once_in_one_line(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(G("--prompt", "cat " * 100, "--out", str(out))) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "tokens, the text encoder reads 77" in warnings[0], err
