"""The four papers' tables in the shapes world: each method against its own baseline, on the same seeds, scored by
the generator's ground truth (:mod:`dreamfuse.engine.shapes_world`'s reader) on the trained ``shapes`` model.

    python -m bench.methods_eval                                  # all four tables (~4 min on 2 cores; --seeds 2: 6)
    python -m bench.methods_eval --only dreammatcher --seeds 4    # one table, more seeds
    python -m bench.methods_eval --json results.json --figure methods.png   # also the raw rows and a figure

Tables (one row per condition; ``k/n`` = images or segments scored right, 95 % Wilson interval; ``Δ`` = the
condition minus the table's baseline on the same seeds, with a 95 % paired-bootstrap interval):

- DreamMatcher. The subject is one striped purple square (``SUBJECT``); a DreamBooth-style fine-tune of the UNet
  on a few renders of it captioned "a sks square ..." (``--db-steps``) is the baseline; targets place
  "a sks square" at new positions on new backgrounds. Subject fidelity = the generated subject's colour and
  texture are the reference's (what DINO / CLIP-I approximate); prompt fidelity = its position and the background
  are the prompt's (CLIP-T). Conditions, as the paper's component analysis (its Table 5): DreamBooth (I), + semantic
  matching with every target position taking its matched reference value (``ama_mask="none"``, III), + AMA with the
  semantic-consistent mask (IV, the λc sweep), + AMA + semantic matching guidance (V); and the training-free case
  (no fine-tune: "a square" alone, with AMA, with unmasked matching).
- MSP / composite. Two objects in a two-colour layout (left/right or top/bottom halves), one segment prompt each;
  a segment is right when the object of its prompt's colour is found with its prompt's shape and its centre lies
  in the segment. Baseline: text2img of the combined prompt ("... left of ..."), same seeds. Conditions: MSP
  without a scaffolding image (its segments develop as independent latents), and with one (the scene's empty
  background, rendered: each segment sees it, noised, outside its mask) at scaffolding fractions κ 0.3, 0.6 and 1
  (1: no harmonization stage), 2 global-diffuser steps each (the paper's 2 of 80 without a scaffolding image; its
  8 of 80 with one would be a third of these 25 steps).
- ReVersion. ``<R>`` learned from exemplars of "inside" (renders of "A inside B" captioned "A {} B"); relation
  accuracy of "A <R> B" generations (the reader's relation of the two objects is "inside") against the plain word
  "inside", the initializer word "and" (no relation), and the ablations without the steering loss and without
  relation-focal importance sampling. ("inside" because it is the relation the model draws best from its word, so
  the learned token has room to show; the model places "above"/"below" poorly, see the README.)
- PatchDPO. A tiny IP-Adapter (shapes UNet, the tiny image encoder; image layers initialized from the text
  layers, as IP-Adapter does) is first trained on IP-Adapter's own objective (renders conditioned on themselves),
  then fine-tuned on pairs (reference render, an image it generated from that reference with a quarter of its 8x8
  patches painted black); the patch-quality maps are the ground truth (0 on a corrupted patch). With patch
  weighting (PatchDPO's loss) vs without (the same pairs, every patch weight 1). Patch fidelity after training =
  fraction of 8x8 patches of images generated from new references whose pixels are mostly the reference's
  background or object colour (:func:`on_palette`); also whether the reference's colour is read back.

Everything is seeded; the tables are reproducible run to run on one machine (``--seeds`` scales every table).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dreamfuse.engine import shapes_world as W
from PIL import Image

SIZE = W.SIZE
STEPS = 25
GUIDANCE = 4.0
SUBJECT = {"shape": "square", "colour": "purple", "texture": "striped", "size": "large"}
SUBJECT_WORD = "sks"
TARGETS = [(p, b) for b in W.BACKGROUNDS for p in W.POSITIONS if p != "in the middle"]  # 12 (position, bg)
CORRUPT = (0, 0, 0)  # a corrupted patch: black, far from every colour, shade and background of the world


# ------------------------------------------------------------------------------------------------ statistics
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``k / n``."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def paired_diff_ci(base: Sequence[bool], method: Sequence[bool], n_boot: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """Mean difference ``method − base`` of paired outcomes and its 95 % bootstrap interval (resampling pairs)."""
    a, b = np.asarray(base, float), np.asarray(method, float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"outcomes: paired lists of equal, non-zero length needed, got {a.size} and {b.size}")
    d = b - a
    idx = np.random.default_rng(seed).integers(0, d.size, (n_boot, d.size))
    boots = d[idx].mean(axis=1)
    return float(d.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


@dataclasses.dataclass
class Row:
    table: str
    metric: str
    condition: str
    outcomes: list[bool]
    baseline: str | None = None  # the condition Δ is taken against
    delta: tuple[float, float, float] | None = None

    @property
    def k(self) -> int:
        return int(sum(self.outcomes))

    @property
    def n(self) -> int:
        return len(self.outcomes)

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def as_dict(self) -> dict:
        lo, hi = wilson(self.k, self.n)
        return {"table": self.table, "metric": self.metric, "condition": self.condition, "k": self.k, "n": self.n,
                "rate": self.rate, "ci95": [lo, hi], "baseline": self.baseline,
                "delta": None if self.delta is None else {"mean": self.delta[0], "ci95": list(self.delta[1:])}}


def with_deltas(rows: list[Row], baseline: str) -> list[Row]:
    """Fill each row's Δ against the row of the same metric whose condition is ``baseline``."""
    base = {r.metric: r for r in rows if r.condition == baseline}
    for r in rows:
        if r.condition != baseline and r.metric in base:
            r.baseline, r.delta = baseline, paired_diff_ci(base[r.metric].outcomes, r.outcomes)
    return rows


