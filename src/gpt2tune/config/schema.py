"""Declaring, reading and checking params keys: the machinery behind params.py.

A key is a dataclass field whose metadata carries a Rule (what values are allowed, as the words
that finish "must be ...", plus a check) and one line of help; ``key(1000, at_least(1),
"optimizer steps")`` declares default, range and help in one place. params.py declares every
key this way; validation (``check_sections``), params.yaml's comments, the docs' table and
a command's --help all read these fields (``describe``), so none of them can drift. Below
that: the strict YAML reader (``read_yaml``: duplicate keys, aliases and values that YAML 1.1
and 1.2 read differently are errors, 2e-5 is a number).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.urls import redact


@dataclass(frozen=True)
class Rule:
    allowed: str  # finishes the sentence "params.yaml: key = value: must be ..."
    ok: Callable[[Any], bool] = lambda v: True  # runs only on values of the right type
    choices: Mapping[str, str] = field(default_factory=dict)  # choice -> help, for the docs


def key(default: Any, rule: Rule, help: str) -> Any:
    """A dataclass field for one params.yaml key: its default, its rule and one line of help."""
    return field(default=default, metadata={"rule": rule, "help": help})


def section(cls: type, help: str) -> Any:
    """A Params field for one section of params.yaml, defaulting to its keys' defaults."""
    return field(default_factory=cls, metadata={"help": help})


def at_least(lo: int, note: str = "") -> Rule:
    return Rule(f"an integer >= {lo}{note}", lambda v: v >= lo)


def number_at_least(lo: float, note: str = "") -> Rule:
    return Rule(f"a number >= {lo}{note}", lambda v: v >= lo)


def int_in(lo: int, hi: int) -> Rule:
    return Rule(f"an integer in {lo}..{hi}", lambda v: lo <= v <= hi)


def one_of(choices: Mapping[str, str] | tuple[str, ...]) -> Rule:
    """Exactly one of `choices` (names, or name -> one line of help for the docs)."""
    helps = dict(choices) if isinstance(choices, Mapping) else {}
    return Rule("one of " + ", ".join(choices), lambda v: v in choices, helps)


SWITCH = Rule("true or false")

# ---------------------------------------------------------------------------------------------
# Reading the declarations.


@dataclass(frozen=True)
class Key:
    """One key as the docs and --help show it."""

    name: str  # without the section: "steps"
    type: str  # "int", "float", "bool", "str" or "list of str"
    default: Any
    allowed: str
    help: str
    choices: Mapping[str, str]


_TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "str", tuple[str, ...]: "list of str"}


def types_of(cls: type) -> dict[str, Any]:
    """{key: type} of a dataclass, in declaration order (annotations resolved)."""
    return typing.get_type_hints(cls)


def rule_of(cls: type, name: str) -> Rule:
    return cls.__dataclass_fields__[name].metadata["rule"]


def describe(cls: type) -> list[Key]:
    """Every key of one section's dataclass, in order, as the docs show it."""
    types = types_of(cls)
    out = []
    for f in dataclasses.fields(cls):
        rule = f.metadata["rule"]
        out.append(
            Key(f.name, _TYPE_NAMES[types[f.name]], f.default, rule.allowed, f.metadata["help"],
                rule.choices)
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Checking one value.

BAD = object()  # returned by coerce for a value of the wrong type


def coerce(value: Any, typ: Any) -> Any:
    """The value as `typ`, or BAD. No silent conversions: "1000" and true are not integers."""
    if typ is bool:  # and 1 or "yes" are not booleans
        return value if isinstance(value, bool) else BAD
    if isinstance(value, bool):  # bool subclasses int, but `steps: true` is surely a mistake
        return BAD
    if typ is int:
        return value if isinstance(value, int) else BAD
    if typ is float:  # an int is fine where a float is expected: `learning_rate: 1`
        if not isinstance(value, (int, float)):
            return BAD
        try:
            value = float(value)
        except OverflowError:
            return BAD
        return value if math.isfinite(value) else BAD
    if typ is str:
        return value if isinstance(value, str) else BAD
    if typ == tuple[str, ...]:
        ok = isinstance(value, list) and all(isinstance(p, str) for p in value)
        return tuple(value) if ok else BAD
    raise TypeError(f"no coercion for {typ!r}")  # a new field type needs a branch above


def show(value: Any) -> str:
    """A value the way YAML would spell it (true, null, "1000"), cut short to keep one line."""
    if isinstance(value, str):  # a password in a URL is not repeated in the error
        value = redact(value)
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def kind(value: Any) -> str:
    for types, name in (
        (bool, "true/false"),
        (int, "an integer"),
        (float, "a number"),
        (str, "text"),
        (list, "a list"),
        (dict, "a mapping"),
        (type(None), "null"),
    ):
        if isinstance(value, types):
            return name
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Checking a whole file.


def _unknown(source: str, key: str, valid: list[str], elsewhere: dict[str, str]) -> Gpt2tuneError:
    """`key` is not one of `valid`: suggest the closest one, or the section it belongs in."""
    short = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(short)]
    what = "unknown key" if prefix else "unknown section"
    close = difflib.get_close_matches(short, valid, n=1)
    if close:
        hint = f"did you mean {prefix}{close[0]}?"
    elif short in elsewhere:
        hint = f"did you mean {elsewhere[short]}?"
    else:
        hint = "valid: " + ", ".join(valid)
    return Gpt2tuneError(f"{source}: {key}: {what}; {hint}")


