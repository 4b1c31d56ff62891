"""Per-request adapters (engine/adapters.py): LoRAs and learned tokens named by each request, applied to its own
rows in shared UNet calls. Every image is compared with the same adapter loaded engine-wide by ``load_lora`` /
``load_textual_inversion`` (which tests/test_lora.py compares with diffusers' ``load_lora_weights``), in merged
scheduler calls beside requests with other adapters and with none; then the registry, the pool's budget and
eviction, bad names and hostile files, unregistering while in use, threads, HTTP and the CLI."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.adapters import MAX_PER_REQUEST, AdapterRegistry
from dreamfuse.engine.server import StepScheduler
from dreamfuse.engine.tiny_adapters import build_tiny_lora
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

CONFIG = dict(device="cpu", backend="torch", progress=False)
STEPS = 2
SIZE = 64


@pytest.fixture(autouse=True)
def _reference_op(monkeypatch):
    """The op's PyTorch reference on CPU (the Triton interpreter runs the model path in test_kernel_path only: it is
    a correctness tool, minutes for a whole model)."""
    monkeypatch.setenv("DREAMFUSE_DISABLE_KERNELS", "1")


@pytest.fixture(scope="module")
def sd():
    return Engine.from_pretrained("tiny", EngineConfig(**CONFIG))


@pytest.fixture(scope="module")
def xl():
    return Engine.from_pretrained("tiny-xl", EngineConfig(**CONFIG))


def custom_lora(engine, path, layers, *, rank=4, seed=0, kohya_alphas=None):
    """A diffusers-format LoRA on exactly ``layers`` (``(component, module path)``; Linear or Conv2d)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for comp, name in layers:
        m = getattr(engine, comp).get_submodule(name)
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            a = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) / fan_in**0.5
            b = torch.randn(m.out_channels, rank, 1, 1, generator=g) * 0.5
        else:
            a = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
            b = torch.randn(m.out_features, rank, generator=g) * 0.5
        te = comp != "unet" and not hasattr(getattr(engine, comp), "text_model")
        key = f"{comp}.{'text_model.' if te else ''}{name}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    save_file(tensors, str(path))
    return path


def odd_kohya(engine, src, path):
    """A kohya file with per-layer alphas and two ranks: peft then needs rank and alpha patterns."""
    t = load_file(str(src))
    downs = sorted(k for k in t if k.endswith(".lora_down.weight"))
    for i, k in enumerate(downs):
        stem = k.removesuffix(".lora_down.weight")
        if i % 3 == 0:
            t[f"{stem}.alpha"] = torch.tensor(1.0)
        if i % 5 == 1:
            d, u = t[k], t[f"{stem}.lora_up.weight"]
            t[k] = torch.cat([d, d * 0.5])
            t[f"{stem}.lora_up.weight"] = torch.cat([u, -u * 0.25], dim=1)
    save_file(t, str(path))
    return path


