"""``dreamfuse export onnx --layout optimum``: the pipeline folder diffusers' and optimum's ONNX pipelines load.

One tiny export (CLI, batch 1-4, 64-128 px; about a minute on 2 cores) is shared by the module. diffusers'
``OnnxStableDiffusionPipeline`` loads it and is compared with diffusers' torch ``StableDiffusionPipeline`` on a
stock copy of the same model (same latents, scheduler, prompts); optimum cannot be installed beside diffusers 0.42
(its transformers pin), so its side is checked as its loader reads the folder (``optimum/onnxruntime/
modeling_diffusion.py``): a session per ``<component>/model.onnx``, the ``config.json`` beside it, inputs cast to
the graph's types, a scalar timestep unsqueezed to ``(1,)``, the VAE decoder fed latents already divided by the
config's ``scaling_factor``, outputs read by name. Tolerance as in tests/test_export_onnx.py: measured ~2e-6.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dreamfuse.engine.cli import main
from dreamfuse.engine.tiny import build_components
from export_models import two_threads  # noqa: F401 (autouse fixture)

TOL = dict(atol=1e-4, rtol=1e-4)
ARGS = ["--model", "tiny", "--layout", "optimum", "--batch", "1-4", "--min-size", "64", "--max-size", "128",
        "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("optimum") / "tiny-ort"
    assert main(["export", "onnx", "--out", str(out), *ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def stock():
    """The tiny model's modules with diffusers' stock attention (no dreamfuse processor anywhere)."""
    return build_components()


def session(folder, name):
    return ort.InferenceSession(str(folder / name / "model.onnx"), providers=["CPUExecutionProvider"])


def io(model):
    """``{name: (elem_type, [dim_param or dim_value, ...])}`` of a graph's inputs and outputs."""
    return {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*model.graph.input, *model.graph.output]}


