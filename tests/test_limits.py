"""Limits: what one call may ask for is checked before allocation, names the field and the limit, and is
configurable per engine; validation of numbers, seeds and text applies to the Python API as well as the CLI."""

import dataclasses
import time

import numpy as np
import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig, Limits
from dreamfuse.engine.layout import parse_layout


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))


@pytest.mark.parametrize("kwargs, needle", [
    ({"height": 100000}, "limits.max_side"),
    ({"height": 4096, "width": 4096}, "limits.max_pixels"),
    ({"steps": 1001}, "limits.max_steps"),
    ({"prompts": ["a cat"] * 65}, "limits.max_images"),
    ({"prompts": "x" * 10_001}, "limits.max_prompt_chars"),
    ({"guidance_scale": float("inf")}, "guidance_scale"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": [0, 2**64]}, r"seed\[1\]"),
    ({"prompts": "a \udcff"}, "UTF-8"),
    ({"ip_scale": float("nan")}, "ip_scale"),
])
def test_text2img_refuses_before_any_work(engine, kwargs, needle):
    kwargs = {"prompts": "a cat", **kwargs}
    if isinstance(kwargs["seed"] if "seed" in kwargs else None, list):
        kwargs["prompts"] = ["a", "b"]
    start = time.perf_counter()
    with pytest.raises(ValueError, match=needle):
        engine.text2img(kwargs.pop("prompts"), **kwargs)
    assert time.perf_counter() - start < 5.0


def test_limits_are_configurable(engine):
    small = Engine({"unet": engine.unet, "vae": engine.vae, "text_encoder": engine.text_encoder,
                    "tokenizer": engine.tokenizer, "scheduler": engine.scheduler},
                   EngineConfig(device="cpu", backend="torch", progress=False,
                                limits=dataclasses.replace(Limits(), max_steps=2, max_images=1)))
    try:
        assert small.text2img("a cat", steps=2, output_type="latent", seed=0).shape[0] == 1
        with pytest.raises(ValueError, match="limits.max_steps"):
            small.text2img("a cat", steps=3)
        with pytest.raises(ValueError, match="limits.max_images"):
            small.text2img(["a", "b"], steps=1)
    finally:
        from dreamfuse.engine.processors import install_processors

        engine.processors = install_processors(engine.unet, "torch")  # the engines share the UNet
    with pytest.raises(ValueError, match="limits.max_steps"):
        EngineConfig(limits=dataclasses.replace(Limits(), max_steps=0)).resolved()


def test_layout_limits_come_before_the_work():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 255
    many = {f"#{i:06x}": "x" for i in range(10_000)}
    start = time.perf_counter()
    with pytest.raises(ValueError, match="limits.max_segments"):
        parse_layout(img, many)
    with pytest.raises(ValueError, match="blur"):
        parse_layout(img, {"#000000": "a"}, blur=1000.0)
    with pytest.raises(ValueError, match="guidance"):
        parse_layout(img, {"#000000": {"prompt": "a", "guidance": float("nan")}})
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ValueError, match="#00ff00 is listed but does not appear"):
        parse_layout(img, {"#000000": "a", "#ffffff": "b", "#00ff00": "missing"})


def test_personalize_and_compose_validate_numbers(engine):
    ref = torch.rand(3, 64, 64)
    for kwargs, needle in (({"lambda_c": float("nan")}, "lambda_c"), ({"lambda_g": float("inf")}, "lambda_g"),
                           ({"lambda_c": 0.0}, "lambda_c")):
        with pytest.raises(ValueError, match=needle):
            engine.personalize("a sks dog", ref, subject_token="sks", steps=2, **kwargs)
    with pytest.raises(ValueError, match="subject_token"):
        engine.personalize("a sks dog", ref, steps=2)  # AMA needs the subject's cross-attention
    out = engine.personalize("a dog", ref, ama=False, steps=1, seed=0, output_type="latent")  # no token needed
    assert out.shape == (1, 4, 8, 8)
    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="sal_scale"):
        engine.compose(img, {"#000000": "a"}, prompt="x", steps=1, sal_scale=float("nan"))
