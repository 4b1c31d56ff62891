"""LoRA on the embedded tiny models: the same images as diffusers' own ``load_lora_weights``, scale/fuse/unload
semantics, several adapters, kohya files, SDXL's second text encoder, the other pipelines, errors, CLI."""

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine import lora as lora_mod
from dreamfuse.engine.cli import main
from dreamfuse.engine.cli.common import lora_spec
from dreamfuse.engine.processors import DreamfuseAttnProcessor
from dreamfuse.engine.tiny import build_components, build_xl_components
from dreamfuse.engine.tiny_adapters import build_tiny_ip_adapter, build_tiny_lora
from PIL import Image

STEPS = 3
PROMPTS = ["a photo of a cat", "a dog on the beach"]
SEEDS = [3, 4]
CONFIG = dict(device="cpu", backend="torch", progress=False)


def run(engine, **kw):
    return engine.text2img(PROMPTS, steps=STEPS, seed=SEEDS, output_type="latent", **kw)


@pytest.fixture(scope="module")
def sd_engine():
    return Engine.from_pretrained("tiny", EngineConfig(**CONFIG))


@pytest.fixture(scope="module")
def xl_engine():
    return Engine.from_pretrained("tiny-xl", EngineConfig(**CONFIG))


@pytest.fixture
def sd(sd_engine):
    yield sd_engine
    sd_engine.unload_lora()


@pytest.fixture
def xl(xl_engine):
    yield xl_engine
    xl_engine.unload_lora()


@pytest.fixture(scope="module")
def files(sd_engine, xl_engine, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {
        "sd": build_tiny_lora(sd_engine, d / "subject.safetensors"),
        "sd_kohya": build_tiny_lora(sd_engine, d / "subject_kohya.safetensors", format="kohya"),
        "sd_unet": build_tiny_lora(sd_engine, d / "style.safetensors", seed=1, text_encoder=False),
        "sd_b": build_tiny_lora(sd_engine, d / "other.safetensors", seed=2, rank=8),
        "xl": build_tiny_lora(xl_engine, d / "xl.safetensors"),
        "xl_kohya": build_tiny_lora(xl_engine, d / "xl_kohya.safetensors", format="kohya"),
    }


@pytest.fixture(scope="module")
def base(sd_engine):
    return run(sd_engine)


def is_peft_free(module) -> bool:
    return not any("lora" in k or "base_layer" in k for k in module.state_dict())


# ------------------------------------------------------------------------------------------- against diffusers
@pytest.mark.parametrize("fmt", ["sd", "sd_kohya"])
def test_lora_equals_diffusers_load_lora_weights(sd, files, fmt):
    """A stock StableDiffusionPipeline on a separately built tiny, the same file through its own
    load_lora_weights at the same scale, the same latents: the same images (stock attention vs dreamfuse's)."""
    from diffusers import StableDiffusionPipeline

    c = build_components()
    c["scheduler"] = sd.new_scheduler(STEPS)
    pipe = StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(files[fmt]), adapter_name="x")
    pipe.set_adapters("x", 0.8)
    ref = pipe(PROMPTS, height=64, width=64, num_inference_steps=STEPS, guidance_scale=7.5,
               latents=sd.initial_latents(SEEDS, 64, 64), output_type="latent").images
    assert sd.load_lora(files[fmt], scale=0.8) == files[fmt].stem
    torch.testing.assert_close(run(sd), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # the stock pipeline's second adapter
def test_two_adapters_equal_diffusers_set_adapters(sd, files):
    """Two LoRAs with UNet and text encoder layers (ranks 4 and 8) at scales 1.0 and 0.5, against diffusers'
    set_adapters on a stock pipeline; then the second one alone after unloading the first."""
    from diffusers import StableDiffusionPipeline

    c = build_components()
    c["scheduler"] = sd.new_scheduler(STEPS)
    pipe = StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(files["sd"]), adapter_name="a")
    pipe.load_lora_weights(str(files["sd_b"]), adapter_name="b")

    def ref():
        return pipe(PROMPTS, height=64, width=64, num_inference_steps=STEPS, guidance_scale=7.5,
                    latents=sd.initial_latents(SEEDS, 64, 64), output_type="latent").images

    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    both = ref()
    pipe.set_adapters(["b"], [0.5])
    only_b = ref()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no library chatter about a second adapter
        sd.load_lora(files["sd"], name="a")
        sd.load_lora(files["sd_b"], name="b", scale=0.5)
    torch.testing.assert_close(run(sd), both, atol=1e-4, rtol=1e-4)
    sd.unload_lora("a")
    torch.testing.assert_close(run(sd), only_b, atol=1e-4, rtol=1e-4)


