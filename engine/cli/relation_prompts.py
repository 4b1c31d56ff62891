"""``dreamfuse relation-prompts``: ReVersion inference prompts from entity lists (imports no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    from ..validation import check_text

    if arg.startswith("@"):
        path = Path(arg[1:]).expanduser()
        if not path.is_file():
            raise ValueError(f"--entities: file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--entities: {str(path)!r} is not UTF-8 text") from None
        items = [line.strip() for line in text.splitlines()]
        items = [i for i in items if i and not i.startswith("#")]
    else:
        check_text(arg, "--entities")
        items = [i.strip() for i in arg.split(",")]
    if not items or not all(items):
        raise ValueError(f"--entities: {arg!r} holds an empty entity (use 'cat,dog' or @FILE)")
    return items


def run(args) -> None:
    from ..validation import check_text

    check_text(args.template, "TEMPLATE_OR_RELATION")
    lists = [entity_list(a) for a in args.entities]
    slots = max(1, args.template.count("{}"))
    total = 1
    for lst in (lists * slots if len(lists) == 1 else lists):
        total *= len(lst)
    if total > MAX_PROMPTS:
        raise ValueError(f"--entities: the lists make {total} prompts; the limit is {MAX_PROMPTS}")
    print("\n".join(relation_prompts(args.template, *lists)))
