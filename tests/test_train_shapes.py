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
                              "--unet-steps", "3", "--unet-batch", "4", "--decoder-steps", "2", "--decoder-batch", "4",
                              "--eval", "2", "--eval-steps", "2", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "vae: step 2/2" in text and "unet: step 3/3" in text and "decoder: step 2/2" in text
    assert "vae round trip (refined decoder)" in text and "eval: background" in text
    assert {p.parent.name for p in out.glob("*/*.safetensors")} == {"unet", "vae", "text_encoder"}
    record = json.loads((out / "shapes_training.json").read_text())
    assert set(record["eval_accuracy"]) >= {"background", "found", "shape", "texture"}
    assert np.isfinite(record["unet_loss"]) and record["recipe"]["n_data"] == 16
    assert np.isfinite(record["decoder_loss"]) and set(record["vae_roundtrip_accuracy"]) >= {"shape", "texture"}
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


def test_decoder_stage_on_a_saved_folder_equals_the_recipe(tmp_path, capsys):
    common = ["--n-data", "8", "--vae-steps", "1", "--vae-batch", "2", "--unet-steps", "1", "--unet-batch", "2",
              "--decoder-batch", "2", "--eval", "0", "--threads", "1", "--save-dtype", "fp32"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_shapes.main(["--out", str(one), "--decoder-steps", "2", *common]) == 0
    assert train_shapes.main(["--out", str(two), "--decoder-steps", "0", *common]) == 0
    assert train_shapes.main(["--refine-decoder-of", str(two), "--decoder-steps", "2", *common]) == 0
    from safetensors.torch import load_file

    a = load_file(str(one / "vae" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(two / "vae" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # seeded on its own: the same decoder
    record = json.loads((two / "shapes_training.json").read_text())
    assert record["recipe"]["decoder_steps"] == 2 and "vae_roundtrip_accuracy_first_stage" in record
    with pytest.raises(SystemExit):  # a folder whose decoder stage already ran
        train_shapes.main(["--refine-decoder-of", str(two), "--decoder-steps", "2", *common])
    with pytest.raises(SystemExit):  # exactly one of --out / --refine-decoder-of
        train_shapes.main(["--decoder-steps", "2", *common])
