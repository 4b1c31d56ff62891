"""Export folders are programs: what dreamfuse checks before it loads one (issue 25, findings 1 and 2).

A folder's ``dreamfuse.json`` records the sha256 of every file it names; the runtime refuses a manifest that is
malformed, names a file outside its folder (absolute path, ``..``, a link leading out) or a file whose bytes are not
the recorded ones, before any onnxruntime session, TensorRT plan or plugin library, or AOTInductor package is loaded.
The AOTInductor package's own test (its members and bytes, checked before ``aoti_load_package``) lives with the
package fixture in ``test_export_aoti.py``.

Hostile folders are cheap copies of the shared tiny export (:func:`clone`: files hard-linked, the manifest copied; a
file that a test changes is replaced, never written through the link). The plan folder is made by hand in the layout
``build_tensorrt`` writes (``test_export_tensorrt.py`` checks that layout on a real build), so these run without
TensorRT and without a GPU.
"""

import builtins
import hashlib
import json
import os
import shutil

import onnx
import onnxruntime as ort
import pytest
import torch
from dreamfuse.engine.cli import main
from dreamfuse.export import manifest as M
from dreamfuse.export.manifest import MANIFEST, file_entries, graph_files, read_manifest
from dreamfuse.export.runtime import OnnxRuntimeUNet, TensorRTUNet
from export_models import shared_export, tiny_engine, two_threads  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_export(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("tiny", ip=True)


WROTE = "wrote the manifest itself"


def clone(src, dst, edit=None):
    """``src`` at ``dst``: files hard-linked, the manifest copied; ``edit(manifest, dst)`` may change the manifest
    (written back unless ``edit`` returns :data:`WROTE`) and the folder."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == MANIFEST:
            shutil.copyfile(f, dst / f.name)
        elif f.is_file():
            os.link(f, dst / f.name)
    if edit is not None:
        m = json.loads((dst / MANIFEST).read_text())
        if edit(m, dst) is not WROTE:
            (dst / MANIFEST).write_text(json.dumps(m))
    return dst


def replace(path, data: bytes) -> None:
    """Give ``path`` new contents without writing through a hard link to the shared export."""
    path.unlink()
    path.write_bytes(data)


def no_native_loading(monkeypatch):
    """Fail the test if anything tries to load a graph, plan, plugin library or package."""
    from dreamfuse.export import plugins

    def called(*args, **kwargs):
        raise AssertionError("native code was loaded before the folder was checked")

    monkeypatch.setattr(ort, "InferenceSession", called)
    monkeypatch.setattr(plugins, "load_tensorrt_plugins", called)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", called)


def cli_generate(folder, tmp_path, capsys) -> tuple[int, list[str]]:
    code = main(["generate", "--unet", str(folder), "--prompt", "a cat", "--steps", "1", "--height", "64", "--width",
                 "64", "--out", str(tmp_path / "cat.png"), "--no-progress"])
    return code, capsys.readouterr().err.strip().splitlines()


# --------------------------------------------------------------------------------------------- written at export
def test_the_export_records_the_sha256_of_every_file_it_names(tiny):
    _, folder, manifest = tiny
    assert manifest["format"] == M.FORMAT == 2
    named = [f for g in manifest["graphs"] for f in graph_files(manifest, g)]
    assert sorted(manifest["files"]) == sorted(named) == sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert all(g["data_files"] == [] for g in manifest["graphs"].values())  # tiny keeps its weights in the graphs


def test_files_are_hashed_in_chunks_never_whole(tmp_path, monkeypatch):
    path = tmp_path / "big.bin"
    data = os.urandom(2 * M.HASH_CHUNK + 12345)
    path.write_bytes(data)
    reads = []
    real_open = builtins.open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

    monkeypatch.setattr(M, "open", lambda *a, **k: Spy(real_open(*a, **k)), raising=False)
    assert M.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert reads and all(0 < n <= M.HASH_CHUNK for n in reads)


# --------------------------------------------------------------------------------------------- finding 2: ONNX
def zeros_graph(real) -> bytes:
    """A graph with ``unet.onnx``'s inputs and output computing ``noise_pred = 0 * sample``."""
    g = onnx.load(str(real), load_external_data=False).graph
    zero = onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT, [], [0.0])
    node = onnx.helper.make_node("Mul", ["sample", "zero"], ["noise_pred"])
    graph = onnx.helper.make_graph([node], "zeros", list(g.input), list(g.output), [zero])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    return model.SerializeToString()