def public(config) -> dict:
    """A diffusers config without its bookkeeping keys (``_class_name``, ``_diffusers_version``, ...)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- diffusers
def test_diffusers_onnx_pipeline_equals_diffusers_torch_pipeline(folder, stock, capsys):
    from diffusers import DDIMScheduler, OnnxStableDiffusionPipeline, StableDiffusionPipeline

    onx = OnnxStableDiffusionPipeline.from_pretrained(str(folder), provider="CPUExecutionProvider")
    onx.set_progress_bar_config(disable=True)
    pipe = StableDiffusionPipeline(**{k: stock[k] for k in ("unet", "vae", "text_encoder", "tokenizer")},
                                   scheduler=DDIMScheduler.from_config(stock["scheduler"].config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert type(onx.scheduler) is DDIMScheduler and public(onx.scheduler.config) == public(pipe.scheduler.config)
    runs = [(["a photo of a cat", "a dog on the beach"], 64, 64, 7.5),  # CFG: UNet batch 4, one timestep for all
            (["a red car"], 128, 64, 1.0)]  # no CFG, batch 1, another size
    for prompts, h, w, g in runs:
        latents = rand(len(prompts), 4, h // 8, w // 8, seed=h)
        kw = dict(height=h, width=w, num_inference_steps=3, guidance_scale=g, output_type="np")
        want = pipe(prompts, latents=latents.clone(), **kw).images
        got = onx(prompts, latents=latents.numpy().copy(), **kw).images
        assert got.shape == want.shape == (len(prompts), h, w, 3)
        assert want.std() > 0.05  # an image, not a constant
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), **TOL)


# --------------------------------------------------------------------------------------------- optimum's contract
def test_folder_layout_and_configs(folder, stock):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "OnnxStableDiffusionPipeline"
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert index[name] == ["diffusers", "OnnxRuntimeModel"]
        assert (folder / name / "model.onnx").is_file() and (folder / name / "config.json").is_file()
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["safety_checker"] == index["feature_extractor"] == [None, None]
    assert not (folder / "dreamfuse.json").exists()  # not a --unet folder
    # config.json: the torch module's config (optimum registers it on each ORT model; the pipelines read
    # unet.config.in_channels / sample_size, vae.config.scaling_factor / block_out_channels)
    unet_cfg = UNet2DConditionModel.load_config(folder / "unet")
    for key, value in public(stock["unet"].config).items():
        assert unet_cfg[key] == (list(value) if isinstance(value, tuple) else value), key
    for name in ("vae_decoder", "vae_encoder"):
        cfg = AutoencoderKL.load_config(folder / name)
        assert cfg["scaling_factor"] == stock["vae"].config.scaling_factor
        assert cfg["block_out_channels"] == list(stock["vae"].config.block_out_channels)
    text_cfg = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    assert (text_cfg.vocab_size, text_cfg.hidden_size, text_cfg.num_hidden_layers) == (
        stock["text_encoder"].config.vocab_size, 64, stock["text_encoder"].config.num_hidden_layers)
    assert public(DDIMScheduler.from_pretrained(folder / "scheduler").config) == public(stock["scheduler"].config)
    # the tokenizer: transformers 5's tokenizer.json, and transformers 4's vocab.json + merges.txt beside it
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= {p.name for p in (folder / "tokenizer").iterdir()}
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tok.model_max_length == 77
    assert tok(["a photo of a sks dog"]).input_ids == stock["tokenizer"](["a photo of a sks dog"]).input_ids
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    assert vocab == stock["tokenizer"].get_vocab()


def test_graph_names_dtypes_and_axes(folder):
    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32

    def graph(name):
        return onnx.load(str(folder / name / "model.onnx"), load_external_data=False)

    assert io(graph("text_encoder")) == {"input_ids": (i32, ["batch", 77]),
                                         "last_hidden_state": (f32, ["batch", 77, 64]),
                                         "pooler_output": (f32, ["batch", 64])}
    unet = graph("unet")
    assert [v.name for v in unet.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert io(unet) == {"sample": (f32, ["batch", 4, "height", "width"]), "timestep": (f32, ["timestep_batch"]),
                        "encoder_hidden_states": (f32, ["batch", 77, 64]),
                        "out_sample": (f32, ["batch", 4, "height", "width"])}
    assert io(graph("vae_decoder")) == {"latent_sample": (f32, ["batch", 4, "height", "width"]),
                                        "sample": (f32, ["batch", 3, "8*height", "8*width"])}
    assert io(graph("vae_encoder")) == {"sample": (f32, ["batch", 3, "height", "width"]),
                                        "latent_sample": (f32, ["batch", 4, "height/8", "width/8"])}
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert not any(n.domain for n in graph(name).graph.node), name  # standard ops only


def test_graphs_as_optimums_models_call_them(folder, stock):
    """What ORTTextEncoder / ORTUnet / ORTVaeDecoder / ORTVaeEncoder do with each session, against the stock
    torch modules."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    sessions = {name: session(folder, name) for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder")}
    for sess in sessions.values():  # optimum reads the config beside the session's model file
        assert (Path(sess._model_path).parent / "config.json").is_file()

    def run(sess, **inputs):  # optimum's _prepare_onnx_inputs: cast to the graph's type; outputs by name
        types = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64}
        feed = {i.name: np.asarray(inputs[i.name]).astype(types[i.type]) for i in sess.get_inputs()}
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))

    ids = stock["tokenizer"](["a photo of a cat", ""], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids  # int64, as the torch pipeline tokenizes
    out = run(sessions["text_encoder"], input_ids=ids.numpy())
    with torch.no_grad():
        want = stock["text_encoder"](ids)
    torch.testing.assert_close(torch.from_numpy(out["last_hidden_state"]), want.last_hidden_state, **TOL)
    torch.testing.assert_close(torch.from_numpy(out["pooler_output"]), want.pooler_output, **TOL)

    x, e = rand(3, 4, 16, 8), rand(3, 77, 64, seed=1)
    for t in (torch.tensor(801), torch.tensor([999.0, 500.0, 3.0])):  # optimum: a scalar unsqueezed; or per row
        got = run(sessions["unet"], sample=x.numpy(), timestep=t.reshape(-1).numpy(),
                  encoder_hidden_states=e.numpy())["out_sample"]
        with torch.no_grad():
            want = stock["unet"](x, t, encoder_hidden_states=e, return_dict=False)[0]
        torch.testing.assert_close(torch.from_numpy(got), want, **TOL)

    vae: AutoencoderKL = stock["vae"]
    lat = rand(2, 4, 8, 16, seed=2)  # what the pipeline hands the decoder: latents / scaling_factor
    with torch.no_grad():
        want = vae.decode(lat / vae.config.scaling_factor, return_dict=False)[0]
        got = run(sessions["vae_decoder"], latent_sample=(lat / vae.config.scaling_factor).numpy())["sample"]
        torch.testing.assert_close(torch.from_numpy(got), want, **TOL)
        image = rand(1, 3, 64, 128, seed=3).clamp(-1, 1)
        got = run(sessions["vae_encoder"], sample=image.numpy())["latent_sample"]
        torch.testing.assert_close(torch.from_numpy(got), vae.encode(image).latent_dist.mean, **TOL)


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, flag", [
    (["--personalize"], "--personalize"),
    (["--personalize", "--plugins"], "--personalize"),
    (["--plugins"], "--plugins"),
    (["--static", "--batch", "2", "--size", "64"], "--static"),
    (["--no-vae"], "--no-vae"),
    (["--no-text-encoders"], "--no-text-encoders"),
    (["--ip-adapter", "tiny", "--image-encoder", "tiny"], "--ip-adapter"),
    (["--model", "tiny-xl"], "--model"),
])
def test_layout_optimum_refuses_what_it_cannot_honour(tmp_path, capsys, args, flag):
    out = tmp_path / "x"
    assert main(["export", "onnx", "--out", str(out), "--layout", "optimum", "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dreamfuse: error: --layout optimum with {flag}: ") and "\n" not in err
    assert not out.exists()  # refused before any export work


def test_layout_unknown_is_argparses_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "onnx", "--out", str(tmp_path / "x"), "--layout", "onnxruntime"])
    assert e.value.code == 2
    assert "argument --layout: invalid choice: 'onnxruntime' (choose from 'dreamfuse', 'optimum')" in \
        capsys.readouterr().err


def test_layout_in_help_and_library(capsys):
    from dreamfuse.engine import Engine, EngineConfig
    from dreamfuse.engine.cli.export import LAYOUTS
    from dreamfuse.export import onnx as onnx_export

    assert LAYOUTS == onnx_export.LAYOUTS
    with pytest.raises(SystemExit):
        main(["export", "onnx", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--layout {dreamfuse,optimum}" in text and "--layout optimum" in text
    engine = Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))
    with pytest.raises(ValueError, match=r"^layout: 'optimim' is not a layout \(use dreamfuse or optimum\)$"):
        onnx_export.export_onnx(engine, "unused", layout="optimim")
    with pytest.raises(ValueError, match="^plugins: "):
        onnx_export.export_onnx(engine, "unused", layout="optimum", plugins=True, personalize=False)
    with pytest.raises(ValueError, match="^no_vae: "):
        onnx_export.export_onnx(engine, "unused", layout="optimum", vae=False)