def test_sdxl_lora_with_text_encoder_2_equals_diffusers(xl, files):
    """tiny-xl: UNet, text encoder and text encoder 2 layers (the pooled embedding comes from encoder 2 only)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(str(files["xl"]), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_encoder", "text_encoder_2"}
    base_pooled = xl.encode_pooled(["a photo of a cat"])
    base = run(xl)
    xl.load_lora(files["xl"], scale=0.7)
    assert (xl.encode_pooled(["a photo of a cat"]) - base_pooled).abs().mean() > 1e-2  # encoder 2 changed
    ours = run(xl)
    assert (ours - base).abs().mean() > 1e-2

    c = build_xl_components()
    c.pop("force_zeros_for_empty_prompt")
    c["scheduler"] = xl.new_scheduler(STEPS)
    pipe = StableDiffusionXLPipeline(**c, force_zeros_for_empty_prompt=True)
    pipe.load_lora_weights(str(files["xl"]), adapter_name="x")
    pipe.set_adapters("x", 0.7)
    ref = pipe(PROMPTS, height=64, width=64, num_inference_steps=STEPS, guidance_scale=7.5,
               latents=xl.initial_latents(SEEDS, 64, 64), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_kohya_equals_diffusers_format(sd, xl, files):
    """The same seeded weights written both ways (kohya: alpha = rank/2 in the file, SDXL with SGM block names;
    diffusers: B/2) give the same model."""
    for engine, plain, kohya in ((sd, "sd", "sd_kohya"), (xl, "xl", "xl_kohya")):
        engine.load_lora(files[plain])
        a = run(engine)
        engine.unload_lora()
        engine.load_lora(files[kohya])
        torch.testing.assert_close(run(engine), a, atol=1e-6, rtol=1e-6)
        engine.unload_lora()


# ------------------------------------------------------------------------------------------- semantics
def test_scale_zero_equals_no_lora(sd, files, base):
    sd.load_lora(files["sd"], scale=0.0)
    assert torch.equal(run(sd), base)
    sd.set_lora_scale(files["sd"].stem, 1.0)
    assert (run(sd) - base).abs().mean() > 1e-2


def test_fused_equals_unfused(sd, files):
    sd.load_lora(files["sd"], name="subject", scale=0.9)
    unfused = run(sd)
    sd.fuse_lora()
    assert lora_mod.is_fused(sd)
    torch.testing.assert_close(run(sd), unfused, atol=1e-4, rtol=1e-4)
    sd.fuse_lora()  # no-op
    sd.unfuse_lora()
    assert not lora_mod.is_fused(sd)
    torch.testing.assert_close(run(sd), unfused, atol=1e-6, rtol=1e-6)
    sd.load_lora(files["sd_unet"], name="style", scale=0.5)
    both = run(sd)
    sd.unload_lora("style")
    sd.fuse_lora()
    sd.load_lora(files["sd_unet"], name="style", scale=0.5)  # loading while fused: unfuse, load, fuse both
    assert lora_mod.is_fused(sd)
    torch.testing.assert_close(run(sd), both, atol=1e-4, rtol=1e-4)


def test_unload_restores_the_base_bit_exactly(sd, files, base):
    """Also after fusing, rescaling while fused and unfusing: the fused layers' weights come back from a copy."""
    before = {m: {k: v.clone() for k, v in getattr(sd, m).state_dict().items()} for m in ("unet", "text_encoder")}
    sd.load_lora(files["sd"], name="a")
    sd.load_lora(files["sd_unet"], name="b", scale=0.5)
    sd.fuse_lora()
    sd.set_lora_scale("a", 0.3)
    sd.unload_lora("b")
    sd.unfuse_lora()
    sd.unload_lora()
    assert dict(sd.loras) == {}
    for m, sd_before in before.items():
        after = getattr(sd, m).state_dict()
        assert after.keys() == sd_before.keys()
        assert all(torch.equal(after[k], v) for k, v in sd_before.items()), m
    assert torch.equal(run(sd), base)


