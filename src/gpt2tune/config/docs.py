"""params.yaml and docs/parameters.md's key table, written from the declarations in params.py.

Each key's default, rule and help are declared once (params.py); this module renders them as
the repo's params.yaml (defaults as values, help and allowed values as one comment per key)
and as the table between docs/parameters.md's ``<!-- params-table:start -->`` and ``-end -->``.
A test compares both files with what is rendered here, so after changing a declaration run

    python -m gpt2tune.config.docs          # rewrite params.yaml and docs/parameters.md's table
    python -m gpt2tune.config.docs --check  # exit 1 naming the stale files
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

from gpt2tune.config.params import Params, reference
from gpt2tune.config.schema import Key, parse_yaml
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import write_text_atomic

HEADER = (
    "# Every hyperparameter of the pipeline. Stages check the whole file before doing any work;\n"
    "# key names are fixed (an unknown key is an error). Numbers like 2e-5 are fine.\n"
    "# Defaults and comments come from src/gpt2tune/config/params.py:\n"
    "# python -m gpt2tune.config.docs writes them here.\n"
)
START, END = "<!-- params-table:start -->", "<!-- params-table:end -->"
PAGE = "docs/parameters.md"  # the page that holds the table, relative to the repository root
COMMENT_AT = 24  # column of the inline comments, as in the hand-written file this replaced
WIDTH = 100  # a key line longer than this gets its comment on the line above


def yaml_value(value: Any) -> str:
    """A value as params.yaml spells it: 0.00002 rather than 2e-05, quotes only when needed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and "e" in repr(value):  # YAML 1.1 readers take 2e-05 for text
        if 1e-8 <= abs(value) < 1:
            return format(Decimal(repr(value)), "f")
        mantissa, exponent = repr(value).split("e")
        return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}"  # 1.0e+300
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in value) + "]"
    quoted = json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML double-quoted one
    if not value or value != value.strip() or "#" in value:
        return quoted
    try:  # the loader params.yaml is read with: it refuses "yes", "09", "1:30" unquoted
        return value if parse_yaml(f"k: {value}", "") == {"k": value} else quoted
    except Gpt2tuneError:  # such as "x: y"
        return quoted


def _inline(left: str, note: str) -> str:
    pad = COMMENT_AT - len(left) if len(left) <= COMMENT_AT - 2 else 2
    return f"{left}{' ' * pad}# {note}"


def _lines(indent: str, name: str, value: str, notes: list[str]) -> list[str]:
    """A key line with the first of `notes` that fits inline; else that fits above it."""
    left = f"{indent}{name}:{' ' + value if value else ''}"
    for note in notes:
        if len(_inline(left, note)) <= WIDTH:
            return [_inline(left, note)]
    above = next((n for n in notes if len(indent) + 2 + len(n) <= WIDTH), notes[-1])
    return [f"{indent}# {above}", left]


def render_params_yaml() -> str:
    """The repo's params.yaml: every key at its declared default with one comment: its help,
    and what it allows where that fits (docs/parameters.md's table always has both)."""
    lines = HEADER.splitlines() + [""]
    for section, (help_, keys) in reference().items():
        lines += _lines("", section, "", [help_])
        for k in keys:
            lines += _lines("  ", k.name, yaml_value(k.default), [f"{k.help}; {k.allowed}", k.help])
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Prose for a table cell: | would end the cell, a bare <name> would read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "\\<")


def _default_cell(value: Any) -> str:
    text = yaml_value(value)
    text = text if len(text) <= 60 else text[:56] + " ..."
    return "`" + text.replace("|", "\\|") + "`"  # GFM tables want \| even in code


def _allowed_cell(k: Key) -> str:
    if not k.choices:
        return _cell(k.allowed)
    return "; ".join(f"`{name}`: {_cell(help_)}" for name, help_ in k.choices.items())


def render_table() -> str:
    """docs/parameters.md's reference table of every key, markers included."""
    rows = [START, "| key | default | what it is | allowed |", "|---|---|---|---|"]
    for section, (help_, keys) in reference().items():
        rows.append(f"| **{section}** | | {_cell(help_)} | |")
        for k in keys:
            cells = (
                f"`{section}.{k.name}`", _default_cell(k.default), _cell(k.help), _allowed_cell(k)
            )  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows + [END])


def _shown(value: Any) -> str:
    text = yaml_value(value)
    return text if len(text) <= 60 else text[:56] + " ..."


def render_help(
    sections: tuple[str, ...], current: Params | None = None, source: str = "params.yaml",
    note: str = "",
) -> str:  # fmt: skip
    """The parameters a command reads, for its --help: per section its help, then one line per
    key, ``section.key = default  (help)`` (long defaults cut short, as in the table). With
    `current` (the params read from `source`), a key whose value differs from its default
    shows both: ``section.key = 1000; params.yaml: 20``. `note`: a line on what was read."""
    ref = reference()
    lines = ["parameters read (params.yaml, or --params; change with --set):"]
    lines += [f"  {note}"] if note else []
    for section in sections:
        help_, keys = ref[section]
        lines.append(f"  {section}: {help_}")
        for k in keys:
            value = _shown(k.default)
            if current is not None:
                now = getattr(getattr(current, section), k.name)
                value += f"; {source}: {_shown(now)}" if _shown(now) != value else ""
            lines.append(f"    {section}.{k.name} = {value}  ({k.help})")
    return "\n".join(lines)


_TABLE = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)


def with_table(page: str) -> str:
    """docs/parameters.md's text with the generated table in place of what the markers hold."""
    if len(_TABLE.findall(page)) != 1:
        raise Gpt2tuneError(f"{PAGE}: needs one {START} ... {END} block for the params table")
    return _TABLE.sub(lambda _: render_table(), page)


def stale(root: Path) -> dict[Path, str]:
    """{file: what it should hold} for params.yaml and docs/parameters.md under root that differ."""
    page = (root / PAGE).read_text(encoding="utf-8")
    want = {root / "params.yaml": render_params_yaml(), root / PAGE: with_table(page)}
    return {
        path: text
        for path, text in want.items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2tune.config.docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    parser.add_argument("--root", type=Path, default=Path(os.curdir), help="repository root")
    args = parser.parse_args(argv)
    try:
        todo = stale(args.root)
    except (Gpt2tuneError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path, text in todo.items():
        if args.check:
            print(f"{path}: stale; run python -m gpt2tune.config.docs", file=sys.stderr)
        else:
            write_text_atomic(path, text)
            print(f"wrote {path}")
    return 1 if args.check and todo else 0


if __name__ == "__main__":
    sys.exit(main())
