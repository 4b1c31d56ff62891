"""img2img and inpainting against diffusers' own pipelines (StableDiffusionImg2ImgPipeline,
StableDiffusionInpaintPipeline and their SDXL versions) on the engine's own modules (stock attention swapped in)
with the same generators: one per image, as the text2img parity tests.

diffusers' inpainting pipelines encode an input image once per *input* image with the first generator, so for
several images of one input they are given the input once per image (a batch of identical images): that is each
image's own generator drawing its own VAE sample, what dreamfuse does (an image never depends on its batch).
"""

import numpy as np
import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.samplers import SAMPLERS, Sampler, noise_seed
from dreamfuse.engine.tiny import build_components, build_xl_components
from edit_inputs import box_mask, nine_channel, picture
from PIL import Image

SIZE = 64
STEPS = 4
PROMPTS = ["a photo of a cat", "a red car on a street"]
SEEDS = [11, 12]


def _config():
    return EngineConfig(device="cpu", backend="torch", progress=False)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", _config())


@pytest.fixture(scope="module")
def xl():
    return Engine.from_pretrained("tiny-xl", _config())


@pytest.fixture(scope="module")
def engine9():
    return Engine(nine_channel(build_components()), _config())


@pytest.fixture(scope="module")
def xl9():
    return Engine(nine_channel(build_xl_components()), _config())


