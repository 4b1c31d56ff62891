"""AOTInductor packages (``dreamfuse export aoti``) and the ``aoti`` UNet backend, against eager PyTorch on CPU.

One tiny package (dynamic batch 1-4 rows, dynamic size 64-128 px: one AOTInductor compile, about a minute on 2
cores) is made through the CLI and shared by the module; a second, small compile checks the op registrations
(``triton_op`` lowers into a package, a ``custom_op`` does not). Tolerance: the package computes the eager fp32 UNet
with inductor's kernels; measured differences are ~2e-6 on outputs of magnitude ~1, so 1e-4 leaves a wide margin
while a swapped timestep row or a wrong input moves outputs by > 1e-2. The tiny-xl package, the static layout the
C++ runner uses and a baked IP-Adapter are ``slow``.

What never ran here (no GPU): a CUDA package. ``test_cuda_trace_reaches_the_triton_kernels`` checks, on fake CUDA
tensors, that the ops trace to the Triton kernels (what inductor then compiles and embeds).
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
import zipfile

import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.cli import main
from dreamfuse.engine.processors import CallContext
from dreamfuse.export.manifest import MANIFEST, weights_hash
from dreamfuse.export.runtime import AotiUNet, OnnxRuntimeUNet, backend_for_path
from export_models import tiny_engine, two_threads  # noqa: F401 (autouse fixture)

TOL = dict(atol=1e-4, rtol=1e-4)
PROFILE = ["--batch", "1-4", "--min-size", "64", "--max-size", "128"]


@pytest.fixture(scope="module")
def aoti(tmp_path_factory):
    """``(engine, folder, cli stdout)``: tiny compiled through ``dreamfuse export aoti``, and a CPU fp32 engine of
    the same model on its PyTorch UNet."""
    folder = tmp_path_factory.mktemp("aoti") / "tiny-aoti"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["export", "aoti", "--model", "tiny", "--device", "cpu", "--out", str(folder), *PROFILE,
                     "--no-progress"])
    assert code == 0, out.getvalue()
    return tiny_engine("tiny", ip=False), folder, out.getvalue()


@pytest.fixture(scope="module")
def backend(aoti):
    return AotiUNet(aoti[1])


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def eager(engine, x, t, e, **kw):
    with torch.no_grad():
        return engine.unet(x, t, encoder_hidden_states=e, return_dict=False, **kw)[0]


def package_strings(path) -> dict[str, int]:
    """How often a dreamfuse op name or a proxy-executor call (AOTInductor's way of calling back into a Python
    custom op) occurs in the package's files, generated code and shared library included."""
    found: dict[str, int] = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            data = z.read(name)
            for pat in (b"dreamfuse::attention", b"dreamfuse::match_argmax", b"dreamfuse",
                        b"proxy_executor_call_function"):
                if data.count(pat):
                    found[pat.decode()] = found.get(pat.decode(), 0) + data.count(pat)
    return found


def run_fresh(script: str, *args) -> subprocess.CompletedProcess:
    """``script`` in a new interpreter that never imports dreamfuse: isolated mode (no cwd or user site on
    sys.path), the interpreter checks itself that no dreamfuse module got loaded."""
    code = textwrap.dedent(script) + "\nassert not [m for m in sys.modules if m.startswith('dreamfuse')]\n"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, "-I", "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