def check_sections(raw: object, root: type, source: str) -> dict[str, Any]:
    """Check an already-parsed params file against `root` (a dataclass of section dataclasses)
    and build each section; raise Gpt2tuneError on the first problem. Unknown keys are reported
    before missing ones, since a misspelled key shows up as both and "did you mean" is the more
    useful message."""
    sections = types_of(root)
    if raw is None:
        raise Gpt2tuneError(f"{source}: file is empty; expected sections {', '.join(sections)}")
    if not isinstance(raw, dict):
        raise Gpt2tuneError(
            f"{source}: top level must be a mapping of sections ({', '.join(sections)}), "
            f"got {kind(raw)}"
        )
    # Where each bare key lives, so `temperature` under train can point to sample.temperature.
    home = {k: f"{s}.{k}" for s, cls in sections.items() for k in types_of(cls)}
    home |= {s: s for s in sections}
    for part in raw:
        if part not in sections:
            raise _unknown(source, str(part), list(sections), home)
    built = {}
    for part, cls in sections.items():
        if part not in raw:
            raise Gpt2tuneError(
                f"{source}: {part}: missing section (with keys {', '.join(types_of(cls))})"
            )
        built[part] = _build(cls, raw[part], source, part, home)
    return built


def _build(cls: type, body: object, source: str, part: str, home: dict[str, str]) -> Any:
    """One section, `part`, checked key by key and built as a `cls`."""
    fields, where = types_of(cls), f"{source}: {part}"
    if not isinstance(body, dict):
        raise Gpt2tuneError(
            f"{where} = {show(body)}: must be a mapping with keys "
            f"{', '.join(fields)} (got {kind(body)})"
        )
    for name in body:
        if name not in fields:
            raise _unknown(source, f"{part}.{name}", list(fields), home)
    values = {}
    for name, typ in fields.items():
        rule, at = rule_of(cls, name), f"{where}.{name}"
        if name not in body:
            raise Gpt2tuneError(f"{at}: missing; must be {rule.allowed}")
        value = coerce(body[name], typ)
        if value is BAD:
            raise Gpt2tuneError(
                f"{at} = {show(body[name])}: must be {rule.allowed} (got {kind(body[name])})"
            )
        if not rule.ok(value):
            raise Gpt2tuneError(f"{at} = {show(body[name])}: must be {rule.allowed}")
        values[name] = value
    return cls(**values)


# ---------------------------------------------------------------------------------------------
# Reading the YAML.


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, made stricter and closer to YAML 1.2 (what DVC's ruamel reads)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # Plain PyYAML lets a repeated key silently win; here it is an error.
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        # Composing recurses once per level: 100,000 "[" cost a RecursionError 3,000 lines
        # long. params.yaml nests three levels (section, key, list); far deeper is a mistake.
        self._depth = getattr(self, "_depth", 0) + 1
        if self._depth > _MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None,
                f"nested more than {_MAX_DEPTH} levels deep; params files need three "
                "(section, key, list): close the brackets",
                self.peek_event().start_mark,
            )  # fmt: skip
        try:
            return self._compose_node(parent, index)
        finally:
            self._depth -= 1

    def _compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        # An alias (*name) repeats an anchored value by reference; nested ones multiply
        # ("billion laughs": 405 bytes became gigabytes the moment an error message showed
        # the value). params.yaml needs no repetition, so the first alias is refused before
        # anything is built: instant, whatever the nesting.
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None,
                f"alias *{event.anchor}: aliases are not allowed in params files; "
                "write the value out",
                event.start_mark,
            )  # fmt: skip
        # A plain value that YAML 1.1 (this loader) and 1.2 (DVC's) read differently would
        # train with one value while dvc.lock and `dvc exp show` record the other.
        if self.check_event(yaml.ScalarEvent):
            event = self.peek_event()
            why = version_dependent(event.value) if event.tag is None and event.implicit[0] else ""
            if why:
                name = f"{index.value}: " if isinstance(index, yaml.ScalarNode) else ""
                raise VersionDependent(None, None, name + why, event.start_mark)
        return super().compose_node(parent, index)


class VersionDependent(yaml.composer.ComposerError):
    """A plain value that YAML 1.1 and YAML 1.2 read differently."""


_MAX_DEPTH = 100  # levels of nesting in a params file (it needs three)

