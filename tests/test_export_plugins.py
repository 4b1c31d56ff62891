"""dreamfuse plugin nodes (``export onnx --plugins``), their onnxruntime custom ops and the TensorRT plumbing.

One plugin export of tiny (``unet.onnx`` + ``unet_personalize.onnx`` with AMA as ``dreamfuse::AmaAttention`` nodes;
no text encoder or VAE) is made per module from the engine of the shared export (tests/export_models.py), whose
``unet_personalize.onnx`` is the decomposed graph (GatherElements + blend + attention) it is checked against.
Oracles: the decomposed graph and the eager PyTorch graph module on the same inputs, the personalize pipeline on
the PyTorch UNet, and for each one-node op graph the dreamfuse Python op (the Triton kernel under
TRITON_INTERPRET=1). Tolerances as in test_export_onnx.py: outputs of magnitude ~1 agree to ~1e-6, so 1e-4 leaves a
wide margin while a missing AMA mask or a wrong flow moves them by > 1e-2.

TensorRT: no plugin library is built on these machines (native/trt_plugins/ needs a TensorRT SDK and CUDA), so only
the error paths and the option plumbing are tested here; the parser's plugin lookup is checked on the one-node
graphs (it looks the creator up by op type, plugin_namespace and plugin_version, and reports it missing).
"""

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from dreamfuse.engine.cli import main
from dreamfuse.export import plugins as P
from dreamfuse.export.manifest import MANIFEST, PLUGIN_OPS, read_manifest
from dreamfuse.export.runtime import OnnxRuntimeUNet
from export_models import PROFILE, shared_export, two_threads  # noqa: F401 (autouse fixture)

pytest.importorskip("onnxruntime_extensions")

TOL = dict(atol=1e-4, rtol=1e-4)
HAS_TRT = any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx"))
needs_trt = pytest.mark.skipif(not HAS_TRT, reason="neither tensorrt nor tensorrt_rtx is installed")
FIELDS = {"AmaAttention": dict(scale=0.3), "CycleMask": dict(lambda_c=0.4)}


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory):
    return shared_export(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def plugged(decomposed, tmp_path_factory):
    """``(folder, manifest)`` of the plugin export (about 2 minutes on 2 loaded cores)."""
    from dreamfuse.export.onnx import export_onnx

    folder = tmp_path_factory.mktemp("plugins") / "tiny-plugins"
    manifest = export_onnx(
        decomposed[0],
        folder,
        personalize=True,
        plugins=True,
        text_encoders=False,
        vae=False,
        model_name="tiny",
        **PROFILE,
    )
    return folder, manifest


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ort_run(model, feeds: dict) -> list[np.ndarray]:
    sess = P.onnxruntime_session(model)
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


# --------------------------------------------------------------------------------------------- the spec
def test_spec_table_docstring_and_manifest_agree():
    assert tuple(P.PLUGINS) == PLUGIN_OPS
    doc = P.__doc__
    for name, spec in P.PLUGINS.items():
        section = " ".join(doc.split(f"\n{name}  (")[1].split("\n\n")[0].split())  # this plugin's paragraph
        assert f"dreamfuse::{spec.op}" in section
        for io_name, kind, dims in spec.inputs + spec.outputs:
            assert f"``{io_name}`` ({', '.join(dims)}) {kind}" in section, (name, io_name)
        for attr, kind in spec.attrs.items():
            assert f"``{attr}`` {kind}" in section
    assert "attributes: none" in " ".join(doc.split("\nMatchArgmax  (")[1].split())
    from dreamfuse.export.manifest import plugins_entry

    got = plugins_entry({"g": {"plugins": ["AmaAttention"]}, "h": {"plugins": []}})
    assert (got["domain"], got["plugin_namespace"], got["plugin_version"]) == (P.DOMAIN, P.NAMESPACE, P.VERSION)
    assert plugins_entry({"g": {"plugins": []}}) is None


@pytest.mark.parametrize("name", list(P.PLUGINS))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_op_graph_is_one_valid_node(name, dtype):
    model = P.op_graph(name, dtype=dtype, **FIELDS.get(name, {}))
    onnx.checker.check_model(model, full_check=False)
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == ("dreamfuse", name)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs.pop("plugin_namespace") == b"dreamfuse" and attrs.pop("plugin_version") == b"1"
    assert attrs == {k: pytest.approx(v) for k, v in FIELDS.get(name, {}).items()}
    for a in node.attribute:
        assert a.type in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT, onnx.AttributeProto.STRING)
    spec = P.PLUGINS[name]
    want = {
        "T": onnx.TensorProto.FLOAT if dtype == "float32" else onnx.TensorProto.FLOAT16,
        "int32": onnx.TensorProto.INT32,
        "float32": onnx.TensorProto.FLOAT,
    }
    for vi, (_, kind, dims) in zip(list(model.graph.input) + list(model.graph.output), spec.inputs + spec.outputs):
        assert vi.type.tensor_type.elem_type == want[kind]
        assert [d.dim_param for d in vi.type.tensor_type.shape.dim] == list(dims)
    assert ("dreamfuse", 1) in {(o.domain, o.version) for o in model.opset_import}


