"""The embedded tiny adapter, encoder and backbone: every image-prompt command runs on a fresh machine."""

import json

import numpy as np
from dreamfuse.engine.cli import main
from PIL import Image


def _png(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_ip_adapter_patch_quality_and_patchdpo_with_tiny_models(tmp_path, capsys):
    ref = _png(tmp_path / "ref.png", 0)
    out = tmp_path / "ip.png"
    assert main(["generate", "--ip-adapter", "tiny", "--image-encoder", "tiny", "--image", str(ref), "--prompt",
                 "a dog", "--steps", "2", "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    assert Image.open(out).size == (64, 64)
    assert main(["patch-quality", "--backbone", "tiny", "--ref", str(ref), "--gen", str(out), "--out",
                 str(tmp_path / "map.png"), "--device", "cpu"]) == 0
    assert "mean quality" in capsys.readouterr().out
    sample = tmp_path / "pairs" / "s0"
    sample.mkdir(parents=True)
    _png(sample / "ref.png", 1)
    _png(sample / "gen0.png", 2)
    (sample / "prompt.txt").write_text("a dog")
    assert main(["train", "patchdpo", "--ip-adapter", "tiny", "--image-encoder", "tiny", "--backbone", "tiny",
                 "--data", str(tmp_path / "pairs"), "--out", str(tmp_path / "pdpo"), "--max-steps", "2",
                 "--no-progress"]) == 0
    weights = tmp_path / "pdpo" / "ip_adapter.bin"
    assert weights.is_file()
    # the trained file loads back with the tiny encoder's folder form, like a real adapter
    from dreamfuse.engine import Engine
    from dreamfuse.engine.tiny_adapters import build_tiny_ip_adapter

    engine = Engine.from_pretrained("tiny")
    build_tiny_ip_adapter(engine).image_encoder.save_pretrained(tmp_path / "enc")
    assert main(["generate", "--ip-adapter", str(weights), "--image-encoder", str(tmp_path / "enc"), "--image",
                 str(ref), "--prompt", "a dog", "--steps", "1", "--out", str(tmp_path / "b.png"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["model_type"] == "clip_vision_model"