def test_two_adapters_at_once(sd, files, base):
    sd.load_lora(files["sd_unet"], name="style", scale=0.5)
    style = run(sd)
    sd.load_lora(files["sd"], name="subject")
    assert dict(sd.loras) == {"style": 0.5, "subject": 1.0}
    both = run(sd)
    sd.unload_lora("style")
    subject = run(sd)
    assert dict(sd.loras) == {"subject": 1.0}
    for a, b in ((both, style), (both, subject), (style, base), (subject, base)):
        assert (a - b).abs().mean() > 1e-2
    sd.unload_lora("subject")
    assert torch.equal(run(sd), base) and is_peft_free(sd.unet) and is_peft_free(sd.text_encoder)
    sd.load_lora(files["sd"], name="subject")
    torch.testing.assert_close(run(sd), subject, atol=1e-6, rtol=1e-6)  # the same whichever came first


def test_set_lora_scale_changes_output_and_back(sd, files):
    sd.load_lora(files["sd"], name="s")
    one = run(sd)
    sd.set_lora_scale("s", 0.3)
    assert sd.loras["s"] == 0.3
    third = run(sd)
    assert (third - one).abs().mean() > 1e-2
    sd.set_lora_scale({"s": 1.0})
    assert torch.equal(run(sd), one)
    sd.fuse_lora()  # rescaling while fused: unfuse, rescale, fuse again
    sd.set_lora_scale("s", 0.3)
    assert lora_mod.is_fused(sd)
    torch.testing.assert_close(run(sd), third, atol=1e-4, rtol=1e-4)


def test_loras_view_is_read_only(sd, files):
    sd.load_lora(files["sd"], name="s", scale=0.5)
    view = sd.loras
    with pytest.raises(TypeError):
        view["s"] = 1.0
    assert sd.loras["s"] == 0.5


def test_caches_follow_the_text_encoder_and_unet(sd, files):
    """The prompt cache is dropped when a text encoder changed (else the cached embedding would skip the LoRA);
    the inversion cache whenever the UNet changed."""
    emb = sd.encode_prompts(["a photo of a cat"])
    sd.inversion_cache.put("stale", 1)
    sd.load_lora(files["sd_unet"], name="unet-only")
    assert "stale" not in sd.inversion_cache
    assert torch.equal(sd.encode_prompts(["a photo of a cat"]), emb)  # no text encoder layers: same embedding
    sd.load_lora(files["sd"], name="with-te")
    assert (sd.encode_prompts(["a photo of a cat"]) - emb).abs().mean() > 1e-2
    sd.set_lora_scale("with-te", 0.0)
    assert torch.equal(sd.encode_prompts(["a photo of a cat"]), emb)
    sd.unload_lora()
    assert torch.equal(sd.encode_prompts(["a photo of a cat"]), emb)


def test_lora_params_need_no_grad(sd, files):
    sd.load_lora(files["sd"])
    sd.set_lora_scale(files["sd"].stem, 0.5)  # peft's set_adapter makes active adapters trainable again
    for m in (sd.unet, sd.text_encoder):
        assert not any(p.requires_grad for p in m.parameters())


