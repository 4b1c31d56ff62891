"""Samplers: every name of SAMPLERS against diffusers' own pipeline with the same scheduler, batch invariance
(stochastic samplers included), one scheduler instance per call, and clear refusals."""

import threading

import numpy as np
import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.pipelines.composite import COMPOSE_SAMPLERS
from dreamfuse.engine.samplers import SAMPLERS, Sampler, check_sampler
from dreamfuse.engine.tiny import build_components

SIZE = 64
STEPS = 3
PROMPTS = ["a photo of a cat", "a red car on a street"]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    c = build_components()
    return StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.scheduler != "DPMSolverSDEScheduler"])
def test_sampler_equals_diffusers_pipeline_with_the_same_scheduler(engine, pipe, name):
    """diffusers' StableDiffusionPipeline with the same scheduler class and options, fed one generator per
    prompt (diffusers draws the latents and then the step noise from them, as dreamfuse does)."""
    spec = SAMPLERS[name]
    pipe.scheduler = Sampler(name, engine.scheduler.config, STEPS, "cpu").scheduler
    assert type(pipe.scheduler).__name__ == spec.scheduler
    gens = [torch.Generator("cpu").manual_seed(s) for s in (11, 12)]
    ref = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0, generator=gens,
               output_type="latent").images
    ours = engine.text2img(PROMPTS, steps=STEPS, guidance_scale=5.0, seed=[11, 12], height=SIZE, width=SIZE,
                           output_type="latent", sampler=name)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_dpm_sde_equals_diffusers_with_the_same_brownian_seeds(engine, pipe):
    """DPM-SDE draws its noise from Brownian trees, one per row seeded from the row's seed; diffusers' pipeline
    takes the tree seeds from the scheduler's ``noise_sampler_seed``."""
    from dreamfuse.engine.samplers import noise_seed

    for name in ("dpmpp-sde", "dpmpp-sde-karras"):
        sched = Sampler(name, engine.scheduler.config, STEPS, "cpu").scheduler
        sched.noise_sampler_seed = [noise_seed(11), noise_seed(12)]
        pipe.scheduler = sched
        gens = [torch.Generator("cpu").manual_seed(s) for s in (11, 12)]
        ref = pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0, generator=gens,
                   output_type="latent").images
        ours = engine.text2img(PROMPTS, steps=STEPS, guidance_scale=5.0, seed=[11, 12], height=SIZE, width=SIZE,
                               output_type="latent", sampler=name)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_batch_invariance_for_every_sampler(engine, name):
    """An image depends on its prompt and seed only: alone or second in a batch of three, the same latents."""
    kw = dict(steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE, output_type="latent", sampler=name)
    batch = engine.text2img(["a dog", PROMPTS[0], PROMPTS[1]], seed=[5, 11, 12], **kw)
    alone = engine.text2img([PROMPTS[0]], seed=[11], **kw)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=1e-4)  # batched text2img's rounding
    assert not torch.equal(batch[0], batch[1])


def test_stochastic_samplers_really_draw_noise(engine):
    """euler-a differs from euler with the same seeds (its ancestral noise is drawn), and is reproducible."""
    kw = dict(steps=STEPS, height=SIZE, width=SIZE, output_type="latent", seed=3)
    a1 = engine.text2img("a cat", sampler="euler-a", **kw)
    a2 = engine.text2img("a cat", sampler="euler-a", **kw)
    e = engine.text2img("a cat", sampler="euler", **kw)
    assert torch.equal(a1, a2)
    assert (a1 - e).abs().max() > 1e-3


def test_ddim_default_is_unchanged(engine):
    kw = dict(steps=STEPS, height=SIZE, width=SIZE, output_type="latent", seed=3)
    assert torch.equal(engine.text2img("a cat", **kw), engine.text2img("a cat", sampler="ddim", **kw))