def test_a_tampered_graph_is_refused_before_onnxruntime_runs(tiny, engine, tmp_path, monkeypatch, capsys):
    _, folder, _ = tiny
    bad = clone(folder, tmp_path / "bad")
    replace(bad / "unet.onnx", zeros_graph(folder / "unet.onnx"))
    sess = ort.InferenceSession(str(bad / "unet.onnx"), providers=["CPUExecutionProvider"])
    shapes = {"sample": (1, 4, 8, 8), "timestep": (1,), "encoder_hidden_states": (1, 77, 64),
              "ip_tokens": (1, 16, 64), "ip_scale": (1,)}
    feeds = {k: torch.ones(v) for k, v in shapes.items()}
    assert [i.name for i in sess.get_inputs()] == list(feeds)  # the stand-in takes what unet.onnx takes
    out = sess.run(["noise_pred"], {k: v.numpy() for k, v in feeds.items()})[0]
    assert out.shape == (1, 4, 8, 8) and not out.any()  # what ran before, exit 0
    no_native_loading(monkeypatch)
    with pytest.raises(ValueError, match=r"^unet_path: '.*/bad/unet.onnx' is not what its manifest describes "
                                         r"\(\d+ bytes, the manifest records \d+\)"):
        OnnxRuntimeUNet(bad)
    with pytest.raises(ValueError, match="^unet_path: .* is not what its manifest describes"):
        engine.set_unet_backend("onnxruntime", bad)
    assert engine.unet_backend == "torch"
    # the same size, one bit flipped: the sha256 catches it
    data = bytearray((folder / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    replace(bad / "unet.onnx", bytes(data))
    with pytest.raises(ValueError, match=r"is not what its manifest describes \(sha256 [0-9a-f]{16}\.\.\., the "
                                         r"manifest records [0-9a-f]{16}\.\.\.\)"):
        OnnxRuntimeUNet(bad)
    code, err = cli_generate(bad, tmp_path, capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"dreamfuse: error: --unet: {str(bad / 'unet.onnx')!r} is not what its manifest "
                             "describes") and "use only export folders you trust" in err[0]


def test_a_consistent_hostile_folder_passes_the_hashes_and_is_still_one_line(tiny, tmp_path, capsys):
    """The limit of the checks: whoever writes the files can write matching hashes (trust the folder like code).
    A graph onnxruntime cannot parse is then onnxruntime's refusal, in one line; onnxruntime itself refuses external
    data outside the model's folder."""
    def garbage(m, d):
        replace(d / "unet.onnx", b"root:x:0:0:root:/root:/bin/bash\n")
        m["files"].update(file_entries(d, ["unet.onnx"]))
    bad = clone(tiny[1], tmp_path / "consistent", garbage)
    with pytest.raises(ValueError, match=r"^unet_path: '.*/unet.onnx' is what its manifest describes, but onnxruntime "
                                         r"cannot load it \(.*\); export again$"):
        OnnxRuntimeUNet(bad)
    code, err = cli_generate(bad, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "onnxruntime cannot load it" in err[0]


def test_the_personalize_graph_is_checked_before_its_session(tiny, tmp_path, monkeypatch):
    _, folder, _ = tiny
    bad = clone(folder, tmp_path / "bad")
    backend = OnnxRuntimeUNet(bad, threads=1)  # unet.onnx intact: its session exists
    replace(bad / "unet_personalize.onnx", b"junk")
    no_native_loading(monkeypatch)
    with pytest.raises(ValueError, match="unet_personalize.onnx' is not what its manifest describes"):
        backend._session("unet_personalize")


def test_external_data_is_listed_and_checked_before_onnxruntime_reads_it(tiny, tmp_path, monkeypatch):
    """A graph past 1 GB keeps its weights in ``unet.onnx.data`` (the random SD 1.5 test, slow): the same layout here
    by converting the tiny graph."""
    from dreamfuse.export.onnx import _external_files

    _, folder, _ = tiny

    def externalize(m, d):
        model = onnx.load(str(folder / "unet.onnx"))
        (d / "unet.onnx").unlink()
        onnx.save_model(model, str(d / "unet.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="unet.onnx.data")
        assert _external_files(d / "unet.onnx") == ["unet.onnx.data"]
        m["graphs"]["unet"].update(data_files=["unet.onnx.data"], external_data=True)
        m["files"].update(file_entries(d, ["unet.onnx", "unet.onnx.data"]))
    bad = clone(folder, tmp_path / "external", externalize)
    OnnxRuntimeUNet(bad, threads=1)  # as exported: loads
    data = bytearray((bad / "unet.onnx.data").read_bytes())
    data[-1] ^= 0x40  # one weight changed
    replace(bad / "unet.onnx.data", bytes(data))
    no_native_loading(monkeypatch)
    with pytest.raises(ValueError, match=r"^unet_path: '.*/unet.onnx.data' is not what its manifest describes"):
        OnnxRuntimeUNet(bad)


def _file(value):
    def edit(m, d):
        m["graphs"]["unet"]["file"] = value
    return edit


def _link_out(m, d):
    (d / "unet.onnx").unlink()
    (d / "unet.onnx").symlink_to(d.parent / "other" / "unet.onnx")


def _link_loop(m, d):
    (d / "loop").symlink_to("loop")
    m["graphs"]["unet"]["file"] = "loop"
    m["files"]["loop"] = m["files"]["unet.onnx"]


def _folder_link_out(m, d):
    (d / "sub").symlink_to(d.parent / "other")
    m["graphs"]["unet"]["file"] = "sub/unet.onnx"
    m["files"]["sub/unet.onnx"] = m["files"]["unet.onnx"]


@pytest.mark.parametrize("edit, message", [
    (_file("../other/unet.onnx"), "graphs.unet.file '../other/unet.onnx' leads outside the export folder"),
    (lambda m, d: m["graphs"]["unet"].update(file=str(d.parent / "other" / "unet.onnx")),
     "graphs.unet.file '/.*/other/unet.onnx' leads outside the export folder"),
    (_file("../../../etc/passwd"), "graphs.unet.file '../../../etc/passwd' leads outside the export folder"),
    (_file("..\\other\\unet.onnx"), "leads outside the export folder"),
    (_link_out, "graphs.unet.file 'unet.onnx' in '.*' is a link leading outside the export folder"),
    (_folder_link_out, "graphs.unet.file 'sub/unet.onnx' in '.*' is a link leading outside the export folder"),
    (lambda m, d: m["graphs"]["unet"].update(data_files=["../other/unet.onnx.data"]),
     r"graphs.unet.data_files\[0\] '../other/unet.onnx.data' leads outside"),
    (lambda m, d: m["files"].pop("unet.onnx"), "graphs.unet.file 'unet.onnx' is not listed under files"),
    (_link_loop, "graphs.unet.file 'loop' in '.*' is not a regular file"),
    (_file("a" * 5000), "graphs.unet.file is a 5000-character name, longer than file systems allow"),
], ids=["dotdot", "absolute", "etc-passwd", "backslashes", "link-out", "folder-link-out", "data-file", "unlisted",
        "link-loop", "long-name"])
def test_files_outside_the_folder_or_unlisted_are_refused(tiny, tmp_path, monkeypatch, capsys, edit, message):
    clone(tiny[1], tmp_path / "other")  # a real export next door: what a path leading out would run
    bad = clone(tiny[1], tmp_path / "bad", edit)
    no_native_loading(monkeypatch)
    with pytest.raises(ValueError, match="^unet_path: .*" + message) as e:
        OnnxRuntimeUNet(bad)
    assert "\n" not in str(e.value)
    code, err = cli_generate(bad, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("dreamfuse: error: --unet: ")


def _write(text_of):
    def edit(m, d):
        (d / MANIFEST).write_text(text_of(m))
        return WROTE
    return edit


_deep = _write(lambda m: "[" * 100_000 + "]" * 100_000)
_deep_inside = _write(lambda m: json.dumps(m)[:-1] + ', "notes": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001)


MALFORMED = [
    ("model-is-a-list", lambda m, d: m.update(model=[]), "model is a list, expected an object"),
    ("graphs-is-a-list", lambda m, d: m.update(graphs=[m["graphs"]["unet"]]), "graphs is a list, expected an object"),
    ("missing-hash", lambda m, d: m["model"].pop("hash"), "model.hash is missing"),
    ("deep-nesting", _deep, r"is not a readable manifest \(nested too deeply\)"),
    ("deep-nesting-inside", _deep_inside, r"is not a readable manifest \(nested too deeply\)"),
    ("null-file", _file(None), "graphs.unet.file is null, expected a file name inside the export folder"),
    ("missing-latent-height", lambda m, d: m["profile"].pop("latent_height"), "profile.latent_height is missing"),
    ("batch-0-0", lambda m, d: m["profile"].update(batch=[0, 0]),
     r"profile.batch is \[0, 0\], expected \[MIN, MAX\] integers with 1 <= MIN"),
    ("batch-huge", lambda m, d: m["profile"].update(batch=[1, 10**12]), r"profile.batch is \[1, 1000000000000\]"),
    ("text-len-bool", lambda m, d: m["model"].update(text_len=True), r"model.text_len is true, expected an integer"),
    ("ip-tokens-string", lambda m, d: m["ip_adapter"].update(tokens="16"), "ip_adapter.tokens is the string '16'"),
    ("no-unet-graph", lambda m, d: m["graphs"].pop("unet"), "graphs.unet is missing"),
    ("bad-sha256", lambda m, d: m["files"]["unet.onnx"].update(sha256="0"), r"files\['unet.onnx'\].sha256 is"),
    ("ama-factor-0", lambda m, d: m["graphs"]["unet_personalize"].update(ama_factors=[0]),
     r"graphs.unet_personalize.ama_factors\[0\] is 0, expected an integer in \[1, 64\]"),
    ("not-an-object", _write(lambda m: "[1, 2]"), r"a JSON list, not an object"),
    ("huge-manifest", _write(lambda m: json.dumps(m) + " " * M.MAX_MANIFEST_BYTES), "is not a readable manifest"),
]


@pytest.mark.parametrize("edit, message", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_a_malformed_manifest_is_one_value_error_naming_the_field(tiny, tmp_path, monkeypatch, edit, message):
    bad = clone(tiny[1], tmp_path / "bad", edit)
    no_native_loading(monkeypatch)
    with pytest.raises(ValueError, match=f"^unet_path: '.*/bad/dreamfuse.json' .*{message}") as e:
        OnnxRuntimeUNet(bad)
    assert "\n" not in str(e.value)


def test_malformed_manifests_through_the_cli_are_one_line(tiny, tmp_path, capsys):
    for name, edit, _ in MALFORMED[:9]:  # the red team's list, and a few more
        bad = clone(tiny[1], tmp_path / name, edit)
        code, err = cli_generate(bad, tmp_path, capsys)
        assert code == 2 and len(err) == 1, (name, err)
        assert err[0].startswith(f"dreamfuse: error: --unet: {str(bad / MANIFEST)!r} "), (name, err)


def test_a_format_1_folder_cannot_be_verified_and_is_refused(tiny, tmp_path, capsys):
    _, folder, _ = tiny

    def old(m, d):
        m["format"] = 1
        del m["files"]
        for g in m["graphs"].values():
            g.pop("data_files")
    bad = clone(folder, tmp_path / "old", old)
    with pytest.raises(ValueError, match=r"^unet_path: .* is a format-1 manifest, which records no sha256 of its "
                                         r"files: they cannot be verified before loading \(export again"):
        read_manifest(bad)
    code, err = cli_generate(bad, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "export again" in err[0]


# --------------------------------------------------------------------------------------------- plan folders
def plan_folder(tiny, dst, libraries=("plugins/libdreamfuse_trt_plugins.so",)):
    """A plan folder in ``build_tensorrt``'s layout (plans here are stand-in bytes: nothing deserializes them)."""
    _, folder, onnx_manifest = tiny
    dst.mkdir()
    (dst / "plugins").mkdir()
    profiles = [{"batch": [1, 2, 8], "latent_height": [8, 8, 16], "latent_width": [8, 8, 16]}]
    m = json.loads(json.dumps(onnx_manifest))
    m["graphs"] = {}
    for graph in ("unet", "unet_personalize"):
        g = dict(onnx_manifest["graphs"][graph])
        g.pop("file"), g.pop("data_files")
        g.update(plan=f"{graph}.plan", profiles=profiles, cache_key="0" * 24, layers=1, plan_bytes=4096)
        (dst / g["plan"]).write_bytes(os.urandom(4096))
        m["graphs"][graph] = g
    for lib in libraries:
        (dst / lib).write_bytes(b"\x7fELF stand-in")
    m["tensorrt"] = {"module": "tensorrt_rtx", "version": "1.7.1.116", "static": False, "refit": False,
                     "profiles": profiles, "build_s": {}, "timing_cache": None, "plugin_libraries": list(libraries),
                     "compute_capability": "8.9"}
    m["files"] = file_entries(dst, [*(g["plan"] for g in m["graphs"].values()), *libraries])
    (dst / MANIFEST).write_text(json.dumps(m))
    return dst


def _edit(folder, change):
    m = json.loads((folder / MANIFEST).read_text())
    change(m)
    (folder / MANIFEST).write_text(json.dumps(m))


def test_plan_folders_are_verified_before_plugins_load_or_plans_deserialize(tiny, tmp_path, monkeypatch):
    good = plan_folder(tiny, tmp_path / "plans")
    no_native_loading(monkeypatch)
    if not torch.cuda.is_available():  # an intact folder gets as far as the GPU check (after verification)
        with pytest.raises(ValueError, match="^unet_path: TensorRT engines run on a CUDA GPU"):
            TensorRTUNet(good)
    for name, data in (("unet_personalize.plan", os.urandom(4096)), ("plugins/libdreamfuse_trt_plugins.so",
                                                                       b"\x7fELF another library")):
        bad = plan_folder(tiny, tmp_path / f"bad-{name.replace('/', '-')}")
        replace(bad / name, data)
        with pytest.raises(ValueError, match=f"^unet_path: '.*/{name}' is not what its manifest describes"):
            TensorRTUNet(bad)
    with pytest.raises(ValueError, match=r"^unet_path: '.*/other.plan' is not a file its folder's manifest lists"):
        TensorRTUNet(good / "other.plan")
    with pytest.raises(ValueError, match="holds TensorRT plans, not ONNX graphs"):
        OnnxRuntimeUNet(good)
    with pytest.raises(ValueError, match="holds ONNX graphs, not TensorRT plans"):
        TensorRTUNet(tiny[1])


@pytest.mark.parametrize("library, message", [
    ("/usr/lib/libdreamfuse_trt_plugins.so", "leads outside the export folder"),
    ("../libdreamfuse_trt_plugins.so", "leads outside the export folder"),
    ("link", "is a link leading outside the export folder"),
    ("unlisted", "is not listed under files"),
])
def test_plugin_libraries_outside_the_plan_folder_or_unlisted_are_refused(tiny, tmp_path, monkeypatch, library,
                                                                         message):
    folder = plan_folder(tiny, tmp_path / "plans")
    outside = tmp_path / "libdreamfuse_trt_plugins.so"
    outside.write_bytes(b"\x7fELF elsewhere")
    lib = "plugins/libdreamfuse_trt_plugins.so"
    if library == "link":
        (folder / lib).unlink()
        (folder / lib).symlink_to(outside)
    elif library == "unlisted":
        (folder / "plugins" / "extra.so").write_bytes(b"\x7fELF")
        _edit(folder, lambda m: m["tensorrt"]["plugin_libraries"].append("plugins/extra.so"))
    else:
        def move(m):
            m["tensorrt"]["plugin_libraries"] = [library]
            m["files"][library] = m["files"].pop(lib)
        _edit(folder, move)
    no_native_loading(monkeypatch)
    with pytest.raises(ValueError, match=r"^unet_path: .*tensorrt.plugin_libraries\[\d\] .*" + message) as e:
        TensorRTUNet(folder)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- finding 1: --help
@pytest.mark.parametrize("command", ["generate", "personalize", "compose", "serve"])
def test_help_of_every_command_taking_unet_says_an_export_folder_is_a_program(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    unet = text[text.index("--unet DIR|FILE.plan"):]
    assert "An export folder is a program" in unet and "use only folders you trust" in unet
    assert "sha256" in unet


def test_export_help_says_export_folders_and_plugin_libraries_are_programs(capsys):
    for argv, phrase in ((["export", "--help"], "An export folder is a program"),
                         (["export", "tensorrt", "--help"], "native code loaded into this process (a program")):
        with pytest.raises(SystemExit):
            main(argv)
        assert phrase in " ".join(capsys.readouterr().out.split())