# --------------------------------------------------------------------------------------------- the package
def test_cli_writes_the_package_and_a_manifest_listing_its_inputs(aoti):
    engine, folder, stdout = aoti
    lines = stdout.strip().splitlines()
    assert lines[0] == "unet: tracing at batch 2, latents 16x16 ..."
    assert lines[1].startswith("unet: traced in ") and "AOTInductor compiling for cpu (aten attention" in lines[1]
    assert lines[2].startswith("unet: compiled in ")
    assert lines[3].startswith(f"wrote {folder} (unet.pt2; cpu, float32, batch 1-4 rows, 64-128 px; inputs sample, "
                               "timestep, encoder_hidden_states; ")
    assert sorted(p.name for p in folder.iterdir()) == ["dreamfuse.json", "unet.pt2"]  # no temporary file left
    m = json.loads((folder / MANIFEST).read_text())
    assert (m["kind"], m["device"], m["dtype"]) == ("aoti", "cpu", "float32")
    assert m["model"]["hash"] == weights_hash(engine.unet) and m["model"]["is_xl"] is False
    assert m["profile"] == {"batch": [1, 4], "latent_height": [8, 16], "latent_width": [8, 16], "static": False}
    assert m["dims"] == {"batch": [1, 4], "latent_height": [8, 16], "latent_width": [8, 16]}
    graph = m["graphs"]["unet"]
    assert graph["file"] == "unet.pt2" and graph["model_name"] == "model" and graph["attention"] == "aten"
    assert graph["inductor_configs"] == {"freezing": True}
    data = (folder / "unet.pt2").read_bytes()  # what the runtime checks before loading it
    assert m["format"] == 2 and m["files"] == {"unet.pt2": {"sha256": hashlib.sha256(data).hexdigest(),
                                                            "bytes": len(data)}}
    with zipfile.ZipFile(folder / "unet.pt2") as z:
        assert graph["members"] == [{"name": i.filename, "bytes": i.file_size, "crc32": i.CRC} for i in z.infolist()]
    assert any(mem["name"].endswith(".so") for mem in graph["members"])
    assert graph["inputs"] == [
        {"name": "sample", "dtype": "float32", "shape": ["batch", 4, "latent_height", "latent_width"]},
        {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
        {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", 77, 64]}]
    assert graph["outputs"] == [{"name": "noise_pred", "dtype": "float32",
                                 "shape": ["batch", 4, "latent_height", "latent_width"]}]
    assert backend_for_path(folder) == "aoti"


@pytest.mark.parametrize("rows, h, w", [(1, 8, 8), (3, 16, 8), (4, 8, 16)])
def test_package_equals_eager_with_per_row_timesteps(aoti, backend, rows, h, w):
    engine = aoti[0]
    x, e = rand(rows, 4, h, w, seed=rows), rand(rows, 77, 64, seed=h)
    t = torch.linspace(981, 1, rows)  # a different timestep on every row
    out = backend(x, t, encoder_hidden_states=e)[0]
    torch.testing.assert_close(out, eager(engine, x, t, e), **TOL)
    if rows > 1:  # per-row timesteps give per-row results: each row equals its own eager call
        alone = torch.cat([eager(engine, x[i:i + 1], t[i:i + 1], e[i:i + 1]) for i in range(rows)])
        torch.testing.assert_close(out, alone, **TOL)
        assert (out[0] - backend(x[:1], t[-1:], encoder_hidden_states=e[:1])[0][0]).abs().max() > 1e-2
    scalar = backend(x, 500, encoder_hidden_states=e)[0]  # a scalar timestep is every row's
    torch.testing.assert_close(scalar, eager(engine, x, torch.full((rows,), 500.0), e), **TOL)


def test_text2img_through_the_aoti_backend_equals_torch(aoti, tmp_path, capsys):
    engine, folder, _ = aoti
    runs = [dict(prompts=["a cat", "a red car"], height=64, width=128),  # CFG: 4 rows
            dict(prompts=["a dog"], height=128, width=64, sampler="euler"),
            dict(prompts=["a dog"], guidance_scale=1.0)]  # 1 row, 64 px native
    refs = [engine.text2img(r.pop("prompts"), steps=3, seed=7, output_type="pt", **r) for r in [dict(x) for x in runs]]
    other = Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False),
                                   unet_backend="aoti", unet_path=folder)
    assert other.unet_backend == "aoti"
    for run, ref in zip(runs, refs):
        torch.testing.assert_close(other.text2img(run.pop("prompts"), steps=3, seed=7, output_type="pt", **run), ref,
                                   **TOL)
    out = tmp_path / "cat.png"
    assert main(["generate", "--unet", str(folder), "--prompt", "a cat", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 0
    assert out.is_file()
    assert main(["generate", "--unet", str(folder), "--prompt", "a cat", "--steps", "2", "--height", "256",
                 "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "dreamfuse: error: height: 256 px is outside the exported profile [64, 128] px (export or build again with "
        "a wider range)"]


def test_package_runs_without_dreamfuse_or_python_ops(aoti, tmp_path):
    """No custom-op call is left in the CPU package (its code and library name no dreamfuse op, nor a proxy-executor
    call back into Python), and a fresh interpreter that never imports dreamfuse runs it to eager's result."""
    engine, folder, _ = aoti
    assert package_strings(folder / "unet.pt2") == {}
    x, t, e = rand(2, 4, 16, 8, seed=3), torch.tensor([900.0, 15.0]), rand(2, 77, 64, seed=4)
    torch.save({"args": (x, t, e), "want": eager(engine, x, t, e)}, tmp_path / "io.pt")
    done = run_fresh("""
        import sys, torch
        model = torch._inductor.aoti_load_package(sys.argv[1])
        io = torch.load(sys.argv[2])
        torch.testing.assert_close(model(*io["args"]), io["want"], atol=1e-4, rtol=1e-4)
        print("ran without dreamfuse")
    """, folder / "unet.pt2", tmp_path / "io.pt")
    assert done.returncode == 0 and done.stdout.strip() == "ran without dreamfuse", done.stderr[-2000:]


# --------------------------------------------------------------------------------------------- op registrations
class _TwoOps(torch.nn.Module):
    def forward(self, q, k, v, f_tgt, f_ref):
        out, _ = torch.ops.dreamfuse.attention(q, k, v, 0.3)  # a triton_op
        _, _, sim, _ = torch.ops.dreamfuse.match_argmax(f_tgt, f_ref)  # a custom_op
        return out * 2, sim + 1


def test_triton_ops_lower_into_a_package_custom_ops_do_not(tmp_path):
    """The registrations, in one small AOTInductor compile without dreamfuse's lowering table: the ``triton_op``
    attention is traced through (on CPU to its reference in ATen, no op call left) while the ``custom_op``
    match_argmax stays a call back into Python, which a loader without dreamfuse refuses with "Could not find
    schema" (the native runner's failure this registration avoids). Also what makes the package check above
    meaningful: the same scan finds the custom op here."""
    from dreamfuse.kernels.attention import attention_reference
    from dreamfuse.kernels.matching import match_argmax_reference

    q, k, v = rand(1, 2, 9, 16, seed=1), rand(1, 2, 12, 16, seed=2), rand(1, 2, 12, 16, seed=3)
    f_tgt, f_ref = rand(1, 16, 8, seed=4), rand(1, 20, 8, seed=5)
    ep = torch.export.export(_TwoOps(), (q, k, v, f_tgt, f_ref), strict=False)
    kept = {str(n.target) for n in ep.graph.nodes if "dreamfuse" in str(n.target)}
    assert kept == {"dreamfuse.attention.default", "dreamfuse.match_argmax.default"}  # export keeps both as nodes
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "two.pt2"))
    found = package_strings(path)
    assert "dreamfuse::attention" not in found
    assert found.get("dreamfuse::match_argmax") and found.get("proxy_executor_call_function")
    out, sim = torch._inductor.aoti_load_package(path)(q, k, v, f_tgt, f_ref)  # with dreamfuse: both run
    torch.testing.assert_close(out, attention_reference(q, k, v, scale=0.3) * 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sim, match_argmax_reference(f_tgt, f_ref)[2] + 1, atol=1e-5, rtol=1e-5)
    torch.save((q, k, v, f_tgt, f_ref), tmp_path / "in.pt")
    done = run_fresh("""
        import sys, torch
        torch._inductor.aoti_load_package(sys.argv[1])(*torch.load(sys.argv[2]))
    """, path, tmp_path / "in.pt")
    assert done.returncode != 0 and "Could not find schema for dreamfuse::match_argmax" in done.stderr


def test_triton_ops_under_inductor_on_cpu_equal_eager():
    """torch.compile (inductor, fullgraph) of a graph with every triton_op on CPU equals the eager ops (the Triton
    interpreter under this test run's TRITON_INTERPRET=1): inductor compiles the ops' reference bodies."""
    import dreamfuse.kernels as K

    ops = ("dreamfuse::attention", "dreamfuse::ama_attention", "dreamfuse::cycle_mask", "dreamfuse::composite_blend",
           "dreamfuse::composite_latents", "dreamfuse::segment_fill")
    assert set(ops) <= set(torch._library.triton.triton_ops_to_kernels)  # registered with torch.library.triton_op
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 2, 16, 24
    q, k, v, v_ref = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
    flow = torch.randint(0, L, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g)
    eps_u, eps_c = torch.randn(1, 3, 4, 4, 4, generator=g), torch.randn(1, 3, 4, 4, 4, generator=g)
    masks = torch.rand(1, 3, 4, 4, generator=g)
    fill = torch.randn(1, 4, 4, 4, generator=g)

    def f(q, k, v, v_ref, flow, mask, eps_u, eps_c, masks, fill):
        a, lse = K.fused_attention(q, k, v, return_lse=True)
        b = K.ama_attention(q, k, v, v_ref, flow, mask)
        t2r = flow % L
        c = K.cycle_mask(t2r, t2r.flip(1), mask, height=4, width=4, lambda_c=0.4)
        d = K.composite_blend(eps_u, eps_c, masks, 7.5)
        e = K.composite_latents(eps_u, masks, fill) + K.segment_fill(eps_u, masks, fill).sum(1)
        return a * 2, lse, b + 1, c, d, e

    args = (q, k, v, v_ref, flow, mask, eps_u, eps_c, masks, fill)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)(*args)
    for got, want in zip(compiled, f(*args)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cuda_trace_reaches_the_triton_kernels():
    """What inductor sees of the ops on CUDA, without a GPU: AOTAutograd's trace on fake CUDA tensors decomposes
    each triton_op into its Triton launch (``triton_kernel_wrapper_functional`` of the dreamfuse kernel), leaving no
    dreamfuse op; the kernel's mutation analysis needs a GPU driver and falls back to cloning every input here.
    A fresh interpreter: the kernels must be defined with TRITON_INTERPRET unset."""
    script = """
        import torch
        import dreamfuse.kernels
        from torch._functorch.aot_autograd import aot_export_module
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
        from torch._subclasses.fake_tensor import FakeTensorMode

        class M(torch.nn.Module):
            def forward(self, q, k, v, v_ref, flow, mask):
                a = torch.ops.dreamfuse.attention(q, k, v, 0.3)[0]
                b = torch.ops.dreamfuse.ama_attention(q, k, v, v_ref, flow, mask, 0.3)[0]
                return (a + b,)

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            q = torch.empty(2, 8, 64, 40, device="cuda", dtype=torch.float16)
            k, v, v_ref = (torch.empty(2, 8, 64, 40, device="cuda", dtype=torch.float16) for _ in range(3))
            flow = torch.zeros(2, 64, dtype=torch.long, device="cuda")
            mask = torch.zeros(2, 64, device="cuda")
            gm, _ = aot_export_module(M(), (q, k, v, v_ref, flow, mask), trace_joint=False)
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        calls = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        kernels = {kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in calls}
        amas = sorted(bool(n.kwargs["kwargs"]["AMA"]) for n in calls)
        print(len(calls), sorted(kernels), amas, any("dreamfuse" in t for t in targets))
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "2 ['_attention_fwd_kernel'] [False, True] False"


# --------------------------------------------------------------------------------------------- refusals
def test_off_profile_calls_gradients_and_handlers_are_refused_naming_the_field(aoti, backend):
    call = lambda x, e=None, **kw: backend(x, torch.ones(x.shape[0]), encoder_hidden_states=rand(x.shape[0], 77, 64)
                                           if e is None else e, **kw)
    x, e = rand(5, 4, 8, 8), rand(5, 77, 64, seed=5)  # past the batch range: chunks of 4 + 1, not a refusal
    torch.testing.assert_close(call(x, e)[0], eager(aoti[0], x, torch.ones(5), e), **TOL)
    with pytest.raises(ValueError, match=r"^height: 192 px is outside the exported profile \[64, 128\] px"):
        call(rand(1, 4, 24, 8))
    with pytest.raises(ValueError, match=r"^width: 96 px \(12 latent\) is not a multiple of 64 px"):
        call(rand(1, 4, 8, 12))
    with pytest.raises(ValueError, match="^encoder_hidden_states: 70 tokens"):
        call(rand(1, 4, 8, 8), rand(1, 70, 64))
    with pytest.raises(ValueError, match="^unet_backend: a gradient through the UNet"):
        call(rand(1, 4, 8, 8).requires_grad_())
    ctx = CallContext(handlers={"up_blocks.1.attentions.0.transformer_blocks.0.attn1": lambda *a: None})
    with pytest.raises(ValueError, match="^personalize: an AOTInductor package holds the plain UNet call"):
        call(rand(1, 4, 8, 8), cross_attention_kwargs={"dreamfuse_ctx": ctx})
    with pytest.raises(ValueError, match="^ip_tokens: the exported UNet has no image-prompt layers"):
        call(rand(1, 4, 8, 8), cross_attention_kwargs={"ip_tokens": rand(1, 16, 64), "ip_scale": 0.5})
    engine = Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))
    engine.set_unet_backend(backend)
    reference = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="^personalize: an AOTInductor package"):  # AMA's handlers, 4 rows
        engine.personalize(["a sks dog"], reference, subject_token="sks", steps=2, height=64, width=64)
    with pytest.raises(ValueError, match="^height: 256 px is outside"):  # through a pipeline: its first call
        engine.text2img("a cat", steps=2, height=256, width=64)


def test_packages_for_another_model_device_or_dtype_are_refused(aoti, backend, tmp_path, monkeypatch):
    engine, folder, _ = aoti
    xl = tiny_engine("tiny-xl", ip=False)
    with pytest.raises(ValueError, match="export is of an SD 1.x/2.x UNet, the engine's is SDXL"):
        xl.set_unet_backend("aoti", folder)
    other = tiny_engine("tiny", ip=False)
    with torch.no_grad():
        other.unet.conv_in.weight.add_(1e-2)  # another checkpoint of the same architecture
    with pytest.raises(ValueError, match="weights .* are not the engine's"):
        other.set_unet_backend("aoti", folder)
    compiled = Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", compile=True,
                                                           progress=False))
    with pytest.raises(ValueError, match="^unet_backend: aoti runs an exported graph; compile=True"):
        compiled.set_unet_backend("aoti", folder)
    stub = lambda device, dtype: types.SimpleNamespace(device=torch.device(device), dtype=dtype)
    with pytest.raises(ValueError, match="^device: the package was compiled for cpu, the engine runs on meta"):
        backend.bind(stub("meta", torch.float32))
    with pytest.raises(ValueError, match="^dtype: the package was compiled for float32, the engine runs float16"):
        backend.bind(stub("cpu", torch.float16))
    with pytest.raises(ValueError, match="^device: the package was compiled for cpu, not cuda"):
        AotiUNet(folder, device="cuda")
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = json.loads((folder / MANIFEST).read_text())
    (bad / MANIFEST).write_text(json.dumps({**manifest, "device": "cuda"}))
    (bad / "unet.pt2").write_bytes((folder / "unet.pt2").read_bytes()[:4096])  # truncated
    with pytest.raises(ValueError, match="^unet_path: .* was compiled for cuda and no CUDA GPU is available"):
        AotiUNet(bad)
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"^unet_path: .*unet.pt2' is not what its manifest describes \(not a "
                                         "readable package"):
        AotiUNet(bad)
    shutil.copyfile(folder / "unet.pt2", bad / "unet.pt2")

    def another_torch(*args, **kwargs):
        raise RuntimeError("Error in dlopen: undefined symbol (a package of another torch build)")
    with monkeypatch.context() as mp:  # intact and as exported, but this torch cannot load it
        mp.setattr(torch._inductor, "aoti_load_package", another_torch)
        with pytest.raises(ValueError, match="^unet_path: .*unet.pt2' could not be loaded .*export it again with "
                                             "this torch"):
            AotiUNet(bad)
    with pytest.raises(ValueError, match="holds an AOTInductor package, not ONNX graphs"):
        OnnxRuntimeUNet(folder)
    (bad / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "kind"}))
    with pytest.raises(ValueError, match="is malformed: opset is missing"):  # without its kind: a broken ONNX one
        AotiUNet(bad)
    shutil.rmtree(bad)


def _rezip(src, dst, change) -> None:
    """Copy the package ``src`` to ``dst`` member by member, ``change(name, data)`` giving each one's replacements."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            for name, data in change(info.filename, zin.read(info.filename)):
                zout.writestr(name, data)


def _flip_library(name, data):
    if name.endswith(".so"):
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
    return [(name, bytes(data))]


def _add_library(name, data):
    extra = [("archive/data/aotinductor/model/extra.so", b"\x7fELF")] if name.endswith(".so") else []
    return [(name, data), *extra]


@pytest.mark.parametrize("change, refresh, message", [
    (_flip_library, (), r"its member 'archive/data/aotinductor/model/\w+.wrapper.so' differs from the recorded one"),
    (_flip_library, ("files",), r"its member '.*wrapper.so' differs from the recorded one"),
    (_flip_library, ("members",), r"\d+ bytes, the manifest records \d+|sha256 \w+\.\.\., the manifest records"),
    (_add_library, ("files",), r"it holds 'archive/data/aotinductor/model/extra.so', which the manifest does not list"),
], ids=["library-changed", "library-changed-hash-updated", "library-changed-members-updated", "library-added"])
def test_a_package_not_as_its_manifest_describes_is_refused_before_it_loads(aoti, tmp_path, monkeypatch, capsys,
                                                                           change, refresh, message):
    """Loading a package dlopens its shared library, whose constructors run at once: its members and bytes are
    checked first. No malicious library is built here: the library's bytes change, and reaching the loader fails."""
    from dreamfuse.export.manifest import file_entries, package_members

    _, folder, _ = aoti
    bad = tmp_path / "bad"
    bad.mkdir()
    _rezip(folder / "unet.pt2", bad / "unet.pt2", change)
    m = json.loads((folder / MANIFEST).read_text())
    if "files" in refresh:  # a manifest edited to the new file's hash
        m["files"] = file_entries(bad, ["unet.pt2"])
    if "members" in refresh:
        m["graphs"]["unet"]["members"] = package_members(bad / "unet.pt2")
    (bad / MANIFEST).write_text(json.dumps(m))
    loaded = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: loaded.append(a))
    with pytest.raises(ValueError, match=f"^unet_path: '.*/bad/unet.pt2' is not what its manifest describes "
                                         f"\\(({message})\\)"):
        AotiUNet(bad)
    with pytest.raises(ValueError, match="is not what its manifest describes"):
        Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False),
                               unet_backend="aoti", unet_path=bad)
    assert main(["generate", "--unet", str(bad), "--prompt", "a cat", "--steps", "1", "--height", "64", "--width",
                 "64", "--out", str(tmp_path / "cat.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dreamfuse: error: --unet: {str(bad / 'unet.pt2')!r} is not what "
                                               "its manifest describes")
    assert "another torch" not in err[0] and "export it again with this torch" not in err[0]
    assert not loaded


@pytest.mark.parametrize("args, message", [
    (["--static"], "--static: give the one image size with --size PX"),
    (["--size", "100"], "--size: 100 px must be a multiple of 8 and >= 64"),
    (["--size", "64", "--min-size", "64"], "--size: give --size or --min-size/--max-size, not both"),
    (["--device", "mps"], "--device: AOTInductor packages are compiled for cpu or cuda, not 'mps'"),
    (["--batch", "0-4"], "--batch: expected N or MIN-MAX with 1 <= MIN <= MAX, got '0-4'"),
    (["--batch", "1-100", "--size", "72", "--static"],
     "--batch: a dynamic batch is capped at 63 rows (diffusers' Upsample2D); got 100"),
    (["--min-size", "96"], "--min-size: 96 px must be a multiple of 64 px and >= 64"),
])
def test_cli_export_aoti_bad_options_are_one_line(tmp_path, capsys, args, message):
    assert main(["export", "aoti", "--out", str(tmp_path / "x"), "--no-progress", *args]) == 2
    assert capsys.readouterr().err.strip() == f"dreamfuse: error: {message}"
    assert not (tmp_path / "x" / "unet.pt2").exists()


def test_cli_export_aoti_help_has_examples(capsys):
    for argv in (["export", "--help"], ["export", "aoti", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and "dreamfuse export aoti --model tiny" in text


# --------------------------------------------------------------------------------------------- slow variants
@pytest.mark.slow
def test_static_size_package_the_native_runner_builds_on(tmp_path, capsys):
    """The command the C++ runner's build uses, verbatim: static 64 px, batch 1-2; the layout it reads."""
    from dreamfuse.export.aoti import PACKAGE

    folder = tmp_path / "tiny-aoti-static"
    assert main(["export", "aoti", "--model", "tiny", "--out", str(folder), "--batch", "1-2", "--size", "64",
                 "--static", "--no-progress"]) == 0
    m = json.loads((folder / MANIFEST).read_text())
    assert m["profile"] == {"batch": [1, 2], "latent_height": [8, 8], "latent_width": [8, 8], "static": True}
    assert m["dims"] == {"batch": [1, 2]}
    assert [(i["name"], i["shape"]) for i in m["graphs"]["unet"]["inputs"]] == [
        ("sample", ["batch", 4, 8, 8]), ("timestep", ["batch"]), ("encoder_hidden_states", ["batch", 77, 64])]
    engine = tiny_engine("tiny", ip=False)
    backend = AotiUNet(folder / PACKAGE)
    backend.bind(engine)
    for rows in (1, 2):
        x, e, t = rand(rows, 4, 8, 8, seed=rows), rand(rows, 77, 64), torch.linspace(700, 30, rows)
        torch.testing.assert_close(backend(x, t, encoder_hidden_states=e)[0], eager(engine, x, t, e), **TOL)
    with pytest.raises(ValueError, match="^height: 128 px is outside the exported profile"):
        backend(rand(1, 4, 16, 8), torch.ones(1), encoder_hidden_states=rand(1, 77, 64))


@pytest.mark.slow
def test_tiny_xl_package_equals_eager(tmp_path):
    from dreamfuse.export.aoti import export_aoti

    engine = tiny_engine("tiny-xl", ip=False)
    manifest = export_aoti(engine, tmp_path / "xl", batch="1-2", min_size=64, max_size=128, model_name="tiny-xl")
    assert [i["name"] for i in manifest["graphs"]["unet"]["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    backend = AotiUNet(tmp_path / "xl")
    backend.bind(engine)
    rows, h, w = 2, 16, 8
    cross, pooled = engine.unet.config.cross_attention_dim, manifest["model"]["pooled_dim"]
    x, e, t = rand(rows, 4, h, w), rand(rows, 77, cross, seed=1), torch.tensor([800.0, 20.0])
    added = {"text_embeds": rand(rows, pooled, seed=2),
             "time_ids": torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * rows, dtype=torch.float32)}
    torch.testing.assert_close(backend(x, t, encoder_hidden_states=e, added_cond_kwargs=added)[0],
                               eager(engine, x, t, e, added_cond_kwargs=added), **TOL)
    ref = engine.text2img("a cat", steps=2, seed=3, height=64, width=128, output_type="pt")
    engine.set_unet_backend(backend)
    torch.testing.assert_close(engine.text2img("a cat", steps=2, seed=3, height=64, width=128, output_type="pt"), ref,
                               **TOL)


@pytest.mark.slow
def test_ip_adapter_baked_into_a_package_equals_eager(tmp_path):
    from dreamfuse.export.aoti import export_aoti

    engine = tiny_engine("tiny", ip=True)
    manifest = export_aoti(engine, tmp_path / "ip", batch="1-2", size=64, static=True, model_name="tiny")
    assert manifest["ip_adapter"]["tokens"] == 16
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))
    ref = engine.text2img("a dog", ip_image=image, ip_scale=0.6, steps=2, seed=7, output_type="pt")
    plain = engine.text2img("a dog", steps=2, seed=7, output_type="pt")
    engine.set_unet_backend("aoti", tmp_path / "ip")
    torch.testing.assert_close(engine.text2img("a dog", ip_image=image, ip_scale=0.6, steps=2, seed=7,
                                               output_type="pt"), ref, **TOL)
    torch.testing.assert_close(engine.text2img("a dog", steps=2, seed=7, output_type="pt"), plain, **TOL)
    assert (ref - plain).abs().max() > 1e-2  # the image prompt mattered
