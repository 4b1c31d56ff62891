"""ONNX export and the onnxruntime UNet backend, verified by onnxruntime on CPU against PyTorch.

One tiny export (UNet with the tiny IP-Adapter-Plus baked in, the personalize graph, text encoder, VAE decoder;
dynamic batch 1-8 and 64-128 px) is shared by the whole module, and one tiny-xl export (UNet, both text encoders,
VAE decoder). Tolerances: the graphs compute what PyTorch computes in fp32 with other kernels; the measured
differences are ~2e-6 on outputs of magnitude ~1, so 1e-4 leaves a wide margin while any wrong input (a swapped
timestep row, a dropped IP token, a missing AMA mask) moves outputs by > 1e-2.
"""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dreamfuse.engine.cli import main
from dreamfuse.export.manifest import MANIFEST, weights_hash
from dreamfuse.export.runtime import OnnxRuntimeUNet
from export_models import shared_export, tiny_engine, two_threads  # noqa: F401 (autouse fixture)

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_export(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def backend(tiny):
    return OnnxRuntimeUNet(tiny[1], threads=2)


@pytest.fixture
def torch_unet(tiny):
    """The engine on its PyTorch UNet during the test (and back to it after)."""
    engine = tiny[0]
    engine.set_unet_backend("torch")
    yield engine
    engine.set_unet_backend("torch")


def session(folder, graph):
    return ort.InferenceSession(str(folder / f"{graph}.onnx"), providers=["CPUExecutionProvider"])


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- graphs
def test_manifest_describes_the_export(tiny):
    engine, folder, manifest = tiny
    on_disk = json.loads((folder / MANIFEST).read_text())
    assert on_disk["model"]["hash"] == weights_hash(engine.unet) == manifest["model"]["hash"]
    assert on_disk["profile"] == {"batch": [1, 8], "latent_height": [8, 16], "latent_width": [8, 16],
                                  "static": False}
    assert set(on_disk["graphs"]) == {"unet", "unet_personalize", "text_encoder", "vae_decoder"}
    assert on_disk["ip_adapter"]["tokens"] == 16 and on_disk["dtype"] == "float32" and on_disk["opset"] == 18
    model = onnx.load(str(folder / "unet.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states", "ip_tokens",
                                                   "ip_scale"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 4 and all(isinstance(d, str) for d in dims[2:])  # dynamic B, h, w
    assert not any(n.domain for n in model.graph.node)  # standard ops only: no dreamfuse:: node survives


@pytest.mark.parametrize("rows, h, w", [(1, 8, 8), (3, 16, 8), (8, 16, 16)])
def test_unet_graph_dynamic_batch_size_and_per_row_timesteps(tiny, torch_unet, rows, h, w):
    engine, folder, _ = tiny
    sess = session(folder, "unet")
    x, e = rand(rows, 4, h, w, seed=rows), rand(rows, 77, 64, seed=h)
    t = torch.linspace(981, 1, rows)  # a different timestep on every row
    tokens = rand(rows, 16, 64, seed=w)
    for scale, ip in ((0.0, None), (0.7, tokens)):
        cak = {} if ip is None else {"ip_tokens": ip, "ip_scale": scale}
        with torch.no_grad():
            ref = engine.unet(x, t, encoder_hidden_states=e, cross_attention_kwargs=cak or None, return_dict=False)[0]
        out = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": e.numpy(),
                              "ip_tokens": tokens.numpy(), "ip_scale": np.array([scale], np.float32)})[0]
        torch.testing.assert_close(torch.from_numpy(out), ref, **TOL)
    if rows > 1:  # per-row timesteps are per-row results: each row equals its own call (what a server relies on)
        with torch.no_grad():
            alone = torch.cat([engine.unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=e[i:i + 1],
                                           return_dict=False)[0] for i in range(rows)])
        out = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": e.numpy(),
                              "ip_tokens": tokens.numpy(), "ip_scale": np.zeros(1, np.float32)})[0]
        torch.testing.assert_close(torch.from_numpy(out), alone, **TOL)


