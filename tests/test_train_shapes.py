"""The shapes model's training script end to end at smoke size: it writes a diffusers folder that the engine loads
and generates from, with the training record and the read-back evaluation."""

import json

import numpy as np
import pytest
from dreamfuse.engine import Engine, EngineConfig

from tools import train_shapes


def test_smoke_run_writes_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert train_shapes.main(["--out", str(out), "--n-data", "16", "--vae-steps", "2", "--vae-batch", "4",
                              "--unet-steps", "3", "--unet-batch", "4", "--eval", "2", "--eval-steps", "2",
                              "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "vae: step 2/2" in text and "unet: step 3/3" in text and "eval: background" in text
    record = json.loads((out / "shapes_training.json").read_text())
    assert set(record["eval_accuracy"]) >= {"background", "found", "shape", "texture"}
    assert np.isfinite(record["unet_loss"]) and record["recipe"]["n_data"] == 16
    engine = Engine.from_pretrained(str(out), EngineConfig(device="cpu", backend="torch", progress=False))
    assert engine.vae.config.scaling_factor != 0.18215  # set from the training latents
    img = engine.text2img("a red circle on the left on grass", steps=2, seed=0)[0]
    assert img.size == (64, 64)


def test_refuses_a_non_empty_out_and_bad_numbers(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit):
        train_shapes.main(["--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        train_shapes.main(["--out", str(tmp_path / "new"), "--unet-steps", "0"])
