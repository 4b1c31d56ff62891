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
    STOP_WORDS,
    ReVersionConfig,
    load_exemplars,
    negative_token_ids,
    negative_words,
    sample_timesteps,
    steering_loss,
    timestep_probabilities,
    train,
    training_session,
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


FAST = dict(steps=3, batch_size=2, grad_accum=1, num_positives=4, checkpoint_every=0, progress=False)


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


# ------------------------------------------------------------------------------------------------ official fidelity
def test_defaults_are_the_official_run_and_the_paper_recipe_is_an_option():
    from dreamfuse.engine.cli import build_parser
    from dreamfuse.engine.cli.train_reversion import config_from_args

    d = ReVersionConfig()
    assert (d.lr, d.batch_size, d.grad_accum) == (pytest.approx(2.5e-4 * 2 * 4), 2, 4)
    assert (d.flip_p, d.num_positives, d.negatives, d.steps) == (0.0, 4, "tokens", 3000)
    paper = ReVersionConfig.from_recipe("paper")
    assert (paper.lr, paper.batch_size, paper.grad_accum) == (2.5e-4, 2, 1)
    assert ReVersionConfig.from_recipe("paper", lr=1e-3).lr == 1e-3  # explicit values win
    with pytest.raises(ValueError, match="recipe"):
        ReVersionConfig.from_recipe("nope")

    def cli(*extra):
        argv = ["train", "reversion", "--data", "d", "--out", "o", *extra]
        return config_from_args(build_parser(argv).parse_args(argv))

    assert (cli().lr, cli().grad_accum) == (d.lr, 4)
    assert (cli("--recipe", "paper").lr, cli("--recipe", "paper").grad_accum) == (2.5e-4, 1)
    c = cli("--recipe", "paper", "--grad-accum", "3", "--max-steps", "7")
    assert (c.lr, c.grad_accum, c.steps) == (2.5e-4, 3, 7)
    assert cli("--lr", "0.001").lr == 0.001 and cli("--negatives", "words").negatives == "words"


def _steering_data(root):
    return make_data(root, n=2, templates=[
        "an orange cat {} a black box, with trees!", "a teddy bear astride {} the giraffe's back; at noon...",
        "cat {} box " + " ".join(["extraordinarily"] * 12),  # longer than 77 tokens: truncated like the forward
    ])


def test_steering_negatives_and_positives_are_official_token_ids(tmp_path):
    """Reference: the official computation, written out plainly on the tiny tokenizer (it splits most words
    into BPE pieces, and 31 of the 56 prepositions, e.g. 'astride' into 5)."""
    exemplars = load_exemplars(_steering_data(tmp_path / "d"))
    engine = Engine.from_pretrained("tiny", EngineConfig(device="cpu"))
    tok = engine.tokenizer
    assert len(tok("astride", add_special_tokens=False).input_ids) > 1
    assert len(STOP_WORDS) == 127 and {"s", "t", "don", "now", "and"} <= set(STOP_WORDS) and "onto" not in STOP_WORDS
    cfg = ReVersionConfig(**{**FAST, "batch_size": 3})
    with training_session(engine, exemplars, tmp_path / "out", cfg) as trainer:
        rid = tok.convert_tokens_to_ids("<R>")
        stop = set(tok(" ".join(STOP_WORDS + BASIS_PREPOSITIONS), truncation=False).input_ids)  # BOS/EOS too
        stop |= {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, rid}
        table = trainer.table.detach().float()
        seen_truncated = False
        for i in range(4):
            b = trainer.micro_batch(i)
            want_neg = []
            for caption in b.captions:
                ids = tok(caption, truncation=True, max_length=77).input_ids
                want_neg += [t for t in ids if t not in stop]
                seen_truncated |= len(tok(caption).input_ids) > 77
            assert b.negative_ids.tolist() == want_neg
            want_pos = [t for words in b.positive_words
                        for t in tok(" ".join(words), add_special_tokens=False).input_ids]
            assert b.positive_ids.tolist() == want_pos
            assert [len(w) for w in b.positive_words] == [cfg.num_positives] * 3  # drawn per image
            assert all(len(set(w)) == len(w) for w in b.positive_words)  # without replacement within an image
            torch.testing.assert_close(b.negatives, table[b.negative_ids])
            torch.testing.assert_close(b.positives, table[b.positive_ids])
        assert seen_truncated
        # punctuation and BPE pieces are negatives; pieces of stop words / prepositions are not, wherever they occur
        ids = tok("an orange cat <R> a black box, with trees!", add_special_tokens=False).input_ids
        negs = negative_token_ids(torch.tensor([ids]), torch.ones(1, len(ids)), trainer.excluded_ids).tolist()
        pieces = tok.convert_ids_to_tokens(negs)
        assert ",</w>" in pieces and "!</w>" in pieces and "cat</w>" in pieces and "bl" in pieces
        assert "e</w>" not in pieces  # orange's last piece: also astride's (official: exclusion is by id)
        assert "s</w>" not in pieces and "an</w>" not in pieces and "<R>" not in pieces
    # a multi-piece preposition is one positive per piece: all 56 per image -> every piece of every preposition
    cfg_all = ReVersionConfig(**{**FAST, "num_positives": len(BASIS_PREPOSITIONS)})
    with training_session(Engine.from_pretrained("tiny", EngineConfig(device="cpu")), exemplars,
                          tmp_path / "out2", cfg_all) as trainer:
        b = trainer.micro_batch(0)
        n_pieces = sum(len(tok(w, add_special_tokens=False).input_ids) for w in BASIS_PREPOSITIONS)
        assert len(b.positive_ids) == cfg_all.batch_size * n_pieces > cfg_all.batch_size * 56


