"""bench/methods_eval.py's metrics and statistics, checked against the shapes world's own ground truth (renders of
the scenes each metric scores), without the model."""

import dataclasses

import numpy as np
import pytest
from dreamfuse.engine import shapes_world as W

from bench import methods_eval as M


def test_wilson_interval_known_values():
    lo, hi = M.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert M.wilson(0, 5)[0] == 0.0 and M.wilson(5, 5)[1] == 1.0
    assert all(np.isnan(M.wilson(0, 0)))


def test_paired_diff_ci_brackets_the_difference():
    base = [False] * 10 + [True] * 10
    method = [True] * 20
    mean, lo, hi = M.paired_diff_ci(base, method)
    assert mean == pytest.approx(0.5) and 0.2 < lo <= 0.5 <= hi <= 0.8
    assert M.paired_diff_ci(method, method) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="outcomes"):
        M.paired_diff_ci([True], [True, False])


def test_format_table_pivots_conditions_and_metrics():
    rows = M.with_deltas([M.Row("T", "m1", "base", [True, False]), M.Row("T", "m1", "new", [True, True]),
                          M.Row("T", "m2", "base", [False, False]), M.Row("T", "m2", "new", [True, False])], "base")
    text = M.format_table("T", rows)
    lines = text.splitlines()
    assert lines[2] == "| condition | m1 (n=2) | m2 (n=2) |"
    assert lines[4].startswith("| base | 0.50 [") and "Δ" not in lines[4]
    assert lines[5].startswith("| new | 1.00 [") and "Δ +0.50" in lines[5]
    assert rows[1].as_dict()["delta"]["mean"] == pytest.approx(0.5)


@pytest.mark.parametrize("position,background", [("on the left", "sand"), ("at the top", "sky")])
def test_subject_scores_of_the_subject_render_are_all_right(position, background):
    scores = M.subject_scores(W.render(M.subject_scene(position, background, seed=3)), position, background)
    assert all(scores.values()), scores
    other = W.render(W.sample_scene(3, objects=[{**M.SUBJECT, "colour": "red"}], position=position,
                                    background=background, caption_dropout=False))
    wrong = M.subject_scores(other, "on the right", background)
    assert not wrong["subject: colour"] and not wrong["prompt: position"] and wrong["subject: texture"]


def _compose_render(case: dict) -> np.ndarray:
    a, b = case["a"], case["b"]
    if case["relation"] == "left of":
        a, b = dataclasses.replace(a, cx=0.25), dataclasses.replace(b, cx=0.75)
    else:
        a, b = dataclasses.replace(a, cy=0.25), dataclasses.replace(b, cy=0.75)
    return W.render(W.Scene(case["background"], (a, b), case["relation"]))


@pytest.mark.parametrize("seed", range(6))
def test_segment_hits_of_the_layout_render_are_right_and_swapped_are_wrong(seed):
    case = M.compose_case(seed)
    assert case["layout"][0, 0].tolist() == [255, 0, 0] and case["layout"][-1, -1].tolist() == [0, 0, 255]
    assert case["segments"]["#ff0000"].endswith(case["background"]) and case["relation"] in case["prompt"]
    assert M.segment_hits(_compose_render(case), case) == [True, True]
    swapped = _compose_render({**case, "a": case["b"], "b": case["a"]})
    assert M.segment_hits(swapped, case) == [False, False]


def test_relation_hits_read_the_exemplars():
    scenes = M.relation_cases(8)
    images = [W.render(s) for s in scenes]
    assert M.relation_hits(images, scenes) == [True] * 8
    swapped = [dataclasses.replace(s, objects=s.objects[::-1]) for s in scenes]  # the container inside the content
    assert not any(M.relation_hits(images, swapped))


def test_write_exemplars_templates(tmp_path):
    from dreamfuse.engine.train.reversion import load_exemplars

    ex = load_exemplars(M.write_exemplars(tmp_path / "data", 3))
    assert len(ex) == 3 and all(t.count("{}") == 1 and M.RELATION not in t for _, ts in ex for t in ts)


def test_corrupt_and_palette_patches():
    scene = W.sample_scene(5, n_objects=1, caption_dropout=False)
    image = W.render(scene)
    bad, q = M.corrupt(image, np.random.default_rng(0), fraction=0.25)
    assert q.shape == (8, 8) and int((q == 0).sum()) == 16
    assert (bad[q.repeat(8, 0).repeat(8, 1) == 0] == 0).all()
    assert M.on_palette(image, scene).all()  # a render is all background and its object
    other = W.render(W.sample_scene(5, n_objects=1, background=next(b for b in W.BACKGROUNDS if b != scene.background),
                                    caption_dropout=False))
    assert M.on_palette(other, scene).mean() < 0.5  # another background: its patches are off the palette