@pytest.fixture(scope="module")
def folder(sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    build_tiny_lora(sd, d / "subject.safetensors", seed=1)
    build_tiny_lora(sd, d / "style.safetensors", seed=2, rank=8, format="kohya")
    build_tiny_lora(sd, d / "unet-only.safetensors", seed=3, text_encoder=False)
    te = "text_model.encoder.layers.0" if hasattr(sd.text_encoder, "text_model") else "encoder.layers.0"
    custom_lora(sd, d / "convs.safetensors", [
        ("unet", "down_blocks.0.resnets.0.conv1"), ("unet", "down_blocks.0.attentions.0.proj_in"),
        ("unet", "up_blocks.3.attentions.0.transformer_blocks.0.ff.net.0.proj"),
        ("unet", "down_blocks.1.resnets.0.time_emb_proj"), ("unet", "mid_block.resnets.0.conv2"),
        ("text_encoder", f"{te}.self_attn.q_proj"), ("text_encoder", f"{te}.mlp.fc1")], seed=4)
    # (a text-encoder part of MLP layers alone is one diffusers cannot read in this format: its key conversion
    # recognizes the file by an attention projection)
    odd_kohya(sd, build_tiny_lora(sd, d / "k.safetensors", seed=5, format="kohya"), d / "odd.safetensors")
    (d / "k.safetensors").unlink()
    dim = sd.text_encoder.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(6)
    torch.save({"<cat-toy>": torch.randn(dim, generator=g)}, d / "cat-toy.bin")
    torch.save({"<trio>": torch.randn(3, dim, generator=g)}, d / "trio.bin")
    return d


@pytest.fixture(scope="module")
def xl_folder(xl, tmp_path_factory):
    d = tmp_path_factory.mktemp("xl-adapters")
    build_tiny_lora(xl, d / "xa.safetensors", seed=1)
    build_tiny_lora(xl, d / "xb.safetensors", seed=2, rank=8, format="kohya")
    return d


@pytest.fixture(scope="module")
def reg(sd, folder):
    sd.adapters.set_folder(folder)
    return sd.adapters


def run(engine, prompts=("a photo of a cat",), **kw):
    return engine.text2img(list(prompts), steps=STEPS, seed=[3, 4][: len(prompts)], output_type="latent", **kw)


def engine_wide(engine, folder, loras, fn):
    """``fn()`` with ``loras`` (``(name, scale)``) loaded engine-wide, then unloaded."""
    for name, scale in loras:
        engine.load_lora(Path(folder) / f"{name}.safetensors", scale=scale, name=name)
    try:
        return fn()
    finally:
        engine.unload_lora()


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), np.int16)


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", ["subject", "style", "odd"])
def test_scalings_are_pefts(sd, reg, folder, name):
    """The per-layer scaling the pool folds in is the one peft computes for the same file (kohya alphas, rank and
    alpha patterns included)."""
    from dreamfuse.engine.lora import layer_scalings, read_lora

    sd_, alphas, meta, fits = read_lora(sd, folder / f"{name}.safetensors")
    ours = {(c, n): s for c, layers in fits.items()
            for n, s in layer_scalings(sd, c, sd_, alphas, meta, layers).items()}
    sd.load_lora(folder / f"{name}.safetensors", name="x")
    try:
        for (comp, layer), (scaling, r) in ours.items():
            peft_layer = getattr(sd, comp).get_submodule(layer)
            (adapter,) = peft_layer.scaling
            assert peft_layer.r[adapter] == r
            assert scaling == pytest.approx(peft_layer.scaling[adapter], rel=1e-12), (comp, layer)
        if name == "odd":
            assert len({s for s, _ in ours.values()}) > 1  # the patterns did something
    finally:
        sd.unload_lora()


def test_per_request_equals_engine_wide(sd, reg, folder):
    """One LoRA, two at once, kohya alphas and patterns, conv/MLP/time-embedding layers, and per-request on top of
    an engine-wide LoRA: the latents of load_lora at the same scales."""
    base = run(sd)
    for loras in ([("subject", 0.8)], [("style", 0.5), ("convs", 1.0), ("odd", 0.7)]):
        ref = engine_wide(sd, folder, loras, lambda: run(sd))
        got = run(sd, loras=loras)
        assert (ref - base).abs().mean() > 1e-2, loras  # the adapter does something
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=str(loras))
    both = engine_wide(sd, folder, [("subject", 0.8), ("style", 0.5)], lambda: run(sd))
    sd.load_lora(folder / "subject.safetensors", scale=0.8)  # engine-wide plus per-request: they add up
    try:
        torch.testing.assert_close(run(sd, loras=[("style", 0.5)]), both, atol=1e-4, rtol=1e-4)
    finally:
        sd.unload_lora()
    assert torch.equal(run(sd), base)  # the shared model is untouched


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_merged_call_equals_solo_generations(request, model):
    """Requests with different LoRAs (one with two) and one with none share UNet calls of the step scheduler: DDIM
    requests as sampling loops of one persistent batch (engine/server/loops.py), and on SD 1.x an Euler request
    stepped call by call riding in the same calls as a guest. Each image equals its solo generation with its LoRAs
    loaded engine-wide (1/255), the plain one plain text2img."""
    engine = request.getfixturevalue("sd" if model == "tiny" else "xl")
    d = request.getfixturevalue("folder" if model == "tiny" else "xl_folder")
    a, b = ("subject", "style") if model == "tiny" else ("xa", "xb")
    engine.adapters.set_folder(d)
    specs = [([(a, 0.8)], "ddim"), (None, "ddim"), ([(a, 0.4), (b, 1.0)], "ddim"), ([(b, 0.5)], "ddim")]
    if model == "tiny":
        specs.append(([(b, 0.7)], "euler"))  # not a loop: its calls ride in the loop group's (takes_guests)
    calls = []
    real = engine.unet_call

    def spy(latents, t, *args, **kw):
        calls.append(kw.get("adapters"))
        return real(latents, t, *args, **kw)

    sched = StepScheduler(engine, max_batch_rows=16)
    engine.unet_call = spy
    try:
        with engine.model_lock.changing("test: hold admission until every request is queued"):
            jobs = [sched.submit("text2img", prompt=f"a photo of a cat {i}", steps=2, seed=20 + i, height=SIZE,
                                 width=SIZE, loras=s, sampler=sampler) for i, (s, sampler) in enumerate(specs)]
        for j in jobs:
            assert j.wait(300) and j.state == "done", (j.state, j.error)
    finally:
        engine.unet_call = real
        sched.shutdown(0)
    mixed = [c for c in calls if c is not None and not hasattr(c, "loras")]
    assert mixed and max(len({id(x) for x in c}) for c in mixed) == len(specs)  # every request in one call
    for i, (j, (s, sampler)) in enumerate(zip(jobs, specs)):
        solo = engine_wide(engine, d, s or [], lambda i=i, sampler=sampler: engine.text2img(
            [f"a photo of a cat {i}"], steps=2, seed=20 + i, height=SIZE, width=SIZE, sampler=sampler))[0]
        assert np.abs(pixels(j.images[0]) - pixels(solo)).max() <= 1, (i, s, sampler)


