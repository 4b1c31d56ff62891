"""PatchDPO training on the tiny model: the weighted loss, the pair batch, what trains, resume, files, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.cli import main
from dreamfuse.engine.ip_adapter import save_tiny_ip_adapter
from dreamfuse.engine.patch_quality import PatchQualityEstimator
from dreamfuse.engine.train import patchdpo
from dreamfuse.engine.train.patchdpo import pair_batch, pair_weights, patchdpo_loss
from PIL import Image
from transformers import ViTConfig, ViTModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _engine() -> Engine:
    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", dtype="fp32", backend="torch", progress=False))


def _img(seed: int, size: int = 64) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    x = torch.stack([yy, xx, 0.5 + 0.5 * torch.sin(6 * (xx + yy) + seed)])
    x[:, :16, :16] = torch.rand(3, 16, 16, generator=g)
    return (x.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("patchdpo")
    weights, enc = save_tiny_ip_adapter(_engine(), root / "ipa", plus=True, fmt="bin")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64), add_pooling_layer=False).eval()
    vit.save_pretrained(root / "vit")
    data = root / "data"
    for s, prompt in enumerate(["a photo of a cat", "a red toy"]):
        d = data / f"s{s}"
        d.mkdir(parents=True)
        Image.fromarray(_img(10 * s)).save(d / "ref.png")
        for g in range(2):
            Image.fromarray(_img(10 * s + g + 1)).save(d / f"gen{g}.png")
        (d / "prompt.txt").write_text(prompt)
    return {"weights": weights, "enc": enc, "vit": root / "vit", "data": data}


def _run(assets, out, **kw):
    engine = _engine()
    kw.setdefault("steps", 2)
    kw.setdefault("checkpoint_every", 0)
    result = patchdpo.train(engine, assets["weights"], assets["enc"], assets["data"], out=out,
                            estimator=PatchQualityEstimator(ViTModel.from_pretrained(assets["vit"])), **kw)
    return engine, result


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("power", [1, 2])
def test_zero_weight_region_gives_zero_gradient(power):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 4, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(4, 4, 8, 8, generator=g)
    w = torch.rand(4, 8, 8, generator=g) + 0.1
    w[:, 2:5, 3:7] = 0  # a latent region, zero in both halves ([ref; gen])
    zero = (w == 0)[:, None].expand_as(pred)
    loss = patchdpo_loss(pred, target, w, power)
    loss.backward()
    assert torch.all(pred.grad[zero] == 0)
    assert torch.all(pred.grad[~zero] != 0)
    # the gradient is exactly the analytic one: 2 (pred - target) w^power / N
    expected = 2 * (pred - target).detach() * w[:, None] ** power / pred.numel()
    torch.testing.assert_close(pred.grad, expected, rtol=1e-6, atol=0)
    # perturbing the prediction or the target inside the region changes nothing
    with torch.no_grad():
        bumped = pred.detach().clone()
        bumped[zero] += 100.0
        target2 = target.clone()
        target2[zero] -= 7.0
        assert patchdpo_loss(bumped, target, w, power) == loss
        assert patchdpo_loss(pred, target2, w, power) == loss
    # the linear form is the DESIGN.md formula; power 2 the supplementary's squared norm
    ref = ((pred - target) ** 2 * w[:, None]).mean() if power == 1 else (((pred - target) * w[:, None]) ** 2).mean()
    torch.testing.assert_close(loss, ref)


def test_pair_weights_and_batch_share_noise_and_timestep():
    q_ref, q_gen = torch.rand(2, 8, 8), torch.rand(2, 8, 8)
    w = pair_weights(q_ref, q_gen)
    torch.testing.assert_close(w, torch.cat([1 - q_ref, q_gen]))
    sched = DDPMScheduler(num_train_timesteps=1000)
    ref, gen = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    noisy, noise, t, clean = pair_batch(ref, gen, sched, torch.Generator().manual_seed(3))
    assert noisy.shape == (4, 4, 8, 8) and t.shape == (4,)
    assert torch.equal(noise[:2], noise[2:]) and torch.equal(t[:2], t[2:])
    assert not torch.equal(noise[0], noise[1])  # independent across pairs
    torch.testing.assert_close(clean, torch.cat([ref, gen]))
    torch.testing.assert_close(noisy, sched.add_noise(clean, noise, t))
    # deterministic in the generator
    again = pair_batch(ref, gen, sched, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], noisy) and torch.equal(again[2], t)


# ------------------------------------------------------------------------------------------------ training
def _snapshot(engine):
    a = engine.ip_adapter
    mods = {"unet": engine.unet, "vae": engine.vae, "text_encoder": engine.text_encoder,
            "image_encoder": a.image_encoder, "image_proj": a.image_proj, "layers": a.layers}
    return {k: {n: p.detach().clone() for n, p in m.state_dict().items()} for k, m in mods.items()}


def _changed(before, after):
    return {k for k in before if any(not torch.equal(before[k][n], after[k][n]) for n in before[k])}


@pytest.mark.parametrize("train_projection", [False, True], ids=["ip-layers", "with-projection"])
def test_only_trainable_weights_change(assets, tmp_path, train_projection):
    engine = _engine()
    engine.load_ip_adapter(assets["weights"], assets["enc"])
    before = _snapshot(engine)
    result = patchdpo.train(engine, None, None, assets["data"], out=tmp_path, steps=2, lr=1e-3,
                            checkpoint_every=0, train_projection=train_projection,
                            estimator=PatchQualityEstimator(ViTModel.from_pretrained(assets["vit"])))
    after = _snapshot(engine)
    want = {"layers", "image_proj"} if train_projection else {"layers"}
    assert _changed(before, after) == want
    assert all(not torch.equal(before["layers"][n], after["layers"][n]) for n in before["layers"])  # every k/v
    assert len(result.losses) == 2 and all(np.isfinite(r["loss"]) for r in result.losses)
    assert not any(p.requires_grad for p in engine.ip_adapter.parameters())  # frozen again
    assert all(p.backend == "torch" for p in engine.processors.values())
    assert (tmp_path / "quality_cache").is_dir() and any((tmp_path / "quality_cache").iterdir())


def test_resume_continues_identically(assets, tmp_path):
    _, full = _run(assets, tmp_path / "full", steps=4, lr=1e-3, batch_size=2)
    _, first = _run(assets, tmp_path / "split", steps=2, lr=1e-3, batch_size=2, checkpoint_every=2)
    assert (tmp_path / "split" / "checkpoints" / "step-0000002.pt").is_file()
    _, second = _run(assets, tmp_path / "split", steps=4, lr=1e-3, batch_size=2, resume="latest")
    assert [r["loss"] for r in second.losses] == [r["loss"] for r in full.losses]
    a, b = full.adapter.layers.state_dict(), second.adapter.layers.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_file_loads_and_changes_generation(assets, tmp_path):
    _, result = _run(assets, tmp_path, steps=2, lr=1e-2, save_format="safetensors")
    assert result.path == tmp_path / "ip_adapter.safetensors"
    ref = assets["data"] / "s0" / "ref.png"

    def gen(weights):
        engine = _engine()
        engine.load_ip_adapter(weights, assets["enc"])
        return engine.text2img("a photo of a cat", steps=2, seed=1, ip_image=ref, output_type="latent")

    trained, untrained = gen(result.path), gen(assets["weights"])
    assert torch.isfinite(trained).all() and (trained - untrained).abs().max() > 1e-4
    torch.testing.assert_close(gen(result.path), trained)  # deterministic: the difference is the training


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_ip_adapter(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "patchdpo", "--ip-adapter", str(assets["weights"]), "--image-encoder", str(assets["enc"]),
                 "--data", str(assets["data"]), "--backbone", str(assets["vit"]), "--out", str(out), "--steps", "1",
                 "--no-progress"]) == 0
    assert (out / "ip_adapter.bin").is_file()
    assert "wrote" in capsys.readouterr().out
    _engine().load_ip_adapter(out / "ip_adapter.bin", assets["enc"])


@pytest.mark.parametrize("case", ["missing", "no-gen"])
def test_cli_bad_data_is_one_line_exit_2(assets, tmp_path, capsys, case):
    data = tmp_path / "data"
    if case == "no-gen":
        (data / "s0").mkdir(parents=True)
        Image.fromarray(_img(0)).save(data / "s0" / "ref.png")
        (data / "s0" / "prompt.txt").write_text("a cat")
    code = main(["train", "patchdpo", "--ip-adapter", str(assets["weights"]), "--image-encoder", str(assets["enc"]),
                 "--data", str(data), "--backbone", str(assets["vit"]), "--out", str(tmp_path / "out"),
                 "--steps", "1", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dataset" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "ip_adapter.bin").exists()


def test_triton_engine_trains_through_sdpa_and_gets_its_backend_back(assets, tmp_path):
    engine = Engine.from_pretrained("tiny", EngineConfig(device="cpu", dtype="fp32", backend="triton", progress=False))
    engine.load_ip_adapter(assets["weights"], assets["enc"])
    before = {k: v.clone() for k, v in engine.ip_adapter.layers.state_dict().items()}
    result = patchdpo.train(engine, data=assets["data"], out=tmp_path, steps=1, lr=1e-3, checkpoint_every=0,
                            estimator=PatchQualityEstimator(ViTModel.from_pretrained(assets["vit"])))
    assert np.isfinite(result.losses[0]["loss"])
    assert all(not torch.equal(before[k], v) for k, v in engine.ip_adapter.layers.state_dict().items())
    assert all(p.backend == "triton" for p in engine.processors.values())


# ------------------------------------------------------------------------------------------------ SDXL
def test_sdxl_pairs_carry_per_image_time_ids_and_pooled_embeddings(assets, tmp_path):
    """tiny-xl + a tiny SDXL IP-Adapter-Plus: every UNet row gets its own image's SDXL time ids
    (orig_h, orig_w, 0, 0, size, size) and its prompt's pooled embedding; training changes only the IP layers and
    the written file drives SDXL generation."""
    engine = Engine.from_pretrained("tiny-xl", EngineConfig(device="cpu", dtype="fp32", backend="torch",
                                                            progress=False))
    weights, enc = save_tiny_ip_adapter(engine, tmp_path / "ipa", plus=True)
    data = tmp_path / "data" / "s0"
    data.mkdir(parents=True)
    Image.fromarray(_img(0, 64)[:48]).save(data / "ref.png")  # 48 x 64 (h x w)
    Image.fromarray(_img(1, 80)[:, :40]).save(data / "gen0.png")  # 80 x 40
    (data / "prompt.txt").write_text("a photo of a cat")
    engine.load_ip_adapter(weights, enc)
    before = {k: v.clone() for k, v in engine.ip_adapter.state_dict().items()}

    seen = []
    real = engine.unet_call

    def spy(*args, **kw):
        seen.append((kw["time_ids"], kw["pooled"]))
        return real(*args, **kw)

    engine.unet_call = spy
    result = patchdpo.train(engine, data=data.parent, out=tmp_path / "out", steps=2, lr=1e-3, checkpoint_every=0,
                            estimator=PatchQualityEstimator(ViTModel.from_pretrained(assets["vit"])))
    del engine.unet_call
    assert len(seen) == 2
    want = torch.tensor([[48, 64, 0, 0, 64, 64], [80, 40, 0, 0, 64, 64]], dtype=torch.float32)
    pooled = engine.encode_pooled(["a photo of a cat"] * 2)
    for time_ids, p in seen:
        assert torch.equal(time_ids, want)
        torch.testing.assert_close(p, pooled)
    after = engine.ip_adapter.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"layers"} and np.isfinite(result.losses[-1]["loss"])

    def gen(w):
        e = Engine.from_pretrained("tiny-xl", EngineConfig(device="cpu", backend="torch", progress=False))
        e.load_ip_adapter(w, enc)
        return e.text2img("a photo of a cat", steps=2, seed=1, ip_image=data / "ref.png", output_type="latent")

    assert (gen(result.path) - gen(weights)).abs().max() > 1e-5


# ------------------------------------------------------------------------------------------------ hostile input
@pytest.mark.parametrize("field, value", [
    ("lr", float("inf")), ("lr", float("nan")), ("weight_decay", float("inf")), ("ip_scale", float("nan")),
    ("steps", "2"), ("batch_size", 0), ("weight_power", 1.0), ("checkpoint_every", -1), ("seed", 2**64),
])
def test_config_refuses_non_finite_and_ill_typed_values(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        patchdpo.PatchDPOConfig(**{field: value}).validate()


def test_resume_with_other_settings_lists_the_differences(assets, tmp_path, monkeypatch):
    from dreamfuse.engine import engine as engine_module

    _run(assets, tmp_path, steps=1, lr=1e-3, checkpoint_every=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001.pt"]  # no temporaries

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(engine_module.Engine, "from_pretrained", no_model)
    with pytest.raises(ValueError) as e:
        patchdpo.train("tiny", assets["weights"], assets["enc"], assets["data"], out=tmp_path, estimator=object(),
                       steps=3, lr=2e-3, weight_power=2, save_format="safetensors", resume="latest")
    msg = str(e.value)
    assert "lr: 0.001 in the checkpoint, 0.002 now" in msg and "weight_power: 1 in the checkpoint, 2 now" in msg
    assert msg.count(" in the checkpoint, ") == 2  # steps, save_format, checkpoint_every, resume may change
    monkeypatch.undo()
    _, more = _run(assets, tmp_path, steps=2, lr=1e-3, save_format="safetensors", resume="latest")
    assert [r["step"] for r in more.losses] == [1, 2] and more.path.name == "ip_adapter.safetensors"


def _bad_backbones(assets, root):
    """A folder with a valid config.json and a garbage model.safetensors, and one whose weights lack a layer."""
    import shutil

    from safetensors.torch import load_file, save_file

    garbage, partial = root / "garbage", root / "partial"
    for d in (garbage, partial):
        shutil.copytree(assets["vit"], d)
    (garbage / "model.safetensors").write_bytes(b"\x00garbage" * 16)
    sd = load_file(assets["vit"] / "model.safetensors")
    save_file({k: v for k, v in sd.items() if ".1." not in k}, partial / "model.safetensors", metadata={"format": "pt"})
    return {"garbage": (garbage, "cannot load the weights"), "partial": (partial, "missing from the weights")}


def test_broken_backbone_is_one_line_in_patchdpo_and_patch_quality(assets, tmp_path, capsys):
    ref = assets["data"] / "s0" / "ref.png"
    for name, (folder, needle) in _bad_backbones(assets, tmp_path).items():
        with pytest.raises(ValueError, match=f"^backbone: .*/{name}'") as e:  # names the folder
            PatchQualityEstimator(folder)
        assert needle in str(e.value) and "\n" not in str(e.value)
        for argv in (["train", "patchdpo", "--ip-adapter", str(assets["weights"]), "--image-encoder",
                      str(assets["enc"]), "--data", str(assets["data"]), "--backbone", str(folder),
                      "--out", str(tmp_path / "out"), "--steps", "1", "--no-progress"],
                     ["patch-quality", "--backbone", str(folder), "--ref", str(ref), "--gen", str(ref),
                      "--out", str(tmp_path / "map.png"), "--no-progress"]):
            assert main(argv) == 2, argv[0]
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "ip_adapter.bin").exists()


def test_out_that_is_a_file_is_refused_before_any_model_loads(assets, tmp_path, capsys, monkeypatch):
    from dreamfuse.engine import engine as engine_module

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(engine_module.Engine, "from_pretrained", no_model)
    (tmp_path / "file").write_text("x")
    assert main(["train", "patchdpo", "--ip-adapter", str(assets["weights"]), "--image-encoder", str(assets["enc"]),
                 "--data", str(assets["data"]), "--backbone", str(assets["vit"]), "--out", str(tmp_path / "file"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "not a folder" in err
    with pytest.raises(ValueError, match="^out: "):
        patchdpo.train("tiny", assets["weights"], assets["enc"], assets["data"], out=tmp_path / "file",
                       estimator=object())
