"""Issue 25, findings 11-15: hostile-but-loadable files (resume checkpoints, LoRAs, IP-Adapters), ill-typed Python
arguments, unbounded CLI options and messages that name the wrong thing. Every refusal is one line naming the field
(exit 2 from the CLI), before any model loads where no model is needed to tell."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

import numpy as np
import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine import engine as engine_module
from dreamfuse.engine.cli import main
from PIL import Image

FAST_S = 15.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: what is checked here must be checked before."""

    def refuse(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(engine_module.Engine, "from_pretrained", refuse)


def _engine() -> Engine:
    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", dtype="fp32", backend="torch", progress=False))


def one_line_error(argv, capsys) -> str:
    """Run the CLI; it must exit 2 with one ``dreamfuse: error:`` line, in seconds. Returns the line."""
    capsys.readouterr()
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}; stderr: {err}"
    assert len(err.splitlines()) == 1 and err.startswith("dreamfuse: error:") and "Traceback" not in err, err
    assert elapsed < FAST_S, f"{elapsed:.1f} s to fail"
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_state") / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "text.json").write_text(json.dumps({f"{i}.png": ["cat {} box"] for i in range(2)}))
    return root


# ------------------------------------------------------------------------------------------------ finding 11
REV = dict(steps=1, batch_size=1, grad_accum=1, checkpoint_every=1, progress=False)


@pytest.fixture(scope="module")
def reversion_checkpoint(data, tmp_path_factory):
    from dreamfuse.engine.train.reversion import ReVersionConfig, train

    out = tmp_path_factory.mktemp("rev_ckpt")
    train(_engine(), data, out, ReVersionConfig(**REV))
    return torch.load(out / "checkpoints" / "step-0000001.pt", weights_only=True)


def _nan_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


# (id, mutation of the checkpoint dict, what the message says)
DAMAGE = [
    ("step-negative", lambda s: s.update(step=-5), "step is -5"),
    ("step-past-its-history", lambda s: s.update(step=10**12), "records the losses of 1 steps"),
    ("step-float", lambda s: s.update(step=1e12), "step is 1000000000000.0"),
    ("embedding-nan", lambda s: s.update(embedding=_nan_first(s["embedding"])), "embedding holds NaN"),
    ("embedding-int", lambda s: s.update(embedding=s["embedding"].long()), "embedding is a torch.int64 tensor"),
    ("embedding-2d", lambda s: s.update(embedding=s["embedding"][None]), "embedding has shape"),
    ("no-scaler", lambda s: s.pop("scaler"), "lacks scaler"),
    ("no-token", lambda s: s.pop("token"), "lacks token"),
    ("token-int", lambda s: s.update(token=5), "token is 5"),
    ("scaler-str", lambda s: s.update(scaler="x"), "scaler is a str"),
    ("optimizer-str", lambda s: s.update(optimizer="x"), "optimizer is not an optimizer state"),
    ("optimizer-nan", lambda s: s["optimizer"]["state"][0].update(exp_avg=_nan_first(
        s["optimizer"]["state"][0]["exp_avg"])), "exp_avg of parameter 0 holds NaN"),
    ("optimizer-shape", lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)), "has shape (3,)"),
    ("generator-short", lambda s: s.update(generator=torch.zeros(10, dtype=torch.uint8)), "generator is not"),
    ("rng-float", lambda s: s.update(torch_rng=torch.zeros(5056)), "torch_rng is a torch.float32 tensor"),
    ("losses-str", lambda s: s["losses"][0].update(loss="a"), "losses[0]"),
    ("world-size-str", lambda s: s.update(world_size="abc"), "world_size is 'abc'"),
    ("config-list", lambda s: s.update(config=[1]), "config is a list"),
]