def test_learned_tokens_per_request(sd, reg, folder):
    """A request's learned tokens (one and three vectors) give what load_textual_inversion gives; other requests read
    the token as plain text; the shared tokenizer is untouched."""
    prompts = ("a <trio> next to a <cat-toy>",)
    vocab = len(sd.tokenizer)
    plain = run(sd, prompts)
    got = run(sd, prompts, learned_tokens=["cat-toy", "trio"])
    assert len(sd.tokenizer) == vocab and not sd.learned_tokens
    torch.testing.assert_close(run(sd, prompts), plain)
    other = Engine.from_pretrained("tiny", EngineConfig(**CONFIG))  # the same weights; tokens loaded engine-wide
    other.load_textual_inversion(folder / "cat-toy.bin")
    other.load_textual_inversion(folder / "trio.bin")
    torch.testing.assert_close(got, run(other, prompts), atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().mean() > 1e-2


def test_other_pipelines(sd, reg, folder):
    """img2img, inpainting and compose with a per-request LoRA give the engine-wide LoRA's result."""
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(SIZE, SIZE)
    mask[16:48, 16:48] = 1
    layout = np.zeros((SIZE, SIZE, 3), np.uint8)
    layout[:, :32] = (255, 0, 0)
    layout[:, 32:] = (0, 0, 255)
    lat = dict(steps=STEPS, seed=5, output_type="latent")

    def all_of(**kw):
        return [sd.img2img("a cat", image, strength=0.7, **lat, **kw),
                sd.inpaint("a cat", image, mask, **lat, **kw),
                sd.compose(layout, {"#ff0000": "a sks dog", "#0000ff": "a cat"}, prompt="a sks dog and a cat",
                           **lat, **kw)]

    loras = [("subject", 0.9)]
    ref = engine_wide(sd, folder, loras, all_of)
    got = all_of(loras=loras)
    for name, r, g in zip(("img2img", "inpaint", "compose"), ref, got):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=name)


