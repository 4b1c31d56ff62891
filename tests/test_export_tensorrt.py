"""TensorRT engines from the tiny ONNX export.

Building is tested with whichever TensorRT module is importable: TensorRT-RTX (``pip install tensorrt-rtx-cu13``)
builds with no GPU for a chosen compute capability, which is what CI does; without either module those tests skip.
Running an engine needs a GPU *and* TensorRT: those tests are marked ``gpu`` and skip elsewhere (they never ran on
the machines this was written on).
"""

import importlib.util
import json

import pytest
import torch
from dreamfuse.engine.cli import main
from dreamfuse.export.manifest import MANIFEST, file_entries, read_manifest
from export_models import shared_export

HAS_TRT = any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx"))
needs_trt = pytest.mark.skipif(not HAS_TRT, reason="neither tensorrt nor tensorrt_rtx is installed "
                                                   "(CI: pip install tensorrt-rtx-cu13)")
CC = None if torch.cuda.is_available() else "8.9"  # TensorRT-RTX without a GPU builds for a named target


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_export(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """unet.plan + unet_personalize.plan, two profiles, through the engine cache (filled on this first build)."""
    from dreamfuse.export.tensorrt import build_tensorrt, parse_profile

    root = tmp_path_factory.mktemp("trt")
    profiles = [parse_profile("1,64,64:2,64,64:4,128,128"), parse_profile("4,64,64:8,64,64:8,128,128")]
    manifest = build_tensorrt(tiny[1], root / "plans", profiles=profiles, compute_capability=CC,
                              timing_cache=root / "timing.cache", cache_dir=root / "cache")
    return root, manifest


@needs_trt
def test_build_tiny_unet_engines(built, tiny):
    root, manifest = built
    info = manifest["tensorrt"]
    assert info["module"] in ("tensorrt", "tensorrt_rtx") and info["version"]
    assert len(info["profiles"]) == 2 and not info["static"]
    assert set(manifest["graphs"]) == {"unet", "unet_personalize"}
    for graph in manifest["graphs"].values():
        plan = root / "plans" / graph["plan"]
        assert plan.stat().st_size == graph["plan_bytes"] > 1_000_000 and graph["layers"] > 1000
        assert (root / "cache" / graph["cache_key"] / graph["plan"]).is_file()
    on_disk = json.loads((root / "plans" / MANIFEST).read_text())
    assert on_disk["model"]["hash"] == tiny[2]["model"]["hash"]  # the runtime checks the engine's weights too
    assert on_disk["files"] == file_entries(root / "plans", ["unet.plan", "unet_personalize.plan"])  # and the plans'
    assert info["plugin_libraries"] == [] and all("file" not in g for g in on_disk["graphs"].values())
    read_manifest(root / "plans")  # what TensorRTUNet reads
    assert on_disk["profile"] == tiny[2]["profile"]
    if info["module"] == "tensorrt":  # TensorRT-RTX has no timing cache (no-ops since 1.2): not written there
        assert info["timing_cache"] and (root / "timing.cache").stat().st_size > 0
    else:
        assert info["timing_cache"] is None and not (root / "timing.cache").exists()


@needs_trt
def test_cached_engine_is_reused_and_the_key_covers_the_profile(built, tiny, tmp_path):
    from dreamfuse.export.tensorrt import build_tensorrt, parse_profile

    root, first = built
    profiles = first["tensorrt"]["profiles"]
    again = build_tensorrt(tiny[1], tmp_path / "again", profiles=profiles, compute_capability=CC,
                           cache_dir=root / "cache", graphs=("unet",))
    assert again["graphs"]["unet"]["cache_key"] == first["graphs"]["unet"]["cache_key"]
    assert again["tensorrt"]["build_s"]["unet"] < 5  # copied, not built
    assert (tmp_path / "again" / "unet.plan").read_bytes() == (root / "plans" / "unet.plan").read_bytes()
    from dreamfuse.export.tensorrt import cache_key, import_tensorrt

    other = [parse_profile("1,64,64:1,64,64:2,64,64")]
    m = read_manifest(tiny[1])
    trt = import_tensorrt()
    cc = first["tensorrt"]["compute_capability"]
    assert cache_key(m, trt, cc, other, False, False, "unet") != first["graphs"]["unet"]["cache_key"]


@needs_trt
def test_profiles_outside_the_export_and_bad_options_are_refused(tiny, tmp_path):
    from dreamfuse.export.tensorrt import build_tensorrt, parse_profile

    folder = tiny[1]
    with pytest.raises(ValueError, match=r"^profile: batch 1-16 rows leaves the ONNX export's range 1-8 rows"):
        build_tensorrt(folder, tmp_path, profiles=[parse_profile("1,64,64:2,64,64:16,64,64")], compute_capability=CC)
    with pytest.raises(ValueError, match=r"^profile: height 64-256 px leaves the ONNX export's range 64-128 px"):
        build_tensorrt(folder, tmp_path, profiles=[parse_profile("1,64,64:1,64,64:1,256,64")], compute_capability=CC)
    with pytest.raises(ValueError, match="^dtype: the ONNX graphs are float32 and the network is strongly typed"):
        build_tensorrt(folder, tmp_path, dtype="fp16", compute_capability=CC)
    with pytest.raises(ValueError, match="^static: a static engine has one shape"):
        build_tensorrt(folder, tmp_path, static=True, compute_capability=CC)
    with pytest.raises(ValueError, match="^profile: expected B,H,W:B,H,W:B,H,W"):
        parse_profile("1,64,64:2,64,64")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^refit: a refittable engine is built on its GPU"):
            build_tensorrt(folder, tmp_path, refit=True, compute_capability=CC)
        if importlib.util.find_spec("tensorrt_rtx") is not None:
            with pytest.raises(ValueError, match="^compute_capability: no GPU here to build for"):
                build_tensorrt(folder, tmp_path, module="tensorrt_rtx")
            with pytest.raises(ValueError, match=r"^compute_capability: '9.0' is not a TensorRT-RTX target"):
                build_tensorrt(folder, tmp_path, module="tensorrt_rtx", compute_capability="9.0")


@needs_trt
def test_cli_export_tensorrt(built, tiny, tmp_path, capsys):
    root, _ = built
    out = tmp_path / "plans"
    cc = ["--compute-capability", CC] if CC else []
    assert main(["export", "tensorrt", "--onnx", str(tiny[1]), "--out", str(out), "--cache", str(root / "cache"),
                 "--profile", "1,64,64:2,64,64:4,128,128", "--profile", "4,64,64:8,64,64:8,128,128", *cc]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "unet.plan").is_file()
    assert main(["export", "tensorrt", "--onnx", str(tiny[1]), "--out", str(out), "--static", *cc]) == 2
    assert main(["export", "tensorrt", "--onnx", str(tiny[1]), "--out", str(out), "--profile", "1,64", *cc]) == 2
    assert main(["export", "tensorrt", "--onnx", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dreamfuse: error: --static: give the one shape with --profile B,H,W (the ONNX export is dynamic)",
                   "dreamfuse: error: --profile: '1,64' in '1,64' is not B,H,W (three integers)",
                   f"dreamfuse: error: --onnx: folder {str(tmp_path / 'none')!r} does not exist"]


@needs_trt
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_tensorrt_backend_without_a_gpu_is_a_clear_error(built):
    from dreamfuse.export.runtime import TensorRTUNet

    with pytest.raises(ValueError, match="TensorRT engines run on a CUDA GPU; none is available here"):
        TensorRTUNet(built[0] / "plans")


# --------------------------------------------------------------------------------------------- on a GPU
def _runnable():
    if not torch.cuda.is_available():
        return "needs CUDA"
    if not HAS_TRT:
        return "needs tensorrt or tensorrt_rtx"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_runnable() is not None, reason=str(_runnable()))
def test_text2img_and_personalize_through_tensorrt_match_torch(built, tiny):
    """Never ran where this was written (no GPU). fp32 engines: TensorRT picks its own kernels (TF32 off by default
    in a strongly typed fp32 network), so the tolerance is looser than onnxruntime's."""
    from dreamfuse.engine import Engine, EngineConfig
    from dreamfuse.engine.tiny_adapters import build_tiny_ip_adapter

    engine = Engine.from_pretrained("tiny", EngineConfig(device="cuda", dtype="fp32", backend="torch",
                                                         progress=False))
    engine.load_ip_adapter(build_tiny_ip_adapter(engine, plus=True))
    ref = engine.text2img(["a cat", "a dog"], steps=3, seed=1, output_type="pt", height=64, width=128)
    reference = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))
    kw = dict(subject_token="sks", steps=4, seed=0, height=128, width=128, output_type="latent", ama_start=1)
    ref_p = engine.personalize("a photo of a sks dog", reference, **kw)
    engine.set_unet_backend("tensorrt", built[0] / "plans")
    out = engine.text2img(["a cat", "a dog"], steps=3, seed=1, output_type="pt", height=64, width=128)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(engine.personalize("a photo of a sks dog", reference, **kw), ref_p, atol=2e-3,
                               rtol=2e-3)