@pytest.mark.parametrize("mutate, needle", [c[1:] for c in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_resume_checks_the_whole_checkpoint_before_the_model_loads(reversion_checkpoint, data, tmp_path, capsys,
                                                                     no_model, mutate, needle):
    """Finding 11: a nonsense step, a NaN embedding, missing or ill-typed entries are one line each (exit 2)
    before the model loads, from the CLI and from ``train`` alike; nothing is written."""
    from dreamfuse.engine.train.reversion import ReVersionConfig, train

    state = copy.deepcopy(reversion_checkpoint)
    mutate(state)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    out = tmp_path / "out"
    err = one_line_error(["train", "reversion", "--data", str(data), "--out", str(out), "--resume", str(bad),
                          "--steps", "2", "--batch-size", "1", "--grad-accum", "1", "--checkpoint-every", "1",
                          "--no-progress"], capsys)
    assert "resume: " in err and needle in err, err
    with pytest.raises(ValueError, match="^resume: ") as e:
        train("tiny", data, out, ReVersionConfig(**{**REV, "steps": 2}), resume=str(bad))
    assert needle in str(e.value)
    assert not out.exists()


def test_resume_of_an_intact_checkpoint_still_continues(reversion_checkpoint, data, tmp_path):
    from dreamfuse.engine.train.reversion import ReVersionConfig, check_checkpoint, train

    check_checkpoint(reversion_checkpoint, ReVersionConfig(**REV), "ckpt")
    torch.save(reversion_checkpoint, tmp_path / "ok.pt")
    result = train(_engine(), data, tmp_path / "out", ReVersionConfig(**{**REV, "steps": 2}),
                   resume=str(tmp_path / "ok.pt"))
    assert [r["step"] for r in result.losses] == [1, 2]


def test_resume_checks_what_only_the_trainer_knows(reversion_checkpoint, data, tmp_path):
    """An optimizer state whose learning rate is not the run's, an embedding of another model's width."""
    from dreamfuse.engine.train.reversion import ReVersionConfig, train

    cfg = ReVersionConfig(**{**REV, "steps": 2})
    for mutate, needle in [(lambda s: s["optimizer"]["param_groups"][0].update(lr=1e9), "lr 1000000000.0"),
                           (lambda s: (s.update(embedding=torch.zeros(65)), s["optimizer"]["state"][0].update(
                               exp_avg=torch.zeros(65), exp_avg_sq=torch.zeros(65))), "(65,) embedding")]:
        state = copy.deepcopy(reversion_checkpoint)
        mutate(state)
        torch.save(state, tmp_path / "bad.pt")
        engine = _engine()
        with pytest.raises(ValueError, match="^resume: ") as e:
            train(engine, data, tmp_path / "out", cfg, resume=str(tmp_path / "bad.pt"))
        assert needle in str(e.value)
        assert not (tmp_path / "out" / "learned_embeds.bin").exists()


def _patchdpo_checkpoint(out):
    """A PatchDPO checkpoint as ``write_checkpoint`` writes it, of a two-weight adapter after one AdamW step."""
    from dreamfuse.engine.train.common import write_checkpoint
    from dreamfuse.engine.train.patchdpo import PatchDPOConfig

    params = {"1.to_k_ip.weight": torch.nn.Parameter(torch.randn(4, 3)),
              "1.to_v_ip.weight": torch.nn.Parameter(torch.randn(4, 3))}
    optimizer = torch.optim.AdamW(list(params.values()), lr=3e-5, weight_decay=1e-2)
    sum(p.square().sum() for p in params.values()).backward()
    optimizer.step()
    trainer = dataclasses.make_dataclass("T", ["out", "step", "optimizer", "scaler", "generator", "losses", "cfg"])(
        out, 1, optimizer, torch.amp.GradScaler("cpu", enabled=False), torch.Generator().manual_seed(0),
        [{"step": 1, "loss": 0.5}], PatchDPOConfig(checkpoint_every=1))
    path = write_checkpoint(trainer, {"params": {n: p.detach().clone() for n, p in params.items()}})
    return torch.load(path, weights_only=True), trainer.cfg


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s.update(step=-5), "step is -5"),
    (lambda s: s.update(params={"1.to_k_ip.weight": 5}), "is an int, not a floating-point tensor"),
    (lambda s: s["params"].update({"1.to_v_ip.weight": torch.full((4, 3), float("inf"))}), "holds NaN or inf"),
    (lambda s: s.pop("scaler"), "lacks scaler"),
    (lambda s: s["optimizer"]["state"][1].update(exp_avg_sq=-s["optimizer"]["state"][1]["exp_avg_sq"] - 1),
     "exp_avg_sq of parameter 1 is negative"),
], ids=["step", "int-weight", "inf-weight", "no-scaler", "negative-second-moment"])
def test_patchdpo_resume_checks_the_whole_checkpoint(tmp_path, mutate, needle):
    from dreamfuse.engine.train.patchdpo import check_checkpoint

    state, cfg = _patchdpo_checkpoint(tmp_path)
    check_checkpoint(copy.deepcopy(state), cfg, "ckpt")  # intact: fine
    mutate(state)
    with pytest.raises(ValueError, match="^resume: ckpt ") as e:
        check_checkpoint(state, cfg, "ckpt")
    assert needle in str(e.value)


