"""ReVersion inference prompts: expand entity lists into ``"<A> <R> <B>"`` prompts (no torch needed)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

DEFAULT_TOKEN = "<R>"
DEFAULT_TEMPLATE = "{} <R> {}"
_SLOT = "{}"


def relation_prompts(template_or_relation: str = DEFAULT_TEMPLATE, *entities: str | Sequence[str]) -> list[str]:
    """Expand entity lists into inference prompts, as the ReVersion benchmark's inference templates do.

    ``template_or_relation`` is either a template whose ``{}`` are entity slots (``"{} <R> {}"``,
    ``"a photo of {} <R> {}, in the snow"``) or, without ``{}``, the relation itself (``"<R>"``), which
    means the template ``"{} <R> {}"``. Then ``entities`` gives one list per slot (a string is a
    one-entity list) and every combination is produced, first slot outermost; a single list serves every
    slot (the benchmark's 10 entities x 10 entities = 100 prompts)::

        relation_prompts("<R>", ["cat", "dog"], ["box"])  -> ["cat <R> box", "dog <R> box"]
        relation_prompts("{} <R> {}", ["man", "cat"])     -> ["man <R> man", "man <R> cat",
                                                              "cat <R> man", "cat <R> cat"]
    """
    template = template_or_relation.strip()
    if not template:
        raise ValueError("relation_prompts: the template or relation is empty")
    if _SLOT not in template:
        template = f"{_SLOT} {template} {_SLOT}"
    pieces = template.split(_SLOT)
    slots = len(pieces) - 1
    lists = [[e] if isinstance(e, str) else list(e) for e in entities]
    if not lists:
        raise ValueError(f"relation_prompts: give entities for the {slots} slot(s) of {template!r}")
    if len(lists) == 1:
        lists = lists * slots
    if len(lists) != slots:
        raise ValueError(f"relation_prompts: {template!r} has {slots} slot(s) but {len(lists)} entity lists "
                         "were given (give one list per slot, or one list for all)")
    for i, lst in enumerate(lists):
        cleaned = [e.strip() for e in lst]
        if not cleaned or not all(cleaned):
            raise ValueError(f"relation_prompts: entity list {i + 1} is empty or holds an empty entity")
        lists[i] = cleaned
    out = []
    for combo in itertools.product(*lists):
        out.append("".join(p + e for p, e in zip(pieces, combo)) + pieces[-1])
    return out
