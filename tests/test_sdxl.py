"""SDXL in the engine, on the embedded ``tiny-xl`` model: conditioning, text2img against diffusers, loading."""

import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.engine import sdxl_time_ids
from dreamfuse.engine.tiny import build_xl_components, save_tiny

STEPS = 3


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny-xl", EngineConfig(device="cpu", backend="torch", progress=False))


def test_time_ids_are_sdxl_order():
    ids = sdxl_time_ids((480, 640), (16, 32), (512, 768))
    assert ids.tolist() == [480, 640, 16, 32, 512, 768]
    with pytest.raises(ValueError, match="crop_top_left"):
        sdxl_time_ids((480, 640), (16,), (512, 512))


def test_prompt_encoding_matches_diffusers(engine):
    """Both encoders' penultimate hidden states concatenated, pooled = encoder 2's projection; an absent negative
    prompt (None) is the zero embedding, an explicit "" is encoded as text (diffusers' rule)."""
    from diffusers import StableDiffusionXLPipeline

    c = build_xl_components()
    c.pop("force_zeros_for_empty_prompt")
    pipe = StableDiffusionXLPipeline(**c, force_zeros_for_empty_prompt=True)
    emb, neg, pooled, neg_pooled = pipe.encode_prompt("a photo of a cat", device="cpu",
                                                      do_classifier_free_guidance=True)
    torch.testing.assert_close(engine.encode_prompts(["a photo of a cat"]), emb)
    torch.testing.assert_close(engine.encode_pooled(["a photo of a cat"]), pooled)
    assert not engine.encode_prompts([None]).any() and not engine.encode_pooled([None]).any()
    assert not neg.any() and not neg_pooled.any()  # diffusers' unconditional embedding, the same zeros
    _, neg_empty, _, neg_pooled_empty = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=True,
                                                           negative_prompt="")
    assert neg_empty.abs().max() > 0.1
    torch.testing.assert_close(engine.encode_prompts([""]), neg_empty)
    torch.testing.assert_close(engine.encode_pooled([""]), neg_pooled_empty)


def test_text2img_equals_diffusers_sdxl_pipeline(engine):
    """The same latents through diffusers' StableDiffusionXLPipeline (DDIM, stock attention, its own time ids)
    and through the engine (dreamfuse processors, the engine's time ids) give the same images."""
    from diffusers import StableDiffusionXLPipeline

    c = build_xl_components()
    c.pop("force_zeros_for_empty_prompt")
    c["scheduler"] = engine.new_scheduler(STEPS)
    pipe = StableDiffusionXLPipeline(**c, force_zeros_for_empty_prompt=True)
    prompts = ["a photo of a cat", "a dog on the beach"]
    latents = engine.initial_latents([3, 4], 64, 96)
    ref = pipe(prompts, height=64, width=96, num_inference_steps=STEPS, guidance_scale=6.0, latents=latents.clone(),
               output_type="latent").images
    ours = engine.text2img(prompts, steps=STEPS, guidance_scale=6.0, seed=[3, 4], height=64, width=96,
                           output_type="latent")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt, negative", [("a photo of a cat", ""), ("", None), ("", "blurry")])
def test_empty_prompts_equal_diffusers_sdxl_pipeline(engine, prompt, negative):
    """diffusers zeroes only an absent negative prompt: an explicit negative "" and a positive "" are encoded."""
    from diffusers import StableDiffusionXLPipeline

    c = build_xl_components()
    c.pop("force_zeros_for_empty_prompt")
    c["scheduler"] = engine.new_scheduler(STEPS)
    pipe = StableDiffusionXLPipeline(**c, force_zeros_for_empty_prompt=True)
    latents = engine.initial_latents([3], 64, 64)
    ref = pipe(prompt, negative_prompt=negative, height=64, width=64, num_inference_steps=STEPS, guidance_scale=6.0,
               latents=latents.clone(), output_type="latent").images
    ours = engine.text2img(prompt, negative_prompt=negative, steps=STEPS, guidance_scale=6.0, seed=3, height=64,
                           width=64, output_type="latent")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    absent = engine.text2img(prompt, steps=STEPS, guidance_scale=6.0, seed=3, height=64, width=64,
                             output_type="latent")
    if negative == "":
        assert (absent - ours).abs().max() > 1e-3  # absent and empty differ, as in diffusers


def test_time_ids_change_the_output(engine):
    """The added conditioning really reaches the UNet (a different original size gives a different eps)."""
    lat = engine.initial_latents([0], 64, 64)
    emb, pooled = engine.encode_prompts(["a cat"]), engine.encode_pooled(["a cat"])
    a = engine.unet_call(lat, 500, emb, pooled=pooled)
    b = engine.unet_call(lat, 500, emb, pooled=pooled, time_ids=engine.time_ids(64, 64))
    c = engine.unet_call(lat, 500, emb, pooled=pooled, time_ids=engine.time_ids(64, 64, original_size=(32, 48)))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4


