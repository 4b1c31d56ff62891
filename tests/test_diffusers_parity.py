"""dreamfuse against diffusers' own pipelines on the same modules (the bench's like-for-like setup), on ``tiny``.

``Engine.stock_attention()`` swaps diffusers' default attention processors into the engine's UNet so that a
``StableDiffusionPipeline`` built from the engine's modules runs stock diffusers without a second copy of the
weights; dreamfuse's processors come back afterwards. SD 1.x text2img is compared against that pipeline with
the same latents (tests/test_sdxl.py does the same for SDXL).
"""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.processors import CallContext, DreamfuseAttnProcessor
from dreamfuse.engine.tiny import build_components
from dreamfuse.engine.tiny_adapters import build_tiny_ip_adapter

STEPS = 3
SIZE = 64


def _config():
    return EngineConfig(device="cpu", backend="torch", progress=False)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", _config())


def _pipeline(components: dict, scheduler) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(unet=components["unet"], vae=components["vae"],
                                   text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _same_modules(engine) -> StableDiffusionPipeline:
    return _pipeline(vars(engine), engine.new_scheduler(STEPS))


def _dreamfuse_installed(engine) -> bool:
    procs = engine.unet.attn_processors
    return procs.keys() == {f"{n}.processor" for n in engine.processors} and all(
        procs[f"{n}.processor"] is p for n, p in engine.processors.items())


def _run(pipe, latents, **kwargs):
    return pipe(["a photo of a cat", "a dog on the beach"], height=SIZE, width=SIZE, num_inference_steps=STEPS,
                latents=latents.clone(), output_type="latent", **kwargs).images


def test_stock_attention_on_the_engines_modules_is_stock_diffusers(engine):
    """Bit for bit: diffusers on the engine's modules with the stock processors swapped in == a separately
    built stock pipeline of the same model."""
    latents = engine.initial_latents([3, 4], SIZE, SIZE)
    stock = _pipeline(build_components(), engine.new_scheduler(STEPS))
    assert all(type(p) is AttnProcessor2_0 for p in stock.unet.attn_processors.values())
    want = _run(stock, latents, guidance_scale=7.5)
    pipe = _same_modules(engine)
    assert pipe.unet is engine.unet and pipe.text_encoder is engine.text_encoder  # no copy
    with engine.stock_attention() as unet:
        assert unet is engine.unet
        assert all(type(p) is AttnProcessor2_0 for p in engine.unet.attn_processors.values())
        got = _run(pipe, latents, guidance_scale=7.5)
    assert torch.equal(got, want)
    assert _dreamfuse_installed(engine)


def test_stock_attention_restores_dreamfuse_processors_after_an_exception(engine):
    before = engine.text2img("a cat", steps=2, seed=0, output_type="latent")
    with pytest.raises(RuntimeError, match="inside the block"):
        with engine.stock_attention():
            assert not any(isinstance(p, DreamfuseAttnProcessor) for p in engine.unet.attn_processors.values())
            raise RuntimeError("inside the block")
    assert _dreamfuse_installed(engine)
    # the processors are in use again (a handler is called), and nothing else changed
    seen = []
    name = next(iter(engine.processors))
    ctx = CallContext(handlers={name: lambda layer, q, k, v: (seen.append(layer.name), layer.attend(q, k, v))[1]})
    lat = engine.initial_latents([0], SIZE, SIZE)
    engine.unet_call(lat, 500, engine.encode_prompts(["a cat"]), ctx=ctx)
    assert seen == [name]
    assert torch.equal(engine.text2img("a cat", steps=2, seed=0, output_type="latent"), before)


def test_stock_attention_refuses_a_loaded_ip_adapter():
    eng = Engine.from_pretrained("tiny", _config())
    eng.load_ip_adapter(build_tiny_ip_adapter(eng, plus=False))
    with pytest.raises(RuntimeError, match="IP-Adapter"):
        with eng.stock_attention():
            pass
    assert _dreamfuse_installed(eng)
    eng.unload_ip_adapter()
    with eng.stock_attention():
        pass
    assert _dreamfuse_installed(eng)


@pytest.mark.parametrize("kwargs", [
    {"guidance_scale": 7.5},
    {"guidance_scale": 1.0},  # no CFG: one UNet row per prompt on both sides
    {"guidance_scale": 5.0, "negative_prompt": ["blurry, low quality", "a cartoon"]},  # one per prompt
], ids=["cfg", "no-cfg", "negative-prompt"])
def test_text2img_equals_diffusers_sd_pipeline(engine, kwargs):
    """SD 1.x: the same latents through diffusers' StableDiffusionPipeline (DDIM, stock attention) on the engine's
    modules and through the engine (dreamfuse processors) give the same latents."""
    latents = engine.initial_latents([3, 4], SIZE, SIZE)
    pipe = _same_modules(engine)
    with engine.stock_attention():
        want = _run(pipe, latents, **kwargs)
    got = engine.text2img(["a photo of a cat", "a dog on the beach"], steps=STEPS, seed=[3, 4], height=SIZE,
                          width=SIZE, output_type="latent", **kwargs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_negative_prompt_and_cfg_change_the_result(engine):
    """The parity above is not vacuous: CFG and the negative prompt reach the UNet."""
    run = lambda **kw: engine.text2img("a photo of a cat", steps=STEPS, seed=3, height=SIZE, width=SIZE,
                                       output_type="latent", **kw)
    plain, no_cfg, neg = run(guidance_scale=5.0), run(guidance_scale=1.0), run(guidance_scale=5.0,
                                                                               negative_prompt="blurry")
    assert (plain - no_cfg).abs().max() > 1e-3 and (plain - neg).abs().max() > 1e-3


def test_single_file_loading_asks_diffusers_for_in_place_weights(monkeypatch):
    """Single-file checkpoints load in place (diffusers' low_cpu_mem_usage, with accelerate); without accelerate
    diffusers copies into randomly initialized models (about 2x the peak memory) and the loader says so."""
    import diffusers.utils
    from dreamfuse.engine import loading

    monkeypatch.setattr(diffusers.utils, "is_accelerate_available", lambda: True)
    assert loading._single_file_memory_kwargs() == {"low_cpu_mem_usage": True}
    monkeypatch.setattr(diffusers.utils, "is_accelerate_available", lambda: False)
    with pytest.warns(UserWarning, match="accelerate"):
        assert loading._single_file_memory_kwargs() == {}