def test_heun_evaluates_twice_per_step(engine):
    calls = []
    orig = engine.unet_call

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    engine.unet_call = counting
    try:
        engine.text2img("a cat", steps=STEPS, height=SIZE, width=SIZE, output_type="latent", seed=1, sampler="heun")
    finally:
        del engine.unet_call
    assert len(calls) == 2 * STEPS - 1


def test_each_call_has_its_own_scheduler(engine):
    """Two threads with different samplers and step counts at once equal the same calls one after another."""
    jobs = {"dpm": dict(sampler="dpmpp-2m", steps=4, seed=1), "euler-a": dict(sampler="euler-a", steps=3, seed=2),
            "unipc": dict(sampler="unipc", steps=2, seed=3)}
    kw = dict(height=SIZE, width=SIZE, output_type="latent")
    seq = {k: engine.text2img("a cat", **v, **kw) for k, v in jobs.items()}
    out, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def run(k, v):
        try:
            barrier.wait(timeout=30)
            out[k] = engine.text2img("a cat", **v, **kw)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for k in jobs:
        assert torch.equal(out[k], seq[k]), k


def test_bad_sampler_names_are_value_errors(engine):
    with pytest.raises(ValueError, match="sampler: unknown sampler 'dpm'"):
        engine.text2img("a cat", steps=2, height=SIZE, width=SIZE, sampler="dpm")
    with pytest.raises(ValueError, match="sampler: must be a sampler name"):
        engine.text2img("a cat", steps=2, height=SIZE, width=SIZE, sampler=None)
    assert check_sampler("DPMPP_2M") == "dpmpp-2m"


def test_ip_adapter_takes_a_sampler(engine):
    from dreamfuse.engine.tiny_adapters import build_tiny_ip_adapter

    engine.load_ip_adapter(build_tiny_ip_adapter(engine))
    try:
        kw = dict(steps=STEPS, height=SIZE, width=SIZE, output_type="latent", sampler="dpmpp-2m", ip_scale=0.8)
        img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
        batch = engine.text2img(["a dog", "a cat"], seed=[1, 2], ip_image=img, **kw)
        alone = engine.text2img(["a cat"], seed=[2], ip_image=img, **kw)
    finally:
        engine.unload_ip_adapter()
    torch.testing.assert_close(batch[1:], alone, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- compose
def _stripes(*colors):
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    for k, c in enumerate(colors):
        img[:, k * SIZE // len(colors):(k + 1) * SIZE // len(colors)] = c
    return img


@pytest.mark.parametrize("name", COMPOSE_SAMPLERS)
def test_compose_with_one_global_segment_equals_text2img_with_the_same_sampler(engine, name):
    kw = dict(steps=STEPS, seed=3, output_type="latent", sampler=name)
    ref = engine.text2img("a cat", height=SIZE, width=SIZE, **kw)
    out = engine.compose(_stripes((255, 0, 0)), {"#ff0000": "a cat"}, prompt="a cat", global_steps=1,
                         scaffold_fraction=0.34, **kw)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["euler-a", "lcm"])
def test_compose_requests_with_stochastic_samplers_equal_each_alone(engine, name):
    """Each request's rows (its segments, then its shared latent) draw noise from the request's own seed."""
    from dreamfuse.engine.pipelines.composite import ComposeRequest, compose_batch

    reqs = [ComposeRequest(_stripes((255, 0, 0), (0, 0, 255)), {"#ff0000": "a red car", "#0000ff": "a dog"}, "a cat"),
            ComposeRequest(_stripes((0, 255, 0)), {"#00ff00": "a tree", "background": "sky"}, "a forest")]
    kw = dict(steps=4, global_steps=1, scaffold_fraction=0.5, output_type="latent", sampler=name)
    both = compose_batch(engine, reqs, seed=[3, 8], **kw)
    for i, (r, s) in enumerate(zip(reqs, [3, 8])):  # rounding only (a shared noise stream would differ by ~1);
        # LCM's x0 parameterization amplifies the batched matmuls' rounding a little at 4 steps
        torch.testing.assert_close(both[i : i + 1], compose_batch(engine, [r], seed=s, **kw), atol=5e-4, rtol=1e-3)


def test_compose_guidance_under_a_sigma_sampler_stays_in_its_segment(engine):
    """Euler's samples live in σ space; the subject-aware guidance runs on the model's VP input and moves the
    subject's segment only."""

    class Seg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

        def forward(self, x):
            return self.conv(x).softmax(1)

    segs = {"#ff0000": {"prompt": "a red car", "subject": True}, "#0000ff": "a dog"}
    kw = dict(prompt="a cat", steps=STEPS, seed=3, output_type="latent", global_steps=0, scaffold_fraction=1.0,
              sampler="euler")
    base = engine.compose(_stripes((255, 0, 0), (0, 0, 255)), segs, **kw)
    guided = engine.compose(_stripes((255, 0, 0), (0, 0, 255)), segs, sal_model=Seg(), sal_scale=50.0,
                            sal_steps=(STEPS - 1, STEPS), **kw)
    assert torch.equal(guided[..., 4:], base[..., 4:])
    assert (guided[..., :4] - base[..., :4]).abs().max() > 1e-5


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc", "heun", "dpmpp-sde"])
def test_compose_refuses_samplers_with_per_row_history(engine, name):
    with pytest.raises(ValueError, match=rf"sampler: '{name}' is not available here; choose one of ddim, euler"):
        engine.compose(_stripes((255, 0, 0)), {"#ff0000": "a cat"}, prompt="a cat", steps=2, sampler=name)


def test_personalize_refuses_other_samplers(engine):
    ref = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="sampler: personalize samples with 'ddim' only"):
        engine.personalize("a photo of a sks dog", ref, subject_token="sks", steps=2, height=SIZE, width=SIZE,
                           sampler="dpmpp-2m")
    with pytest.raises(ValueError, match="sampler: unknown sampler"):
        engine.personalize("a photo of a sks dog", ref, subject_token="sks", steps=2, sampler="nope")