def test_patchdpo_cli_refuses_a_damaged_checkpoint_before_the_model_loads(tmp_path, capsys, no_model):
    state, _ = _patchdpo_checkpoint(tmp_path)
    state["step"] = -5
    torch.save(state, tmp_path / "bad.pt")
    sample = tmp_path / "pairs" / "s0"
    sample.mkdir(parents=True)
    for name in ("ref.png", "gen0.png"):
        Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(sample / name)
    (sample / "prompt.txt").write_text("a cat")
    err = one_line_error(["train", "patchdpo", "--ip-adapter", "tiny", "--image-encoder", "tiny", "--backbone", "tiny",
                          "--data", str(tmp_path / "pairs"), "--out", str(tmp_path / "out"), "--resume",
                          str(tmp_path / "bad.pt"), "--no-progress"], capsys)
    assert "resume: " in err and "step is -5" in err


# ------------------------------------------------------------------------------------------------ finding 12
@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    from dreamfuse.engine.ip_adapter import save_tiny_ip_adapter
    from dreamfuse.engine.lora import build_tiny_lora
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("weights")
    engine = _engine()
    lora = load_file(build_tiny_lora(engine, root / "lora.safetensors"))
    first = next(iter(lora))
    for name, value in {"lora-1d": lora[first][0], "lora-int": (lora[first] * 100).long(),
                        "lora-nan": _nan_first(lora[first])}.items():
        save_file({**lora, first: value.contiguous()}, root / f"{name}.safetensors")
    weights, encoder = save_tiny_ip_adapter(engine, root / "ipa", plus=True, fmt="bin")
    sd = torch.load(weights, weights_only=True)
    torch.save({"image_proj": {k: 1 for k in sd["image_proj"]}, "ip_adapter": sd["ip_adapter"]}, root / "ints.bin")
    torch.save({"image_proj": sd["image_proj"], "ip_adapter": {k: v.long() for k, v in sd["ip_adapter"].items()}},
               root / "int-tensors.bin")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(root / "ref.png")
    return {"root": root, "encoder": encoder}


