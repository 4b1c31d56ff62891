"""What img2img and inpainting do, measured in the shapes world on the trained ``shapes`` model (the world's reader,
:mod:`dreamfuse.engine.shapes_world`, reads shapes, colours and positions back from the images).

    python -m bench.edit_eval --threads 2                      # both tables (~15 min on 2 busy cores)
    python -m bench.edit_eval --only inpaint --cases 2         # one table, twice the cases

Tables (``k/n`` rates with a 95 % Wilson interval, means with a 95 % bootstrap interval; ``Δ`` = the row minus the
table's baseline on the same cases and seeds, 95 % paired-bootstrap interval):

- Inpainting. An input scene holds one small object (any colour but red) on one side (left, right, top or
  bottom); the mask is a 32x32 box on the opposite side; the prompt asks for "a red circle" on the scene's
  background: alone, with the position word of the box, or describing the whole wanted scene ("a red circle left
  of a striped blue square on grass"). Per image: a red circle is read back anywhere; a red object's / a red
  circle's centre lies in the box; the input's object is still read back (its colour and shape, centre outside the
  box); the mean absolute difference to the input outside the box (0-255). Baseline: text2img of the same prompt
  with the same seed. Reference row: the input through the VAE alone (what the known region can at best
  be: inpainting keeps its latents, not its pixels).
- img2img strength. An input scene holds one large non-red, non-circle object on one background; the prompt asks
  for "a red circle" on another background. Per strength (0.04 ... 1.0, the last ``int(25 · strength)`` of 25
  steps): mean absolute difference to the input; the input's object and background read back; the prompt's red
  circle and background read back. The input through the VAE is the first row, then the sweep, text2img of the
  prompt, and a control: img2img with the input's own caption (which should keep the input at any strength).

Everything is seeded (the cases, the generation seeds), so a run reproduces its tables on one machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from dreamfuse.engine import shapes_world as W

from bench.methods_eval import GUIDANCE, SIZE, STEPS, paired_diff_ci, shapes_engine, wilson

SIDES = ("on the left", "on the right", "at the top", "at the bottom")
OPPOSITE = dict(zip(SIDES, ("on the right", "on the left", "at the bottom", "at the top")))
RELATION = dict(zip(SIDES, ("left of", "right of", "above", "below")))  # the box's side -> "A <relation> B"
BOX = 32  # the mask's side in pixels (half the image's)
STRENGTHS = (0.04, 0.08, 0.12, 0.2, 0.4, 0.6, 0.8, 1.0)
CONTROL_STRENGTHS = (0.2, 0.6)
"""1, 2, 3, 5, 10, 15, 20 and 25 of 25 steps: at 64x64 (8x8 latents) a shape is a few latent cells, so the input
gives way within the first fifth of the schedule."""
BATCH = 16


# ------------------------------------------------------------------------------------------------ statistics
def mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and its 95 % bootstrap interval."""
    v = np.asarray(values, float)
    boots = v[np.random.default_rng(seed).integers(0, v.size, (n_boot, v.size))].mean(1)
    return float(v.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def cell(values: Sequence, base: Sequence | None = None) -> str:
    """``rate [CI]`` for booleans, ``mean [CI]`` for numbers; with ``base`` (paired) also ``Δ mean [CI]``."""
    if isinstance(values[0], (bool, np.bool_)):
        k, n = int(sum(values)), len(values)
        lo, hi = wilson(k, n)
        text = f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]"
        fmt = "+.2f"
    else:
        m, lo, hi = mean_ci(values)
        text = f"{m:.1f} [{lo:.1f}, {hi:.1f}]"
        fmt = "+.1f"
    if base is not None:
        d, dlo, dhi = paired_diff_ci(np.asarray(base, float), np.asarray(values, float))
        text += f"<br>Δ {d:{fmt}} [{dlo:{fmt}}, {dhi:{fmt}}]"
    return text