# --------------------------------------------------------------------------------------------- CLI
def test_cli_sampler_option(engine, tmp_path, capsys):
    from dreamfuse.engine.cli import main
    from PIL import Image

    out = tmp_path / "cat.png"
    assert main(["generate", "--prompt", "a cat", "--steps", "2", "--seed", "3", "--sampler", "euler-a", "--out",
                 str(out), "--no-progress"]) == 0
    img = Image.open(out)
    assert img.text["sampler"] == "euler-a"
    (ref,) = engine.text2img("a cat", steps=2, seed=3, sampler="euler-a")
    assert np.array_equal(np.asarray(img), np.asarray(ref))
    layout = tmp_path / "layout.png"
    Image.fromarray(_stripes((255, 0, 0))).save(layout)
    with pytest.raises(SystemExit) as e:
        main(["compose", "--layout", str(layout), "--segments", '{"#ff0000": "a cat"}', "--prompt", "a cat",
              "--sampler", "dpmpp-2m", "--out", str(tmp_path / "c.png")])
    assert e.value.code == 2
    assert "invalid choice: 'dpmpp-2m'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["personalize", "--help"])
    assert "--sampler" not in capsys.readouterr().out  # DDIM only there


def test_steps_past_the_models_schedule_are_refused_at_once(engine):
    """SD's scheduler config (1000 training timesteps, steps_offset 1) samples at most 999 steps: 1000 would index
    ᾱ[1000] deep inside the scheduler."""
    with pytest.raises(ValueError, match="steps: 1000, this model's scheduler samples at most 999 steps"):
        engine.text2img("a cat", steps=1000, height=SIZE, width=SIZE)
    ref = torch.rand(3, SIZE, SIZE)
    with pytest.raises(ValueError, match="steps: 1000"):
        engine.personalize("a sks dog", ref, subject_token="sks", steps=1000, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="steps: 1000"):
        engine.compose(_stripes((255, 0, 0)), {"#ff0000": "a cat"}, prompt="a cat", steps=1000)