def test_op_graph_and_hooks_refuse_bad_arguments():
    with pytest.raises(ValueError, match="^plugin: unknown plugin 'Nope'"):
        P.op_graph("Nope")
    with pytest.raises(ValueError, match="^scale: AmaAttention needs it"):
        P.op_graph("AmaAttention")
    with pytest.raises(ValueError, match="^height: not an attribute of CycleMask"):
        P.op_graph("CycleMask", lambda_c=0.4, height=3)
    with pytest.raises(ValueError, match="^lambda_c: must be > 0"):
        P.op_graph("CycleMask", lambda_c=0.0)
    with pytest.raises(ValueError, match="^dtype: 'bfloat16' is not a plugin dtype"):
        P.op_graph("MatchArgmax", dtype="bfloat16")
    import onnxruntime as ort

    with pytest.raises(ValueError, match="^plugins: .*float32 only"):
        P.add_onnxruntime_ops(ort.SessionOptions(), {"plugins": ["AmaAttention"]}, "float16")
    opts = ort.SessionOptions()
    assert P.add_onnxruntime_ops(opts, {"plugins": []}, "float16") is opts  # no plugin nodes: nothing to do


# --------------------------------------------------------------------------------------------- one-node graphs
def test_ama_attention_op_graph_equals_the_op():
    """Lq != Lk, head dim 40, mask exactly 0 / exactly 1 / soft, repeated and out-of-range flows (clamped, as the
    kernel does); a NaN in v_ref where the mask is 0 and in v_tgt where it is 1 must not leak in."""
    from dreamfuse.kernels.attention import ama_attention

    B, H, Lq, Lk, D = 2, 3, 7, 11, 40
    q = torch.randn(B, H, Lq, D, generator=gen(0))
    k, v_tgt, v_ref = (torch.randn(B, H, Lk, D, generator=gen(i)) for i in (1, 2, 3))
    flow = torch.randint(0, Lk - 1, (B, Lk), generator=gen(4))
    flow[0, 2:5] = 5  # several keys warped from one reference row
    flow[:, 0] = Lk - 1  # the only key reading v_ref's last row ...
    mask = torch.rand(B, Lk, generator=gen(5))
    mask[:, 0], mask[:, 1] = 0.0, 1.0  # ... with weight 0: its NaN must not leak in
    v_ref[:, :, Lk - 1] = float("nan")
    v_tgt[:, :, 1] = float("nan")  # weight 1: v_tgt is not read there
    (got,) = ort_run(
        P.op_graph("AmaAttention", scale=0.3), dict(q=q, k=k, v_tgt=v_tgt, v_ref=v_ref, flow=flow.int(), mask=mask)
    )
    want = ama_attention(q, k, v_tgt, v_ref, flow, mask, scale=0.3)
    assert np.isfinite(got).all()
    torch.testing.assert_close(torch.from_numpy(got), want, atol=2e-5, rtol=2e-5)
    bad = flow.clone()
    bad[1, 2], bad[1, 3] = -4, Lk + 6  # the spec: clamped into [0, Lk)
    v_ref = v_ref.nan_to_num(3.0)
    (got,) = ort_run(
        P.op_graph("AmaAttention", scale=0.3), dict(q=q, k=k, v_tgt=v_tgt, v_ref=v_ref, flow=bad.int(), mask=mask)
    )
    want = ama_attention(q, k, v_tgt, v_ref, bad.clamp(0, Lk - 1), mask, scale=0.3)
    assert (want - ama_attention(q, k, v_tgt, v_ref, flow, mask, scale=0.3)).abs().max() > 1e-3
    torch.testing.assert_close(torch.from_numpy(got), want, atol=2e-5, rtol=2e-5)


