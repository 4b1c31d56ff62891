"""ReVersion: training learns only the <R> row, the losses and sampling are the paper's, resume is exact,
the official file format round-trips, and the CLI trains, generates and prints relation prompts."""

import json
import math

import numpy as np
import pytest
import torch
from dreamfuse.engine.cli import main
from dreamfuse.engine.config import EngineConfig
from dreamfuse.engine.engine import Engine
from dreamfuse.engine.relation import load_relation, relation_prompts
from dreamfuse.engine.train.reversion import (
    BASIS_PREPOSITIONS,
    ReVersionConfig,
    load_exemplars,
    negative_words,
    sample_timesteps,
    steering_loss,
    timestep_probabilities,
    train,
)
from PIL import Image


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP's spin-waiting makes the tiny UNet ~100x slower
    with 2 threads than with 1. Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FAST = dict(steps=3, batch_size=2, num_positives=4, checkpoint_every=0, progress=False)


def make_data(root, n=3, templates=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    table = {}
    for i in range(n):
        name = f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / name)
        table[name] = templates or ["cat {} box", "an orange cat {} a black box, with trees"]
    (root / "text.json").write_text(json.dumps(table))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("reversion") / "data")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One short run on the tiny model, shared by the tests that inspect its outcome."""
    engine = Engine.from_pretrained("tiny")
    before = {name: {k: v.clone() for k, v in getattr(engine, name).state_dict().items()}
              for name in ("unet", "vae", "text_encoder")}
    vocab = engine.text_encoder.get_input_embeddings().weight.shape[0]
    and_row = engine.text_encoder.get_input_embeddings().weight[engine.tokenizer.convert_tokens_to_ids("and</w>")]
    out = tmp_path_factory.mktemp("run")
    result = train(engine, data, out, ReVersionConfig(**FAST, lr=0.05))
    return engine, before, vocab, and_row.float().cpu(), result


def test_only_the_relation_row_learns(trained):
    engine, before, vocab, and_row, result = trained
    for name in ("unet", "vae"):
        after = getattr(engine, name).state_dict()
        assert all(torch.equal(before[name][k], after[k]) for k in before[name]), name
        assert not any(p.requires_grad for p in getattr(engine, name).parameters())
    te = engine.text_encoder.state_dict()
    key = next(k for k in te if k.endswith("token_embedding.weight"))
    assert all(torch.equal(before["text_encoder"][k], te[k]) for k in before["text_encoder"] if k != key)
    assert not any(p.requires_grad for p in engine.text_encoder.parameters())
    table = te[key]
    assert table.shape[0] == vocab + 1  # exactly one row added
    assert torch.equal(table[:vocab], before["text_encoder"][key])  # every other row untouched
    rid = engine.tokenizer.convert_tokens_to_ids("<R>")
    assert rid == vocab
    assert not torch.allclose(result.embedding, and_row)  # learned away from its "and" initialization
    # ... and written into the engine's row (in the engine's dtype) at the end
    assert torch.equal(table[rid].float().cpu(), result.embedding.to(table.dtype).float())
    assert len(result.losses) == FAST["steps"]
    assert all(math.isfinite(r["denoise"]) and math.isfinite(r["steer"]) for r in result.losses)


def test_steering_loss_matches_hand_computation():
    r = torch.tensor([1.0, 2.0, 0.0])
    pos = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 1.0]])
    neg = torch.tensor([[0.0, 0.0, 2.0], [-1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    tau = 0.07

    def unit(v):
        return [x / math.sqrt(sum(y * y for y in v)) for x in v]

    def sim(a, b):
        return sum(x * y for x, y in zip(unit(a), unit(b))) / tau

    rp = [math.exp(sim(r.tolist(), p)) for p in pos.tolist()]
    rn = [math.exp(sim(r.tolist(), n)) for n in neg.tolist()]
    expected = -math.log(sum(rp) / (sum(rp) + sum(rn)))
    got = steering_loss(r, pos, neg, tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # No negatives: the loss is -log(1) = 0; and the gradient reaches the anchor.
    assert steering_loss(r, pos, neg[:0], tau).item() == pytest.approx(0.0, abs=1e-6)
    a = r.clone().requires_grad_(True)
    steering_loss(a, pos, neg, tau).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_negatives_are_content_words_only():
    assert negative_words("an orange cat {} a black box, with trees in the background") == [
        "orange", "cat", "black", "box", "trees", "background"]
    assert len(BASIS_PREPOSITIONS) == 56 and not negative_words("amidst {} atop the of 3 ,")


def _chi_square(counts, probs):
    n = counts.sum()
    return float(((counts - n * probs) ** 2 / (n * probs)).sum())


def test_importance_sampling_histogram_matches_f():
    T, alpha, n, bins = 1000, 0.5, 200_000, 20
    p = timestep_probabilities(T, alpha)
    w = [1 - alpha * math.cos(math.pi * t / T) for t in range(T)]
    assert torch.allclose(p, torch.tensor(w, dtype=torch.float64) / sum(w), rtol=1e-12)
    expected = p.view(bins, -1).sum(1).numpy()
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(n, T, importance=True, alpha=alpha, generator=g)
    assert t.min() >= 0 and t.max() < T
    counts = np.bincount(t.numpy() // (T // bins), minlength=bins).astype(float)
    # chi-square with 19 degrees of freedom: 43.8 is the 0.001 critical value.
    assert _chi_square(counts, expected) < 43.8
    uniform = sample_timesteps(n, T, importance=False, generator=torch.Generator().manual_seed(0))
    u_counts = np.bincount(uniform.numpy() // (T // bins), minlength=bins).astype(float)
    assert _chi_square(u_counts, expected) > 1000  # the test has power: uniform sampling is rejected
    assert _chi_square(u_counts, np.full(bins, 1 / bins)) < 43.8
    assert (t >= T // 2).float().mean() > 0.6  # skewed towards large t (analytically 0.659)


def test_resume_continues_identically(data, tmp_path):
    cfg = ReVersionConfig(**{**FAST, "steps": 4}, lr=0.01)
    cpu = lambda: Engine.from_pretrained("tiny", EngineConfig(device="cpu"))  # bitwise-deterministic kernels
    straight = train(cpu(), data, tmp_path / "a", cfg)
    first = train(cpu(), data, tmp_path / "b", cfg, steps=2, checkpoint_every=2)
    assert (tmp_path / "b" / "checkpoints" / "step-0000002.pt").is_file()
    resumed = train(cpu(), data, tmp_path / "b", cfg, resume="latest")
    assert train("tiny", data, tmp_path / "c", cfg, steps=1).path.is_file()  # a model name works too
    assert torch.equal(straight.embedding, resumed.embedding)
    assert not torch.equal(first.embedding, resumed.embedding)
    assert [r["loss"] for r in straight.losses] == [r["loss"] for r in resumed.losses]


def test_steering_ablation_and_steering_alone(data, tmp_path):
    cpu = lambda: Engine.from_pretrained("tiny", EngineConfig(device="cpu"))
    full = train(cpu(), data, tmp_path / "full", ReVersionConfig(**FAST, lr=0.05))
    ablated = train(cpu(), data, tmp_path / "abl", ReVersionConfig(**FAST, lr=0.05, lambda_steer=0.0))
    # Same random stream: identical first denoising loss; then the missing steering gradient shows.
    assert full.losses[0]["denoise"] == ablated.losses[0]["denoise"]
    assert all(math.isnan(r["steer"]) for r in ablated.losses)
    assert not torch.allclose(full.embedding, ablated.embedding)
    # Steering alone pulls <R> towards the basis prepositions: its loss falls step after step.
    steer = train(cpu(), data, tmp_path / "steer", ReVersionConfig(**{**FAST, "steps": 5}, lr=0.05,
                                                                   lambda_denoise=0.0, lambda_steer=1.0))
    losses = [r["steer"] for r in steer.losses]
    assert losses[-1] < losses[0]


def test_official_format_and_load_relation(trained, tmp_path):
    engine, _, _, _, result = trained
    saved = torch.load(result.path, weights_only=True)
    assert list(saved) == ["<R>"] and saved["<R>"].shape == (engine.text_encoder.config.hidden_size,)
    fresh = Engine.from_pretrained("tiny")
    fresh.encode_prompts(["a cat <R> a box"])  # cached before the token exists: load_relation must clear it
    assert load_relation(fresh, result.path) == "<R>"
    kw = dict(steps=2, seed=0, guidance_scale=1.0, output_type="pt", progress=False)
    with_r = fresh.text2img("a cat <R> a box", **kw)
    with_and = fresh.text2img("a cat and a box", **kw)  # what <R> was before learning ("and")
    assert (with_r - with_and).abs().max() > 1e-4
    assert torch.allclose(with_r, engine.text2img("a cat <R> a box", **kw), atol=1e-5)
    # A file written by hand in the official format, under another token name, loads too.
    vec = torch.randn(engine.text_encoder.config.hidden_size)
    torch.save({"<S>": vec}, tmp_path / "learned_embeds.bin")
    assert fresh.load_relation(str(tmp_path / "learned_embeds.bin")) == "<S>"
    row = fresh.text_encoder.get_input_embeddings().weight[fresh.tokenizer.convert_tokens_to_ids("<S>")]
    assert torch.equal(row.float().cpu(), vec.to(row.dtype).float())
    assert not torch.allclose(fresh.encode_prompts(["cat <S> box"]), fresh.encode_prompts(["cat <R> box"]))


def test_load_relation_errors(tmp_path):
    engine = Engine.from_pretrained("tiny")
    torch.save({"<R>": torch.randn(768)}, tmp_path / "sd15.bin")
    with pytest.raises(ValueError, match="hidden size is 64"):
        load_relation(engine, tmp_path / "sd15.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.bin"):
        load_relation(engine, tmp_path / "junk.bin")
    with pytest.raises(ValueError, match="already a word"):
        load_relation(engine, {"cat": torch.randn(64)})
    with pytest.raises(FileNotFoundError):
        load_relation(engine, tmp_path / "missing.bin")


@pytest.mark.parametrize("case, needle", [
    ("missing_image", "'9.png'"), ("empty_list", "empty template list"), ("no_slot", "'cat box'"),
    ("no_text_json", "text.json is missing"),
])
def test_data_errors_name_the_problem(tmp_path, case, needle):
    root = make_data(tmp_path / "d", n=2)
    table = json.loads((root / "text.json").read_text())
    if case == "missing_image":
        table["9.png"] = ["a {} b"]
    elif case == "empty_list":
        table["0.png"] = []
    elif case == "no_slot":
        table["1.png"] = ["cat {} box", "cat box"]
    (root / "text.json").write_text(json.dumps(table))
    if case == "no_text_json":
        (root / "text.json").unlink()
    with pytest.raises(ValueError, match=needle):
        load_exemplars(root)


def test_relation_prompts():
    assert relation_prompts("<R>", ["cat", "dog"], "box") == ["cat <R> box", "dog <R> box"]
    assert relation_prompts("{} <R> {}", ["man", "cat"]) == ["man <R> man", "man <R> cat", "cat <R> man",
                                                              "cat <R> cat"]
    assert relation_prompts("a photo of {} <R> {}, snow", "cat", ["box"]) == ["a photo of cat <R> box, snow"]
    with pytest.raises(ValueError, match="2 slot"):
        relation_prompts("{} <R> {}", ["a"], ["b"], ["c"])


def test_cli_train_generate_and_prompts(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "reversion", "--model", "tiny", "--data", str(data), "--out", str(out), "--steps", "2",
                 "--no-progress"]) == 0
    saved = torch.load(out / "learned_embeds.bin", weights_only=True)
    assert list(saved) == ["<R>"] and saved["<R>"].shape == (64,)
    img = tmp_path / "x.png"
    assert main(["generate", "--relation", str(out / "learned_embeds.bin"), "--prompt", "cat <R> box", "--steps", "2",
                 "--seed", "0", "--out", str(img), "--no-progress"]) == 0
    assert Image.open(img).size == (64, 64)
    capsys.readouterr()
    (tmp_path / "b.txt").write_text("box\n# comment\nbasket\n")
    assert main(["relation-prompts", "-e", "cat,dog", "-e", f"@{tmp_path / 'b.txt'}"]) == 0
    assert capsys.readouterr().out.splitlines() == ["cat <R> box", "cat <R> basket", "dog <R> box",
                                                    "dog <R> basket"]
    assert main(["relation-prompts", "{} <S> {}", "-e", "man,cat"]) == 0
    assert capsys.readouterr().out.splitlines() == ["man <S> man", "man <S> cat", "cat <S> man", "cat <S> cat"]
    bad = tmp_path / "bad"
    make_data(bad, n=1, templates=["cat box"])
    assert main(["train", "reversion", "--data", str(bad), "--out", str(tmp_path / "o2"), "--steps", "1"]) == 2
    assert "'cat box'" in capsys.readouterr().err