def test_text_encoder_and_vae_decoder_graphs(tiny):
    engine, folder, _ = tiny
    ids = engine.tokenize(["a photo of a cat", "a dog"], padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids
    hidden = session(folder, "text_encoder").run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(hidden), engine.text_encoder(ids)[0], **TOL)
    for shape in ((1, 4, 8, 8), (3, 4, 16, 8)):
        lat = rand(*shape, seed=shape[0])
        img = session(folder, "vae_decoder").run(None, {"latents": lat.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(img), engine.decode(lat), **TOL)


def test_dreamfuse_op_translations_run_in_onnxruntime(tmp_path):
    """attention and ama_attention, alone, through both translations (opset 18 MatMul/Softmax, opset 23 Attention)
    against the kernels' fp32 references."""
    import dreamfuse.kernels  # noqa: F401 (registers the ops)
    from dreamfuse.export.onnx import _export_graph
    from dreamfuse.kernels.attention import ama_attention_reference, attention_reference

    class Ops(torch.nn.Module):
        def forward(self, q, k, v, v_ref, flow, mask):
            out, lse = torch.ops.dreamfuse.attention(q, k, v, 0.3)
            return out, lse, torch.ops.dreamfuse.ama_attention(q, k, v, v_ref, flow, mask, 0.3)[0]

    q, k, v, v_ref = (rand(3, 2, 20, 40, seed=i) for i in range(4))  # head dim 40, 20 keys: odd on purpose
    flow = torch.randint(0, 20, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(1))
    ref_out, ref_lse = attention_reference(q, k, v, scale=0.3, return_lse=True)
    ref_ama = ama_attention_reference(q, k, v, v_ref, flow, mask, scale=0.3)
    names = ["q", "k", "v", "v_ref", "flow", "mask"]
    for opset, op in ((18, "Softmax"), (23, "Attention")):
        path = tmp_path / f"ops{opset}.onnx"
        _export_graph(Ops(), (q, k, v, v_ref, flow, mask), None, names, ["out", "lse", "ama"], path, opset)
        assert op in {n.op_type for n in onnx.load(str(path)).graph.node}
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out, lse, ama = sess.run(None, dict(zip(names, (t.numpy() for t in (q, k, v, v_ref, flow, mask)))))
        for got, want in ((out, ref_out), (lse, ref_lse), (ama, ref_ama)):
            torch.testing.assert_close(torch.from_numpy(got), want, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------- the backend
def test_text2img_and_ip_adapter_through_onnxruntime_equal_torch(tiny, backend, torch_unet):
    engine = tiny[0]
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))
    runs = [dict(prompts=["a cat", "a red car"], height=64, width=128),  # CFG: 4 rows, mixed with the next one
            dict(prompts=["a dog"], ip_image=image, ip_scale=0.6, height=128, width=64),
            dict(prompts=["a dog"], guidance_scale=1.0, sampler="euler")]
    refs = [engine.text2img(r.pop("prompts"), steps=3, seed=7, output_type="pt", **r) for r in [dict(x) for x in runs]]
    engine.set_unet_backend(backend)
    assert engine.unet_backend == "onnxruntime"
    for run, ref in zip(runs, refs):
        out = engine.text2img(run.pop("prompts"), steps=3, seed=7, output_type="pt", **run)
        torch.testing.assert_close(out, ref, **TOL)
    assert (refs[1] - engine.text2img(["a dog"], steps=3, seed=7, output_type="pt", height=128,
                                      width=64)).abs().max() > 1e-2  # the image prompt mattered


def test_personalize_through_onnxruntime_equals_torch(tiny, backend, torch_unet):
    """DreamMatcher's AMA through unet_personalize.onnx: every step's UNet output (reference + target rows, AMA
    from step 1 on) and the final latents equal the PyTorch pipeline's; AMA changes the result far beyond that."""
    engine = tiny[0]
    reference = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))
    kw = dict(subject_token="sks", steps=4, seed=0, height=128, width=128, output_type="latent", ama_start=1,
              guidance_scale=7.0)
    prompts = ["a sks dog on the beach"]  # rows [ref_u, tgt_u, ref_c, tgt_c]
    ref_steps, ort_steps = [], []
    ref = engine.personalize(prompts, reference, callback=lambda d: ref_steps.append(d["eps"]), **kw)
    no_ama = engine.personalize(prompts, reference, **{**kw, "ama": False})
    engine.set_unet_backend(backend)
    out = engine.personalize(prompts, reference, callback=lambda d: ort_steps.append(d["eps"]), **kw)
    for a, b in zip(ort_steps, ref_steps):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(out, ref, **TOL)
    assert (ref - no_ama).abs().max() > 1e-2  # AMA did something, and the graph did the same
    with pytest.raises(ValueError, match="lambda_g"):  # the guidance gradient cannot go through the graph
        engine.personalize(prompts[:1], reference, **{**kw, "steps": 2, "lambda_g": 50.0})
    with pytest.raises(ValueError, match="ama_blocks"):
        engine.personalize(prompts[:1], reference, **{**kw, "steps": 2, "ama_blocks": [3]})
    with pytest.raises(ValueError, match="^ama_mask: the personalize graph applies the semantic-consistent mask"):
        engine.personalize(prompts[:1], reference, **{**kw, "steps": 2, "ama_mask": "none"})


