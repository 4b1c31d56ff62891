"""Loading details as diffusers users expect them: weight variants, the single-file configs argument, and
textual inversions in diffusers' and AUTOMATIC1111's formats (checked against diffusers' own loaders)."""

import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.cli import main
from dreamfuse.engine.tiny import build
from safetensors.torch import save_file

CPU = EngineConfig(device="cpu", backend="torch", progress=False)


def _pipe(components=None):
    from diffusers import StableDiffusionPipeline

    c = components or build("tiny")
    return StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    """A folder written by ``save_pretrained(variant="fp16")``: only ``*.fp16.safetensors`` weight files."""
    path = tmp_path_factory.mktemp("variant") / "tiny-fp16"
    _pipe().save_pretrained(str(path), safe_serialization=True, variant="fp16")
    assert (path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    return path


def test_variant_folder_loads_as_diffusers_loads_it(fp16_folder):
    from diffusers import StableDiffusionPipeline

    engine = Engine.from_pretrained(str(fp16_folder), CPU, variant="fp16")
    ref = StableDiffusionPipeline.from_pretrained(str(fp16_folder), variant="fp16", local_files_only=True,
                                                  safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(ref, name).state_dict(), getattr(engine, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    tiny = Engine.from_pretrained("tiny", CPU)
    kw = dict(steps=2, seed=0, output_type="latent")
    torch.testing.assert_close(engine.text2img("a dog", **kw), tiny.text2img("a dog", **kw))


def test_variant_errors_name_the_variant(fp16_folder, tmp_path):
    with pytest.raises(ValueError, match=r"variant='fp16' \(CLI: --variant fp16\)"):
        Engine.from_pretrained(str(fp16_folder), CPU)  # only fp16 files: say which variant to ask for
    with pytest.raises(ValueError, match="holds no 'bf16' weights.*'fp16'"):
        Engine.from_pretrained(str(fp16_folder), CPU, variant="bf16")
    for bad in ("", "../x", "a b", 16):
        with pytest.raises(ValueError, match="^variant: "):
            Engine.from_pretrained(str(fp16_folder), CPU, variant=bad)
    with pytest.raises(ValueError, match="only for a diffusers folder"):
        Engine.from_pretrained("tiny", CPU, variant="fp16")


def test_cli_variant(fp16_folder, tmp_path, capsys):
    out = tmp_path / "v.png"
    assert main(["generate", "--model", str(fp16_folder), "--variant", "fp16", "--prompt", "a cat", "--steps", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["generate", "--model", "tiny", "--variant", "fp16", "--prompt", "a cat", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.count("--variant") == 1 and "diffusers folder" in err


def test_single_file_advice_names_the_argument_that_works(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, ckpt)
    with pytest.raises(ValueError, match=r"config_dir=DIR") as e:
        Engine.from_pretrained(str(ckpt), CPU)
    assert "pass config=" not in str(e.value)
    with pytest.raises(TypeError, match="config: expected an EngineConfig.*config_dir="):
        Engine.from_pretrained(str(ckpt), str(tmp_path))  # following the old advice literally
    for bad in (None, 5):
        with pytest.raises(ValueError, match="^model: "):
            Engine.from_pretrained(bad, CPU)


# ------------------------------------------------------------------------------------------ textual inversion
PROMPT = "a photo of <tok> on a table, <tok>"


def _diffusers_embeddings(path, token=None, prompt=PROMPT):
    """diffusers' load_textual_inversion + encode_prompt on a fresh copy of the tiny model."""
    pipe = _pipe()
    pipe.load_textual_inversion(str(path), token=token)
    emb, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return emb


@pytest.mark.parametrize("vectors", [1, 3])
def test_a1111_pt_loads_as_diffusers_loads_it(tmp_path, vectors):
    vec = torch.randn(vectors, 64, generator=torch.Generator().manual_seed(vectors))
    path = tmp_path / "a1111.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "<tok>", "step": 1500,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "tiny"}, path)
    engine = Engine.from_pretrained("tiny", CPU)
    assert engine.load_textual_inversion(path) == "<tok>"
    torch.testing.assert_close(engine.encode_prompts([PROMPT]), _diffusers_embeddings(path), atol=0, rtol=0)
    # the token expands in every tokenizer call, so token positions (personalize's subject index) agree too
    ids = engine.tokenize(PROMPT).input_ids
    assert ids.count(engine.tokenizer.convert_tokens_to_ids("<tok>")) == 2
    assert len(ids) == len(engine.tokenizer(PROMPT).input_ids) + 2 * (vectors - 1)


def test_a1111_safetensors_takes_the_given_name_or_the_file_stem(tmp_path):
    vec = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    save_file({"emb_params": vec}, tmp_path / "mystyle.safetensors")
    engine = Engine.from_pretrained("tiny", CPU)
    assert engine.load_textual_inversion(tmp_path / "mystyle.safetensors", token="<tok>") == "<tok>"
    torch.testing.assert_close(engine.encode_prompts([PROMPT]),
                               _diffusers_embeddings(tmp_path / "mystyle.safetensors", token="<tok>"), atol=0, rtol=0)
    other = Engine.from_pretrained("tiny", CPU)
    assert other.load_textual_inversion(tmp_path / "mystyle.safetensors") == "mystyle"  # AUTOMATIC1111's naming
    assert other.learned_tokens["mystyle"] == ["mystyle", "mystyle_1"]


def test_diffusers_format_multi_vector_and_reload(tmp_path):
    vec = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    torch.save({"<tok>": vec}, tmp_path / "learned_embeds.bin")
    engine = Engine.from_pretrained("tiny", CPU)
    engine.load_textual_inversion(tmp_path / "learned_embeds.bin")
    torch.testing.assert_close(engine.encode_prompts([PROMPT]), _diffusers_embeddings(tmp_path / "learned_embeds.bin"),
                               atol=0, rtol=0)
    engine.load_textual_inversion({"<tok>": vec[0]})  # loading a token again replaces it (one vector now)
    assert engine.learned_tokens["<tok>"] == ["<tok>"]
    torch.save({"<tok>": vec[:1]}, tmp_path / "one.bin")
    torch.testing.assert_close(engine.encode_prompts([PROMPT]), _diffusers_embeddings(tmp_path / "one.bin"),
                               atol=0, rtol=0)


@pytest.mark.parametrize("data, needle", [
    ({"string_to_param": {"*": torch.randn(64)}}, "names no token"),
    ({"string_to_param": [1, 2], "name": "<t>"}, "string_to_param is not a non-empty dict"),
    ({"string_to_param": {"*": torch.zeros(80, 64)}, "name": "<t>"}, r"1 <= n <= 75"),
    ({"string_to_param": {"*": torch.randn(2, 32)}, "name": "<t>"}, "hidden size is 64"),
    ({"string_to_param": {"*": torch.ones(2, 64).long()}, "name": "<t>"}, "not a floating-point tensor"),
    ({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, "SDXL textual inversion"),
    ({"string_to_param": {"*": torch.randn(1, 64)}, "name": "a b"}, "without spaces"),
])
def test_bad_textual_inversions_are_one_value_error(tmp_path, data, needle):
    engine = Engine.from_pretrained("tiny", CPU)
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=needle):
        engine.load_textual_inversion(tmp_path / "bad.pt")
    assert not engine.learned_tokens and not engine.tokenizer.get_added_vocab().keys() - {"<|startoftext|>",
                                                                                           "<|endoftext|>"}


@pytest.mark.parametrize("token", ["<|endoftext|>", "<|startoftext|>"])
def test_special_tokens_cannot_be_overwritten(tmp_path, token):
    engine = Engine.from_pretrained("tiny", CPU)
    before = engine.encode_prompts(["a cat"]).clone()
    torch.save({token: torch.randn(64)}, tmp_path / "evil.bin")
    with pytest.raises(ValueError, match="special or added token|already a word"):
        engine.load_relation(tmp_path / "evil.bin")
    engine.clear_prompt_cache()
    assert torch.equal(engine.encode_prompts(["a cat"]), before)


def test_cli_textual_inversion(tmp_path, capsys):
    torch.save({"string_to_param": {"*": torch.randn(2, 64)}, "name": "<tok>"}, tmp_path / "ti.pt")
    out = tmp_path / "ti.png"
    assert main(["generate", "--textual-inversion", str(tmp_path / "ti.pt"), "--prompt", "a <tok>", "--steps", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert out.is_file()
    assert main(["generate", "--textual-inversion", f"{tmp_path / 'ti.pt'}:<other>", "--prompt", "a <other>",
                 "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    torch.save({"string_to_param": {"*": torch.randn(2, 8)}, "name": "<tok>"}, tmp_path / "bad.pt")
    assert main(["generate", "--textual-inversion", str(tmp_path / "bad.pt"), "--prompt", "a <tok>",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--textual-inversion" in err and "hidden size" in err