def test_match_argmax_op_graph_equals_the_op():
    """Ties (duplicated reference rows: the lowest index wins both ways), zero rows (similarity 0), odd sizes."""
    from dreamfuse.kernels.matching import match_argmax

    f_tgt = torch.randn(2, 13, 5, generator=gen(0))
    f_ref = torch.randn(2, 11, 5, generator=gen(1))
    f_ref[:, 7] = f_ref[:, 2]  # exact duplicate: ties
    f_tgt[:, 4] = f_ref[:, 2] * 3.0  # its best match is the tie
    f_tgt[:, 9] = f_tgt[:, 3]
    f_tgt[1, 6] = 0.0
    f_ref[0, 10] = 0.0
    got = ort_run(P.op_graph("MatchArgmax"), dict(f_tgt=f_tgt, f_ref=f_ref))
    want = match_argmax(f_tgt, f_ref)
    assert [g.dtype for g in got] == [np.int32, np.int32, np.float32, np.float32]
    assert got[0][0, 4] == got[0][1, 4] == 2
    for g, w in zip(got[:2], want[:2]):
        assert torch.equal(torch.from_numpy(g).long(), w)
    for g, w in zip(got[2:], want[2:]):
        torch.testing.assert_close(torch.from_numpy(g), w, atol=1e-6, rtol=1e-6)


def test_cycle_mask_op_graph_equals_the_op():
    """A 5 x 7 grid (not square), soft fg, flows with consistent / inconsistent cycles and out-of-range entries
    (inconsistent: mask 0)."""
    from dreamfuse.kernels.matching import cycle_mask

    B, Hg, Wg = 3, 5, 7
    N = Hg * Wg
    t2r = torch.randint(0, N, (B, N), generator=gen(0))
    r2t = torch.randint(0, N, (B, N), generator=gen(1))
    r2t[:, t2r[0]] = torch.arange(N)  # some exact cycles
    t2r[2, :4] = torch.tensor([-1, N, N + 3, -7])
    fg = torch.rand(B, N, generator=gen(2))
    fg[1, ::3] = 0.0
    (got,) = ort_run(
        P.op_graph("CycleMask", lambda_c=0.4),
        dict(t2r=t2r.int().view(B, Hg, Wg), r2t=r2t.int().view(B, Hg, Wg), fg=fg.view(B, Hg, Wg)),
    )
    want = cycle_mask(t2r, r2t, fg, height=Hg, width=Wg, lambda_c=0.4).view(B, Hg, Wg)
    assert got.shape == (B, Hg, Wg)
    assert (got[2].reshape(-1)[:4] == 0).all()
    assert 0 < (got > 0).sum() < (fg > 0).sum()  # some pass the cycle test, some do not
    torch.testing.assert_close(torch.from_numpy(got), want, atol=0, rtol=0)


def test_composite_blend_op_graph_equals_the_op():
    """3 segments, 7 x 9 latents, per-segment guidance, uncovered pixels (all masks 0: output 0), hard and soft."""
    from dreamfuse.kernels.composite import composite_blend

    B, S, C, h, w = 2, 3, 4, 7, 9
    u, c = (torch.randn(B, S, C, h, w, generator=gen(i)) for i in (0, 1))
    masks = torch.rand(B, S, h, w, generator=gen(2))
    masks[:, 1, :3] = 0.0
    masks[:, :, 0, 0] = 0.0  # uncovered
    masks[0, 2] = (masks[0, 2] > 0.5).float()
    g = torch.tensor([[7.5, 1.0, 3.0], [0.0, 12.0, 5.0]])
    (got,) = ort_run(P.op_graph("CompositeBlend"), dict(eps_uncond=u, eps_cond=c, masks=masks, guidance=g))
    want = composite_blend(u, c, masks, g)
    assert (got[:, :, 0, 0] == 0).all()
    torch.testing.assert_close(torch.from_numpy(got), want, atol=2e-5, rtol=2e-5)