# --------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("rows", [9, 19])
def test_more_rows_than_the_profile_run_in_chunks(tiny, torch_unet, backend, rows):
    """Past the profile's 8 rows the backend splits (8 + 1, 8 + 8 + 3): the result is the one eager call's."""
    engine = tiny[0]
    x, e, t = rand(rows, 4, 8, 8, seed=rows), rand(rows, 77, 64, seed=1), torch.linspace(981, 1, rows)
    with torch.no_grad():
        ref = engine.unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
    calls = []
    run = backend._run
    backend._run = lambda graph, feeds, device: calls.append(feeds["sample"].shape[0]) or run(graph, feeds, device)
    try:
        out = backend(x, t, encoder_hidden_states=e)[0]
    finally:
        del backend._run
    assert calls == [8] * (rows // 8) + [rows % 8]
    torch.testing.assert_close(out, ref, **TOL)


def test_the_step_scheduler_serves_an_exported_unet_past_its_batch_range(tiny, backend):
    """Merged calls of up to 16 rows on an 8-row export: every image equals its solo generation on the same
    backend, and the scheduler's calls did pass the profile's maximum (so the backend split them)."""
    from dreamfuse.engine.server import StepScheduler
    from dreamfuse.engine.server.histogram import cumulative

    engine = tiny[0]
    engine.set_unet_backend(backend)
    sched = StepScheduler(engine, max_batch_rows=16)
    try:
        reqs = [dict(prompt=p, steps=3, guidance_scale=5.0, height=64, width=64) for p in
                ("a cat", "a red car", "a dog", "a house", "a tree", "a boat")]
        jobs = [sched.submit("text2img", seed=i, **r) for i, r in enumerate(reqs)]
        assert all(j.wait(300) and j.state == "done" for j in jobs), [(j.state, j.error) for j in jobs]
        rows = sched.stats()["rows_per_call"]
        assert dict(cumulative(rows))[8] < rows["count"]  # some call carried more than 8 rows
        for job, r in zip(jobs, reqs):
            solo = engine.text2img(r["prompt"], seed=job.seeds[0], steps=3, guidance_scale=5.0, height=64, width=64)
            diff = np.abs(np.asarray(job.images[0], np.int16) - np.asarray(solo[0], np.int16))
            assert diff.max() <= 1  # batched rounding: at most 1/255
    finally:
        sched.shutdown(grace_s=0)
        engine.set_unet_backend("torch")


def test_fewer_rows_than_the_profile_are_padded(tiny, torch_unet, monkeypatch):
    """A profile whose batch starts at 4 (a static batch, say): 1 and 3 rows run padded to 4, padding dropped."""
    engine, folder, _ = tiny
    narrow = OnnxRuntimeUNet(folder, threads=2)
    narrow.manifest["profile"]["batch"] = [4, 8]
    seen = []
    run = narrow._run
    narrow._run = lambda graph, feeds, device: seen.append(feeds["sample"].shape[0]) or run(graph, feeds, device)
    for rows in (1, 3):
        x, e, t = rand(rows, 4, 8, 8, seed=rows), rand(rows, 77, 64, seed=2), torch.linspace(900, 20, rows)
        with torch.no_grad():
            ref = engine.unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
        out = narrow(x, t, encoder_hidden_states=e)[0]
        assert out.shape[0] == rows
        torch.testing.assert_close(out, ref, **TOL)
    assert seen == [4, 4]


def test_off_profile_requests_are_refused_naming_the_field(tiny, backend):
    call = lambda x, e=None: backend(x, torch.ones(x.shape[0]), encoder_hidden_states=rand(x.shape[0], 77, 64)
                                     if e is None else e)
    with pytest.raises(ValueError, match=r"^height: 192 px is outside the exported profile \[64, 128\] px"):
        call(rand(1, 4, 24, 8))
    with pytest.raises(ValueError, match=r"^width: 96 px \(12 latent\) is not a multiple of 64 px"):
        call(rand(1, 4, 8, 12))
    with pytest.raises(ValueError, match="^encoder_hidden_states: 70 tokens"):
        call(rand(1, 4, 8, 8), rand(1, 70, 64))
    engine = tiny[0]
    engine.set_unet_backend(backend)
    try:
        with pytest.raises(ValueError, match="^height: 256 px is outside"):  # through a pipeline: its first call
            engine.text2img("a cat", steps=2, height=256, width=64)
    finally:
        engine.set_unet_backend("torch")


def test_manifest_and_model_mismatches_are_refused(tiny, tmp_path):
    engine, folder, _ = tiny
    xl = tiny_engine("tiny-xl", ip=False)
    with pytest.raises(ValueError, match="export is of an SD 1.x/2.x UNet, the engine's is SDXL"):
        xl.set_unet_backend("onnxruntime", folder)
    other = tiny_engine("tiny", ip=True)
    weight = other.unet.conv_in.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-2)  # another checkpoint of the same architecture
    with pytest.raises(ValueError, match="weights .* are not the engine's"):
        other.set_unet_backend("onnxruntime", folder)
    with torch.no_grad():
        weight.copy_(original)
    plain = tiny_engine("tiny", ip=False)
    plain.set_unet_backend("onnxruntime", folder)  # an IP-export serves text-only calls (zero tokens, scale 0)
    other.unload_ip_adapter()
    from dreamfuse.engine.tiny_adapters import build_tiny_ip_adapter

    other.load_ip_adapter(build_tiny_ip_adapter(other, plus=True, seed=3))
    with pytest.raises(ValueError, match="IP-Adapter .* is not the one exported"):
        other.set_unet_backend("onnxruntime", folder)
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad, ignore=shutil.ignore_patterns("*.onnx", "*.data"))
    with pytest.raises(FileNotFoundError, match="lists 'unet.onnx' for unet but the file is missing"):
        OnnxRuntimeUNet(bad)
    manifest = json.loads((bad / MANIFEST).read_text())
    (bad / MANIFEST).write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(ValueError, match="manifest format 99"):
        OnnxRuntimeUNet(bad)
    (bad / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="has no dreamfuse.json"):
        OnnxRuntimeUNet(bad)


