"""How much DreamMatcher's AMA layers can move the shapes model's images, and how much AMA's mask lets through.

    python -m bench.ama_leverage            # ~30 s on 2 cores

AMA rewrites the values of the decoder's self-attention (``up_blocks`` 2 and 3 in SD's layout). Its effect on the
image is bounded by how much those layers contribute at all, so this zeroes each attention level's output in turn
(every other weight unchanged) and prints the mean per-pixel change of the images, over the whole image and over the
subject's pixels, next to what the method itself changes (a DreamBooth-style fine-tune on the subject, as
``bench.methods_eval``'s DreamMatcher table: AMA with its semantic-consistent mask, and the same warping with every
position warped, ``ama_mask="none"``, each against AMA off). The first line says whether the model can draw the
subject at all when the prompt spells it out ("a striped purple square ..."): the appearance AMA should carry is
one the decoder has.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
from dreamfuse.engine import shapes_world as W
from dreamfuse.engine.pipelines import personalize as pz
from PIL import Image

from bench import methods_eval as M

LEVELS = [("down_blocks.0", "attn1"), ("down_blocks.0", "attn2"), ("down_blocks.1", "attn1"),
          ("down_blocks.1", "attn2"), ("up_blocks.1", "attn1"), ("up_blocks.1", "attn2"), ("up_blocks.2", "attn1"),
          ("up_blocks.2", "attn2"), ("up_blocks.3", "attn1"), ("up_blocks.3", "attn2")]


def _zeroed(unet, prefix: str, attn: str) -> list:
    return [m.register_forward_hook(lambda mod, args, out: out * 0) for n, m in unet.named_modules()
            if n.startswith(prefix + ".") and n.endswith(attn)]


def _subject_mask(image: np.ndarray) -> np.ndarray:
    """The pixels of the largest object the reader finds (none: an empty mask)."""
    objects = W.read_image(image).objects
    return objects[0].mask if objects else np.zeros(image.shape[:2], bool)


@contextlib.contextmanager
def _foreground_maps(out: list):
    """Collect every finished foreground mask of the cond targets ``(n, h, w)`` (the pipeline's own, read as it is
    finished: :meth:`~dreamfuse.engine.pipelines.personalize._MatchState.finish_foreground`)."""
    original = pz._MatchState.finish_foreground

    def spy(state):
        pending = state.fg_sum is not None
        original(state)
        if pending:
            out.append(state.fg[len(state.fg) // 2:].clone())

    pz._MatchState.finish_foreground = spy
    try:
        yield out
    finally:
        pz._MatchState.finish_foreground = original


def _change(a: list[np.ndarray], b: list[np.ndarray], masks: list[np.ndarray]) -> tuple[float, float]:
    d = [np.abs(x.astype(np.int16) - y).mean(-1) for x, y in zip(a, b)]
    whole = float(np.mean([x.mean() for x in d]))
    subject = float(np.mean([x[m].mean() for x, m in zip(d, masks) if m.any()]))
    return whole, subject


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ama_leverage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--subject-token", default=M.SUBJECT["shape"],
                   help="the word whose cross-attention gives AMA's foreground mask (default: the class word, as the "
                        "DreamMatcher table; 'sks' or 'sks square' also work)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = M.shapes_engine(args.model)
    words = f"{M.SUBJECT['texture']} {M.SUBJECT['colour']}"
    prompts = [M.subject_prompt(pos, bg, words) for pos, bg in M.TARGETS]
    seeds = [1000 + 17 * i for i in range(len(prompts))]
    base = M.generate(engine, prompts, seeds)
    scores = [M.subject_scores(im, pos, bg) for im, (pos, bg) in zip(base, M.TARGETS)]
    print(f"text2img of '{prompts[0]}' and {len(prompts) - 1} more: subject colour "
          f"{np.mean([s['subject: colour'] for s in scores]):.2f}, texture "
          f"{np.mean([s['subject: texture'] for s in scores]):.2f} (the reader's rates)\n")
    masks = [_subject_mask(im) for im in base]
    rows = []
    for prefix, attn in LEVELS:
        hooks = _zeroed(engine.unet, prefix, attn)
        try:
            out = M.generate(engine, prompts, seeds)
        finally:
            for h in hooks:
                h.remove()
        kind = "self" if attn == "attn1" else "cross"
        rows.append((f"{prefix} {kind}-attention zeroed ({len(hooks)} layers)", *_change(out, base, masks)))
    reference = Image.fromarray(M.subject_reference())
    sks = [M.subject_prompt(pos, bg) for pos, bg in M.TARGETS]
    maps: list = []
    with M.finetuned(engine, *M.subject_renders(), 30):
        run = lambda **kw: M._arrays(engine.personalize(sks, reference, subject_token=args.subject_token,
                                                        steps=M.STEPS, guidance_scale=M.GUIDANCE, seed=seeds,
                                                        height=M.SIZE, width=M.SIZE, **kw))
        off, unmasked = run(ama=False), run(ama_mask="none")
        with _foreground_maps(maps):
            on = run()
    # where the foreground mask puts the subject: its value on the subject's pixels (AMA on) vs elsewhere
    fg = F.interpolate(torch.stack(maps).mean(0)[:, None].float(), size=(M.SIZE, M.SIZE), mode="nearest")[:, 0]
    on_masks = [_subject_mask(im) for im in on]
    inside = float(np.mean([f.numpy()[m].mean() for f, m in zip(fg, on_masks) if m.any()]))
    outside = float(np.mean([f.numpy()[~m].mean() for f, m in zip(fg, on_masks) if m.any()]))
    print(f"AMA's foreground mask ('{args.subject_token}' cross-attention, {tuple(maps[0].shape[1:])} grid, mean over "
          f"the AMA steps): {inside:.2f} on the subject's pixels, {outside:.2f} elsewhere\n")
    db_masks = [_subject_mask(im) for im in off]
    rows.append(("DreamBooth + AMA vs AMA off (the method itself)", *_change(on, off, db_masks)))
    rows.append(("DreamBooth + matching without a mask vs AMA off", *_change(unmasked, off, db_masks)))
    top = max(r[1] for r in rows)
    print("| what changes | mean abs. pixel change, whole image (0-255) | on the subject | ratio to the largest |")
    print("|---|---:|---:|---:|")
    for name, whole, subject in rows:
        print(f"| {name} | {whole:.2f} | {subject:.2f} | {whole / top:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
