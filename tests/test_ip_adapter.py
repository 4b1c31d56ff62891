"""IP-Adapter / IP-Adapter-Plus on the tiny model: decoupled cross-attention, standard files, CFG, CLI."""

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.cli import main
from dreamfuse.engine.ip_adapter import (
    build_tiny_ip_adapter,
    read_ip_adapter_file,
    save_ip_adapter,
    save_tiny_ip_adapter,
)
from PIL import Image

STEPS = 2
KINDS = [False, True]  # plus?
CROSS_INDICES = [str(i) for i in range(1, 20, 2)]  # tiny UNet: 10 transformer blocks, attn2 at odd indices


def _image(seed: int, h: int = 48, w: int = 64) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))


@pytest.fixture(scope="module")
def plain(engine):
    engine.unload_ip_adapter()
    return engine.text2img("a photo of a cat", steps=STEPS, seed=3, output_type="latent")


def _gen(engine, prompts="a photo of a cat", seed=3, **kw):
    return engine.text2img(prompts, steps=STEPS, seed=seed, output_type="latent", **kw)


@pytest.mark.parametrize("plus", KINDS, ids=["base", "plus"])
def test_scale_zero_is_text2img_and_scale_changes_image(engine, plain, plus):
    engine.load_ip_adapter(build_tiny_ip_adapter(engine, plus=plus))
    assert engine.ip_adapter.plus is plus and engine.ip_adapter.uncond_tokens().shape[1] == (16 if plus else 4)
    torch.testing.assert_close(_gen(engine), plain, atol=1e-5, rtol=0)  # adapter loaded, no image: unchanged
    torch.testing.assert_close(_gen(engine, ip_image=_image(0), ip_scale=0.0), plain, atol=1e-5, rtol=0)
    with_ip = _gen(engine, ip_image=_image(0), ip_scale=0.6)
    other_ref = _gen(engine, ip_image=_image(1), ip_scale=0.6)
    assert (with_ip - plain).abs().mean() > 1e-2
    assert (with_ip - other_ref).abs().mean() > 1e-3
    engine.unload_ip_adapter()
    torch.testing.assert_close(_gen(engine), plain, atol=0, rtol=0)


def test_batch_invariance_one_image_per_prompt(engine):
    engine.load_ip_adapter(build_tiny_ip_adapter(engine, plus=True))
    prompts, seeds, refs = ["a photo of a cat", "a red car"], [3, 8], [_image(0), _image(1, 64, 64)]
    batch = _gen(engine, prompts, seed=seeds, ip_image=refs, ip_scale=0.8)
    for i in range(2):
        alone = _gen(engine, prompts[i], seed=seeds[i], ip_image=refs[i], ip_scale=0.8)
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-4, rtol=1e-4)
    # one image for all prompts equals the same image given per prompt
    shared = _gen(engine, prompts, seed=seeds, ip_image=refs[0], ip_scale=0.8)
    torch.testing.assert_close(shared[0], batch[0], atol=1e-5, rtol=0)
    # without CFG (guidance <= 1) only the conditional rows run, image tokens included
    no_cfg = _gen(engine, prompts[0], seed=seeds[0], ip_image=refs[0], ip_scale=0.8, guidance_scale=1.0)
    assert (no_cfg - _gen(engine, prompts[0], seed=seeds[0], guidance_scale=1.0)).abs().mean() > 1e-2
    engine.unload_ip_adapter()


def test_only_ip_layers_receive_gradients(engine):
    """The PatchDPO hook: with ``adapter.layers`` trainable, a UNet call's loss reaches to_k_ip/to_v_ip only."""
    adapter = engine.load_ip_adapter(build_tiny_ip_adapter(engine, plus=True))
    adapter.layers.requires_grad_(True)
    try:
        tokens = adapter.image_tokens([_image(0)]).expand(2, -1, -1)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        eps = engine.unet_call(latents, 500, engine.encode_prompts(["a cat", "a dog"]), tokens, 1.0)
        eps.square().mean().backward()
        grads = {n: p.grad for n, p in adapter.named_parameters() if p.grad is not None}
        assert set(grads) == {f"layers.{n}" for n in adapter.layers.state_dict()}
        assert all(g.abs().sum() > 0 for g in grads.values())
        assert all(p.grad is None for p in engine.unet.parameters())
    finally:
        engine.unload_ip_adapter()