def format_table(title: str, rows: list[Row]) -> str:
    """A markdown table: one line per condition, one column per metric; a cell is ``rate [95 % CI]`` and, off the
    baseline, ``Δ mean [95 % CI]`` against it (paired, same seeds)."""
    metrics = list(dict.fromkeys(r.metric for r in rows))
    conditions = list(dict.fromkeys(r.condition for r in rows))
    cell = {(r.condition, r.metric): r for r in rows}
    n = {m: next(r.n for r in rows if r.metric == m) for m in metrics}
    lines = [f"### {title}", "", "| condition | " + " | ".join(f"{m} (n={n[m]})" for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for c in conditions:
        cells = []
        for m in metrics:
            r = cell.get((c, m))
            if r is None:
                cells.append("")
                continue
            lo, hi = wilson(r.k, r.n)
            text = f"{r.rate:.2f} [{lo:.2f}, {hi:.2f}]"
            if r.delta is not None:
                text += f"<br>Δ {r.delta[0]:+.2f} [{r.delta[1]:+.2f}, {r.delta[2]:+.2f}]"
            cells.append(text)
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ model
def shapes_engine(model: str = "shapes"):
    """The shapes model on the CPU, fp32, torch attention (what every table runs)."""
    from dreamfuse.engine import Engine, EngineConfig

    return Engine.from_pretrained(model, EngineConfig(device="cpu", dtype="fp32", backend="torch", progress=False))


def _arrays(images) -> list[np.ndarray]:
    return [np.asarray(im.convert("RGB")) for im in images]


def _pixels(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


@contextlib.contextmanager
def finetuned(engine, images: Sequence[np.ndarray], captions: Sequence[str], steps: int, **kw):
    """The engine's UNet fine-tuned DreamBooth-style (:func:`finetune_unet`) inside the block, its own weights back
    on exit. Training runs with stock SDPA processors; inside the block the engine's processors are back."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = engine.unet
    saved_procs, saved_sd = unet.attn_processors, copy.deepcopy(unet.state_dict())
    try:
        unet.set_attn_processor(AttnProcessor2_0())
        unet.train().requires_grad_(True)
        try:
            finetune_unet(engine, images, captions, steps, **kw)
        finally:
            unet.eval().requires_grad_(False)
            unet.set_attn_processor(dict(saved_procs))  # a copy: diffusers empties the dict it is given
        yield unet
    finally:
        unet.load_state_dict(saved_sd)


def _latents(engine, images: Sequence[np.ndarray]) -> torch.Tensor:
    with torch.no_grad():
        x = _pixels(images).mul(2).sub(1)
        return engine.vae.encode(x).latent_dist.mean * engine.vae.config.scaling_factor


def finetune_unet(engine, images: Sequence[np.ndarray], captions: Sequence[str], steps: int, *, lr: float = 1e-4,
                  batch: int = 8, seed: int = 0) -> None:
    """DreamBooth-style fine-tune of the whole UNet on ``images`` with ``captions`` (epsilon objective, text
    encoder frozen), in place; :func:`finetuned` gives the weights back afterwards."""
    g = torch.Generator().manual_seed(seed)
    lat = _latents(engine, images)
    with torch.no_grad():
        cond = engine.encode_prompts(list(captions))
    alphas = engine.scheduler.alphas_cumprod
    opt = torch.optim.AdamW(engine.unet.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        idx = torch.randint(len(lat), (batch,), generator=g)
        t = torch.randint(engine.scheduler.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(lat[idx].shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(engine.unet(a.sqrt() * lat[idx] + (1 - a).sqrt() * noise, t,
                                      encoder_hidden_states=cond[idx]).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def generate(engine, prompts: Sequence[str], seeds: Sequence[int], steps: int = STEPS,
             guidance: float = GUIDANCE, **kw) -> list[np.ndarray]:
    out = []
    for i in range(0, len(prompts), 16):
        out += _arrays(engine.text2img(list(prompts[i:i + 16]), seed=list(seeds[i:i + 16]), steps=steps,
                                       guidance_scale=guidance, height=SIZE, width=SIZE, **kw))
    return out


# ------------------------------------------------------------------------------------------------ DreamMatcher
def subject_scene(position: str, background: str, seed: int = 0) -> W.Scene:
    return W.sample_scene(seed, objects=[SUBJECT], position=position, background=background, caption_dropout=False)


def subject_prompt(position: str, background: str, word: str = SUBJECT_WORD) -> str:
    return f"a {word} {SUBJECT['shape']} {position} on {background}".replace("  ", " ")


def subject_scores(image: np.ndarray, position: str, background: str) -> dict[str, bool]:
    """Subject fidelity (colour, texture of the largest object = the reference's) and prompt fidelity (its
    position, the background) of one generated image."""
    r = W.read_image(image)
    o = r.objects[0] if r.objects else None
    colour = o is not None and o.colour == SUBJECT["colour"]
    texture = o is not None and o.texture == SUBJECT["texture"]
    return {"subject: colour": colour, "subject: texture": texture, "subject: colour+texture": colour and texture,
            "prompt: position": o is not None and W.position_of(o) == position,
            "prompt: background": r.background == background}


def subject_reference() -> np.ndarray:
    """The reference image of the subject: in the middle, on grass."""
    return W.render(subject_scene("in the middle", "grass", seed=1))


def subject_renders() -> tuple[list[np.ndarray], list[str]]:
    """The DreamBooth instance set: 10 renders of the subject (every position word, on grass and on sand) and their
    "a sks square ..." captions."""
    where = [(p, b) for p in W.POSITIONS for b in ("grass", "sand")]
    return ([W.render(subject_scene(p, b, seed=50 + i)) for i, (p, b) in enumerate(where)],
            [subject_prompt(p, b) for p, b in where])


def dreammatcher_table(engine, *, seeds: int = 2, steps: int = STEPS, db_steps: int = 30, lambda_g: float = 4.0,
                       lambda_cs: Sequence[float] = (0.2, 0.4, 0.8), targets=TARGETS,
                       keep: dict | None = None) -> list[Row]:
    """The DreamMatcher ablation in miniature (see the module docstring). ``keep`` receives example images."""
    reference = subject_reference()
    plan = [(p, b, s) for s in range(seeds) for p, b in targets]
    pos = [p for p, _, _ in plan]
    bgs = [b for _, b, _ in plan]
    seed_list = [1000 + 17 * i for i in range(len(plan))]

    def run(word: str, **kw) -> list[np.ndarray]:
        prompts = [subject_prompt(p, b, word) for p, b, _ in plan]
        out = []
        for i in range(0, len(prompts), 12):
            out += _arrays(engine.personalize(prompts[i:i + 12], Image.fromarray(reference),
                                              subject_token=SUBJECT["shape"], steps=steps, guidance_scale=GUIDANCE,
                                              seed=seed_list[i:i + 12], height=SIZE, width=SIZE, **kw))
        return out

    conditions: dict[str, list[np.ndarray]] = {}
    conditions["no fine-tune, 'a square'"] = run("", ama=False)
    conditions["no fine-tune + AMA"] = run("", ama=True)
    conditions["no fine-tune + semantic matching, no mask"] = run("", ama=True, ama_mask="none")
    with finetuned(engine, *subject_renders(), db_steps):
        conditions["DreamBooth (baseline)"] = run(SUBJECT_WORD, ama=False)
        conditions["DreamBooth + semantic matching, no mask"] = run(SUBJECT_WORD, ama=True, ama_mask="none")
        for lc in lambda_cs:
            conditions[f"DreamBooth + AMA (λc {lc})"] = run(SUBJECT_WORD, ama=True, lambda_c=lc)
        conditions[f"DreamBooth + AMA + guidance (λg {lambda_g:g})"] = run(SUBJECT_WORD, ama=True, lambda_g=lambda_g)
    rows = []
    for name, images in conditions.items():
        scores = [subject_scores(im, p, b) for im, p, b in zip(images, pos, bgs)]
        rows += [Row("DreamMatcher", m, name, [s[m] for s in scores]) for m in scores[0]]
    if keep is not None:
        keep["dreammatcher"] = {"reference": reference, "DreamBooth": conditions["DreamBooth (baseline)"][:3],
                                "+ matching, no mask": conditions["DreamBooth + semantic matching, no mask"][:3],
                                "+ AMA": conditions[f"DreamBooth + AMA (λc {lambda_cs[len(lambda_cs) // 2]})"][:3]}
    return with_deltas(rows, "DreamBooth (baseline)")


# ------------------------------------------------------------------------------------------------ composite
def compose_case(seed: int) -> dict:
    """Two objects (different colours, plain or textured), their layout (two halves), the prompts and a
    scaffolding image (the scene's background without objects)."""
    rng = np.random.default_rng(seed)
    a = W.sample_object(rng, size="large")
    b = W.sample_object(rng, size="large", exclude_colours=(a.colour,))
    relation = ("left of", "above")[int(rng.integers(2))]
    bg = tuple(W.BACKGROUNDS)[int(rng.integers(len(W.BACKGROUNDS)))]
    layout = np.zeros((SIZE, SIZE, 3), np.uint8)
    first = (slice(None), slice(0, SIZE // 2)) if relation == "left of" else (slice(0, SIZE // 2), slice(None))
    layout[:] = (0, 0, 255)
    layout[first] = (255, 0, 0)
    return {"a": a, "b": b, "relation": relation, "background": bg, "layout": layout,
            "segments": {"#ff0000": f"{a.words(False)} on {bg}", "#0000ff": f"{b.words(False)} on {bg}"},
            "prompt": f"{a.words(False)} {relation} {b.words(False)} on {bg}",
            "scaffold": Image.fromarray(W.render(W.Scene(bg, ()), SIZE))}


def segment_hits(image: np.ndarray, case: dict, shape: bool = True) -> list[bool]:
    """Per segment: the object of its prompt's colour is found, its centre is in the segment, and (``shape``) it
    has its prompt's shape."""
    r = W.read_image(image)
    out = []
    for obj, first in ((case["a"], True), (case["b"], False)):
        o = r.find(obj.colour)
        centre = None if o is None else (o.cx if case["relation"] == "left of" else o.cy)
        inside = centre is not None and ((centre < 0.5) if first else (centre >= 0.5))
        out.append(o is not None and (o.shape == obj.shape or not shape) and inside)
    return out


COMPOSE_GLOBAL_STEPS = 2
SCAFFOLD_FRACTIONS = (0.3, 0.6, 1.0)
"""The κ sweep of the scaffolding-image rows (0.3 is the pipeline's default; 1: scaffolding to the last step)."""


def composed(engine, case: dict, seed: int, steps: int = STEPS, scaffold: bool = False,
             scaffold_fraction: float = 0.3) -> np.ndarray:
    """One MSP image of ``case`` (:func:`compose_case`), with or without its scaffolding image."""
    extra = {"scaffold_image": case["scaffold"]} if scaffold else {}
    return np.asarray(engine.compose(case["layout"], case["segments"], prompt=case["prompt"], steps=steps,
                                     guidance_scale=GUIDANCE, seed=seed, global_steps=COMPOSE_GLOBAL_STEPS,
                                     scaffold_fraction=scaffold_fraction, **extra)[0].convert("RGB"))


def compose_table(engine, *, seeds: int = 24, steps: int = STEPS, keep: dict | None = None) -> list[Row]:
    cases = [compose_case(7000 + i) for i in range(seeds)]
    seed_list = [3000 + i for i in range(seeds)]
    conditions = {"text2img, combined prompt (baseline)": generate(engine, [c["prompt"] for c in cases], seed_list,
                                                                   steps)}
    conditions["MSP, no scaffolding image (κ 0.3)"] = [composed(engine, c, s, steps)
                                                       for c, s in zip(cases, seed_list)]
    for k in SCAFFOLD_FRACTIONS:
        conditions[f"MSP, scaffolding image, κ {k:g}"] = [composed(engine, c, s, steps, True, k)
                                                          for c, s in zip(cases, seed_list)]
    rows = []
    for name, images in conditions.items():
        colour = [segment_hits(im, c, shape=False) for im, c in zip(images, cases)]
        hits = [segment_hits(im, c) for im, c in zip(images, cases)]
        rows.append(Row("MSP", "segment holds its colour", name, [h for pair in colour for h in pair]))
        rows.append(Row("MSP", "segment holds its object (colour + shape)", name, [h for pair in hits for h in pair]))
        rows.append(Row("MSP", "both segments right (colour + shape)", name, [all(pair) for pair in hits]))
    if keep is not None:
        keep["compose"] = {"layout": cases[0]["layout"],
                           "text2img": conditions["text2img, combined prompt (baseline)"][:3],
                           "compose": conditions[f"MSP, scaffolding image, κ {SCAFFOLD_FRACTIONS[-1]:g}"][:3]}
    return with_deltas(rows, "text2img, combined prompt (baseline)")


# ------------------------------------------------------------------------------------------------ ReVersion
RELATION = "inside"


def write_exemplars(folder: Path, n: int, seed: int = 0, relation: str = RELATION) -> Path:
    """``n`` renders of "A <relation> B" with their caption templates (``text.json``) for ReVersion."""
    folder.mkdir(parents=True, exist_ok=True)
    table = {}
    for i, s in enumerate(W.sample_scenes(seed, n, relation=relation, caption_dropout=False)):
        Image.fromarray(W.render(s)).save(folder / f"{i}.png")
        table[f"{i}.png"] = [s.caption.replace(f" {relation} ", " {} ")]
    (folder / "text.json").write_text(json.dumps(table, indent=1))
    return folder


def relation_cases(n: int, seed: int = 11) -> list[W.Scene]:
    return W.sample_scenes(seed, n, relation=RELATION, caption_dropout=False)


def relation_hits(images: Sequence[np.ndarray], scenes: Sequence[W.Scene], relation: str = RELATION) -> list[bool]:
    out = []
    for im, s in zip(images, scenes):
        r = W.read_image(im)
        a, b = r.find(s.objects[0].colour), r.find(s.objects[1].colour)
        out.append(a is not None and b is not None and W.relation_between(a, b) == relation)
    return out


def learn_relation(engine, data: Path, out: Path, steps: int, **cfg) -> str:
    """Train ``<R>`` on ``engine`` (in place: the token is then in its tokenizer) and return the token."""
    from dreamfuse.engine.train.reversion import ReVersionConfig, train

    config = ReVersionConfig(steps=steps, resolution=SIZE, checkpoint_every=0, progress=False, **cfg)
    return train(engine, data, out, config).token


def reversion_table(model: str = "shapes", *, seeds: int = 24, steps: int = STEPS, train_steps: int = 200,
                    n_exemplars: int = 16, keep: dict | None = None) -> list[Row]:
    scenes = relation_cases(seeds)
    seed_list = [5000 + i for i in range(seeds)]

    def prompts(word: str) -> list[str]:
        return [f"{s.objects[0].words(False)} {word} {s.objects[1].words(False)} on {s.background}" for s in scenes]

    engine = shapes_engine(model)
    conditions = {f"plain word '{RELATION}'": generate(engine, prompts(RELATION), seed_list, steps),
                  "initializer 'and' (no relation)": generate(engine, prompts("and"), seed_list, steps)}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_exemplars(Path(tmp) / "data", n_exemplars)
        for name, cfg in (("ReVersion <R> (baseline)", {}), ("<R> w/o steering loss", {"lambda_steer": 0.0}),
                          ("<R> w/o importance sampling", {"importance_sampling": False})):
            e = shapes_engine(model)
            token = learn_relation(e, data, Path(tmp) / name.replace(" ", "_").replace("/", ""), train_steps, **cfg)
            conditions[name] = generate(e, prompts(token), seed_list, steps)
    rows = [Row("ReVersion", f"relation is '{RELATION}'", name, relation_hits(images, scenes))
            for name, images in conditions.items()]
    if keep is not None:
        keep["reversion"] = {"exemplar": W.render(W.sample_scenes(0, 1, relation=RELATION,
                                                                  caption_dropout=False)[0]),
                             "'and'": conditions["initializer 'and' (no relation)"][:3],
                             "<R>": conditions["ReVersion <R> (baseline)"][:3]}
    return with_deltas(rows, "ReVersion <R> (baseline)")


# ------------------------------------------------------------------------------------------------ PatchDPO
def shapes_ip_adapter(engine, seed: int = 0):
    """The tiny IP-Adapter (base: 4 image tokens) for ``engine``'s UNet with ``to_k_ip``/``to_v_ip`` copied from
    each layer's ``to_k``/``to_v`` (IP-Adapter's initialization), attached to ``engine``."""
    from dreamfuse.engine.ip_adapter import build_tiny_ip_adapter

    adapter = build_tiny_ip_adapter(engine, plus=False, seed=seed)
    with torch.no_grad():
        for idx, name in adapter.layer_names.items():
            attn = engine.unet.get_submodule(name)
            adapter.layers[idx].to_k_ip.weight.copy_(attn.to_k.weight)
            adapter.layers[idx].to_v_ip.weight.copy_(attn.to_v.weight)
    engine.load_ip_adapter(adapter)
    return adapter


def corrupt(image: np.ndarray, rng: np.random.Generator, fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with ``fraction`` of its 8x8 patches painted :data:`CORRUPT`, and the patch-quality map (8x8
    grid, 1 = intact, 0 = corrupted)."""
    cells = SIZE // 8
    q = np.ones(cells * cells, np.float32)
    q[rng.choice(q.size, int(round(fraction * q.size)), replace=False)] = 0
    q = q.reshape(cells, cells)
    out = image.copy()
    for y, x in zip(*np.nonzero(q == 0)):
        out[8 * y:8 * y + 8, 8 * x:8 * x + 8] = CORRUPT
    return out, q


def on_palette(image: np.ndarray, scene: W.Scene) -> np.ndarray:
    """Per 8x8 patch: is its majority pixel class (:func:`~dreamfuse.engine.shapes_world.label_pixels`) the
    scene's background or one of its objects' colours — patch-level fidelity to a reference of that scene."""
    allowed = {scene.background, *(o.colour for o in scene.objects)}
    labels = W.label_pixels(image)
    cells = SIZE // 8
    out = np.zeros((cells, cells), bool)
    for y in range(cells):
        for x in range(cells):
            names, counts = np.unique(labels[8 * y:8 * y + 8, 8 * x:8 * x + 8], return_counts=True)
            out[y, x] = names[counts.argmax()] in allowed
    return out


def _ip_train(engine, samples, out: Path, steps: int, lr: float, ip_scale: float, projection: bool) -> None:
    from dreamfuse.engine.train.patchdpo import PatchDPOConfig, training_session

    cfg = PatchDPOConfig(steps=steps, lr=lr, batch_size=4, resolution=SIZE, checkpoint_every=0, progress=False,
                         ip_scale=ip_scale, train_projection=projection).validate()
    with training_session(engine, samples, out, cfg, SIZE) as trainer:
        while trainer.step < steps:
            trainer.train_step()


def pretrain_ip_adapter(engine, folder: Path, n: int, steps: int, lr: float, ip_scale: float) -> dict:
    """IP-Adapter's own objective on ``n`` renders (denoise an image conditioned on its own image tokens; image
    projection and image layers train): PatchDPO's trainer with every pair (ref, ref) and every weight 1. Returns
    the adapter's state dict."""
    from dreamfuse.engine.patch_quality import QualitySample

    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, s in enumerate(W.sample_scenes(23, n, caption_dropout=False)):
        path = folder / f"pre{i}.png"
        Image.fromarray(W.render(s)).save(path)
        ones = torch.ones(1, SIZE // 8, SIZE // 8)
        samples.append(QualitySample(f"p{i}", s.caption, path, [path], ones, torch.zeros_like(ones)))
    _ip_train(engine, samples, folder / "out", steps, lr, ip_scale, projection=True)
    return copy.deepcopy(engine.ip_adapter.state_dict())


def patchdpo_table(model: str = "shapes", *, seeds: int = 16, steps: int = STEPS, train_steps: int = 150,
                   pretrain_steps: int = 300, n_pretrain: int = 64, n_refs: int = 12, gens_per_ref: int = 2,
                   lr: float = 3e-4, ip_scale: float = 0.4, keep: dict | None = None) -> list[Row]:
    from dreamfuse.engine.patch_quality import QualitySample

    refs = W.sample_scenes(21, n_refs, n_objects=1, caption_dropout=False)
    evals = W.sample_scenes(22, seeds, n_objects=1, caption_dropout=False)
    rng = np.random.default_rng(0)
    conditions = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        samples = {"weighted": [], "uniform": []}
        engine = shapes_engine(model)
        shapes_ip_adapter(engine)
        pretrained = pretrain_ip_adapter(engine, root / "pretrain", n_pretrain, pretrain_steps, lr, ip_scale)
        for i, s in enumerate(refs):
            ref = W.render(s)
            Image.fromarray(ref).save(root / f"ref{i}.png")
            gens = generate(engine, [s.caption] * gens_per_ref, [900 + 31 * i + g for g in range(gens_per_ref)],
                            steps, ip_image=Image.fromarray(ref), ip_scale=ip_scale)
            paths, maps = [], []
            for g, im in enumerate(gens):
                bad, q = corrupt(im, rng)
                Image.fromarray(bad).save(root / f"gen{i}_{g}.png")
                paths.append(root / f"gen{i}_{g}.png")
                maps.append(torch.from_numpy(q))
            q_gen = torch.stack(maps)
            q_ref = torch.zeros_like(q_gen)  # the reference is intact: weight 1 - 0 everywhere
            samples["weighted"].append(QualitySample(f"s{i}", s.caption, root / f"ref{i}.png", paths, q_gen, q_ref))
            samples["uniform"].append(QualitySample(f"s{i}", s.caption, root / f"ref{i}.png", paths,
                                                    torch.ones_like(q_gen), q_ref))
        eval_refs = [W.render(s) for s in evals]
        eval_seeds = [6000 + i for i in range(seeds)]

        def sample_all(e) -> list[np.ndarray]:
            return [generate(e, [s.caption], [sd], steps, ip_image=Image.fromarray(r), ip_scale=ip_scale)[0]
                    for s, r, sd in zip(evals, eval_refs, eval_seeds)]

        conditions["IP-Adapter (pretrained) before fine-tuning"] = sample_all(engine)
        for name, key in (("fine-tuned, no patch weighting (baseline)", "uniform"),
                          ("PatchDPO (patch-weighted)", "weighted")):
            e = shapes_engine(model)
            shapes_ip_adapter(e).load_state_dict(pretrained)
            _ip_train(e, samples[key], root / key, train_steps, lr, ip_scale, projection=False)
            conditions[name] = sample_all(e)
    rows = []
    for name, images in conditions.items():
        patches = [on_palette(im, s) for im, s in zip(images, evals)]
        rows.append(Row("PatchDPO", "8x8 patch on the reference's palette", name,
                        [bool(v) for p in patches for v in p.ravel()]))
        rows.append(Row("PatchDPO", "image all on the reference's palette", name, [bool(p.all()) for p in patches]))
        rows.append(Row("PatchDPO", "reference colour read back", name,
                        [W.read_image(im).find(s.objects[0].colour) is not None for im, s in zip(images, evals)]))
    if keep is not None:
        keep["patchdpo"] = {"reference": eval_refs[0],
                            "no weighting": conditions["fine-tuned, no patch weighting (baseline)"][:3],
                            "PatchDPO": conditions["PatchDPO (patch-weighted)"][:3]}
    return with_deltas(rows, "fine-tuned, no patch weighting (baseline)")


# ------------------------------------------------------------------------------------------------ figure
def write_figure(keep: dict, path: Path) -> Path:
    """Reference / baseline / method images side by side, one row of panels per method (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, v) for k, v in keep.items()]
    cols = max(sum(1 if isinstance(x, np.ndarray) else len(x) for x in v.values()) for _, v in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.5 * len(rows)), squeeze=False)
    for r, (method, panels) in enumerate(rows):
        c = 0
        for label, imgs in panels.items():
            for j, im in enumerate([imgs] if isinstance(imgs, np.ndarray) else imgs):
                ax = axes[r][c]
                ax.imshow(im, interpolation="nearest")
                ax.set_title(label if j == 0 else "", fontsize=7)
                c += 1
        axes[r][0].set_ylabel(method, fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[r][c:]:
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TABLES = ("dreammatcher", "compose", "reversion", "patchdpo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.methods_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", help="the shapes model (default: the bundled 'shapes')")
    p.add_argument("--only", choices=TABLES, action="append", help="run only this table (repeatable)")
    p.add_argument("--seeds", type=int, default=1, help="multiplies every table's number of seeds (default 1)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"sampling steps (default {STEPS})")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--figure", type=Path, default=None, help="write the side-by-side figure here (PNG, matplotlib)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        p.error("--seeds and --steps: must be at least 1")
    if args.figure is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--figure: needs matplotlib (pip install -e '.[bench]')")
    if args.threads:
        torch.set_num_threads(args.threads)
    keep: dict = {}
    todo: dict[str, Callable[[], list[Row]]] = {
        "dreammatcher": lambda: dreammatcher_table(shapes_engine(args.model), seeds=2 * args.seeds,
                                                   steps=args.steps, keep=keep),
        "compose": lambda: compose_table(shapes_engine(args.model), seeds=24 * args.seeds, steps=args.steps,
                                         keep=keep),
        "reversion": lambda: reversion_table(args.model, seeds=24 * args.seeds, steps=args.steps, keep=keep),
        "patchdpo": lambda: patchdpo_table(args.model, seeds=16 * args.seeds, steps=args.steps, keep=keep),
    }
    all_rows = []
    for name in args.only or TABLES:
        t0 = time.perf_counter()
        rows = todo[name]()
        all_rows += rows
        print(format_table(f"{rows[0].table} ({time.perf_counter() - t0:.0f} s)", rows) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in all_rows], indent=1) + "\n")
    if args.figure:
        print(f"wrote {write_figure(keep, args.figure)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