def test_gradients_flow_through_per_request_loras(sd, reg, folder):
    """A UNet call with gradients (personalize's guidance) takes the op's differentiable reference: the gradient with
    respect to the input is the engine-wide LoRA's; the LoRA weights get none."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = sd.encode_text(["a cat", "a dog"], reg.request(["convs"]))[0]

    def grad(**kw):
        xi = x.clone().requires_grad_(True)
        sd.unet_call(xi, torch.tensor([700, 300]), emb, **kw).square().sum().backward()
        return xi.grad

    ref = engine_wide(sd, folder, [("convs", 1.0), ("style", 0.5)], grad)
    torch.testing.assert_close(grad(adapters=reg.request([("convs", 1.0), ("style", 0.5)])), ref, atol=1e-4,
                               rtol=1e-4)
    assert not torch.allclose(grad(), ref, atol=1e-3)


def test_personalize_with_a_per_request_lora(sd, reg, folder):
    """Personalize (the reference's inversion, AMA, a guided step's backward) with a per-request LoRA: the engine-wide
    LoRA's result; the inversion cache keeps the two apart."""
    reference = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))

    def go(**kw):
        return sd.personalize("a photo of a sks dog", reference, subject_token="sks", ama_start=1, lambda_g=50.0,
                              steps=3, seed=5, output_type="latent", **kw)

    plain = go()
    ref = engine_wide(sd, folder, [("subject", 0.9)], go)
    torch.testing.assert_close(go(loras=[("subject", 0.9)]), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(go(), plain)
    assert all(p.grad is None for p in sd.unet.parameters())


def test_kernel_path(sd, reg, folder, monkeypatch, tmp_path):
    """The hooks call dreamfuse::lora_delta: under TRITON_INTERPRET=1 the Triton kernels run; a mixed call (rows with
    two adapters, one, none) matches the reference path."""
    monkeypatch.delenv("DREAMFUSE_DISABLE_KERNELS")
    from dreamfuse.kernels._common import interpreting

    if not interpreting():
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET=0)")
    few = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.proj_out",
           "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"]
    for i in range(2):
        custom_lora(sd, tmp_path / f"few{i}.safetensors", [("unet", n) for n in few], seed=10 + i, rank=4 + 4 * i)
        reg.register(tmp_path / f"few{i}.safetensors", f"few{i}", replace=True)
    rows = (reg.request([("few0", 1.0), ("few1", 0.5)]),) * 2 + (None, reg.request(["few1"]))
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = sd.encode_prompts(["a", "b", "c", "d"])
    t = torch.tensor([900, 900, 500, 20])
    kernel = sd.unet_call(x, t, emb, adapters=rows)
    monkeypatch.setenv("DREAMFUSE_DISABLE_KERNELS", "1")
    torch.testing.assert_close(kernel, sd.unet_call(x, t, emb, adapters=rows), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(kernel, sd.unet_call(x, t, emb), atol=1e-3)


def test_caches_key_on_adapters(sd, reg):
    plain = sd.encode_prompts(["a photo of a cat"])
    te = reg.request([("subject", 1.0)])
    with_te = sd.encode_text(["a photo of a cat"], te)[0]
    assert (with_te - plain).abs().mean() > 1e-3
    assert torch.equal(sd.encode_prompts(["a photo of a cat"]), plain)
    unet_only = reg.request([("unet-only", 1.0)])
    assert unet_only.text_key is None and torch.equal(sd.encode_text(["a photo of a cat"], unet_only)[0], plain)
    assert te.text_key != reg.request([("subject", 0.5)]).text_key


# ------------------------------------------------------------------------------------------- the registry
def test_registry_list_bytes_and_names(sd, reg, folder):
    listed = {d["name"]: d for d in reg.list()}
    assert {"subject", "style", "convs", "cat-toy", "trio"} <= set(listed)
    assert listed["style"]["kind"] == "lora" and listed["style"]["rank"] == 8
    assert listed["trio"]["kind"] == "token"
    assert all(str(folder) not in str(d) for d in listed.values())  # no server path leaks
    name = reg.register((folder / "unet-only.safetensors").read_bytes(), "from-bytes")
    tok = reg.register((folder / "cat-toy.bin").read_bytes(), "tok-bytes")
    info = reg.info(name)
    assert info["kind"] == "lora" and info["loaded"] and info["memory_bytes"] > 0
    assert reg.info(tok)["token"] == "<cat-toy>"
    with pytest.raises(ValueError, match="^name: an adapter named 'from-bytes' is registered"):
        reg.register(b"x", "from-bytes")
    torch.testing.assert_close(run(sd, loras=["from-bytes"]), run(sd, loras=["unet-only"]))
    reg.unregister(name)
    reg.unregister(tok)
    with pytest.raises(ValueError, match="^loras: no adapter named 'from-bytes'"):
        run(sd, loras=["from-bytes"])
    assert reg.pool_info()["bytes"] <= reg.pool_info()["budget_bytes"]


def bad_cases(sd, xl, folder, tmp):
    """(request kwargs, the message's start, a piece of it)."""
    from safetensors.torch import save_file

    good = load_file(str(folder / "subject.safetensors"))
    (tmp / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    data = (folder / "subject.safetensors").read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_file({k: v * float("nan") for k, v in good.items()}, str(tmp / "nan.safetensors"))
    build_tiny_lora(xl, tmp / "for-sdxl.safetensors")
    save_file({k: v for k, v in list(sd.unet.state_dict().items())[:4]}, str(tmp / "weights.safetensors"))
    torch.save({"<x>": torch.zeros(7)}, tmp / "wrong-dim.bin")
    torch.save({"<y>": torch.full((768 if False else sd.text_encoder.get_input_embeddings().weight.shape[1],),
                                  1e9)}, tmp / "huge.bin")
    torch.save({"<dreamfuse-slot-0>": torch.zeros(sd.text_encoder.get_input_embeddings().weight.shape[1])},
               tmp / "slot.bin")
    (tmp / "evil.bin").write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." )  # a code-running pickle
    (tmp / "both.safetensors").write_bytes(data)
    (tmp / "both.bin").write_bytes(b"x")
    outside = tmp.parent / f"{tmp.name}-outside.safetensors"
    outside.write_bytes(data)
    (tmp / "escape.safetensors").symlink_to(outside)
    os.mkfifo(tmp / "fifo.safetensors")
    return [
        (dict(loras=["nope"]), "loras: no adapter named 'nope'", "registered:"),
        (dict(loras=["../subject"]), "loras: adapter names are plain file stems", "'../subject'"),
        (dict(loras=["/etc/passwd"]), "loras: adapter names are plain file stems", "passwd"),
        (dict(loras=["a/b"]), "loras: adapter names", "a/b"),
        (dict(loras=[".."]), "loras: adapter names", ".."),
        (dict(loras=[".hidden"]), "loras: adapter names", "hidden"),
        (dict(loras=[("subject", -1.0)]), "loras.scale", "scale"),
        (dict(loras=[("subject", float("nan"))]), "loras.scale", "scale"),
        (dict(loras=[("subject", 1.0), ("subject", 0.5)]), "loras: 'subject' named twice", ""),
        (dict(loras=[f"n{i}" for i in range(MAX_PER_REQUEST + 1)]), "loras: 9 LoRAs", "at most"),
        (dict(loras=[{"name": "subject", "weight": 1}]), "loras: an object with 'name'", "weight"),
        (dict(loras=5), "loras: a list", "int"),
        (dict(loras=["cat-toy"]), "loras: adapter 'cat-toy' is a learned token", "learned_tokens"),
        (dict(learned_tokens=["subject"]), "learned_tokens: adapter 'subject' is a LoRA", "loras"),
        (dict(loras=["garbage"]), "loras: adapter 'garbage' is not a safetensors file", ""),
        (dict(loras=["truncated"]), "loras: adapter 'truncated' is truncated", ""),
        (dict(loras=["nan"]), "loras: adapter 'nan' holds broken LoRA weights", "NaN"),
        (dict(loras=["for-sdxl"]), "loras: adapter 'for-sdxl': none of its layers fits", "SDXL"),
        (dict(loras=["weights"]), "loras: adapter 'weights' is not a LoRA file", ""),
        (dict(learned_tokens=["wrong-dim"]), "learned_tokens: adapter 'wrong-dim'", "hidden size"),
        (dict(learned_tokens=["huge"]), "learned_tokens: ", "norm"),
        (dict(learned_tokens=["evil"]), "learned_tokens: ", "cannot read"),
        (dict(learned_tokens=["slot"]), "learned_tokens: adapter 'slot'", "reserved"),
        (dict(loras=["both"]), "loras: adapter 'both' is ambiguous", "both.bin"),
        (dict(loras=["escape"]), "loras: adapter 'escape' links outside the adapters folder", ""),
        (dict(loras=["fifo"]), "loras: adapter 'fifo': not a regular file", ""),
    ]


def test_bad_requests_fail_alone_and_clearly(sd, xl, folder, tmp_path):
    """Names that could leave the folder, unknown names, hostile and broken files, files for another model: one
    ValueError naming the field and the adapter (never a server path, never a traceback from inside torch), before
    any weight is used; nothing changes for anyone else."""
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    registry = AdapterRegistry(sd, tmp_path / "..", 64)  # a second registry on the same engine, its own folder
    registry.set_folder(tmp_path)
    before = {d["name"]: d["loaded"] for d in sd.adapters.list()}
    for kwargs, start, piece in bad_cases(sd, xl, folder, tmp_path):
        with pytest.raises(ValueError) as e:
            registry.request(**kwargs)
        text = str(e.value)
        assert text.startswith(start) and piece in text and "\n" not in text, (kwargs, text)
        assert str(tmp_path) not in text, text
    assert not Path("pwned").exists()
    assert registry.request(loras=["subject"]) is not None  # the good ones still work
    assert {d["name"]: d["loaded"] for d in sd.adapters.list()} == before
    with pytest.raises(ValueError, match="^learned_tokens: .*SD 1.x/2.x"):
        AdapterRegistry(xl, folder).request(learned_tokens=["cat-toy"])


def test_a_bad_adapter_fails_only_its_request(sd, reg, folder, tmp_path):
    """In the scheduler: a request naming a missing adapter is refused at submit; an adapter whose file breaks after
    its request was accepted (evicted, then unreadable) fails that request alone, at its start; the requests
    beside it finish with their own images."""
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes((folder / "unet-only.safetensors").read_bytes())
    reg.register(victim, "victim", replace=True)
    sched = StepScheduler(sd, max_batch_rows=16)
    try:
        with pytest.raises(ValueError, match="^loras: no adapter named 'missing'"):
            sched.submit("text2img", prompt="x", steps=2, height=SIZE, width=SIZE, loras=["missing"])
        with sd.model_lock.changing("test: hold admission"):
            jobs = [sched.submit("text2img", prompt="a cat", steps=2, seed=1, height=SIZE, width=SIZE, loras=lo)
                    for lo in (["subject"], ["victim"], None)]
            entry = reg._entries["victim"]
            with reg._lock:
                reg._evict(entry)
            victim.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
        for j in jobs:
            j.wait(120)
        assert [j.state for j in jobs] == ["done", "failed", "done"], [j.error for j in jobs]
        assert "victim" in jobs[1].error and str(tmp_path) not in jobs[1].error
    finally:
        sched.shutdown(0)
        reg.unregister("victim")


def test_eviction_never_takes_a_held_adapter(sd, folder, monkeypatch):
    """A budget for about two adapters: loading more evicts the least recently used ones that nothing holds; a
    held adapter stays, past the budget if it must, and the pool comes back under it once released."""
    one = sd.adapters.info("style")["memory_bytes"]
    registry = AdapterRegistry(sd, folder, cache_mb=2.5 * one / 2**20)
    monkeypatch.setattr(sd, "_adapters", registry)
    held = registry.request(["style"])
    with held.held():
        for name in ("subject", "unet-only", "odd", "convs"):
            registry.request([name])
            assert registry.info("style")["loaded"]
            info = registry.pool_info()
            assert info["bytes"] <= info["budget_bytes"] or info["over_budget"]
        loaded = [d["name"] for d in registry.list() if d["loaded"]]
        assert "style" in loaded and len(loaded) < 5
        # four requests, each its own adapter, at once: all held, the pool goes past the budget and comes back
        ref = {n: engine_wide(sd, folder, [(n, 1.0)], lambda: run(sd, ("a cat",))) for n in ("subject", "odd")}
        out = {}
        threads = [threading.Thread(target=lambda n=n: out.__setitem__(n, run(sd, ("a cat",), loras=[n])))
                   for n in ("subject", "odd")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in ref:
            torch.testing.assert_close(out[n], ref[n], atol=1e-4, rtol=1e-4)
    assert registry.pool_info()["held"] == 0
    registry.request(["unet-only"])
    assert registry.pool_info()["bytes"] <= registry.pool_info()["budget_bytes"]
    assert not registry.over_budget


def test_unregister_while_in_use(sd, folder, monkeypatch, tmp_path):
    """A running request keeps the adapter it started with; new requests naming it fail; one accepted before the
    unregister but not started fails at its start; the weights leave the pool when the last user ends."""
    from dreamfuse.engine.pipelines.program import drive
    from dreamfuse.engine.pipelines.stepping import SamplingLoop
    from dreamfuse.engine.pipelines.text2img import text2img_program

    def step_alone(engine, call):
        out = call.run(engine)
        return out if call.update is None else call.update.apply(out)

    registry = AdapterRegistry(sd, None)
    monkeypatch.setattr(sd, "_adapters", registry)
    registry.register(folder / "subject.safetensors", "s")
    solo = run(sd, ("a cat",), loras=["s"])
    running = text2img_program(sd, ["a cat"], steps=STEPS, seed=3, output_type="latent", loras=["s"])
    accepted = text2img_program(sd, ["a cat"], steps=STEPS, seed=3, output_type="latent", loras=["s"])
    request = next(running)  # started: holds "s"
    registry.unregister("s")
    with pytest.raises(ValueError, match="^loras: no adapter named 's'"):
        run(sd, ("a cat",), loras=["s"])
    assert registry.pool_info()["loaded"] == 1  # still held
    try:
        while True:  # DDIM: the program hands over its loop (run alone here, as drive does)
            request = running.send(request.run(sd) if isinstance(request, SamplingLoop)
                                   else step_alone(sd, request))
    except StopIteration as stop:
        torch.testing.assert_close(stop.value, solo)
    assert registry.pool_info()["loaded"] == 0
    with pytest.raises(ValueError, match="^loras: adapter 's' was unregistered"):
        drive(sd, accepted)


def test_threads_with_different_adapters(sd, reg, folder):
    """Calls in different threads bind their own adapters: three threads, two rounds each, each result its own."""
    specs = {"a": [("subject", 1.0)], "b": [("convs", 1.0), ("style", 0.7)], "c": None}
    ref = {k: engine_wide(sd, folder, v or [], lambda: run(sd, ("a cat",))) for k, v in specs.items()}
    out, errors = {}, []

    def work(k):
        try:
            for r in range(2):
                out[k, r] = run(sd, ("a cat",), loras=specs[k])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (k, _), v in out.items():
        torch.testing.assert_close(v, ref[k], atol=1e-4, rtol=1e-4, msg=k)


def test_exported_backends_refuse(sd, reg, monkeypatch):
    monkeypatch.setattr(sd, "unet_backend", "onnxruntime")
    with pytest.raises(ValueError, match="^loras: per-request adapters need the PyTorch UNet"):
        run(sd, loras=["subject"])


# ------------------------------------------------------------------------------------------- HTTP, CLI
def test_http_routes(sd, reg, folder):
    """GET /v1/adapters lists them; the OpenAI route takes ``loras`` through extra_body and answers the engine-wide
    LoRA's image; a bad adapter is OpenAI's 400 with ``param`` naming the field, or the native routes' 422."""
    import base64

    import httpx
    from dreamfuse.engine.server.http import create_app
    from server_helpers import png_b64, serve

    openai = pytest.importorskip("openai")
    sched = StepScheduler(sd, max_batch_rows=8)
    try:
        with serve(create_app(sched, model_name="tiny"), lifespan="off") as url:
            listed = httpx.get(f"{url}/v1/adapters").json()
            kinds = {d["name"]: d["kind"] for d in listed["data"]}
            assert kinds["subject"] == "lora" and kinds["trio"] == "token" and listed["pool"]["budget_bytes"] > 0
            assert str(folder) not in str(listed)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
            got = client.images.generate(prompt="a <cat-toy>", size=f"{SIZE}x{SIZE}", extra_body={
                "steps": STEPS, "seed": 3, "loras": [{"name": "subject", "scale": 0.8}],
                "learned_tokens": ["cat-toy"]})
            from PIL import Image

            image = Image.open(__import__("io").BytesIO(base64.b64decode(got.data[0].b64_json)))
            solo = engine_wide(sd, folder, [("subject", 0.8)], lambda: sd.text2img(
                "a <cat-toy>", steps=STEPS, seed=3, height=SIZE, width=SIZE, learned_tokens=["cat-toy"]))[0]
            assert np.abs(pixels(image) - pixels(solo)).max() <= 1
            for body, param, needle in (({"loras": [{"name": "nope"}]}, "loras", "nope"),
                                        ({"loras": [{"name": "../subject"}]}, "loras", "pattern"),
                                        ({"learned_tokens": ["subject"]}, "learned_tokens", "is a LoRA"),
                                        ({"loras": [{"name": "subject", "path": "/etc/passwd"}]}, "loras",
                                         "Unknown parameter: 'loras[0].path'")):
                with pytest.raises(openai.BadRequestError) as e:
                    client.images.generate(prompt="x", extra_body={"steps": 1, **body})
                assert e.value.param == param and needle in str(e.value), str(e.value)
            ref = png_b64(Image.new("RGB", (SIZE, SIZE), (200, 30, 30)))
            r = httpx.post(f"{url}/v1/images/personalize", timeout=60, json={
                "prompt": "a sks dog", "reference_image": ref, "subject_token": "sks", "steps": 1,
                "learned_tokens": ["nope"]})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "learned_tokens"], r.text
    finally:
        sched.shutdown(0)


def test_cli_adapter_by_name_or_path(folder, tmp_path):
    """``--adapters DIR --adapter NAME[:SCALE]`` (and a path) give what ``--lora`` / ``--textual-inversion`` give."""
    from dreamfuse.engine.cli import main
    from PIL import Image

    common = ["generate", "--model", "tiny", "--prompt", "a <cat-toy>", "--steps", "1", "--seed", "3",
              "--no-progress"]
    assert main([*common, "--adapters", str(folder), "--adapter", "subject:0.8", "--adapter", "cat-toy",
                 "--adapter", str(folder / "unet-only.safetensors"), "--out", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--lora", f"{folder / 'subject.safetensors'}:0.8", "--lora",
                 str(folder / "unet-only.safetensors"), "--textual-inversion", str(folder / "cat-toy.bin"),
                 "--out", str(tmp_path / "b.png")]) == 0
    a, b = (pixels(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert np.abs(a - b).max() <= 1


def test_cli_bad_adapter_is_one_line(folder, tmp_path, capsys):
    """A bad ``--adapter`` is one line, exit 2, before the model loads."""
    from dreamfuse.engine.cli import main

    common = ["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "1", "--no-progress"]
    for args, needle in ((["--adapter", "nope"], "--adapters DIR"),
                         (["--adapters", str(folder), "--adapter", "../subject"], "no adapter in"),
                         (["--adapters", str(tmp_path / "missing"), "--adapter", "x"], "does not exist")):
        capsys.readouterr()
        assert main([*common, *args, "--out", str(tmp_path / "c.png")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err


def test_no_registry_no_hooks():
    """An engine without a registry answers a request naming an adapter with the usual error, without making the
    registry (which hooks every layer); a bad name is still a bad name."""
    from types import SimpleNamespace

    from dreamfuse.engine.adapters import request_adapters

    engine = SimpleNamespace(_adapters=None)
    assert request_adapters(engine, None, []) is None
    with pytest.raises(ValueError, match="^loras: no adapter named 'dog' \\(no adapters are registered"):
        request_adapters(engine, [("dog", 0.5)])
    with pytest.raises(ValueError, match="^learned_tokens: no adapter named 'cat'"):
        request_adapters(engine, None, ["cat"])
    with pytest.raises(ValueError, match="^loras: adapter names are plain file stems"):
        request_adapters(engine, ["../dog"])
    assert engine._adapters is None


def test_serve_options_make_the_registry(folder, tmp_path):
    """``dreamfuse serve --adapters DIR --adapter-cache-mb MB`` (the options the Ray replicas get too): the engine
    serves the folder under that budget; a missing folder is a CLI error before any model loads."""
    from dreamfuse.engine.cli import build_parser
    from dreamfuse.engine.cli.common import CLIError
    from dreamfuse.engine.cli.serve import check_serve_args, prepare_engine
    from dreamfuse.engine.server.ray_app import _MODEL_KEYS

    assert {"adapters", "adapter_cache_mb"} <= set(_MODEL_KEYS)
    argv = ["serve", "--model", "tiny", "--device", "cpu", "--adapters", str(folder), "--adapter-cache-mb", "5"]
    args = build_parser(argv).parse_args(argv)
    check_serve_args(args)
    engine = prepare_engine(args)
    assert engine.adapters.cache_bytes == 5 * 2**20 and "subject" in engine.adapters.names()
    bad = build_parser(argv).parse_args([*argv[:5], "--adapters", str(tmp_path / "missing")])
    with pytest.raises(CLIError, match="--adapters"):
        check_serve_args(bad)


def test_a_request_larger_than_a_tick_keeps_its_lora(sd, reg, folder):
    """A request with more rows than ``max_batch_rows`` (its loop stepped call by call, in pieces of one row): the
    pieces keep the request's LoRA; the image is the engine-wide LoRA's."""
    sched = StepScheduler(sd, max_batch_rows=1)
    try:
        job = sched.submit("text2img", prompt="a cat", steps=2, seed=9, height=SIZE, width=SIZE,
                           loras=[("style", 0.6)])
        assert job.wait(300) and job.state == "done", (job.state, job.error)
    finally:
        sched.shutdown(0)
    solo = engine_wide(sd, folder, [("style", 0.6)], lambda: sd.text2img("a cat", steps=2, seed=9, height=SIZE,
                                                                         width=SIZE))[0]
    assert np.abs(pixels(job.images[0]) - pixels(solo)).max() <= 1