def test_word_level_negatives_are_an_option(tmp_path):
    exemplars = load_exemplars(_steering_data(tmp_path / "d"))
    engine = Engine.from_pretrained("tiny", EngineConfig(device="cpu"))
    cfg = ReVersionConfig(**FAST, negatives="words")
    with training_session(engine, exemplars, tmp_path / "out", cfg) as trainer:
        b = trainer.micro_batch(0)
        assert b.negative_ids is None
        templates = [next(t for t in trainer.templates[0] + trainer.templates[1]
                          if t.replace("{}", " <R> ").strip() == c) for c in b.captions]
        words = [w for t in templates for w in negative_words(t)]
        torch.testing.assert_close(b.negatives, torch.stack([trainer.word_embedding(w) for w in words]))
        torch.testing.assert_close(b.positives, torch.stack([trainer.word_embedding(w) for ws in b.positive_words
                                                             for w in ws]))
        assert b.positives.shape[0] == cfg.batch_size * cfg.num_positives  # one mean row per preposition
    result = train(Engine.from_pretrained("tiny", EngineConfig(device="cpu")), exemplars[0][0].parent,
                   tmp_path / "w", cfg, steps=1)
    assert math.isfinite(result.losses[0]["steer"])


def test_no_flip_by_default_and_flipped_latents_only_when_asked(data, tmp_path):
    exemplars = load_exemplars(data)
    with training_session(Engine.from_pretrained("tiny"), exemplars, tmp_path, ReVersionConfig(**FAST)) as t:
        assert t.posteriors[1::2] == [None] * len(exemplars)  # never drawn: not even encoded
    flip = ReVersionConfig(**FAST, flip_p=1.0)
    with training_session(Engine.from_pretrained("tiny"), exemplars, tmp_path, flip) as t:
        assert all(p is not None for p in t.posteriors)
        t.micro_batch(0)  # draws only flipped images


# ------------------------------------------------------------------------------------------------ text.json
@pytest.mark.parametrize("case, needle", [
    ("absolute", "no absolute path"), ("dotdot", "no absolute path, no '..'"), ("symlink_out", "leads out"),
    ("duplicate", "twice"), ("same_image_twice", "twice"), ("deep", "nested too deeply"), ("huge", "bytes"),
    ("not_utf8", "not UTF-8"), ("nul_in_template", "NUL"),
])
def test_text_json_hostile_content_is_refused(tmp_path, case, needle):
    root = make_data(tmp_path / "d", n=2)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    tj = root / "text.json"
    if case == "absolute":
        tj.write_text(json.dumps({"0.png": ["a {} b"], "1.png": ["a {} b"], str(outside): ["a {} b"]}))
    elif case == "dotdot":
        tj.write_text(json.dumps({"0.png": ["a {} b"], "1.png": ["a {} b"], "../secret.png": ["a {} b"]}))
    elif case == "symlink_out":
        (root / "link.png").symlink_to(outside)
        tj.write_text(json.dumps({"0.png": ["a {} b"], "1.png": ["a {} b"], "link.png": ["a {} b"]}))
    elif case == "duplicate":
        tj.write_text('{"0.png": ["a {} b"], "1.png": ["c {} d"], "0.png": ["e {} f"]}')
    elif case == "same_image_twice":
        tj.write_text(json.dumps({"0.png": ["a {} b"], "1.png": ["a {} b"], "./0.png": ["a {} b"]}))
    elif case == "deep":
        tj.write_text('{"0.png": ' + "[" * 200_000 + "]" * 200_000 + "}")
    elif case == "huge":
        tj.write_text(json.dumps({"0.png": ["a {} b" + " " * (5 * 2**20)], "1.png": ["a {} b"]}))
    elif case == "not_utf8":
        tj.write_bytes(b'{"0.png": ["caf\xe9 {} b"], "1.png": ["a {} b"]}')
    elif case == "nul_in_template":
        tj.write_text(json.dumps({"0.png": ["a {} b\u0000"], "1.png": ["a {} b"]}))
    with pytest.raises(ValueError, match=needle) as e:
        load_exemplars(root)
    assert str(e.value).startswith("data: ") and "\n" not in str(e.value)