def test_lora_loaded_after_binding_is_refused(tiny, tmp_path):
    from dreamfuse.engine.tiny_adapters import build_tiny_lora

    engine = tiny_engine("tiny", ip=False)
    engine.set_unet_backend("onnxruntime", tiny[1])
    lora = build_tiny_lora(engine, tmp_path / "style.safetensors")
    engine.load_lora(lora)
    with pytest.raises(ValueError, match="^lora: the engine's LoRAs changed"):
        engine.text2img("a cat", steps=1)


# --------------------------------------------------------------------------------------------- CLI
def test_cli_generate_with_unet_folder(tiny, tmp_path, capsys):
    folder = tiny[1]
    out = tmp_path / "cat.png"
    assert main(["generate", "--unet", str(folder), "--prompt", "a cat", "--steps", "2", "--seed", "1", "--out",
                 str(out), "--no-progress"]) == 0
    assert out.is_file()
    assert main(["generate", "--unet", str(folder), "--prompt", "a cat", "--steps", "2", "--height", "256",
                 "--out", str(out), "--no-progress"]) == 2
    assert main(["generate", "--unet", str(tmp_path), "--prompt", "a", "--out", str(out)]) == 2
    assert main(["generate", "--unet", str(folder), "--compile", "--prompt", "a", "--out", str(out)]) == 2
    assert main(["generate", "--unet", str(folder), "--model", "tiny-xl", "--prompt", "a", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "dreamfuse: error: height: 256 px is outside the exported profile [64, 128] px (export or build again with "
        "a wider range)",
        f"dreamfuse: error: --unet: {str(tmp_path)!r} holds none of unet.onnx, unet.plan, unet.pt2 (make one "
        "with `dreamfuse export onnx` / `dreamfuse export tensorrt` / `dreamfuse export aoti`)",
        "dreamfuse: error: --compile: compiles the PyTorch UNet; --unet runs an exported one (use one or the other)",
        "dreamfuse: error: --unet: the export is of an SD 1.x/2.x UNet, the engine's is SDXL"]


@pytest.mark.parametrize("args, message", [
    (["--batch", "0-4"], "--batch: expected N or MIN-MAX with 1 <= MIN <= MAX, got '0-4'"),
    (["--batch", "1-100"], "--batch: a dynamic batch is capped at 63 rows (diffusers' Upsample2D); got 100"),
    (["--size", "100"], "--size: 100 px must be a multiple of 8 and >= 64"),
    (["--size", "64", "--min-size", "64"], "--size: give --size or --min-size/--max-size, not both"),
    (["--static"], "--static: needs one batch (--batch N) and one size (--size S)"),
    (["--min-size", "96"], "--min-size: 96 px must be a multiple of 64 px and >= 64"),
    (["--ip-adapter", "tiny"], "--ip-adapter and --image-encoder go together"),
])
def test_cli_export_onnx_bad_options_are_one_line(tmp_path, capsys, args, message):
    assert main(["export", "onnx", "--out", str(tmp_path / "x"), "--no-progress", *args]) == 2
    assert capsys.readouterr().err.strip() == f"dreamfuse: error: {message}"


def test_cli_export_help_has_examples(capsys):
    for argv in (["export", "--help"], ["export", "onnx", "--help"], ["export", "tensorrt", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "examples:" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- SDXL (tiny-xl)
@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    return shared_export(tmp_path_factory, "tiny-xl")


def test_tiny_xl_graphs_and_text2img_equal_torch(tiny_xl):
    engine, folder, manifest = tiny_xl
    assert set(manifest["graphs"]) == {"unet", "text_encoder", "text_encoder_2", "vae_decoder"}
    sess = session(folder, "unet")
    assert [i.name for i in sess.get_inputs()] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                   "time_ids"]
    x, e, pooled = rand(3, 4, 16, 8), rand(3, 77, 96, seed=1), rand(3, 48, seed=2)
    t, ids = torch.tensor([999.0, 500.0, 3.0]), torch.tensor([[128.0, 64, 0, 0, 128, 64]] * 3)
    with torch.no_grad():
        ref = engine.unet(x, t, encoder_hidden_states=e, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                          return_dict=False)[0]
    out = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": e.numpy(),
                          "text_embeds": pooled.numpy(), "time_ids": ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), ref, **TOL)
    tok = engine.tokenize(["a cat", ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want1 = engine.text_encoder(tok.input_ids, output_hidden_states=True).hidden_states[-2]
        want2 = engine.text_encoder_2(tok.input_ids, output_hidden_states=True)
    got1 = session(folder, "text_encoder").run(None, {"input_ids": tok.input_ids.numpy()})[0]
    got2, pooled2 = session(folder, "text_encoder_2").run(None, {"input_ids": tok.input_ids.numpy()})
    torch.testing.assert_close(torch.from_numpy(got1), want1, **TOL)
    torch.testing.assert_close(torch.from_numpy(got2), want2.hidden_states[-2], **TOL)
    torch.testing.assert_close(torch.from_numpy(pooled2), want2.text_embeds, **TOL)
    ref = engine.text2img(["a cat", "a dog"], steps=3, seed=2, output_type="pt", height=64, width=128)
    engine.set_unet_backend("onnxruntime", folder, threads=2)
    try:
        out = engine.text2img(["a cat", "a dog"], steps=3, seed=2, output_type="pt", height=64, width=128)
    finally:
        engine.set_unet_backend("torch")
    torch.testing.assert_close(out, ref, **TOL)


# --------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_cli_export_onnx_static_then_generate(tmp_path, capsys):
    out = tmp_path / "static"
    assert main(["export", "onnx", "--model", "tiny", "--out", str(out), "--static", "--batch", "2", "--size", "64",
                 "--no-text-encoders", "--no-vae", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["profile"] == {"batch": [2, 2], "latent_height": [8, 8], "latent_width": [8, 8], "static": True}
    img = tmp_path / "a.png"
    assert main(["generate", "--unet", str(out), "--prompt", "a cat", "--steps", "2", "--out", str(img),
                 "--no-progress"]) == 0  # CFG: 2 rows
    assert main(["generate", "--unet", str(out), "--prompt", "a cat", "--guidance", "1", "--steps", "2", "--out",
                 str(img), "--no-progress"]) == 0  # 1 row: padded to the static batch of 2


@pytest.mark.slow
def test_random_sd15_unet_at_64px(tmp_path):
    """The published SD 1.5 UNet architecture (random weights, 3.4 GB fp32: external data) at 64², batch 2."""
    from dreamfuse.engine import Engine, EngineConfig
    from dreamfuse.export.onnx import export_onnx

    engine = Engine.from_pretrained("random-sd15", EngineConfig(device="cpu", backend="torch", progress=False))
    manifest = export_onnx(engine, tmp_path, batch="1-2", min_size=64, max_size=128, text_encoders=False, vae=False)
    assert manifest["graphs"]["unet"]["external_data"]
    x, e, t = rand(2, 4, 8, 8), rand(2, 77, 768, seed=1), torch.tensor([999.0, 20.0])
    with torch.no_grad():
        ref = engine.unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
    out = session(tmp_path, "unet").run(None, {"sample": x.numpy(), "timestep": t.numpy(),
                                               "encoder_hidden_states": e.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-3, rtol=1e-3)