def test_torch_ops_lower_to_the_op_graph_nodes(tmp_path):
    """The exporter's lowering (``plugins=True``) of matching, cycle mask and composite blending in a traced module
    gives the same nodes as :func:`op_graph` (op type, domain, attributes, int32 flows) and runs equal to the ops."""
    import dreamfuse.kernels  # noqa: F401
    from dreamfuse.export.onnx import _export_graph
    from dreamfuse.kernels.composite import composite_blend
    from dreamfuse.kernels.matching import cycle_mask, match_argmax

    class Ops(torch.nn.Module):
        def forward(self, f_tgt, f_ref, fg, u, c, m):
            t2r, r2t, s1, s2 = torch.ops.dreamfuse.match_argmax(f_tgt, f_ref)
            cm = torch.ops.dreamfuse.cycle_mask(t2r, r2t, fg, 4, 5, 0.4)
            eps = torch.ops.dreamfuse.composite_blend(u, c, m, None, 6.0)
            return t2r, s2, cm, eps

    args = (
        torch.randn(2, 20, 6, generator=gen(0)),
        torch.randn(2, 20, 6, generator=gen(1)),
        torch.rand(2, 20, generator=gen(2)),
        torch.randn(2, 3, 4, 5, 6, generator=gen(3)),
        torch.randn(2, 3, 4, 5, 6, generator=gen(4)),
        torch.rand(2, 3, 5, 6, generator=gen(5)),
    )
    names = ["f_tgt", "f_ref", "fg", "u", "c", "m"]
    info = _export_graph(Ops(), args, None, names, ["t2r", "s2", "cm", "eps"], tmp_path / "ops.onnx", 18, plugins=True)
    assert info["plugins"] == ["CompositeBlend", "CycleMask", "MatchArgmax"]
    model = onnx.load(str(tmp_path / "ops.onnx"))
    attrs = lambda n: {a.name: (a.type, onnx.helper.get_attribute_value(a)) for a in n.attribute}
    for node in (n for n in model.graph.node if n.domain == "dreamfuse"):
        (ref,) = P.op_graph(node.op_type, **FIELDS.get(node.op_type, {})).graph.node
        assert len(node.input) == len(ref.input) and len(node.output) == len(ref.output)
        got, want = attrs(node), attrs(ref)
        assert got.keys() == want.keys()
        for key, (kind, value) in want.items():
            assert got[key][0] == kind and got[key][1] == pytest.approx(value), key
    got = ort_run(model, dict(zip(names, args)))
    t2r, r2t, _, s2 = match_argmax(args[0], args[1])
    assert torch.equal(torch.from_numpy(got[0]), t2r)
    torch.testing.assert_close(torch.from_numpy(got[1]), s2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        torch.from_numpy(got[2]), cycle_mask(t2r, r2t, args[2], height=4, width=5, lambda_c=0.4), atol=0, rtol=0
    )
    torch.testing.assert_close(torch.from_numpy(got[3]), composite_blend(*args[3:], 6.0), atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------- the personalize graph
def test_personalize_graph_has_one_plugin_node_per_ama_layer(plugged, decomposed):
    folder, manifest = plugged
    info = manifest["graphs"]["unet_personalize"]
    assert info["plugins"] == ["AmaAttention"] and manifest["graphs"]["unet"]["plugins"] == []
    assert manifest["plugins"] == {
        "domain": "dreamfuse",
        "plugin_namespace": "dreamfuse",
        "plugin_version": "1",
        "ops": ["AmaAttention"],
        "graphs": ["unet_personalize"],
    }
    assert json.loads((folder / MANIFEST).read_text())["plugins"] == manifest["plugins"]
    assert decomposed[2].get("plugins") is None
    model = onnx.load(str(folder / "unet_personalize.onnx"))
    nodes = list(model.graph.node)
    ama = [n for n in nodes if n.op_type == "AmaAttention"]
    assert len(ama) == len(info["ama_layers"]) > 0
    producers = {o: n for n in nodes for o in n.output}
    scales = []
    for n in ama:
        assert n.domain == "dreamfuse" and len(n.input) == 6 and len(n.output) == 1
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        assert a["plugin_namespace"] == b"dreamfuse" and a["plugin_version"] == b"1"
        assert set(a) == {"scale", "plugin_namespace", "plugin_version"}
        scales.append(a["scale"])
        cast = producers[n.input[4]]  # the flow: int64 graph input -> int32, as the spec says
        assert cast.op_type == "Cast" and onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.INT32
    unet = decomposed[0].unet
    attn = [unet.get_submodule(name) for name in info["ama_layers"]]
    assert sorted(scales) == pytest.approx(sorted((a.to_q.out_features // a.heads) ** -0.5 for a in attn))
    ops = {n.op_type for n in nodes}
    assert "GatherElements" not in ops  # the decomposition is gone
    assert ("dreamfuse", 1) in {(o.domain, o.version) for o in model.opset_import}
    plain = onnx.load(str(folder / "unet.onnx"))
    assert not [n for n in plain.graph.node if n.domain == "dreamfuse"]  # plain attention stays standard ops
    dec = onnx.load(str(decomposed[1] / "unet_personalize.onnx"))
    assert "GatherElements" in {n.op_type for n in dec.graph.node}
    assert not [n for n in dec.graph.node if n.domain == "dreamfuse"]


def _personalize_feeds(manifest, rows=4, h=16, w=16, ama=True):
    g = gen(11)
    info = manifest["graphs"]["unet_personalize"]
    cross = manifest["model"]["cross_attention_dim"]
    fg_tokens = torch.zeros(rows, 77)
    fg_tokens[:, 3] = fg_tokens[:, 4] = 0.5
    feeds = dict(
        sample=torch.randn(rows, 4, h, w, generator=g),
        timestep=torch.tensor([999.0, 999.0, 500.0, 20.0]),
        encoder_hidden_states=torch.randn(rows, 77, cross, generator=g),
        ama_ref_index=torch.tensor([0, 0, 2, 2]),
        fg_tokens=fg_tokens,
        fg_source=torch.tensor([0, 3, 2, 3]),
    )
    for f in info["ama_factors"]:
        hf, wf = h // f, w // f
        feeds[f"ama_flow_{f}"] = torch.randint(0, hf * wf, (rows, hf, wf), generator=g)
        err = torch.rand(rows, hf, wf, generator=g) * 0.4 * hf
        err[[0, 2]] = float("inf")  # reference rows: no AMA
        feeds[f"ama_err_{f}"] = err if ama else torch.full_like(err, float("inf"))
        feeds[f"ama_thresh_{f}"] = torch.tensor([0.4 * hf])
    return feeds


def test_plugin_graph_equals_decomposed_graph_and_pytorch(plugged, decomposed, monkeypatch):
    """Same inputs (AMA on the target rows, with a mask that some pixels pass): the plugin graph in onnxruntime
    with the custom ops = the decomposed graph = the eager PyTorch graph module, on every output."""
    from dreamfuse.export.onnx import PersonalizeUNetGraph, personalize_layers

    engine, dec_folder, _ = decomposed
    folder, manifest = plugged
    info = manifest["graphs"]["unet_personalize"]
    feeds = _personalize_feeds(manifest)
    names = info["outputs"]
    plug = dict(zip(names, ort_run(str(folder / "unet_personalize.onnx"), feeds)))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(dec_folder / "unet_personalize.onnx"), providers=["CPUExecutionProvider"])
    dec = dict(zip(names, sess.run(None, {k: v.numpy() for k, v in feeds.items()})))
    monkeypatch.setenv("DREAMFUSE_DISABLE_KERNELS", "1")  # the eager module on the ops' PyTorch references
    graph = PersonalizeUNetGraph(engine.unet, False, *personalize_layers(engine))
    assert graph.input_names() == info["inputs"]
    with torch.no_grad():
        eager = dict(zip(names, graph(*(feeds[n] for n in info["inputs"]))))
    for n in names:
        torch.testing.assert_close(torch.from_numpy(plug[n]), torch.from_numpy(dec[n]), **TOL)
        torch.testing.assert_close(torch.from_numpy(plug[n]), eager[n].float(), **TOL)
    (no_ama,) = ort_run(str(folder / "unet_personalize.onnx"), _personalize_feeds(manifest, ama=False))[:1]
    assert np.abs(no_ama - plug["noise_pred"]).max() > 1e-2  # the AMA nodes did something


def test_personalize_through_onnxruntime_with_plugins_equals_torch_and_decomposed(plugged, decomposed):
    engine, dec_folder, _ = decomposed
    folder, _ = plugged
    reference = torch.rand(3, 128, 128, generator=gen(1))
    kw = dict(
        subject_token="sks",
        steps=3,
        seed=0,
        height=128,
        width=128,
        output_type="latent",
        ama_start=1,
        guidance_scale=7.0,
    )
    prompts = ["a sks dog on the beach"]
    runs = {}
    try:
        for name, backend in (
            ("torch", "torch"),
            ("decomposed", OnnxRuntimeUNet(dec_folder, threads=2)),
            ("plugins", OnnxRuntimeUNet(folder, threads=2)),
        ):
            engine.set_unet_backend(backend)
            steps = []
            out = engine.personalize(prompts, reference, callback=lambda d, s=steps: s.append(d["eps"]), **kw)
            runs[name] = (out, steps)
    finally:
        engine.set_unet_backend("torch")
    for other in ("torch", "decomposed"):
        for a, b in zip(runs["plugins"][1], runs[other][1]):
            torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(runs["plugins"][0], runs[other][0], **TOL)
    assert len(runs["plugins"][1]) == kw["steps"]


def test_plugins_needs_the_personalize_graph_and_a_plugin_dtype(decomposed, tmp_path, capsys):
    from dreamfuse.export.onnx import export_onnx

    with pytest.raises(ValueError, match="^plugins: only the personalize graph"):
        export_onnx(decomposed[0], tmp_path / "x", plugins=True)
    with pytest.raises(ValueError, match="^plugins: the plugin nodes are float32 or float16 .* not bfloat16"):
        export_onnx(decomposed[0], tmp_path / "x", personalize=True, plugins=True, dtype="bf16")
    assert not (tmp_path / "x").exists()  # refused before anything is written
    assert main(["export", "onnx", "--out", str(tmp_path / "y"), "--plugins", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        "dreamfuse: error: --plugins: only the personalize graph has plugin nodes (AMA attention); add --personalize"
    )


def test_manifest_with_unknown_plugin_is_refused(plugged, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(plugged[0], folder)
    m = json.loads((folder / MANIFEST).read_text())
    m["graphs"]["unet_personalize"]["plugins"] = ["AmaAttention", "FlashWarp"]
    (folder / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"unet_personalize needs plugin nodes \['FlashWarp'\]"):
        read_manifest(folder)


# --------------------------------------------------------------------------------------------- TensorRT plumbing
@needs_trt
def test_tensorrt_parser_looks_up_each_plugin_by_name_namespace_version():
    from dreamfuse.export.tensorrt import _Logger, import_tensorrt

    trt = import_tensorrt()
    for name in P.PLUGINS:
        logger = _Logger(trt).logger
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        assert not parser.parse(P.op_graph(name, **FIELDS.get(name, {})).SerializeToString())
        errors = " ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        assert "Plugin not found" in errors, errors  # the fallback plugin importer ran: no library loaded here


@needs_trt
def test_tensorrt_build_of_a_plugin_export_needs_the_library(plugged, tmp_path, capsys):
    from dreamfuse.export.tensorrt import build_tensorrt

    folder, _ = plugged
    out = tmp_path / "plans"
    with pytest.raises(
        ValueError,
        match=r"^plugins: unet_personalize\.onnx holds dreamfuse plugin nodes "
        r"\(AmaAttention\); .*--plugins LIB",
    ):
        build_tensorrt(folder, out, compute_capability="8.9")
    assert not out.exists()  # refused before building anything
    with pytest.raises(ValueError, match="^plugins: .* is not a file"):
        build_tensorrt(folder, out, compute_capability="8.9", plugins=tmp_path / "missing.so")
    fake = tmp_path / "libfake.so"
    fake.write_text("not a shared library")
    with pytest.raises(ValueError, match="^plugins: TensorRT could not load"):
        build_tensorrt(folder, out, compute_capability="8.9", plugins=fake)
    assert not out.exists()
    base = ["export", "tensorrt", "--onnx", str(folder), "--out", str(out), "--compute-capability", "8.9"]
    assert main(base) == 2
    assert main([*base, "--plugins", str(tmp_path / "missing.so")]) == 2
    assert main([*base, "--plugins", str(fake)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [e for e in err if e.startswith("dreamfuse: error:")]
    assert len(err) == 3
    assert (
        err[0].startswith(
            "dreamfuse: error: --plugins: unet_personalize.onnx holds dreamfuse plugin nodes (AmaAttention)"
        )
        and "--plugins LIB" in err[0]
    )
    assert err[1] == f"dreamfuse: error: --plugins: file {str(tmp_path / 'missing.so')!r} does not exist"
    assert err[2].startswith("dreamfuse: error: --plugins: TensorRT could not load")


@needs_trt
def test_tensorrt_plugin_library_is_part_of_the_cache_key(plugged, tmp_path):
    from dreamfuse.export.tensorrt import cache_key, import_tensorrt

    trt = import_tensorrt()
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"v1")
    m = plugged[1]
    keys = {cache_key(m, trt, "8.9", [], False, False, "unet_personalize", libs) for libs in ((), [lib])}
    lib.write_bytes(b"v2")
    keys.add(cache_key(m, trt, "8.9", [], False, False, "unet_personalize", [lib]))
    assert len(keys) == 3