# ------------------------------------------------------------------------------------------- with the rest
def test_processors_and_ip_adapter_survive(sd, files):
    """peft wraps to_q/to_k/to_v/to_out.0; the dreamfuse processors (with their IP layers) stay installed and see
    the wrapped projections."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    ref = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    sd.load_ip_adapter(build_tiny_ip_adapter(sd))
    try:
        ip_only = run(sd, ip_image=ref, ip_scale=0.7)
        sd.load_lora(files["sd"])
        attn = sd.unet.get_submodule(next(iter(sd.processors)))
        assert isinstance(attn.to_q, BaseTunerLayer) and isinstance(attn.to_out[0], BaseTunerLayer)
        procs = sd.unet.attn_processors
        assert all(procs[f"{n}.processor"] is p for n, p in sd.processors.items())
        assert all(isinstance(p, DreamfuseAttnProcessor) for p in procs.values())
        assert sum(p.ip_layer is not None for p in procs.values()) > 0
        both = run(sd, ip_image=ref, ip_scale=0.7)
        lora_only = run(sd)
        assert (both - ip_only).abs().mean() > 1e-2 and (both - lora_only).abs().mean() > 1e-2
        sd.unload_lora()
        assert torch.equal(run(sd, ip_image=ref, ip_scale=0.7), ip_only)
    finally:
        sd.unload_ip_adapter()


def test_personalize_and_compose_run_with_a_lora(sd, files):
    """A DreamBooth-LoRA on the base model is the intended use of both pipelines."""
    reference = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))
    layout = np.zeros((64, 64, 3), np.uint8)
    layout[:, :32] = (255, 0, 0)
    layout[:, 32:] = (0, 0, 255)

    def both():
        p = sd.personalize("a photo of a sks dog", reference, subject_token="sks", steps=3, seed=0, height=128,
                           width=128, output_type="latent", ama_start=1, lambda_g=50.0)  # guidance: a UNet backward
        c = sd.compose(layout, {"#ff0000": "a sks dog", "#0000ff": "a cat"}, prompt="a sks dog and a cat",
                       steps=STEPS, seed=3, output_type="latent")
        return p, c

    plain = both()
    sd.load_lora(files["sd"])
    with_lora = both()
    assert all(p.grad is None for p in sd.unet.parameters())  # the guidance backward leaves the LoRA alone
    for a, b in zip(with_lora, plain):
        assert torch.isfinite(a).all() and (a - b).abs().mean() > 1e-2


# ------------------------------------------------------------------------------------------- errors
def _write(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def bad_files(tmp, files, sd_engine):
    from safetensors.torch import load_file

    good = load_file(str(files["sd"]))
    k = next(iter(good))
    misfit = dict(good)
    misfit[k] = torch.zeros(misfit[k].shape[0], misfit[k].shape[1] + 1)
    (tmp / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (tmp / "weights.bin").write_bytes(b"x")
    (tmp / "folder.safetensors").mkdir(exist_ok=True)
    data = files["sd"].read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    return {
        "missing": (tmp / "nope.safetensors", "does not exist"),
        "folder": (tmp / "folder.safetensors", "not a file"),
        "pickle": (tmp / "weights.bin", "safetensors"),
        "garbage": (tmp / "garbage.safetensors", "not a safetensors file"),
        "truncated": (tmp / "truncated.safetensors", "truncated"),
        "empty": (_write(tmp / "empty.safetensors", {}), "no tensors"),
        "unet weights": (_write(tmp / "unet.safetensors", {k: v for k, v in list(sd_engine.unet.state_dict().items())
                                                           [:4]}), "not a LoRA file"),
        "sdxl on sd": (files["xl"], "none of its layers fits"),
        "shape": (_write(tmp / "misfit.safetensors", misfit), "do not fit"),
        "extra layer": (_write(tmp / "extra.safetensors", {**good, "unet.nope.to_q.lora_A.weight": torch.zeros(4, 8),
                                                           "unet.nope.to_q.lora_B.weight": torch.zeros(8, 4)}),
                        "no such layer"),
    }


def test_bad_files_are_value_errors_naming_lora(sd, files, tmp_path):
    for case, (path, needle) in bad_files(tmp_path, files, sd).items():
        with pytest.raises(ValueError, match=r"^lora: ") as exc:
            sd.load_lora(path)
        assert needle in str(exc.value), (case, str(exc.value))
        assert "\n" not in str(exc.value)
    assert dict(sd.loras) == {} and is_peft_free(sd.unet) and is_peft_free(sd.text_encoder)  # nothing changed
    with pytest.raises(ValueError, match="^lora: expected the path"):
        sd.load_lora(123)


def test_bad_names_and_scales(sd, files):
    with pytest.raises(ValueError, match="^lora: no LoRA is loaded"):
        sd.fuse_lora()
    sd.unfuse_lora()  # no-op
    sd.load_lora(files["sd"], name="s")
    with pytest.raises(ValueError, match="^name: a LoRA named 's' is already loaded"):
        sd.load_lora(files["sd_unet"], name="s")
    with pytest.raises(ValueError, match="^name: must be a non-empty string"):
        sd.load_lora(files["sd_unet"], name="")
    for call in (lambda: sd.unload_lora("nope"), lambda: sd.set_lora_scale("nope", 1.0),
                 lambda: sd.set_lora_scale({"s": 1.0, "nope": 1.0})):
        with pytest.raises(ValueError, match=r"^name: no LoRA named 'nope' is loaded \(loaded: 's'\)"):
            call()
    for bad in (-0.5, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match="^scale"):
            sd.load_lora(files["sd_unet"], scale=bad, name="t")
        with pytest.raises(ValueError, match="^scale"):
            sd.set_lora_scale("s", bad)
    with pytest.raises(ValueError, match="^scale: required"):
        sd.set_lora_scale("s")
    with pytest.raises(ValueError, match="^scale: give the scales in the dict"):
        sd.set_lora_scale({"s": 1.0}, 0.5)
    assert dict(sd.loras) == {"s": 1.0}


def test_build_tiny_lora_checks(sd_engine, tmp_path):
    with pytest.raises(ValueError, match="^format"):
        build_tiny_lora(sd_engine, tmp_path / "x.safetensors", format="lycoris")
    with pytest.raises(ValueError, match="^rank"):
        build_tiny_lora(sd_engine, tmp_path / "x.safetensors", rank=3)
    a = build_tiny_lora(sd_engine, tmp_path / "a.safetensors", seed=5)
    b = build_tiny_lora(sd_engine, tmp_path / "b.safetensors", seed=5)
    assert a.read_bytes() == b.read_bytes()


# ------------------------------------------------------------------------------------------- CLI
def test_lora_spec_parsing(tmp_path):
    assert lora_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert lora_spec("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert lora_spec("dir:x/a.safetensors") == ("dir:x/a.safetensors", 1.0)  # ':' then a non-number: a path
    assert lora_spec("a:b:1e-1") == ("a:b", 0.1)
    odd = tmp_path / "odd:2"
    odd.write_bytes(b"")
    assert lora_spec(str(odd)) == (str(odd), 1.0)  # an existing file is read whole
    import argparse

    for bad in ("a.safetensors:-1", "a.safetensors:nan", "a.safetensors:inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="--lora scale must be a finite number >= 0"):
            lora_spec(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="no file"):
        lora_spec(":0.5")


def test_cli_generate_with_lora(tmp_path, files, sd_engine, capsys):
    common = ["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "2", "--seed", "3", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--lora", f"{files['sd']}:0.8", "--lora", str(files["sd_unet"]),
                 "--out", str(tmp_path / "lora.png")]) == 0
    assert main([*common, "--lora", f"{files['sd']}:0.8", "--lora", str(files["sd"]),  # one stem twice: numbered
                 "--out", str(tmp_path / "twice.png")]) == 0
    plain, lora = (np.asarray(Image.open(tmp_path / f"{n}.png"), np.float32) for n in ("plain", "lora"))
    assert np.abs(plain - lora).mean() > 1.0
    capsys.readouterr()


def test_cli_lora_loading_is_quiet_when_not_a_terminal(tmp_path, files):
    """No library notices (peft's second-adapter warning, transformers' load report, diffusers' 'no text encoder
    keys') when stderr is not a terminal: only the 'wrote' line."""
    r = subprocess.run([sys.executable, "-m", "dreamfuse.engine.cli", "generate", "--prompt", "a cat", "--steps", "1",
                        "--seed", "0", "--lora", str(files["sd_unet"]), "--lora", f"{files['sd']}:0.5", "--lora",
                        str(files["sd_b"]), "--out", str(tmp_path / "x.png")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout.startswith("wrote ")


@pytest.mark.parametrize("command", ["generate", "personalize", "compose"])
def test_cli_missing_lora_is_one_line_exit_2(command, tmp_path, capsys):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(ref)
    segments = tmp_path / "segments.json"
    segments.write_text('{"#c81e1e": "a cat"}')
    extra = {"generate": ["--prompt", "a cat"],
             "personalize": ["--prompt", "a sks dog", "--reference", str(ref), "--subject-token", "sks"],
             "compose": ["--prompt", "a cat", "--layout", str(ref), "--segments", str(segments)]}[command]
    code = main([command, *extra, "--lora", str(tmp_path / "missing.safetensors:0.5"), "--no-progress",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--lora" in err and "missing.safetensors" in err and "does not exist" in err


def test_cli_help_lists_lora(capsys):
    for command in ("generate", "personalize", "compose"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--lora FILE[:SCALE]" in capsys.readouterr().out