def _sd_pipe(cls, engine, scheduler):
    pipe = cls(vae=engine.vae, text_encoder=engine.text_encoder, tokenizer=engine.tokenizer, unet=engine.unet,
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _xl_pipe(cls, engine, scheduler):
    pipe = cls(vae=engine.vae, text_encoder=engine.text_encoder, text_encoder_2=engine.text_encoder_2,
               tokenizer=engine.tokenizer, tokenizer_2=engine.tokenizer_2, unet=engine.unet, scheduler=scheduler,
               force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scheduler(engine, name: str, steps: int = STEPS, seeds=SEEDS):
    sched = Sampler(name, engine.scheduler.config, steps, "cpu").scheduler
    if SAMPLERS[name].scheduler == "DPMSolverSDEScheduler":
        sched.noise_sampler_seed = [noise_seed(s) for s in seeds]  # the trees dreamfuse seeds per row
    return sched


def _gens(seeds=SEEDS):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _diffusers(pipe, engine, **kw):
    with engine.stock_attention():
        return pipe(output_type="latent", generator=_gens(kw.pop("seeds", SEEDS)), **kw).images


SAMPLER_NAMES = list(SAMPLERS)


# --------------------------------------------------------------------------------------------- img2img
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_img2img_equals_diffusers_for_every_sampler(engine, name):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = _sd_pipe(StableDiffusionImg2ImgPipeline, engine, _scheduler(engine, name))
    img = picture(0)
    want = _diffusers(pipe, engine, prompt=PROMPTS, image=img, strength=0.6, num_inference_steps=STEPS,
                      guidance_scale=5.0)
    got = engine.img2img(PROMPTS, img, strength=0.6, steps=STEPS, guidance_scale=5.0, seed=SEEDS, sampler=name,
                         output_type="latent")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [
    {"strength": 1.0, "guidance_scale": 7.5},
    {"strength": 0.3, "guidance_scale": 1.0},  # no CFG; int(4 * 0.3) = 1 step
    {"strength": 0.75, "guidance_scale": 5.0, "negative_prompt": ["blurry", "a cartoon"]},
], ids=["full", "no-cfg", "negative"])
def test_img2img_equals_diffusers(engine, kwargs):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = _sd_pipe(StableDiffusionImg2ImgPipeline, engine, engine.new_scheduler(STEPS))
    img = picture(1)
    want = _diffusers(pipe, engine, prompt=PROMPTS, image=img, num_inference_steps=STEPS, **kwargs)
    got = engine.img2img(PROMPTS, img, steps=STEPS, seed=SEEDS, output_type="latent", **kwargs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_img2img_images_equal_diffusers(engine):
    """The decoded images too (the same VAE decode)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = _sd_pipe(StableDiffusionImg2ImgPipeline, engine, engine.new_scheduler(STEPS))
    img = picture(2)
    with engine.stock_attention():
        want = pipe(PROMPTS[0], image=img, strength=0.5, num_inference_steps=STEPS, generator=_gens([5]),
                    output_type="pt").images
    got = engine.img2img(PROMPTS[0], img, strength=0.5, steps=STEPS, seed=5, output_type="pt")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_sdxl_img2img_equals_diffusers(xl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    for name in ("ddim", "euler-a"):
        pipe = _xl_pipe(StableDiffusionXLImg2ImgPipeline, xl, _scheduler(xl, name))
        img = picture(3, 64, 96)
        want = _diffusers(pipe, xl, prompt=PROMPTS, image=img, strength=0.5, num_inference_steps=STEPS,
                          guidance_scale=6.0)
        got = xl.img2img(PROMPTS, img, strength=0.5, steps=STEPS, guidance_scale=6.0, seed=SEEDS, sampler=name,
                         output_type="latent")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_inpaint_regular_unet_equals_diffusers_for_every_sampler(engine, name):
    """A 4-channel UNet: the known region's noised latents blended in after every step."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = _sd_pipe(StableDiffusionInpaintPipeline, engine, _scheduler(engine, name))
    img, mask = picture(4), box_mask()
    want = _diffusers(pipe, engine, prompt=PROMPTS, image=[img, img], mask_image=mask, strength=0.75,
                      num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE)
    got = engine.inpaint(PROMPTS, img, mask, strength=0.75, steps=STEPS, guidance_scale=5.0, seed=SEEDS,
                         sampler=name, output_type="latent")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [
    {"strength": 1.0, "guidance_scale": 7.5},
    {"strength": 0.5, "guidance_scale": 1.0},
    {"strength": 1.0, "guidance_scale": 5.0, "negative_prompt": ["blurry", "a cartoon"]},
], ids=["full", "no-cfg", "negative"])
@pytest.mark.parametrize("channels", [4, 9])
def test_inpaint_equals_diffusers(engine, engine9, channels, kwargs):
    from diffusers import StableDiffusionInpaintPipeline

    e = engine if channels == 4 else engine9
    pipe = _sd_pipe(StableDiffusionInpaintPipeline, e, e.new_scheduler(STEPS))
    img, mask = picture(5), box_mask(box=(8, 40, 24, 64))
    want = _diffusers(pipe, e, prompt=PROMPTS, image=[img, img], mask_image=mask, num_inference_steps=STEPS,
                      height=SIZE, width=SIZE, **kwargs)
    got = e.inpaint(PROMPTS, img, mask, steps=STEPS, seed=SEEDS, output_type="latent", **kwargs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_inpaint_nine_channels_with_a_stochastic_sampler_equals_diffusers(engine9):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = _sd_pipe(StableDiffusionInpaintPipeline, engine9, _scheduler(engine9, "euler-a"))
    img, mask = picture(6), box_mask()
    want = _diffusers(pipe, engine9, prompt=PROMPTS, image=[img, img], mask_image=mask, strength=0.8,
                      num_inference_steps=STEPS, height=SIZE, width=SIZE)
    got = engine9.inpaint(PROMPTS, img, mask, strength=0.8, steps=STEPS, seed=SEEDS, sampler="euler-a",
                          output_type="latent")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels", [4, 9])
def test_sdxl_inpaint_equals_diffusers(xl, xl9, channels):
    from diffusers import StableDiffusionXLInpaintPipeline

    e = xl if channels == 4 else xl9
    for name, strength in (("ddim", 1.0), ("euler-a", 0.7)):
        pipe = _xl_pipe(StableDiffusionXLInpaintPipeline, e, _scheduler(e, name))
        img, mask = picture(7, 64, 96), box_mask(64, 96, box=(8, 56, 40, 88))
        want = _diffusers(pipe, e, prompt=PROMPTS, image=[img, img], mask_image=mask, strength=strength,
                          num_inference_steps=STEPS, guidance_scale=6.0, height=64, width=96)
        got = e.inpaint(PROMPTS, img, mask, strength=strength, steps=STEPS, guidance_scale=6.0, seed=SEEDS,
                        sampler=name, output_type="latent")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_mask_is_read_as_diffusers_reads_it(engine):
    """A soft RGB mask (grey levels either side of 0.5, coloured pixels read by their luma) gives diffusers'
    binarization."""
    from diffusers import StableDiffusionInpaintPipeline

    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[8:40, 8:40] = (200, 90, 120)  # luma 129.7 -> white
    rgb[40:56, 16:48] = (130, 125, 120)  # luma 125.9 -> black
    rgb[:, 56:] = 160
    mask = Image.fromarray(rgb)
    pipe = _sd_pipe(StableDiffusionInpaintPipeline, engine, engine.new_scheduler(STEPS))
    img = picture(8)
    want = _diffusers(pipe, engine, prompt=PROMPTS[:1], image=[img], mask_image=mask, num_inference_steps=STEPS,
                      height=SIZE, width=SIZE, seeds=SEEDS[:1])
    got = engine.inpaint(PROMPTS[0], img, mask, steps=STEPS, seed=SEEDS[0], output_type="latent")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the same mask as an array and as a float tensor
    for m in (rgb, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255):
        torch.testing.assert_close(engine.inpaint(PROMPTS[0], img, m, steps=STEPS, seed=SEEDS[0],
                                                  output_type="latent"), got)


@pytest.mark.slow
def test_random_sd15_img2img_and_inpaint_equal_diffusers():
    """The real SD 1.5 architecture (random weights) at 128x128: img2img and inpainting (regular UNet)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    e = Engine.from_pretrained("random-sd15", _config())
    img, mask = picture(9, 128, 128), box_mask(128, 128, box=(32, 96, 16, 80))
    kw = dict(num_inference_steps=3, guidance_scale=7.5)
    pipe = _sd_pipe(StableDiffusionImg2ImgPipeline, e, e.new_scheduler(3))
    want = _diffusers(pipe, e, prompt=PROMPTS[:1], image=img, strength=0.7, seeds=SEEDS[:1], **kw)
    got = e.img2img(PROMPTS[0], img, strength=0.7, steps=3, seed=SEEDS[0], output_type="latent")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    pipe = _sd_pipe(StableDiffusionInpaintPipeline, e, e.new_scheduler(3))
    want = _diffusers(pipe, e, prompt=PROMPTS[:1], image=[img], mask_image=mask, seeds=SEEDS[:1], height=128,
                      width=128, **kw)
    got = e.inpaint(PROMPTS[0], img, mask, steps=3, seed=SEEDS[0], output_type="latent")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