def test_text2img_shapes_determinism_batch_invariance(engine):
    imgs = engine.text2img(["a cat", "a dog"], steps=STEPS, seed=5, height=64, width=96)
    assert [im.size for im in imgs] == [(96, 64)] * 2
    batch = engine.text2img(["a cat", "a dog"], steps=STEPS, seed=[5, 6], output_type="latent")
    alone = engine.text2img("a dog", steps=STEPS, seed=6, output_type="latent")
    torch.testing.assert_close(batch[1:], alone, atol=1e-4, rtol=1e-4)
    assert torch.equal(batch, engine.text2img(["a cat", "a dog"], steps=STEPS, seed=[5, 6], output_type="latent"))


def test_triton_backend_matches_torch(engine):
    tri = Engine.from_pretrained("tiny-xl", EngineConfig(device="cpu", backend="triton", progress=False))
    a = engine.text2img("a red car", steps=2, seed=1, output_type="latent")
    b = tri.text2img("a red car", steps=2, seed=1, output_type="latent")
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_unet_call_conditioning_errors(engine):
    lat = engine.initial_latents([0, 1], 64, 64)
    emb = engine.encode_prompts(["a", "b"])
    with pytest.raises(ValueError, match="pooled"):
        engine.unet_call(lat, 10, emb)
    with pytest.raises(ValueError, match="pooled"):
        engine.unet_call(lat, 10, emb, pooled=engine.encode_pooled(["a"]))
    with pytest.raises(ValueError, match="time_ids"):
        engine.unet_call(lat, 10, emb, pooled=engine.encode_pooled(["a", "b"]), time_ids=torch.zeros(2, 5))
    sd = Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))
    with pytest.raises(ValueError, match="SDXL"):
        sd.unet_call(sd.initial_latents([0], 64, 64), 10, sd.encode_prompts(["a"]), time_ids=torch.zeros(6))
    assert sd.encode_pooled(["a"]) is None


def test_bucket_padding_carries_added_conditioning(engine, monkeypatch):
    """With compile's batch buckets the pooled embeddings and time ids are padded with the rows."""
    seen = {}

    def fake_unet(latents, t, encoder_hidden_states, added_cond_kwargs, return_dict):
        seen.update(rows=latents.shape[0], **{k: v.shape[0] for k, v in added_cond_kwargs.items()})
        return (latents,)

    monkeypatch.setattr(engine.config, "compile", True)
    monkeypatch.setattr(engine, "_unet_fn", fake_unet)
    lat = engine.initial_latents([0, 1, 2], 64, 64)
    out = engine.unet_call(lat, 10, engine.encode_prompts(["a"] * 3), pooled=engine.encode_pooled(["a"] * 3))
    assert out.shape[0] == 3 and seen == {"rows": 4, "text_embeds": 4, "time_ids": 4}


def test_diffusers_folder_loads_the_same_model(engine, tmp_path):
    save_tiny(tmp_path / "xl", name="tiny-xl")
    folder = Engine.from_pretrained(str(tmp_path / "xl"), EngineConfig(device="cpu", backend="torch", progress=False))
    assert folder.is_xl and folder.force_zeros_for_empty_prompt
    a = engine.text2img("a cat", steps=2, seed=0, output_type="latent")
    b = folder.text2img("a cat", steps=2, seed=0, output_type="latent")
    torch.testing.assert_close(a, b)


def test_fp16_sdxl_vae_is_upcast():
    e = Engine.from_pretrained("tiny-xl", EngineConfig(device="cpu", dtype="fp16", backend="torch", progress=False))
    assert e.vae.dtype == torch.float32 and e.unet.dtype == torch.float16
    img = e.decode(torch.zeros(1, 4, 8, 8, dtype=torch.float16))
    assert img.dtype == torch.float32 and torch.isfinite(img).all()
    assert e.encode_image(img).dtype == torch.float16


# ------------------------------------------------------------------------------------- the other pipelines
SIZE = 128  # latent 16x16: AMA at 8x8 (up_blocks.1), foreground at 4x4 (down_blocks.2, up_blocks.0)


@pytest.fixture(scope="module")
def reference():
    return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_personalize_on_sdxl(engine, reference):
    """DreamMatcher on the SDXL layout (its default blocks): AMA off == text2img; AMA changes the target rows
    and never the reference rows."""
    kw = dict(steps=4, seed=0, height=SIZE, width=SIZE, output_type="latent", ama_start=1)
    logs = {True: [], False: []}
    out = {a: engine.personalize("a photo of a sks dog", reference, subject_token="sks", ama=a,
                                 callback=logs[a].append, **kw) for a in (True, False)}
    plain = engine.text2img("a photo of a sks dog", steps=4, seed=0, height=SIZE, width=SIZE, guidance_scale=10.0,
                            output_type="latent")
    torch.testing.assert_close(out[False], plain, atol=1e-4, rtol=1e-4)
    rows = logs[True][0]["rows"]
    refs = [0, rows.n + 1]
    assert all(torch.equal(on["eps"][refs], off["eps"][refs]) for on, off in zip(logs[True], logs[False]))
    assert (out[True] - out[False]).abs().mean() > 1e-3