def test_text_json_keys_may_name_files_in_subfolders(tmp_path):
    root = make_data(tmp_path / "d", n=1)
    (root / "more").mkdir()
    Image.new("RGB", (8, 8)).save(root / "more" / "x.png")
    (root / "text.json").write_text(json.dumps({"0.png": ["a {} b"], "more/x.png": "c {} d"}))
    assert [(p.name, t) for p, t in load_exemplars(root)] == [("0.png", ["a {} b"]), ("x.png", ["c {} d"])]


# ------------------------------------------------------------------------------------------------ files, resume
def test_embeds_and_checkpoints_are_written_atomically(data, tmp_path, monkeypatch):
    from dreamfuse.engine.train.reversion import save_embeds

    path = tmp_path / "learned_embeds.bin"
    save_embeds(path, "<R>", torch.ones(64))
    real_save = torch.save

    def dies_half_way(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_embeds(path, "<R>", torch.zeros(64))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["<R>"], torch.ones(64))  # the old file, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learned_embeds.bin"]  # no temporary left behind
    out = tmp_path / "run"
    train(Engine.from_pretrained("tiny"), data, out, ReVersionConfig(**{**FAST, "steps": 1, "checkpoint_every": 1}))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001.pt"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "learned_embeds.bin"]


def test_resume_with_other_settings_lists_the_differences(data, tmp_path, monkeypatch):
    from dreamfuse.engine import engine as engine_module

    out = tmp_path / "run"
    cfg = ReVersionConfig(**{**FAST, "steps": 1, "checkpoint_every": 1}, lr=0.002)
    train(Engine.from_pretrained("tiny"), data, out, cfg)

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(engine_module.Engine, "from_pretrained", no_model)
    with pytest.raises(ValueError) as e:
        train("tiny", data, out, cfg, lr=0.001, batch_size=1, steps=5, checkpoint_every=0, resume="latest")
    msg = str(e.value)
    assert "lr: 0.002 in the checkpoint, 0.001 now" in msg and "batch_size: 2 in the checkpoint, 1 now" in msg
    assert msg.count(" in the checkpoint, ") == 2  # steps, checkpoint_every and resume may change
    monkeypatch.undo()
    more = train(Engine.from_pretrained("tiny"), data, out, cfg, steps=2, resume="latest", progress=False)
    assert [r["step"] for r in more.losses] == [1, 2]  # extending the run is fine


# ------------------------------------------------------------------------------------------------ hostile values
@pytest.mark.parametrize("field, value", [
    ("lr", float("inf")), ("lr", float("nan")), ("temperature", float("inf")), ("alpha", float("nan")),
    ("lambda_steer", float("inf")), ("weight_decay", float("nan")), ("flip_p", float("nan")), ("steps", "3"),
    ("steps", True), ("batch_size", 2.0), ("negatives", "pos"), ("seed", -1), ("resolution", 60),
])
def test_config_refuses_non_finite_and_ill_typed_values(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        ReVersionConfig(**{field: value}).validate()


def test_relation_embeddings_must_be_finite_and_of_sane_size(tmp_path):
    from dreamfuse.engine.relation import MAX_EMBEDDING_NORM, add_token

    engine = Engine.from_pretrained("tiny")
    for name, value in [("nan", torch.full((64,), float("nan"))), ("inf", torch.full((64,), float("inf"))),
                        ("huge", torch.full((64,), MAX_EMBEDDING_NORM))]:
        f = tmp_path / f"{name}.bin"
        torch.save({"<R>": value}, f)
        with pytest.raises(ValueError, match=f"{name}.bin"):
            load_relation(engine, f)
        with pytest.raises(ValueError, match="NaN or inf|norm"):
            add_token(engine, "<Q>", value)
    assert "<R>" not in engine.tokenizer.get_added_vocab()  # nothing was added on the way
    load_relation(engine, {"<R>": torch.randn(64)})  # an ordinary one still loads


def test_cli_refuses_out_file_and_corrupt_relation_in_one_line(data, tmp_path, capsys, monkeypatch):
    from dreamfuse.engine import engine as engine_module

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(engine_module.Engine, "from_pretrained", no_model)
    (tmp_path / "file").write_text("x")
    assert main(["train", "reversion", "--data", str(data), "--out", str(tmp_path / "file"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "not a folder" in err
    with pytest.raises(ValueError, match="^out: "):
        train("tiny", data, tmp_path / "file", ReVersionConfig(**FAST))
    monkeypatch.undo()
    (tmp_path / "learned_embeds.bin").write_bytes(b"\x80\x02garbage")
    assert main(["generate", "--relation", str(tmp_path / "learned_embeds.bin"), "--prompt", "cat <R> box",
                 "--steps", "1", "--out", str(tmp_path / "x.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "learned_embeds.bin" in err and "Traceback" not in err