def table(title: str, rows: dict[str, dict[str, list]], baselines: dict[str, str] | None = None) -> str:
    """A markdown table: one line per condition (``rows``: condition -> metric -> per-case values); a row named in
    ``baselines`` gets its Δ against the row it maps to."""
    metrics = list(next(iter(rows.values())))
    n = len(next(iter(next(iter(rows.values())).values())))
    lines = [f"### {title}", "", "| condition | " + " | ".join(f"{m} (n={n})" for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for name, values in rows.items():
        base = rows[baselines[name]] if baselines and name in baselines else None
        cells = [cell(values[m], None if base is None or m not in base else base[m]) if m in values else ""
                 for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ helpers
def batched(fn: Callable[[list, list], list], items: Sequence, seeds: Sequence[int]) -> list[np.ndarray]:
    """``fn(items, seeds)`` in batches of :data:`BATCH`, images as uint8 arrays."""
    out = []
    for i in range(0, len(items), BATCH):
        out += [np.asarray(im.convert("RGB")) for im in fn(list(items[i:i + BATCH]), list(seeds[i:i + BATCH]))]
    return out


def mad(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    d = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(-1)
    return float(d[where].mean() if where is not None else d.mean())


def box_mask(side: str, size: int = SIZE, box: int = BOX) -> np.ndarray:
    """A ``box x box`` square centred on the position word's centre, clipped to the image."""
    cx, cy = (round(c * size) for c in W.POSITIONS[side])
    m = np.zeros((size, size), bool)
    m[max(0, cy - box // 2):cy + box // 2, max(0, cx - box // 2):cx + box // 2] = True
    return m


def is_red_circle(o) -> bool:
    return o is not None and o.colour == "red" and o.shape == "circle"


def vae_round_trip(engine, images: Sequence[np.ndarray], seeds: Sequence[int]) -> list[np.ndarray]:
    """The inputs through the VAE as inpainting keeps them: the posterior sampled with each image's generator."""
    from dreamfuse.engine.pipelines.img2img import posterior, sample_latents

    out = []
    with torch.no_grad():
        for im, s in zip(images, seeds):
            x = torch.from_numpy(im).permute(2, 0, 1)[None].float().contiguous() / 255
            z = sample_latents(engine, posterior(engine, x * 2 - 1), torch.Generator().manual_seed(s))
            out.append((engine.decode(z)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return out


# ------------------------------------------------------------------------------------------------ inpainting
def inpaint_case(index: int) -> dict:
    """Case ``index``: the mask's side cycles through :data:`SIDES`; the object (small, not red) stands opposite,
    clear of the box."""
    rng = np.random.default_rng([index, 0xED17])
    side = SIDES[index % len(SIDES)]
    obj = W.sample_object(rng, size="small", exclude_colours=("red",))
    scene = W.sample_scene(int(rng.integers(2**31)), objects=[{"shape": obj.shape, "colour": obj.colour,
                                                                "texture": obj.texture, "size": "small"}],
                           position=OPPOSITE[side], caption_dropout=False)
    words = scene.objects[0].words(False)
    return {"scene": scene, "image": W.render(scene), "mask": box_mask(side), "side": side,
            "prompt": f"a red circle on {scene.background}",
            "prompt_at": f"a red circle {side} on {scene.background}",
            "prompt_scene": f"a red circle {RELATION[side]} {words} on {scene.background}"}


PROMPTS = {"prompt": "'a red circle on <bg>'", "prompt_at": "'a red circle <side> on <bg>'",
           "prompt_scene": "'a red circle <relation> <the input's object> on <bg>'"}


def inpaint_scores(image: np.ndarray, case: dict) -> dict:
    r = W.read_image(image)
    m = case["mask"]

    def in_mask(o) -> bool:
        return bool(m[min(SIZE - 1, int(o.cy * SIZE)), min(SIZE - 1, int(o.cx * SIZE))])

    want = case["scene"].objects[0]
    return {"red circle read back": any(is_red_circle(o) for o in r.objects),
            "red object in the mask": any(o.colour == "red" and in_mask(o) for o in r.objects),
            "red circle in the mask": any(is_red_circle(o) and in_mask(o) for o in r.objects),
            "input's object kept": any(o.colour == want.colour and o.shape == want.shape and not in_mask(o)
                                       for o in r.objects),
            "mean abs diff outside the mask": mad(image, case["image"], ~m)}


def inpaint_table(engine, *, cases: int = 48, steps: int = STEPS) -> tuple[str, dict]:
    cs = [inpaint_case(i) for i in range(cases)]
    seeds = [5000 + i for i in range(cases)]
    kw = dict(steps=steps, guidance_scale=GUIDANCE)

    def t2i(key):
        return lambda items, s: engine.text2img([c[key] for c in items], seed=s, height=SIZE, width=SIZE, **kw)

    def inp(key):
        return lambda items, s: engine.inpaint([c[key] for c in items], [c["image"] for c in items],
                                               [c["mask"] for c in items], seed=s, **kw)

    images = {"input through the VAE (reference)": vae_round_trip(engine, [c["image"] for c in cs], seeds)}
    baselines = {}
    for key, words in PROMPTS.items():
        base = f"text2img {words} (baseline)"
        images[base] = batched(t2i(key), cs, seeds)
        images[f"inpaint {words}"] = batched(inp(key), cs, seeds)
        baselines[f"inpaint {words}"] = base
    rows = {}
    for name, ims in images.items():
        scores = [inpaint_scores(im, c) for im, c in zip(ims, cs)]
        rows[name] = {k: [s[k] for s in scores] for k in scores[0]}
    return table("Inpainting 'a red circle' into a 32x32 box opposite the input's object (Δ: inpaint minus text2img "
                 "of the same prompt)", rows, baselines), {"cases": cs, "images": images}


# ------------------------------------------------------------------------------------------------ img2img
def img2img_case(index: int) -> dict:
    rng = np.random.default_rng([index, 0x1212])
    obj = W.sample_object(rng, size="large", exclude_colours=("red",))
    if obj.shape == "circle":
        obj = W.Obj(("square", "triangle", "star")[index % 3], obj.colour, obj.texture, obj.size, obj.cx, obj.cy)
    bgs = list(W.BACKGROUNDS)
    bg_in = bgs[index % len(bgs)]
    bg_out = bgs[(index + 1 + int(rng.integers(2))) % len(bgs)]
    scene = W.sample_scene(int(rng.integers(2**31)), objects=[{"shape": obj.shape, "colour": obj.colour,
                                                                "texture": obj.texture, "size": "large"}],
                           background=bg_in, caption_dropout=False)
    return {"scene": scene, "image": W.render(scene), "prompt": f"a red circle on {bg_out}", "background": bg_out}


def img2img_scores(image: np.ndarray, case: dict) -> dict:
    r = W.read_image(image)
    want = case["scene"].objects[0]
    return {"mean abs diff to the input": mad(image, case["image"]),
            "input's object read back": any(o.colour == want.colour and o.shape == want.shape for o in r.objects),
            "input's background": r.background == case["scene"].background,
            "prompt's red circle read back": any(is_red_circle(o) for o in r.objects),
            "prompt's background": r.background == case["background"]}


def img2img_table(engine, *, cases: int = 24, steps: int = STEPS) -> tuple[str, dict]:
    cs = [img2img_case(i) for i in range(cases)]
    seeds = [6000 + i for i in range(cases)]
    kw = dict(steps=steps, guidance_scale=GUIDANCE)
    images = {"input through the VAE (reference)": vae_round_trip(engine, [c["image"] for c in cs], seeds)}
    for s in STRENGTHS:
        images[f"img2img, strength {s:g} ({int(steps * s)} of {steps} steps)"] = batched(
            lambda items, sd, s=s: engine.img2img([c["prompt"] for c in items], [c["image"] for c in items],
                                                  strength=s, seed=sd, **kw), cs, seeds)
    images["text2img of the prompt"] = batched(
        lambda items, sd: engine.text2img([c["prompt"] for c in items], seed=sd, height=SIZE, width=SIZE, **kw),
        cs, seeds)
    for s in CONTROL_STRENGTHS:  # the control: the input's own caption keeps the input at these strengths
        images[f"control: the input's own caption, strength {s:g}"] = batched(
            lambda items, sd, s=s: engine.img2img([c["scene"].caption for c in items], [c["image"] for c in items],
                                                  strength=s, seed=sd, **kw), cs, seeds)
    rows = {}
    for name, ims in images.items():
        scores = [img2img_scores(im, c) for im, c in zip(ims, cs)]
        rows[name] = {k: [s[k] for s in scores] for k in scores[0]}
    return table("img2img: from the input toward the prompt ('a red circle on <another background>') as strength "
                 "grows", rows), {"cases": cs, "images": images}


TABLES = ("inpaint", "img2img")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.edit_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", help="the shapes model (default: the bundled 'shapes')")
    p.add_argument("--only", choices=TABLES, action="append", help="run only this table (repeatable)")
    p.add_argument("--cases", type=int, default=1, help="multiplies the cases of each table (48 inpainting, 24 "
                                                         "img2img; default 1)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"sampling steps (default {STEPS})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--figure", default=None, help="write a PNG of the first cases of each table here")
    args = p.parse_args(argv)
    if args.cases < 1 or args.steps < 1:
        p.error("--cases and --steps: must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = shapes_engine(args.model)
    keep = {}
    for name in args.only or TABLES:
        t0 = time.perf_counter()
        if name == "inpaint":
            text, keep[name] = inpaint_table(engine, cases=48 * args.cases, steps=args.steps)
        else:
            text, keep[name] = img2img_table(engine, cases=24 * args.cases, steps=args.steps)
        print(text.replace("### ", f"### ({time.perf_counter() - t0:.0f} s) ", 1) + "\n", flush=True)
    if args.figure:
        from PIL import Image

        strips = []
        for name, kept in keep.items():
            first = [c["image"] for c in kept["cases"][:6]]
            if name == "inpaint":
                first = [np.where(c["mask"][..., None], (first[i] // 2 + 127), first[i]).astype(np.uint8)
                         for i, c in enumerate(kept["cases"][:6])]
            strips.append(np.concatenate(first, 1))
            strips += [np.concatenate(ims[:6], 1) for ims in kept["images"].values()]
        Image.fromarray(np.concatenate(strips, 0)).save(args.figure)
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