@pytest.mark.parametrize("name, needle", [
    ("lora-1d", "are not the weights of a Linear LoRA"),
    ("lora-int", "torch.int64 tensor, not floating-point"),
    ("lora-nan", "holds NaN or inf"),
])
def test_hostile_lora_is_one_line(weight_files, tmp_path, capsys, name, needle):
    """Finding 12: a LoRA whose tensors have the wrong rank (IndexError before), an integer dtype (cast silently
    before) or NaN is refused before the model changes."""
    path = weight_files["root"] / f"{name}.safetensors"
    engine = _engine()
    with pytest.raises(ValueError, match="^lora: ") as e:
        engine.load_lora(path)
    assert needle in str(e.value) and not engine.loras
    err = one_line_error(["generate", "--prompt", "a cat", "--steps", "1", "--lora", str(path), "--no-progress",
                          "--out", str(tmp_path / "x.png")], capsys)
    assert "--lora" in err and needle in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name, needle", [
    ("ints.bin", "image_proj.latents in"),
    ("int-tensors.bin", "torch.int64 tensor, not floating-point weights"),
])
def test_hostile_ip_adapter_is_one_line(weight_files, tmp_path, capsys, monkeypatch, name, needle):
    """Finding 12: an IP-Adapter ``.bin`` of ints (AttributeError before) or of integer tensors (cast silently
    before) is refused before its image encoder loads."""
    from dreamfuse.engine import ip_adapter

    path = weight_files["root"] / name
    with monkeypatch.context() as m:
        m.setattr(ip_adapter, "load_image_encoder", lambda *a, **k: pytest.fail("the image encoder was loaded"))
        with pytest.raises(ValueError, match="^ip_adapter weights: ") as e:
            _engine().load_ip_adapter(path, weight_files["encoder"])
    assert needle in str(e.value)
    err = one_line_error(["generate", "--prompt", "a cat", "--steps", "1", "--ip-adapter", str(path),
                          "--image-encoder", str(weight_files["encoder"]), "--image",
                          str(weight_files["root"] / "ref.png"), "--no-progress", "--out", str(tmp_path / "x.png")],
                         capsys)
    assert "ip_adapter weights" in err and needle in err


# ------------------------------------------------------------------------------------------------ finding 13
@pytest.fixture(scope="module")
def engine():
    return _engine()


REF = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
LAYOUT = np.zeros((64, 64, 3), np.uint8)
LAYOUT[:, 32:] = (255, 0, 0)

# (id, a call that must raise before any work, exception, message start)
API = [
    ("pca_dim-0", lambda e: e.personalize("a sks dog", REF, subject_token="sks", pca_dim=0), ValueError, "pca_dim: "),
    ("pca_dim-neg", lambda e: e.personalize("a sks dog", REF, subject_token="sks", pca_dim=-1), ValueError,
     "pca_dim: "),
    ("pca_dim-str", lambda e: e.personalize("a sks dog", REF, subject_token="sks", pca_dim="a"), TypeError,
     "pca_dim: "),
    ("personalize-callback", lambda e: e.personalize("a sks dog", REF, subject_token="sks", callback=5), TypeError,
     "callback: "),
    ("personalize-progress", lambda e: e.personalize("a sks dog", REF, subject_token="sks", progress="no"),
     TypeError, "progress: "),
    ("ama_start-str", lambda e: e.personalize("a sks dog", REF, subject_token="sks", ama_start="a"), TypeError,
     "ama_start: "),
    ("ama_blocks-int", lambda e: e.personalize("a sks dog", REF, subject_token="sks", ama_blocks=5), TypeError,
     "ama_blocks: "),
    ("text2img-progress", lambda e: e.text2img("a cat", progress="yes"), TypeError, "progress: "),
    ("compose-callback", lambda e: e.compose(LAYOUT, {"#ff0000": "a car"}, prompt="x", callback=5), TypeError,
     "callback: "),
    ("compose-sal_steps-str", lambda e: e.compose(LAYOUT, {"#ff0000": "a car"}, prompt="x", sal_steps=("1", "2")),
     TypeError, "sal_steps: "),
    ("ip-adapter-empty-dict", lambda e: e.load_ip_adapter({}, "enc"), ValueError, "ip_adapter weights: "),
    ("ip-adapter-int", lambda e: e.load_ip_adapter(5, "enc"), TypeError, "weights: "),
    ("ip-adapter-encoder-int", lambda e: e.load_ip_adapter("w.bin", 5), TypeError, "image_encoder: "),
    ("from_pretrained-None", lambda e: Engine.from_pretrained(None), ValueError, "model: "),
]


@pytest.mark.parametrize("call, error, start", [c[1:] for c in API], ids=[c[0] for c in API])
def test_python_api_names_the_bad_argument_before_any_work(engine, monkeypatch, call, error, start):
    """Finding 13: ill-typed or out-of-range arguments of the public pipeline functions and loaders raise a
    ValueError / TypeError starting with the argument's name, before the UNet, the VAE or any file is touched."""
    for name in ("unet_call", "encode_image", "decode"):
        monkeypatch.setattr(engine, name, lambda *a, **k: pytest.fail("work was done"))
    with pytest.raises(error) as e:
        call(engine)
    assert str(e.value).startswith(start), str(e.value)