# Plain values whose meaning depends on the YAML version: 010 (YAML 1.1 octal 8, 1.2 decimal
# 10), 09 (1.1 text, 1.2 9), 0o10 (1.1 text, 1.2 8), 1:30 (1.1 base 60, 90; 1.2 text), and
# yes/no/on/off/y/n (1.1 booleans, though PyYAML reads y and n as text; 1.2 text).
_LEADING_ZERO = re.compile(r"[-+]?0[0-9_]+")
_OCTAL_12 = re.compile(r"[-+]?0o[0-7]+")
_BASE_60 = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?")
_BOOLEAN_11 = {"y": True, "yes": True, "on": True, "n": False, "no": False, "off": False}


def version_dependent(value: str) -> str:
    """Why the plain YAML scalar `value` means one thing in YAML 1.1 and another in 1.2 (what
    DVC reads), and how to write it; "" when both read it alike."""
    sign = "-" if value.startswith("-") else ""
    digits = value.lstrip("+-")
    if _LEADING_ZERO.fullmatch(value):
        number = int(sign + digits.replace("_", ""))
        if not re.fullmatch(r"[0-7_]+", digits):
            return _both_ways(value, "text", f"{number}", f"{number}")
        octal = int(sign + digits.replace("_", ""), 8)
        return (
            ""
            if octal == number
            else _both_ways(value, f"the octal number {octal}", f"{number}", f"{number}")
        )
    if _OCTAL_12.fullmatch(value):
        number = int(sign + digits[2:], 8)
        return _both_ways(value, "text", f"the octal number {number}", f"{number}")
    if _BASE_60.fullmatch(value):
        whole, _, fraction = digits.replace("_", "").partition(".")
        number = 0
        for part in whole.split(":"):
            number = number * 60 + int(part)
        spelled = f"{sign}{number}" + (f".{fraction}" if fraction else "")
        return _both_ways(value, f"{spelled} (base 60)", "text", spelled)
    if (truth := _BOOLEAN_11.get(value.lower())) is not None:
        word = "true" if truth else "false"
        if value in (value.lower(), value.capitalize(), value.upper()):  # YAML 1.1's spellings
            return _both_ways(value, word, "text", word)
        return (
            f"{value} looks like YAML 1.1's boolean {word} (text in YAML 1.2, which DVC "
            f"reads); write {word}, or '{value}' in quotes for text"
        )
    return ""


def _both_ways(value: str, in_11: str, in_12: str, fix: str) -> str:
    return (
        f"{value} is {in_11} in YAML 1.1 but {in_12} in YAML 1.2 (DVC reads 1.2); "
        f"write {fix}, or '{value}' in quotes for text"
    )


# YAML 1.1 reads `learning_rate: 2e-5` as the string "2e-5" (it wants a dot); 1.2 and DVC
# read a float. Accept the exponent form so users can write learning rates naturally.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | os.PathLike) -> Any:
    """Read and parse a params file strictly; every problem is one-line Gpt2tuneError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Gpt2tuneError(
            f"{source}: file not found (run from the repository root, cwd is {os.getcwd()})"
        ) from None
    except UnicodeDecodeError as e:
        raise Gpt2tuneError(f"{source}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise Gpt2tuneError(f"{source}: cannot read: {e.strerror or e}") from None
    return parse_yaml(text, source)


def parse_yaml(text: str, source: str) -> Any:
    """Parse params YAML with the strict loader; a problem is one line naming `source`."""
    try:
        raw = yaml.load(text, Loader=_Loader)  # _Loader derives from SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        if isinstance(e, yaml.reader.ReaderError):  # bad characters carry an offset, not a mark
            line = text.count("\n", 0, e.position) + 1
            column = e.position - text.rfind("\n", 0, e.position)
            where = f"{source}:{line}:{column}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        what = "" if isinstance(e, VersionDependent) else "invalid YAML: "
        raise Gpt2tuneError(f"{where}: {what}{problem}") from None
    return raw


def apply_overrides(raw: Any, overrides: list[str], root: type) -> dict:
    """A copy of parsed params `raw` with each ``section.key=value`` of `overrides` (the
    command line's --set) in place; a value is parsed as YAML by the file's own loader, so
    `--set train.steps=5` is an integer and `--set sample.prompts=[a, b]` a list. Whether the
    values are allowed is left to the validation, which then names --set."""
    merged = {s: dict(b) if isinstance(b, dict) else b for s, b in raw.items()}
    sections = types_of(root)
    home = {k: f"{s}.{k}" for s, cls in sections.items() for k in types_of(cls)}
    for item in overrides:
        name, eq, text = item.partition("=")
        part, _, short = name.strip().partition(".")
        if not eq or not short:
            raise Gpt2tuneError(f"--set {item}: expected section.key=value, e.g. train.steps=10")
        if part not in sections:
            raise _unknown("--set", part, list(sections), home)
        if short not in types_of(sections[part]):
            raise _unknown("--set", name.strip(), list(types_of(sections[part])), home)
        value = parse_yaml(text, f"--set {name.strip()}")
        if not isinstance(merged.get(part), dict):
            merged[part] = {}
        merged[part][short] = value
    return merged
