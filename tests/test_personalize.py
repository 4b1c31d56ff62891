"""DreamMatcher personalization on the tiny model: what AMA must and must not change."""

import pytest
import torch
import torch.nn.functional as F
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.cli import main
from dreamfuse.engine.pipelines import personalize as pz
from dreamfuse.engine.pipelines.personalize import (
    _foreground_handler,
    _Layout,
    _MatchState,
    subject_token_indices,
)
from dreamfuse.engine.processors import CallContext, LayerInfo
from dreamfuse.kernels.attention import attention_reference
from PIL import Image

SIZE = 128  # latent 16x16: AMA at 8x8 (up_blocks.2) and 16x16 (up_blocks.3), foreground at 4x4
KW = dict(steps=5, seed=0, height=SIZE, width=SIZE, output_type="latent", ama_start=1)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))


@pytest.fixture(scope="module")
def reference():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, SIZE, SIZE, generator=g)


def test_ama_off_equals_text2img(engine, reference):
    off = engine.personalize("a photo of a sks dog", reference, subject_token="sks", ama=False, **KW)
    plain = engine.text2img("a photo of a sks dog", steps=5, seed=0, height=SIZE, width=SIZE,
                            guidance_scale=10.0, output_type="latent")
    torch.testing.assert_close(off, plain, atol=1e-4, rtol=1e-4)


def test_ama_changes_target_not_reference(engine, reference):
    logs = {True: [], False: []}
    out = {}
    for ama in (True, False):
        out[ama] = engine.personalize("a photo of a sks dog", reference, subject_token="sks", ama=ama,
                                      callback=lambda d, a=ama: logs[a].append(d), **KW)
    assert (out[True] - out[False]).abs().mean() > 1e-3
    rows = logs[True][0]["rows"]
    refs = [0, rows.n + 1]
    for on, off in zip(logs[True], logs[False]):
        # the reference branch follows its inverted trajectory and is never warped: bit-identical
        assert torch.equal(on["eps"][refs], off["eps"][refs])
    # from the first AMA step on, the target rows differ
    assert not torch.allclose(logs[True][2]["eps"][rows.targets], logs[False][2]["eps"][rows.targets])