# ------------------------------------------------------------------------------------------------ finding 14
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    for name in ("ref.png", "gen.png"):
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / name)
    with open(root / "entities.txt", "wb") as f:  # 30 MB, sparse: costs nothing to make
        f.truncate(30 * 2**20)
    (root / "e100k.txt").write_text("".join(f"e{i}\n" for i in range(100_000)))
    return root


PQ = ["patch-quality", "--backbone", "tiny", "--ref", "{root}/ref.png", "--gen", "{root}/gen.png", "--out",
      "{root}/map.png"]
LIMITS = [
    ("latent-size", [*PQ, "--latent-size", "100000"], "--latent-size"),
    ("image-size", [*PQ, "--image-size", "100000"], "--image-size"),
    ("image-size-grid", [*PQ, "--image-size", "4096"], "--image-size"),
    ("resolution", ["train", "reversion", "--data", "{data}", "--out", "{root}/o", "--resolution", "65536"],
     "--resolution"),
    ("batch-size", ["train", "reversion", "--data", "{data}", "--out", "{root}/o", "--batch-size", "1000000"],
     "--batch-size"),
    ("entities-30MB", ["relation-prompts", "-e", "@{root}/entities.txt"], "--entities"),
    ("relation-alone-squares-the-list", ["relation-prompts", "<R>", "-e", "@{root}/e100k.txt"], "--entities"),
    ("prompts-too-long", ["relation-prompts", "x" * 1000 + " {{}}", "-e", "@{root}/e100k.txt"], "--entities"),
    ("num-images", ["generate", "--prompt", "x", "--num-images", "100000000"], "--num-images"),
    ("height", ["generate", "--prompt", "x", "--height", "100000"], "--height"),
    ("steps", ["generate", "--prompt", "x", "--steps", "100000"], "--steps"),
    ("pixels", ["personalize", "--reference", "{root}/ref.png", "--prompt", "a sks dog", "--subject-token", "sks",
                "--height", "4096", "--width", "4096"], "--height/--width"),
]


@pytest.mark.parametrize("argv, flag", [c[1:] for c in LIMITS], ids=[c[0] for c in LIMITS])
def test_unbounded_cli_options_are_refused_before_any_model_loads(images, data, capsys, monkeypatch, no_model, argv,
                                                                  flag):
    """Finding 14: sizes, batches and files past the engine's limits fail in seconds, naming the flag, before the
    model (or the patch-quality backbone) loads."""
    from dreamfuse.engine import patch_quality

    monkeypatch.setattr(patch_quality.PatchQualityEstimator, "estimate",
                        lambda *a, **k: pytest.fail("the backbone ran"))
    argv = [a.format(root=images, data=data) for a in argv]
    err = one_line_error(argv, capsys)
    assert flag in err, err
    assert not (images / "map.png").exists()


def test_training_configs_have_the_same_bounds():
    from dreamfuse.engine.train.patchdpo import PatchDPOConfig
    from dreamfuse.engine.train.reversion import ReVersionConfig

    for cfg, needle in [(ReVersionConfig(resolution=65536), "^resolution: 65536, the limit is 2048"),
                        (ReVersionConfig(batch_size=10**6), "^batch_size: 1000000 images per micro-batch"),
                        (PatchDPOConfig(batch_size=33), r"^batch_size: 33 \(ref, gen\) pairs per micro-batch")]:
        with pytest.raises(ValueError, match=needle):
            cfg.validate()


# ------------------------------------------------------------------------------------------------ finding 15
BIG = "1" + "0" * 5000  # past Python's int-from-text limit (4300 digits)


