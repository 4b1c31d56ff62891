"""PatchDPO patch-quality estimator: tiny random-weight backbones built here (nothing is downloaded)."""

from __future__ import annotations

import json

import dreamfuse.engine.cli as cli
import numpy as np
import pytest
import torch
from dreamfuse.engine import patch_quality as pq
from dreamfuse.engine.patch_quality import PatchQualityEstimator, quality_maps
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTModel,
)

SIZE = 32  # backbone input; patch 4 -> an 8x8 patch grid


def _vit(seed: int = 0) -> ViTModel:
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=SIZE, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64)
    return ViTModel(cfg, add_pooling_layer=False).eval()


def _dinov2_registers() -> Dinov2WithRegistersModel:
    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(image_size=SIZE, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, mlp_ratio=2, num_register_tokens=4)
    return Dinov2WithRegistersModel(cfg).eval()


def _clip_vision() -> CLIPVisionModel:
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=SIZE, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64)
    return CLIPVisionModel(cfg).eval()


def _structured(size: int = SIZE, phase: float = 0.0) -> torch.Tensor:
    """Smooth, position-dependent content: every patch of it looks different from uniform noise."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([yy, xx, 0.5 + 0.5 * torch.sin(6 * (xx + yy) + phase)])


def _noise_quadrant(img: torch.Tensor, seed: int) -> torch.Tensor:
    out = img.clone()
    h, w = img.shape[-2] // 2, img.shape[-1] // 2
    out[:, :h, :w] = torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))
    return out


def _png(path, t: torch.Tensor):
    Image.fromarray((t.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vit")
    _vit().save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return d


@pytest.mark.parametrize("make", [_vit, _dinov2_registers, _clip_vision], ids=["vit", "dinov2-registers", "clip"])
def test_identical_images_quality_one(make):
    est = PatchQualityEstimator(make())
    ref = torch.stack([_structured(), _structured(phase=1.0)])  # batched, two different pairs
    q_gen, q_ref = est.estimate(ref, ref.clone())
    assert q_gen.shape == q_ref.shape == (2, 8, 8)
    torch.testing.assert_close(q_gen, torch.ones_like(q_gen), atol=1e-5, rtol=0)
    torch.testing.assert_close(q_ref, torch.ones_like(q_ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_replaced_region_has_lower_quality(seed):
    est = PatchQualityEstimator(_vit())
    ref = _structured()
    gen = _noise_quadrant(ref, seed)
    q_gen, q_ref = est.estimate(ref, gen)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:4, :4] = True
    q = q_gen[0]  # the noise patches match nothing in the reference
    assert q[inside].mean() < q[~inside].mean() - 0.3, (q[inside].mean(), q[~inside].mean())
    assert q[inside].max() < q[~inside].min()
    q = q_ref[0]  # the lost reference content is not reproduced (smooth content: similar patches elsewhere)
    assert q[inside].mean() < q[~inside].mean() - 0.15, (q[inside].mean(), q[~inside].mean())
    assert q_gen[0][~inside].min() > 0.95  # untouched patches still find themselves


def test_latent_resampling_shape_and_range():
    est = PatchQualityEstimator(_vit())
    ref = _structured()
    gens = torch.stack([_noise_quadrant(ref, 0), _noise_quadrant(ref, 1), ref])
    for latent_hw, shape in ((64, (64, 64)), ((16, 24), (16, 24))):
        q_gen, q_ref = est.estimate(ref, gens, latent_hw=latent_hw)  # one reference broadcast to 3 generated
        assert q_gen.shape == q_ref.shape == (3, *shape)
        for q in (q_gen, q_ref):
            assert q.dtype == torch.float32 and q.min() >= 0 and q.max() <= 1
    q_gen, _ = est.estimate(ref, gens, latent_hw=64)
    assert q_gen[:2, :32, :32].mean() < q_gen[:2, 32:, 32:].mean() - 0.3  # the region survives resampling
    torch.testing.assert_close(q_gen[2], torch.ones(64, 64), atol=1e-5, rtol=0)


def test_triton_backend_matches_torch(monkeypatch):
    from dreamfuse.kernels import matching

    launches = []
    real = matching._launch_match
    monkeypatch.setattr(matching, "_launch_match", lambda *a, **k: launches.append(1) or real(*a, **k))
    model = _vit()
    ref = torch.stack([_structured(), _structured(phase=2.0)])
    gen = torch.stack([_noise_quadrant(ref[0], 0), _noise_quadrant(ref[1], 1)])
    q_t = PatchQualityEstimator(model, backend="triton").estimate(ref, gen, latent_hw=16)
    q_r = PatchQualityEstimator(model, backend="torch").estimate(ref, gen, latent_hw=16)
    assert launches == [1]  # the Triton kernel ran (interpreted on CPU), not the reference
    for a, b in zip(q_t, q_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_inputs_and_errors(vit_dir, tmp_path):
    est = PatchQualityEstimator(vit_dir)  # from a folder: weights and preprocessor_config.json
    assert est.mean == (0.5, 0.5, 0.5) and est.std == (0.5, 0.5, 0.5)
    assert PatchQualityEstimator(vit_dir).fingerprint() == est.fingerprint()  # cache keys survive a reload
    ref, gen = _structured(64), _noise_quadrant(_structured(64), 0)  # resized to the 32x32 input
    paths = _png(tmp_path / "r.png", ref), _png(tmp_path / "g.png", gen)
    q_path = est.estimate(*paths)
    q_pil = est.estimate(Image.open(paths[0]), [Image.open(paths[1])])
    for a, b in zip(q_path, q_pil):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="reference: batch 2"):
        est.estimate(torch.stack([ref, ref]), torch.stack([gen, gen, gen]))
    mixed = est.estimate(ref, [paths[1], gen[:, :32, :32].contiguous()])  # a list may mix sizes
    assert mixed[0].shape == (2, 8, 8)
    with pytest.raises(ValueError, match="float in"):
        est.estimate(ref, (gen * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="generated: file"):
        est.estimate(ref, tmp_path / "missing.png")
    with pytest.raises(ValueError, match="not a transformers model folder"):
        PatchQualityEstimator(tmp_path)
    from transformers import ResNetConfig, ResNetModel

    with pytest.raises(ValueError, match="no square patch grid"):
        PatchQualityEstimator(ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])))
    with pytest.raises(ValueError, match="backend"):
        PatchQualityEstimator(_vit(), backend="cuda")


# --------------------------------------------------------------------------------------------- dataset cache
def _dataset(root, n: int = 2):
    for i in range(n):
        d = root / f"s{i}"
        d.mkdir(parents=True)
        ref = _structured(phase=float(i))
        _png(d / "ref.png", ref)
        _png(d / "gen0.png", _noise_quadrant(ref, i))
        _png(d / "gen1.png", ref)
        (d / "prompt.txt").write_text(f"a photo of thing {i}\n")
    return root


def test_quality_maps_cache(tmp_path, monkeypatch):
    data, cache = _dataset(tmp_path / "data"), tmp_path / "cache"
    est = PatchQualityEstimator(_vit())
    calls = []
    real = est.estimate
    monkeypatch.setattr(est, "estimate", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = quality_maps(data, est, 16, cache)
    assert len(calls) == 2 and len(list(cache.glob("*.pt"))) == 4  # one batched call per sample, 4 pairs
    assert [s.name for s in first] == ["s0", "s1"] and first[0].prompt == "a photo of thing 0"
    assert [g.name for g in first[0].gens] == ["gen0.png", "gen1.png"]
    assert first[0].q_gen.shape == first[0].q_ref.shape == (2, 16, 16)
    assert first[0].q_gen[0, :8, :8].mean() < first[0].q_gen[0, 8:, 8:].mean() - 0.3
    torch.testing.assert_close(first[1].q_gen[1], torch.ones(16, 16), atol=1e-5, rtol=0)

    second = quality_maps(data, est, 16, cache)
    assert len(calls) == 2  # everything read from the cache
    for a, b in zip(first, second):
        assert torch.equal(a.q_gen, b.q_gen) and torch.equal(a.q_ref, b.q_ref)

    _png(data / "s1" / "gen0.png", _noise_quadrant(_structured(phase=1.0), 7))  # changed content
    third = quality_maps(data, est, 16, cache)
    assert len(calls) == 3  # only s1 recomputed ...
    assert not torch.equal(third[1].q_gen[0], first[1].q_gen[0])
    assert torch.equal(third[1].q_gen[1], first[1].q_gen[1])  # ... and its unchanged pair still came from cache

    quality_maps(data, est, 8, cache)  # another latent size is another key
    assert len(calls) == 5
    with torch.no_grad():
        next(est.backbone.parameters()).add_(0.1)  # changed weights (e.g. fine-tuned): not stale maps
    quality_maps(data, est, 16, cache)
    assert len(calls) == 7


def test_quality_maps_dataset_errors(tmp_path):
    est = PatchQualityEstimator(_vit())
    with pytest.raises(ValueError, match="does not exist"):
        quality_maps(tmp_path / "nope", est, 8, tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no sample folders"):
        quality_maps(tmp_path / "empty", est, 8, tmp_path / "c")
    data = _dataset(tmp_path / "data", 1)
    (data / "s0" / "ref.png").unlink()
    with pytest.raises(ValueError, match="no reference image"):
        quality_maps(data, est, 8, tmp_path / "c")
    data = _dataset(tmp_path / "data2", 1)
    for g in (data / "s0").glob("gen*"):
        g.unlink()
    with pytest.raises(ValueError, match="no generated image"):
        quality_maps(data, est, 8, tmp_path / "c")
    data = _dataset(tmp_path / "data3", 1)
    (data / "s0" / "prompt.txt").unlink()
    with pytest.raises(ValueError, match="no prompt.txt"):
        quality_maps(data, est, 8, tmp_path / "c")


# --------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def dreamfuse_main():
    return cli.main


def test_cli_writes_map(dreamfuse_main, vit_dir, tmp_path, capsys):
    ref = _structured(48)
    gen = _png(tmp_path / "gen.png", _noise_quadrant(ref, 0))
    out = tmp_path / "map.png"
    rc = dreamfuse_main(["patch-quality", "--backbone", str(vit_dir), "--ref", str(_png(tmp_path / "ref.png", ref)),
                         "--gen", str(gen), "--out", str(out), "--latent-size", "16", "--device", "cpu"])
    assert rc == 0
    fig = Image.open(out)
    assert fig.size == (96, 48) and fig.mode == "RGB"
    heat = np.asarray(fig)[:, 48:].astype(int)
    assert heat[:24, :24, 2].mean() > heat[24:, 24:, 2].mean() + 50  # the noise quadrant reads blue (low)
    printed = capsys.readouterr().out
    mean = float(printed.split("mean quality: generated ")[1].split(",")[0])
    assert 0.5 < mean < 1.0


@pytest.mark.parametrize("bad, match", [
    (["--ref", "missing.png"], "--ref: file"),
    (["--backbone", "nope"], "--backbone: folder"),
    (["--out", "map.jpg"], "--out: .* must be a .png"),
    (["--out", "no/such/dir/map.png"], "--out: folder"),
    (["--backbone", "."], "--backbone: .*no config.json"),
    (["--image-size", "30"], "--image-size: 30 is not a multiple of the patch size 4"),  # the flag typed
])
def test_cli_bad_inputs(dreamfuse_main, vit_dir, tmp_path, monkeypatch, capsys, bad, match):
    import re

    monkeypatch.chdir(tmp_path)
    img = _png(tmp_path / "img.png", _structured())
    args = {"--backbone": str(vit_dir), "--ref": str(img), "--gen": str(img), "--out": "map.png"}
    args.update(dict(zip(bad[::2], bad[1::2])))
    rc = dreamfuse_main(["patch-quality", *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("dreamfuse: error: ")
    assert re.search(match, err), err
    assert not (tmp_path / "map.png").exists()


# --------------------------------------------------------------------------------------------- fine-tuning
def test_finetune_backbone_patch_infonce():
    est = PatchQualityEstimator(_vit())
    images = [_structured(phase=float(i)) for i in range(4)]
    x = est.resize(images)
    before = {n: p.detach().clone() for n, p in est.backbone.named_parameters()}
    fp = est.fingerprint()
    with torch.no_grad():
        eval_before = pq.patch_infonce_loss(est, x, torch.Generator().manual_seed(123)).item()
    losses = pq.finetune_backbone(est, images, steps=8, batch_size=4, lr=3e-3, seed=0)
    with torch.no_grad():
        eval_after = pq.patch_infonce_loss(est, x, torch.Generator().manual_seed(123)).item()
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert eval_after < eval_before - 0.3, (eval_before, eval_after)  # same two views before and after
    assert any(not torch.equal(p, before[n]) for n, p in est.backbone.named_parameters())
    assert not est.backbone.training and all(p.requires_grad for p in est.backbone.parameters())  # flags restored
    assert all(p.grad is None for p in est.backbone.parameters())
    assert est.fingerprint() != fp
    q_gen, q_ref = est.estimate(x, x.clone())  # still an estimator: identical images are perfect
    torch.testing.assert_close(q_gen, torch.ones_like(q_gen), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="steps"):
        pq.finetune_backbone(est, images, steps=0)