def test_deterministic_and_targets_batched(engine, reference):
    a = engine.personalize(["a photo of a sks dog", "a sks dog on the beach"], reference, subject_token="sks",
                           **KW)
    b = engine.personalize(["a photo of a sks dog", "a sks dog on the beach"], reference, subject_token="sks",
                           **KW)
    assert torch.equal(a, b) and a.shape == (2, 4, SIZE // 8, SIZE // 8)


def test_multi_token_subject_word(engine, reference):
    idx = subject_token_indices(engine.tokenizer, "a photo of a zqxw dog", "zqxw")
    assert len(idx) > 1 and idx == list(range(idx[0], idx[0] + len(idx)))
    out = engine.personalize("a photo of a zqxw dog", reference, subject_token="zqxw", **KW)
    assert torch.isfinite(out).all()


def test_semantic_matching_guidance_moves_target(engine, reference):
    base = engine.personalize("a photo of a sks dog", reference, subject_token="sks", **KW)
    guided = engine.personalize("a photo of a sks dog", reference, subject_token="sks", lambda_g=5.0, **KW)
    assert torch.isfinite(guided).all()
    assert (guided - base).abs().mean() > 1e-4


def test_foreground_from_lse_equals_materialized_attention():
    """The subject-token map read through the log-sum-exp equals the one from the full softmax matrix."""
    g = torch.Generator().manual_seed(0)
    n, heads, hw, d = 2, 2, (3, 4), 8
    rows = 2 * (n + 1)
    q = torch.randn(rows, heads, hw[0] * hw[1], d, generator=g)
    k = torch.randn(rows, heads, 77, d, generator=g)
    v = torch.randn(rows, heads, 77, d, generator=g)
    token_idx = torch.tensor([[5, 6], [9, 10]])
    lay = _Layout(n)
    state = _MatchState(lay, None, 0.4, 16)

    class Ops:
        attention = staticmethod(attention_reference)

    out = _foreground_handler(state, Ops, token_idx)(LayerInfo("x.attn2", True, hw, attention_reference), q, k, v)
    torch.testing.assert_close(out, attention_reference(q, k, v))
    probs = (q @ k.transpose(-1, -2) * d**-0.5).softmax(-1)[lay.cond_targets]  # (n, H, Lq, 77)
    want = torch.stack([probs[i, :, :, token_idx[i]].mean(dim=(0, 2)) for i in range(n)]).view(n, *hw)
    torch.testing.assert_close(state.fg_sum, want, atol=1e-5, rtol=1e-5)


def test_ama_uses_the_current_steps_foreground_mask(engine, reference, monkeypatch):
    """At every AMA step the mask AMA uses is the one of that step's own cross-attention (recomputed here from the
    materialized softmax of the foreground layers' q, k), not the previous step's (the official code aggregates the
    step's cross-attention maps when its AMA layers run)."""
    prompt = "a photo of a sks dog"
    token_idx = subject_token_indices(engine.tokenizer, prompt, "sks")
    step, maps, used = [0], {}, {}
    real_fg, real_ama = pz._foreground_handler, pz._ama_handler

    def fg_factory(state, ops, tokens):
        real = real_fg(state, ops, tokens)

        def handler(layer, q, k, v):
            (row,) = state.layout.cond_targets
            p = (q[row].float() @ k[row].float().mT * q.shape[-1] ** -0.5).softmax(-1)  # (H, Lq, 77)
            maps.setdefault(step[0], []).append(p[..., token_idx].mean(dim=(0, 2)).view(*layer.hidden_hw))
            return real(layer, q, k, v)

        return handler

    def ama_factory(state, ops):
        real = real_ama(state, ops)

        def handler(layer, q, k, v):
            out = real(layer, q, k, v)
            used.setdefault(step[0], []).append(state.fg.clone())
            return out

        return handler

    monkeypatch.setattr(pz, "_foreground_handler", fg_factory)
    monkeypatch.setattr(pz, "_ama_handler", ama_factory)
    kw = {**KW, "steps": 3, "height": 64, "width": 64}  # latent 8x8: foreground maps at 2x2, AMA at 4x4 and 8x8
    engine.personalize(prompt, reference[:, ::2, ::2], subject_token="sks",
                       callback=lambda d: step.__setitem__(0, d["step"] + 1), **kw)

    def expected(i):
        m = torch.stack(maps[i]).mean(0)
        m = (m - m.min()) / (m.max() - m.min())
        return torch.stack([m, m])  # the cond target's map serves its uncond and cond rows

    assert sorted(used) == [1, 2]  # AMA from ama_start=1 to the end
    for i, masks in sorted(used.items()):
        assert len(maps.get(i, [])) == len(pz._foreground_layers(engine)), f"step {i}: not every foreground layer ran"
        for m in masks:  # every AMA layer of the step
            torch.testing.assert_close(m, expected(i), atol=1e-5, rtol=1e-5)
    assert (expected(2) - expected(1)).abs().max() > 1e-2  # a stale mask would be told apart


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_foreground_layers_all_run_before_the_first_ama_layer(engine, model):
    """In one UNet call every foreground cross-attention layer runs before the first AMA self-attention layer (SD
    and SDXL layouts, default AMA blocks), so the first AMA layer can finish the current step's mask."""
    eng = engine if model == "tiny" else Engine.from_pretrained("tiny-xl", EngineConfig(device="cpu", backend="torch",
                                                                                         progress=False))
    fg, ama = pz._foreground_layers(eng), pz._layer_names(eng, pz.default_blocks(eng)[0], "attn1")
    order = []

    def record(layer, q, k, v):
        order.append(layer.name)
        return layer.attend(q, k, v)

    ctx = CallContext(handlers={name: record for name in fg + ama})
    emb, pooled = eng.encode_text([""])
    with torch.no_grad():
        eng.unet_call(torch.zeros(1, 4, 8, 8), 500, emb, pooled=pooled, ctx=ctx)
    assert fg and ama and sorted(order) == sorted(fg + ama)
    assert max(order.index(n) for n in fg) < min(order.index(n) for n in ama)


def test_mask_needed_before_its_layers_ran_is_an_error():
    state = _MatchState(_Layout(1), None, 0.4, 16, fg_expected=2)
    state.fg_sum, state.fg_layers = torch.rand(1, 2, 2), 1
    with pytest.raises(RuntimeError, match="1 of 2 foreground"):
        state.finish_foreground()


def test_matching_features_are_upsampled_with_align_corners():
    """``set_features`` upsamples the coarse block bilinearly with ``align_corners=True`` (the official code's
    pre-PCA interpolation). With ``pca_dim`` at least each block's channels the PCA is a rotation per block, so the
    cosine similarities of the final features equal those of the centred, concatenated, upsampled features."""
    g = torch.Generator().manual_seed(0)
    lay = _Layout(2)
    f1, f2 = torch.randn(lay.rows, 6, 4, 4, generator=g), torch.randn(lay.rows, 5, 8, 8, generator=g)
    state = _MatchState(lay, None, 0.4, pca_dim=8)
    state.set_features([f1, f2])
    got = torch.cat([state.psi_ref.flatten(2), state.psi_tgt.flatten(2)], 2).mT  # (2n, 2N, Q): ref then target

    def reference(align_corners: bool) -> torch.Tensor:
        parts = []
        for f in (F.interpolate(f1, size=(8, 8), mode="bilinear", align_corners=align_corners), f2):
            flat = f.flatten(2).mT
            pair = torch.cat([flat[lay.refs_of_targets], flat[lay.targets]], 1)
            parts.append(pair - pair.mean(1, keepdim=True))
        feats = F.normalize(torch.cat(parts, -1), dim=-1)
        return feats @ feats.mT

    torch.testing.assert_close(got @ got.mT, reference(True), atol=1e-4, rtol=1e-4)
    assert (got @ got.mT - reference(False)).abs().max() > 1e-2


def test_inversion_is_cached(engine, reference):
    """The reference is inverted once per (image, size, steps): a second call costs only its denoising steps."""
    calls = []
    real = engine.unet_call
    engine.unet_call = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        fresh = reference.flip(-1)  # an image no other test inverted
        engine.personalize("a photo of a sks dog", fresh, subject_token="sks", **KW)
        first = len(calls)
        engine.personalize("a sks dog", fresh, subject_token="sks", **KW)
        second = len(calls) - first
    finally:
        del engine.unet_call
    assert (first, second) == (2 * KW["steps"], KW["steps"])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"reference_image": None}, "reference_image"),
        ({"reference_image": "/nonexistent.png"}, "reference_image"),
        ({"reference_image": torch.rand(3, SIZE, SIZE // 2)}, "aspect"),
        ({"subject_token": "cat"}, "subject_token"),
        ({"lambda_c": 0.0}, "lambda_c"),
        ({"ama_blocks": (7,)}, "ama_blocks"),
        ({"ama_blocks": (1, 2, 3)}, "ama_blocks"),  # up_blocks.1 holds foreground layers: its mask is not complete
        ({"ama_start": 0}, "ama_start"),
        ({"ama_mask": "all"}, "ama_mask"),
    ],
)
def test_bad_inputs(engine, reference, kwargs, field):
    args = {"reference_image": reference, "subject_token": "sks", **KW, **kwargs}
    ref = args.pop("reference_image")
    with pytest.raises(ValueError, match=field):
        engine.personalize("a photo of a sks dog", ref, **args)


def test_ama_mask_modes(engine, reference, monkeypatch):
    # every AMA layer's mask is what ama_mask says: M * U, M alone, or every position; the flows are the same
    seen = {}
    original = _MatchState.flow_and_mask

    def spy(self, hw):
        flow, mask = original(self, hw)
        fg = F.interpolate(self.fg[:, None], size=hw, mode="nearest").flatten(1)
        seen.setdefault(self.mask_mode, []).append((hw, flow.clone(), mask.clone(), fg))
        return flow, mask

    monkeypatch.setattr(_MatchState, "flow_and_mask", spy)
    out = {mode: engine.personalize("a photo of a sks dog", reference, subject_token="sks", ama_mask=mode, **KW)
           for mode in pz.AMA_MASKS}
    for mode, calls in seen.items():
        for _hw, _flow, mask, fg in calls:
            if mode == "foreground":
                torch.testing.assert_close(mask, fg, atol=0, rtol=0)
            elif mode == "none":
                assert torch.equal(mask, torch.ones_like(mask))
            else:  # the cycle-consistency filter keeps a subset of the foreground, never more
                assert bool((mask <= fg).all()) and bool((mask < fg).any())
    first = {mode: calls[0][1] for mode, calls in seen.items()}  # the first step's flows: same features, same flow
    assert torch.equal(first["consistent"], first["none"]) and torch.equal(first["consistent"], first["foreground"])
    assert (out["none"] - out["consistent"]).abs().mean() > 1e-3


def test_cli_personalize(tmp_path, reference):
    ref_path = tmp_path / "ref.png"
    Image.fromarray((reference.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(ref_path)
    out = tmp_path / "out.png"
    code = main(["personalize", "--reference", str(ref_path), "--prompt", "a sks dog", "--subject-token", "sks",
                 "--steps", "3", "--seed", "0", "--height", "128", "--width", "128", "--out", str(out),
                 "--ama-mask", "none", "--no-progress"])
    assert code == 0 and Image.open(out).size == (SIZE, SIZE)
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["personalize", "--reference", str(ref_path), "--prompt", "a sks dog", "--subject-token", "sks",
              "--ama-mask", "all", "--out", str(out)])
    bad = main(["personalize", "--reference", str(tmp_path / "missing.png"), "--prompt", "a sks dog",
                "--subject-token", "sks", "--out", str(out), "--no-progress"])
    assert bad == 2


def test_triton_backend_matches_torch_backend(engine, reference):
    """The whole pipeline on the Triton kernels (interpreted here, compiled on CUDA): fused attention, AMA,
    matching and cycle mask give the torch backend's result."""
    tri = Engine(
        {"unet": engine.unet, "vae": engine.vae, "text_encoder": engine.text_encoder, "tokenizer": engine.tokenizer,
         "scheduler": engine.scheduler},
        EngineConfig(device="cpu", backend="triton", progress=False),
    )
    # 64x64 and 2 steps keep the interpreter to seconds: AMA on the 4x4 and 8x8 grids at step 1, guided
    kw = {**KW, "steps": 2, "height": 64, "width": 64}
    reference = reference[:, ::2, ::2]
    try:
        got = tri.personalize("a photo of a sks dog", reference, subject_token="sks", lambda_g=5.0, **kw)
    finally:
        engine.processors = __import__("dreamfuse.engine.processors", fromlist=["x"]).install_processors(
            engine.unet, "torch")  # the two engines share the UNet: give it back its processors
    want = engine.personalize("a photo of a sks dog", reference, subject_token="sks", lambda_g=5.0, **kw)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_cli_ama_mask_choices_are_the_pipelines():
    # the CLI spells the modes out (its --help imports no torch); they must stay the pipeline's
    from dreamfuse.engine.cli import build_parser

    argv = ["personalize", "--reference", "r.png", "--prompt", "p"]
    sub = next(a for a in build_parser(argv)._actions if a.dest == "command").choices["personalize"]
    choices = next(a for a in sub._actions if a.dest == "ama_mask").choices
    assert tuple(choices) == pz.AMA_MASKS