@pytest.mark.parametrize("plus", KINDS, ids=["base", "plus"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_standard_files_round_trip(engine, tmp_path, plus, fmt):
    adapter = build_tiny_ip_adapter(engine, plus=plus, seed=5)
    engine.load_ip_adapter(adapter)
    ref = _gen(engine, ip_image=_image(2), ip_scale=0.7)
    path = save_ip_adapter(adapter, tmp_path / f"ip.{fmt}", tmp_path / "enc")

    raw = safetensors.torch.load_file(str(path)) if fmt == "safetensors" else torch.load(path, weights_only=True)
    keys = set(raw) if fmt == "safetensors" else {f"{g}.{k}" for g, d in raw.items() for k in d}
    expected_ip = {f"ip_adapter.{i}.to_{kv}_ip.weight" for i in CROSS_INDICES for kv in "kv"}
    assert {k for k in keys if k.startswith("ip_adapter.")} == expected_ip
    proj = {k.removeprefix("image_proj.") for k in keys if k.startswith("image_proj.")}
    assert len(proj) + len(expected_ip) == len(keys)
    if plus:  # the official Resampler layout
        assert {"latents", "proj_in.weight", "layers.0.0.to_kv.weight", "layers.3.1.3.weight"} <= proj
    else:
        assert proj == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    sd = read_ip_adapter_file(path)
    assert sd["ip_adapter"]["1.to_k_ip.weight"].shape == (40, 64)  # down_blocks.0 attn2: 40 channels, text dim 64

    loaded = engine.load_ip_adapter(path, tmp_path / "enc")
    assert loaded is not adapter and loaded.plus is plus
    assert loaded.layer_names["1"] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert loaded.layer_names["19"] == "mid_block.attentions.0.transformer_blocks.0.attn2"
    torch.testing.assert_close(_gen(engine, ip_image=_image(2), ip_scale=0.7), ref, atol=0, rtol=0)
    engine.unload_ip_adapter()


def test_decoupled_attention_equals_hand_computation(engine):
    adapter = engine.load_ip_adapter(build_tiny_ip_adapter(engine, plus=False))
    name = "up_blocks.2.attentions.1.transformer_blocks.0.attn2"
    index = next(i for i, n in adapter.layer_names.items() if n == name)
    proc, attn, ip = engine.processors[name], engine.unet.get_submodule(name), adapter.layers[index]
    g = torch.Generator().manual_seed(0)
    x, text, tokens = torch.randn(2, 16, 80, generator=g), torch.randn(2, 77, 64, generator=g), torch.randn(2, 4, 64)

    def heads(t):
        return t.view(2, -1, attn.heads, 80 // attn.heads).transpose(1, 2)

    q = heads(attn.to_q(x))
    text_out = F.scaled_dot_product_attention(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
    img_out = F.scaled_dot_product_attention(q, heads(ip.to_k_ip(tokens)), heads(ip.to_v_ip(tokens)))
    want = attn.to_out[0]((text_out + 0.35 * img_out).transpose(1, 2).reshape(2, 16, 80))
    with torch.no_grad():
        got = proc(attn, x, encoder_hidden_states=text, ip_tokens=tokens, ip_scale=0.35)
        text_only = proc(attn, x, encoder_hidden_states=text, ip_tokens=tokens, ip_scale=0.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_only, attn.to_out[0](text_out.transpose(1, 2).reshape(2, 16, 80)))
    engine.unload_ip_adapter()


def test_triton_backend_matches_torch(engine):
    """The image branch runs through the fused kernel (interpreted on CPU) and agrees with SDPA."""
    triton = Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="triton", progress=False))
    outs = []
    for e in (engine, triton):
        e.load_ip_adapter(build_tiny_ip_adapter(e, plus=True))
        outs.append(e.text2img("a cat", steps=1, seed=0, output_type="latent", ip_image=_image(0), ip_scale=1.0))
    engine.unload_ip_adapter()
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


def test_invalid_inputs_name_the_field(engine, tmp_path):
    engine.unload_ip_adapter()
    with pytest.raises(ValueError, match="ip_image: no IP-Adapter is loaded"):
        _gen(engine, ip_image=_image(0))
    engine.load_ip_adapter(build_tiny_ip_adapter(engine, plus=False))
    with pytest.raises(ValueError, match="ip_scale"):
        _gen(engine, ip_image=_image(0), ip_scale=-0.1)
    with pytest.raises(ValueError, match="ip_image: give one image"):
        _gen(engine, ["a", "b", "c"], ip_image=[_image(0), _image(1)])
    with pytest.raises(ValueError, match="ip_image: file"):
        _gen(engine, ip_image=str(tmp_path / "missing.png"))
    weights, enc = save_tiny_ip_adapter(engine, tmp_path, plus=False)
    with pytest.raises(ValueError, match="image_encoder"):
        engine.load_ip_adapter(weights)
    with pytest.raises(ValueError, match="image_encoder"):
        engine.load_ip_adapter(weights, tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist"):
        engine.load_ip_adapter(tmp_path / "nope.bin", enc)
    sd = read_ip_adapter_file(weights)
    sd["ip_adapter"].pop("19.to_v_ip.weight")
    with pytest.raises(ValueError, match="ip_adapter: weights do not fit"):
        engine.load_ip_adapter(sd, enc)
    engine.unload_ip_adapter()


@pytest.fixture(scope="module")
def tiny_files(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("ipa")
    weights, enc = save_tiny_ip_adapter(engine, root, plus=True, fmt="bin")
    ref = root / "ref.png"
    Image.fromarray((_image(4).permute(1, 2, 0).numpy() * 255).astype("uint8")).save(ref)
    return weights, enc, ref


def test_cli_generate_with_image_prompt(tiny_files, tmp_path):
    weights, enc, ref = tiny_files
    out = tmp_path / "ip.png"
    assert main(["generate", "--prompt", "a cat", "--steps", "2", "--seed", "1", "--out", str(out), "--no-progress",
                 "--ip-adapter", str(weights), "--image-encoder", str(enc), "--image", str(ref),
                 "--ip-scale", "0.5"]) == 0
    img = Image.open(out)
    assert img.size == (64, 64) and img.text["ip_scale"] == "0.5"


@pytest.mark.parametrize("args, needle", [
    (["--image", "REF"], "--image needs --ip-adapter"),
    (["--ip-adapter", "W", "--image", "REF"], "--image-encoder is required"),
    (["--ip-adapter", "/nope.bin", "--image-encoder", "ENC", "--image", "REF"], "--ip-adapter: file"),
    (["--ip-adapter", "W", "--image-encoder", "/nope", "--image", "REF"], "--image-encoder: folder"),
    (["--ip-adapter", "W", "--image-encoder", "ENC", "--image", "/nope.png"], "--image: file"),
    (["--ip-adapter", "W", "--image-encoder", "ENC", "--image", "REF", "--ip-scale", "-1"], "--ip-scale"),
])
def test_cli_ip_errors_are_one_line(tiny_files, tmp_path, capsys, args, needle):
    weights, enc, ref = tiny_files
    subst = {"W": str(weights), "ENC": str(enc), "REF": str(ref)}
    args = [subst.get(a, a) for a in args]
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["generate", "--prompt", "a cat", "--no-progress", "--out", str(tmp_path / "x.png"),
                               *args]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and needle in err
    assert len(err.splitlines()) == 1 or err.startswith("usage:")  # ours: one line; argparse: usage + error
    assert not (tmp_path / "x.png").exists()
