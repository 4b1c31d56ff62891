"""``dreamfuse relation-prompts``: ReVersion inference prompts from entity lists (imports no torch)."""

from __future__ import annotations

import argparse

from ..relation_prompts import DEFAULT_TEMPLATE, relation_prompts

EPILOG = """\
entity lists (-e/--entities, one per {} slot, or one for all slots):
  comma-separated ("cat,dog,red panda"), or @FILE with one entity per line (UTF-8; '#' starts a comment line).

examples:
  dreamfuse relation-prompts -e cat,dog -e box,basket          # cat <R> box, cat <R> basket, dog <R> box, ...
  dreamfuse relation-prompts -e man,woman,child,cat,rabbit     # every pair: the benchmark's N x N prompts
  dreamfuse relation-prompts "a photo of {} <R> {}, in the snow" -e cat -e box,basket
  dreamfuse relation-prompts "<S>" -e cat -e box               # another token name: cat <S> box
  dreamfuse relation-prompts -e cat,dog -e box > prompts.txt   # then, per line:
      dreamfuse generate --relation out/learned_embeds.bin --prompt "$line" --out x.png
"""

MAX_PROMPTS = 100_000
MAX_OUTPUT_CHARS = 64 << 20
"""Most characters printed (100,000 prompts of 600 characters)."""
MAX_ENTITY_FILE_BYTES = 1 << 20
"""Largest @FILE read: 100,000 entities of ten characters (a list longer than MAX_PROMPTS is refused anyway)."""


def register(sub, name: str, help_: str, rest: list[str]) -> None:
    p = sub.add_parser(
        name, help=help_, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print one inference prompt per line for a learned ReVersion relation token: every "
                    "combination of the entity lists placed in the template's {} slots (first slot "
                    "outermost). Use the prompts with `dreamfuse generate --relation learned_embeds.bin`.")
    p.add_argument("template", nargs="?", default=DEFAULT_TEMPLATE, metavar="TEMPLATE_OR_RELATION",
                   help=f"a template with {{}} entity slots, or the relation token alone (meaning "
                        f"'{{}} TOKEN {{}}'); default {DEFAULT_TEMPLATE!r}")
    p.add_argument("-e", "--entities", action="append", required=True, metavar="LIST",
                   help="entities for one slot: 'cat,dog' or @FILE (one per line); repeat per slot, or give "
                        "once for all slots")
    p.set_defaults(func=run)


def entity_list(arg: str) -> list[str]:
    """One ``-e`` argument -> its entities: ``'cat,dog'``, or ``@FILE`` (a UTF-8 file of at most
    :data:`MAX_ENTITY_FILE_BYTES`, one entity per line). Each entity is prompt text (at most
    ``limits.max_prompt_chars`` characters), and a list holds at most :data:`MAX_PROMPTS` of them."""
    from ..files import check_file
    from ..limits import DEFAULT_LIMITS
    from ..validation import check_text

    check_text(arg, "--entities")
    if arg.startswith("@"):
        path = check_file(arg[1:], "--entities")
        size = path.stat().st_size
        if size > MAX_ENTITY_FILE_BYTES:
            raise ValueError(f"--entities: {str(path)!r} is {size} bytes, more than the {MAX_ENTITY_FILE_BYTES} an "
                             "entity list may have")
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ValueError(f"--entities: {str(path)!r} is not UTF-8 text") from None
        items = [line.strip() for line in text.splitlines()]
        items = [i for i in items if i and not i.startswith("#")]
    else:
        items = [i.strip() for i in arg.split(",")]
    if not items or not all(items):
        raise ValueError(f"--entities: {arg[:60]!r} holds an empty entity (use 'cat,dog' or @FILE)")
    if len(items) > MAX_PROMPTS:
        raise ValueError(f"--entities: {arg[:60]!r} lists {len(items)} entities; the limit is {MAX_PROMPTS} prompts")
    for item in items:
        check_text(item, "--entities", DEFAULT_LIMITS.max_prompt_chars)
    return items


def run(args) -> None:
    from ..limits import DEFAULT_LIMITS
    from ..validation import check_text

    check_text(args.template, "TEMPLATE_OR_RELATION", DEFAULT_LIMITS.max_prompt_chars)
    lists = [entity_list(a) for a in args.entities]
    template = args.template.strip()
    slots = template.count("{}") if "{}" in template else 2  # the relation alone means "{} <R> {}"
    per_slot = lists * slots if len(lists) == 1 else lists
    total = 1
    for lst in per_slot:
        total *= len(lst)
        if total > MAX_PROMPTS:
            raise ValueError(f"--entities: the lists make more than {MAX_PROMPTS} prompts (the limit)")
    # every entity of slot s appears in total / len(list_s) prompts
    chars = total * (len(template) + 1) + sum(total // len(lst) * sum(map(len, lst)) for lst in per_slot)
    if chars > MAX_OUTPUT_CHARS:
        raise ValueError(f"--entities: the {total} prompts would be {chars} characters, more than the "
                         f"{MAX_OUTPUT_CHARS} printed at most")
    print("\n".join(relation_prompts(args.template, *lists)))