def test_compose_one_segment_equals_text2img_on_sdxl(engine):
    import numpy as np

    layout = np.zeros((64, 64, 3), np.uint8)
    layout[..., 0] = 255
    ref = engine.text2img("a photo of a cat", steps=STEPS, seed=3, output_type="latent")
    out = engine.compose(layout, {"#ff0000": "a photo of a cat"}, prompt="a photo of a cat", steps=STEPS, seed=3,
                         output_type="latent", global_steps=0, scaffold_fraction=0.34)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_relation_tokens_are_refused_on_sdxl(engine):
    with pytest.raises(ValueError, match="SDXL"):
        engine.load_relation({"<R>": torch.zeros(engine.text_encoder.config.hidden_size)})


@pytest.mark.parametrize("plus", [False, True], ids=["base", "plus"])
def test_ip_adapter_on_sdxl_equals_diffusers(engine, tmp_path, plus):
    """A tiny SDXL IP-Adapter(-Plus) written as a standard file: the engine (decoupled attention in our
    processors, our CLIP preprocessing and zero-image uncond tokens) and diffusers' SDXL pipeline with the same
    file loaded by its own loader give the same images. Scale 0 is text2img."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from dreamfuse.engine.ip_adapter import save_tiny_ip_adapter
    from PIL import Image
    from transformers import CLIPImageProcessor

    weights, encoder = save_tiny_ip_adapter(engine, tmp_path, plus=plus)
    engine.load_ip_adapter(weights, encoder)
    try:
        assert engine.ip_adapter.cross_attention_dim == engine.unet.config.cross_attention_dim == 96
        img = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
        prompts = ["a photo of a cat", "a dog"]
        ours = engine.text2img(prompts, steps=2, seed=[3, 4], ip_image=img, ip_scale=0.7, output_type="latent")
        zero = engine.text2img(prompts, steps=2, seed=[3, 4], ip_image=img, ip_scale=0.0, output_type="latent")
    finally:
        engine.unload_ip_adapter()
    torch.testing.assert_close(zero, engine.text2img(prompts, steps=2, seed=[3, 4], output_type="latent"))
    assert (ours - zero).abs().mean() > 1e-2

    c = build_xl_components()
    c.pop("force_zeros_for_empty_prompt")
    c["scheduler"] = engine.new_scheduler(2)
    fe = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StableDiffusionXLPipeline(**c, feature_extractor=fe, force_zeros_for_empty_prompt=True)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=weights.name, image_encoder_folder=str(encoder))
    pipe.set_ip_adapter_scale(0.7)
    ref = pipe(prompts, ip_adapter_image=img, num_inference_steps=2, guidance_scale=7.5,
               latents=engine.initial_latents([3, 4], 64, 64), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_single_file_sdxl_checkpoint_loads_the_same_weights(tmp_path):
    """An original-format SDXL .safetensors (SGM keys, OpenCLIP second encoder), configs from a diffusers SDXL
    folder: every component comes back bit-identical and the engine is SDXL."""
    from ldm_format import xl_pipeline_to_ldm
    from safetensors.torch import save_file

    comps = build_xl_components(seed=3)
    save_tiny(tmp_path / "configs", name="tiny-xl")
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    save_file(xl_pipeline_to_ldm(*(comps[n] for n in names)), tmp_path / "xl.safetensors")
    eng = Engine.from_pretrained(str(tmp_path / "xl.safetensors"), EngineConfig(device="cpu", progress=False),
                                 config_dir=tmp_path / "configs")
    assert eng.is_xl
    for name in names:
        want, got = comps[name].state_dict(), getattr(eng, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name


@pytest.mark.parametrize("name, unet_params", [("random-sd15", 859_520_964), ("random-sdxl", 2_567_463_684)])
def test_synthetic_models_have_the_published_architectures(name, unet_params):
    """The benchmark models are the real SD 1.5 / SDXL architectures (built on the meta device: no memory)."""
    from dreamfuse.engine import synthetic

    comps = synthetic.build(name, device="meta")
    assert sum(p.numel() for p in comps["unet"].parameters()) == unet_params
    assert sum(p.numel() for p in comps["vae"].parameters()) == 83_653_863
    if name == "random-sdxl":
        assert comps["unet"].config.cross_attention_dim == (comps["text_encoder"].config.hidden_size
                                                            + comps["text_encoder_2"].config.hidden_size)


def test_cli_tells_an_absent_negative_prompt_from_an_empty_one(engine, tmp_path):
    import numpy as np
    from dreamfuse.engine.cli import main
    from PIL import Image

    base = ["generate", "--model", "tiny-xl", "--prompt", "a cat", "--steps", "2", "--seed", "3", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "absent.png")]) == 0
    assert main([*base, "--negative-prompt", "", "--out", str(tmp_path / "empty.png")]) == 0
    absent, empty = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("absent", "empty"))
    (ref,) = engine.text2img("a cat", negative_prompt="", steps=2, seed=3)
    assert np.abs(empty - np.asarray(ref).astype(int)).max() <= 1  # a fresh CLI engine vs this one: rounding
    assert np.abs(absent - empty).max() > 8