@pytest.mark.parametrize("argv, flag", [
    (["generate", "--prompt", "x", "--num-images", "500"], "--num-images: "),
    (["generate", "--prompt", "x", "--prompt", "y", "--num-images", "40"], "--num-images: 80 images"),
    (["generate", "--prompt", "x", "--num-images", BIG], "--num-images must be an integer of at most 4300 digits"),
    (["generate", "--prompt", "x", "--seed", BIG], "--seed must be an integer of at most 4300 digits"),
    (["generate", "--prompt", "x", "--steps", BIG], "--steps must be an integer of at most 4300 digits"),
    (["train", "reversion", "--data", "{data}", "--out", "{tmp}/o", "--batch-size", BIG], "--batch-size"),
    (["train", "patchdpo", "--ip-adapter", "tiny", "--image-encoder", "tiny", "--backbone", "tiny", "--data",
      "{data}", "--out", "{tmp}/o", "--weight-power", BIG], "--weight-power"),
], ids=["num-images", "prompts-x-images", "num-images-digits", "seed-digits", "steps-digits", "batch-size-digits",
        "weight-power-digits"])
def test_limit_messages_name_the_flag_typed(data, tmp_path, capsys, no_model, argv, flag):
    """Finding 15: the flag the user typed, not the library's field (``prompts:``), before the model loads; a
    5001-digit integer is described, not echoed."""
    err = one_line_error([a.format(data=data, tmp=tmp_path) for a in argv], capsys)
    assert flag in err and len(err) < 300, err


def test_huge_integers_in_python_inputs_name_their_field(engine, tmp_path):
    """Finding 15, Python API: JSON read for a pipeline, seeds and config values with integers past 4300 digits."""
    from dreamfuse.engine.train.reversion import load_exemplars

    (tmp_path / "segments.json").write_text('{"#ff0000": {"prompt": "a car", "guidance": ' + BIG + "}}")
    with pytest.raises(ValueError, match="^segments: .* holds a number too long to read"):
        engine.compose(LAYOUT, tmp_path / "segments.json", prompt="x")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "text.json").write_text('{"1.png": ' + BIG + "}")
    with pytest.raises(ValueError, match="^data: .* holds a number too long to read"):
        load_exemplars(folder)
    with pytest.raises(ValueError, match="^seed: must be an integer in .*, got a 5001-digit number"):
        engine.text2img("a cat", seed=10**5000)
    with pytest.raises(ValueError, match="^guidance_scale: must be a finite number, got a 5001-digit number"):
        engine.text2img("a cat", guidance_scale=10**5000)
    with pytest.raises(ValueError, match="^batch_buckets: must be integers"):
        EngineConfig(device="cpu", batch_buckets=(BIG,)).resolved()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_a_directory_or_fifo_is_not_called_missing(data, tmp_path, capsys, no_model):
    """Finding 15: a folder or a FIFO where a file is expected is said to be one (and a FIFO is never read: that
    would block), from the CLI and the library."""
    from dreamfuse.engine.layout import load_segments

    folder = tmp_path / "folder.png"
    folder.mkdir()
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path, said in [(folder, "is a directory"), (fifo, "is not a regular file")]:
        for argv, flag in [
            (["generate", "--prompt", "x", "--ip-adapter", str(path), "--image-encoder", str(tmp_path), "--image",
              str(path)], "--ip-adapter"),
            (["personalize", "--reference", str(path), "--prompt", "a sks dog", "--subject-token", "sks"],
             "--reference"),
            (["compose", "--layout", str(path), "--segments", str(path), "--prompt", "x"], "--segments"),
            (["relation-prompts", "-e", f"@{path}"], "--entities"),
            (["train", "reversion", "--data", str(data), "--out", str(tmp_path / "o"), "--resume", str(path)],
             "resume"),
            *([(["generate", "--prompt", "x", "--model", str(path), "--config", str(tmp_path)], "--model")]
              if path == fifo else []),  # a folder is a diffusers model
        ]:
            err = one_line_error(argv, capsys)
            assert f"{flag}: " in err and said in err and "does not exist" not in err, err
        with pytest.raises(ValueError, match=f"^segments: .*{said}"):
            load_segments(path)
    with pytest.raises(FileNotFoundError, match="^segments: file .* does not exist"):
        load_segments(tmp_path / "missing.json")
