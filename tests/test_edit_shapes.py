"""What img2img and inpainting are for, on the trained ``shapes`` model, with fixed seeds other than the bench's
(``python -m bench.edit_eval``, bench/RESULTS.md): inpainting puts the prompt's red circle into the masked box and
keeps the rest of the input; img2img's strength moves the result from the input toward the prompt. A few images,
the bench's 25 steps."""

import dataclasses

import numpy as np
import pytest
from dreamfuse.engine import shapes_world as W

from bench import edit_eval as E

STEPS = 25
CASES = range(1000, 1008)  # the bench's cases are 0.., its seeds 5000.. / 6000..
SEEDS = [9000 + i for i in range(len(CASES))]


@pytest.fixture(scope="module")
def engine():
    return E.shapes_engine()


@pytest.mark.parametrize("index", range(4))
def test_the_bench_scores_read_the_worlds_ground_truth(index):
    """Without the model: the input scores as itself (object kept, nothing red, no change outside the box); the same
    scene with a red circle drawn in the box scores the circle in the box and nothing changed outside it."""
    case = E.inpaint_case(index)
    assert not (W.read_image(case["image"]).objects[0].mask & case["mask"]).any()  # the object is clear of the box
    alone = E.inpaint_scores(case["image"], case)
    assert alone == {"red circle read back": False, "red object in the mask": False, "red circle in the mask": False,
                     "input's object kept": True, "mean abs diff outside the mask": 0.0}
    cx, cy = W.POSITIONS[case["side"]]
    red = W.Obj("circle", "red", "plain", "small", cx, cy)
    scene = dataclasses.replace(case["scene"], objects=(*case["scene"].objects, red))
    both = E.inpaint_scores(W.render(scene), case)
    assert all(v for k, v in both.items() if k != "mean abs diff outside the mask"), both
    assert both["mean abs diff outside the mask"] < 0.5
    i2i = E.img2img_case(index)
    s = E.img2img_scores(i2i["image"], i2i)
    assert s["input's object read back"] and s["input's background"] and not s["prompt's background"]
    assert not s["prompt's red circle read back"] and s["mean abs diff to the input"] == 0.0


def test_bench_table_cells():
    assert E.cell([True, False, True, True]).startswith("0.75 [")
    assert E.cell([1.0, 2.0, 3.0]).startswith("2.0 [")
    assert "Δ +0.50" in E.cell([True, True], [False, True]) and "Δ -1.0" in E.cell([1.0, 2.0], [2.0, 3.0])
    text = E.table("T", {"a": {"m": [True, False]}, "b": {"m": [True, True]}}, {"b": "a"})
    assert text.splitlines()[2] == "| condition | m (n=2) |" and "Δ" in text.splitlines()[-1]


def _rate(scores, key) -> float:
    return float(np.mean([s[key] for s in scores]))


def test_inpainting_puts_the_red_circle_in_the_box_and_keeps_the_rest(engine):
    # the prompt that describes the wanted scene ("a red circle left of a white square on grass"), where the bench
    # finds inpainting ahead of text2img (red circle in the box 0.71 vs 0.38 of 48). Measured here (8 cases): 5/8 vs
    # 1/8; mean abs difference outside the box 7.7 vs 25.4 (the VAE alone: 5.8), lower on every case
    cases = [E.inpaint_case(i) for i in CASES]
    prompts = [c["prompt_scene"] for c in cases]
    kw = dict(steps=STEPS, guidance_scale=E.GUIDANCE, seed=SEEDS)
    inpainted = engine.inpaint(prompts, [c["image"] for c in cases], [c["mask"] for c in cases], **kw)
    plain = engine.text2img(prompts, height=E.SIZE, width=E.SIZE, **kw)
    s_in = [E.inpaint_scores(np.asarray(im), c) for im, c in zip(inpainted, cases)]
    s_t2i = [E.inpaint_scores(np.asarray(im), c) for im, c in zip(plain, cases)]
    circle, diff = "red circle in the mask", "mean abs diff outside the mask"
    assert _rate(s_in, circle) >= 4 / 8 and _rate(s_in, circle) >= _rate(s_t2i, circle) + 3 / 8, (s_in, s_t2i)
    assert all(a[diff] < b[diff] for a, b in zip(s_in, s_t2i)) and _rate(s_in, diff) < 10, (s_in, s_t2i)


def test_img2img_strength_moves_from_the_input_to_the_prompt(engine):
    # "a red circle on <another background>" over a large non-red, non-circle object: at strength 0.04 (1 of 25
    # steps) the input stays (bench: its object read back 0.96, its background 1.00), at 1 the prompt wins (red
    # circle 0.96, background 1.00)
    cases = [E.img2img_case(i) for i in CASES[:4]]
    out = {}
    for strength in (0.04, 1.0):
        images = engine.img2img([c["prompt"] for c in cases], [c["image"] for c in cases], strength=strength,
                                steps=STEPS, guidance_scale=E.GUIDANCE, seed=SEEDS[:4])
        out[strength] = [E.img2img_scores(np.asarray(im), c) for im, c in zip(images, cases)]
    low, high = out[0.04], out[1.0]
    assert all(a["mean abs diff to the input"] < b["mean abs diff to the input"] for a, b in zip(low, high))
    assert _rate(low, "input's object read back") >= 3 / 4 and _rate(low, "input's background") >= 3 / 4, low
    assert _rate(low, "prompt's background") <= 1 / 4 and _rate(low, "prompt's red circle read back") <= 1 / 4, low
    assert _rate(high, "prompt's background") >= 3 / 4 and _rate(high, "prompt's red circle read back") >= 3 / 4, high
    assert _rate(high, "input's object read back") <= 1 / 4, high
