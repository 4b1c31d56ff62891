"""Composite (MSP) generation on the embedded tiny model: layouts, stages, batching, guidance, CLI."""

import json

import numpy as np
import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.cli import main
from dreamfuse.engine.layout import BACKGROUND, build_masks, parse_layout
from dreamfuse.engine.pipelines.composite import (
    ComposeRequest,
    compose_batch,
    load_sal_model,
    stage_schedule,
    subject_aware_guidance,
)
from PIL import Image

STEPS = 3
RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)
CAT = "a photo of a cat"


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))


def stripes(*colors, h=64, w=64) -> np.ndarray:
    """Vertical stripes of equal width (64 / len(colors) px), one flat colour each."""
    img = np.zeros((h, w, 3), np.uint8)
    edges = np.linspace(0, w, len(colors) + 1).round().astype(int)
    for c, a, b in zip(colors, edges[:-1], edges[1:]):
        img[:, a:b] = c
    return img


def latent(engine, layout, segments, **kw):
    kw = {"prompt": CAT, "steps": STEPS, "seed": 3, "output_type": "latent", **kw}
    return engine.compose(layout, segments, **kw)


class TinySeg(torch.nn.Module):
    """A hand-made segmentation model: 1x1 conv to 3 classes, softmax."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[4.0, -2, 1], [-3, 5, 0.5], [1, 1, -4]])[:, :, None, None])
            self.conv.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x):
        return self.conv(x).softmax(1)


# --------------------------------------------------------------------------------------------- layouts
def test_segments_background_and_masks():
    img = stripes(RED, WHITE, BLUE, WHITE)  # white is not listed
    lay = parse_layout(img, {"#ff0000": "a cat", "#00f": {"prompt": "a dog", "guidance": 3}})
    assert [s.key for s in lay.segments] == ["#ff0000", "#00f", BACKGROUND]
    assert lay.segments[2].prompt is None  # no "background" entry: takes the global prompt
    assert (lay.labels[:, 16:32] == 2).all() and (lay.labels[:, 48:] == 2).all()  # unlisted colour -> background
    assert lay.masks.shape == (3, 8, 8)
    torch.testing.assert_close(lay.masks.sum(0), torch.ones(8, 8))
    assert (lay.masks[0, :, :2] == 1).all() and (lay.masks[1, :, 4:6] == 1).all()

    with_bg = parse_layout(img, {"background": "a street", "#ff0000": "a cat", "#0000ff": "a dog"})
    assert [s.key for s in with_bg.segments] == ["#ff0000", "#0000ff", "background"]
    assert with_bg.segments[2].prompt == "a street"
    # every pixel listed: no background segment even with an entry, masks still a partition of unity
    full = parse_layout(stripes(RED, BLUE), {"#ff0000": "a cat", "#0000ff": "a dog", "background": "x"})
    assert full.num_segments == 2


def test_anti_aliased_edges_go_to_the_nearest_listed_colour():
    img = stripes(RED, BLUE, WHITE)
    blend = lambda a, b, f: tuple(round(f * x + (1 - f) * y) for x, y in zip(a, b))
    img[:, 20] = blend(RED, BLUE, 0.65)  # edge pixels of the red/blue boundary
    img[:, 21] = blend(RED, BLUE, 0.35)
    img[:, 42] = blend(BLUE, WHITE, 0.7)  # edge of blue against the unlisted white
    img[:, 43] = blend(BLUE, WHITE, 0.3)
    img[5, 5] = (240, 12, 8)  # lossy-file noise inside red
    lay = parse_layout(img, {"#ff0000": "a cat", "#0000ff": "a dog"})
    assert (lay.labels[:, 20] == 0).all() and (lay.labels[:, 21] == 1).all()
    assert (lay.labels[:, 42] == 1).all() and (lay.labels[:, 43] == 2).all()
    assert lay.labels[5, 5] == 0
    torch.testing.assert_close(lay.masks.sum(0), torch.ones(8, 8))


def test_blur_softens_edges_and_keeps_a_partition_of_unity():
    labels = np.repeat(np.repeat(np.array([[0] * 4 + [1] * 4] * 8), 8, 0), 8, 1)
    hard = build_masks(labels, 2, 8)
    soft = build_masks(labels, 2, 8, blur=1.5)
    torch.testing.assert_close(soft.sum(0), torch.ones(8, 8))
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    assert 0 < soft[0, 0, 3] < 1 and 0 < soft[0, 0, 4] < 1  # the edge columns mix
    assert soft[0, 0, 0] > 0.99 and soft[1, 0, 7] > 0.99


@pytest.mark.parametrize(
    "layout, segments, kwargs, field",
    [
        (stripes(RED, BLUE, h=48), {"#ff0000": "a", "#0000ff": "b"}, {"height": 64, "width": 64}, "layout"),
        (stripes(RED, BLUE, h=60), {"#ff0000": "a", "#0000ff": "b"}, {}, "layout"),
        (stripes(RED, BLUE), {}, {}, "segments"),
        (stripes(RED, BLUE), {"#ff0000": "a", "#00ff00": "b"}, {}, "#00ff00"),
        (stripes(RED, BLUE), {"#ff0000": "a", "#ggg": "b"}, {}, "segments"),
        (stripes(RED, BLUE), {"#ff0000": "a", "#0000ff": "  "}, {}, "prompt"),
        (stripes(RED, BLUE), {"#ff0000": "a", "#0000ff": {"prompt": "b", "guidance": -1}}, {}, "guidance"),
        (stripes(RED, BLUE), {"#ff0000": "a", "#0000ff": {"prompt": "b", "guidance": "high"}}, {}, "guidance"),
        (stripes(RED, BLUE), {"#ff0000": "a", "#0000ff": {"promt": "b"}}, {}, "promt"),
        (stripes(RED, BLUE), {"#ff0000": "a"}, {"harmonize": "mix"}, "harmonize"),
        (stripes(RED, BLUE), {"#ff0000": "a"}, {"global_steps": 9}, "global_steps"),
        (stripes(RED, BLUE), {"#ff0000": "a"}, {"scaffold_fraction": 1.5}, "scaffold_fraction"),
        (stripes(RED, BLUE), {"#ff0000": "a"}, {"sal_scale": 1.0}, "sal_model"),
    ],
)
def test_bad_input_names_the_field(engine, layout, segments, kwargs, field):
    with pytest.raises(ValueError, match=field):
        latent(engine, layout, segments, **kwargs)


def test_bad_segments_json(engine, tmp_path):
    path = tmp_path / "segments.json"
    path.write_text('{"#ff0000": "a cat",')
    with pytest.raises(ValueError, match="segments.*JSON"):
        latent(engine, stripes(RED), str(path))


# --------------------------------------------------------------------------------------------- stages
def test_stage_schedule_defaults_follow_the_paper():
    plain = stage_schedule(80)
    assert plain[:2] == ["global"] * 2 and plain.count("scaffold") == 24 and plain.count("harmonize") == 54
    scaf = stage_schedule(80, scaffold_image=True)
    assert scaf.count("global") == 8 and scaf[8:32] == ["scaffold"] * 24 and scaf.count("harmonize") == 48
    assert stage_schedule(3, scaffold_image=True) == ["global"] * 3  # clipped to the steps
    assert stage_schedule(4, global_steps=0, scaffold_fraction=1.0) == ["scaffold"] * 4


@pytest.mark.parametrize("harmonize", ["blend", "global"])
@pytest.mark.parametrize("global_steps, fraction", [(0, 0.0), (1, 0.34), (0, 1.0)])
def test_one_segment_with_the_global_prompt_equals_text2img(engine, harmonize, global_steps, fraction):
    ref = engine.text2img(CAT, steps=STEPS, seed=3, height=64, width=64, output_type="latent")
    out = latent(engine, stripes(RED), {"#ff0000": CAT}, harmonize=harmonize, global_steps=global_steps,
                 scaffold_fraction=fraction)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_one_call_per_step_with_rows_per_segment(engine):
    seen = []
    segments = {"#ff0000": "a cat", "#0000ff": {"prompt": "a dog", "guidance": 1.0}, "background": "grass"}
    latent(engine, stripes(RED, BLUE, WHITE), segments, steps=4, global_steps=1, scaffold_fraction=0.5,
           callback=seen.append)
    assert [s["stages"] for s in seen] == [["global"], ["scaffold"], ["scaffold"], ["harmonize"]]
    # global: uncond + cond; segments: 3 cond + 2 uncond (guidance 1 drops the dog's uncond row)
    assert [s["rows"] for s in seen] == [2, 5, 5, 5]


def test_changing_one_segment_prompt_leaves_the_other_segment_exactly(engine):
    """Scaffolding over every step: segments develop independently, so the other region cannot move."""
    kw = {"global_steps": 0, "scaffold_fraction": 1.0}
    a = latent(engine, stripes(RED, BLUE), {"#ff0000": "a red car", "#0000ff": "a dog"}, **kw)
    b = latent(engine, stripes(RED, BLUE), {"#ff0000": "a house in the snow", "#0000ff": "a dog"}, **kw)
    assert torch.equal(a[..., 4:], b[..., 4:])  # latent columns 4..7 are the blue half
    assert (a[..., :4] - b[..., :4]).abs().mean() > 1e-2
    # harmonizing on the shared latent: the UNet sees the whole image, yet far inside the other segment
    # the change is much smaller than inside the changed one
    kw = {"global_steps": 0, "scaffold_fraction": 0.0, "harmonize": "blend"}
    a = latent(engine, stripes(RED, BLUE), {"#ff0000": "a red car", "#0000ff": "a dog"}, **kw)
    b = latent(engine, stripes(RED, BLUE), {"#ff0000": "a house in the snow", "#0000ff": "a dog"}, **kw)
    d = (a - b).abs()
    assert d[..., 6:].mean() < 0.1 * d[..., :2].mean()


def test_scaffold_image(engine):
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    segs = {"#ff0000": "a red car", "#0000ff": "a dog"}
    kw = {"steps": 4, "global_steps": 1, "scaffold_fraction": 0.5}
    plain = latent(engine, stripes(RED, BLUE), segs, **kw)
    scaf = latent(engine, stripes(RED, BLUE), segs, scaffold_image=img, **kw)
    assert torch.isfinite(scaf).all() and (scaf - plain).abs().mean() > 1e-3
    # one segment covering everything: the scaffold is filled nowhere, the output is text2img's exactly
    ref = engine.text2img(CAT, steps=4, seed=3, height=64, width=64, output_type="latent")
    one = latent(engine, stripes(RED), {"#ff0000": CAT}, scaffold_image=Image.new("RGB", (32, 32), "blue"), **kw)
    torch.testing.assert_close(one, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="scaffold_image"):
        latent(engine, stripes(RED), {"#ff0000": CAT}, scaffold_image=torch.rand(3, 64, 32))


# --------------------------------------------------------------------------------------------- guidance
def test_subject_aware_guidance_moves_the_latent_only_inside_its_segment(engine):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    masks = torch.zeros(2, 8, 8)
    masks[0, :, :3] = 1.0
    masks[1, 4:, :] = 0.5
    out = subject_aware_guidance(engine, x, eps, 0.5, masks, TinySeg(), scale=10.0)
    outside = (masks == 0)[:, None].expand_as(x)
    assert torch.equal(out[outside], x[outside])
    assert (out - x)[~outside].abs().max() > 1e-6
    alone = subject_aware_guidance(engine, x[1:], eps[1:], 0.5, masks[1:], TinySeg(), scale=10.0)
    torch.testing.assert_close(alone, out[1:], atol=1e-5, rtol=1e-4)  # rows are independent


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # TorchScript is what the issue asks for
def test_subject_aware_guidance_in_the_pipeline(engine, tmp_path):
    """Guiding the red (subject) segment at the last step changes the red half only; a TorchScript file loads with
    load_sal_model, and the pipeline refuses a path (a TorchScript file is a program: never from a request)."""
    path = tmp_path / "seg.pt"
    torch.jit.script(TinySeg()).save(str(path))
    segs = {"#ff0000": {"prompt": "a red car", "subject": True}, "#0000ff": "a dog"}
    kw = {"global_steps": 0, "scaffold_fraction": 1.0}
    base = latent(engine, stripes(RED, BLUE), segs, **kw)
    guided = latent(engine, stripes(RED, BLUE), segs, sal_model=load_sal_model(path, engine.device), sal_scale=50.0,
                    sal_steps=(STEPS - 1, STEPS), **kw)
    with pytest.raises(ValueError, match="sal_model: pass a loaded model, not a path"):
        latent(engine, stripes(RED, BLUE), segs, sal_model=str(path), sal_scale=50.0, **kw)
    assert torch.equal(guided[..., 4:], base[..., 4:])
    assert (guided[..., :4] - base[..., :4]).abs().max() > 1e-5
    with pytest.raises(ValueError, match="sal_model"):
        latent(engine, stripes(RED, BLUE), segs, sal_model=lambda x: x, sal_scale=1.0, **kw)


# --------------------------------------------------------------------------------------------- batching
def _requests():
    return [
        ComposeRequest(stripes(RED, BLUE, WHITE), {"#ff0000": "a red car", "#0000ff": {"prompt": "a dog",
                                                                                        "guidance": 5.0}}, CAT),
        ComposeRequest(stripes(GREEN), {"#00ff00": "a tree", "background": "a sky"}, "a forest",
                       negative_prompt="blurry",
                       scaffold_image=torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))),
    ]


@pytest.mark.parametrize("global_steps", [1, None])  # None: 2 steps for one request, all 4 for the scaffolded one
def test_two_requests_in_one_call_equal_each_alone(engine, global_steps):
    kw = {"steps": 4, "global_steps": global_steps, "scaffold_fraction": 0.5, "output_type": "latent"}
    reqs = _requests()
    both = compose_batch(engine, reqs, seed=[3, 8], **kw)
    for i, (r, s) in enumerate(zip(reqs, [3, 8])):
        alone = compose_batch(engine, [r], seed=s, **kw)
        torch.testing.assert_close(both[i : i + 1], alone, atol=1e-4, rtol=1e-4)


def test_pil_output_and_metadata(engine):
    (img,) = engine.compose(stripes(RED, BLUE), {"#ff0000": "a cat", "#0000ff": "a dog"}, prompt="a pet pair",
                            steps=2, seed=5)
    assert img.size == (64, 64) and img.info["prompt"] == "a pet pair" and img.info["seed"] == "5"


# --------------------------------------------------------------------------------------------- CLI
def test_cli_compose(tmp_path, capsys):
    Image.fromarray(stripes(RED, BLUE, WHITE)).save(tmp_path / "layout.png")
    (tmp_path / "segments.json").write_text(json.dumps({"#ff0000": "a cat", "#0000ff": {"prompt": "a dog"}}))
    out = tmp_path / "out.png"
    base = ["compose", "--layout", str(tmp_path / "layout.png"), "--prompt", "two pets", "--steps", "2",
            "--seed", "1", "--device", "cpu", "--no-progress"]
    assert main([*base, "--segments", str(tmp_path / "segments.json"), "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.size == (64, 64) and img.info["prompt"] == "two pets"

    (tmp_path / "bad.json").write_text("{not json")
    capsys.readouterr()
    assert main([*base, "--segments", str(tmp_path / "bad.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dreamfuse: error: --segments") and len(err.splitlines()) == 1


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_triton_kernels_match_the_torch_backend_on_cuda():
    """The same compose run (blend harmonization, scaffold image, 3 segments) on CUDA with the Triton kernels and
    with the PyTorch references agrees within fp16 rounding."""
    outs = []
    for backend in ("triton", "torch"):
        eng = Engine.from_pretrained("tiny", EngineConfig(device="cuda", backend=backend, progress=False))
        reqs = _requests()
        outs.append(compose_batch(eng, reqs, seed=[3, 8], steps=4, global_steps=1, scaffold_fraction=0.5,
                                  output_type="latent").float().cpu())
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)


def test_pipeline_call_patterns_pass_the_kernel_launchers(engine, monkeypatch):
    """The public kernel ops (their shape/dtype/stride checks, and the Triton code under TRITON_INTERPRET=1 on
    CPU) accept what the pipeline passes — padded S, expanded views, (B, S) guidance, fp32 masks — and agree
    with the references the torch backend calls."""
    import dreamfuse.engine.pipelines.composite as composite
    from dreamfuse.engine.ops import ops_for

    kw = {"steps": 4, "global_steps": 1, "scaffold_fraction": 0.5, "output_type": "latent", "seed": 3}
    batches = [_requests(), _requests()[:1]]  # padded S (a copy) and one request (views of the UNet output)
    refs = [compose_batch(engine, reqs, **kw) for reqs in batches]
    monkeypatch.setattr(composite, "ops_for", lambda backend: ops_for("triton"))
    for reqs, ref in zip(batches, refs):
        torch.testing.assert_close(compose_batch(engine, reqs, **kw), ref, atol=1e-4, rtol=1e-4)
