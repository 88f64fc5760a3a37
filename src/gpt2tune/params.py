"""Hyperparameters: load params.yaml, check every key, hand back frozen dataclasses.

Every DVC stage calls ``load_params("params.yaml")`` before doing any work, so a typo costs a
one-line error instead of an hour of training with the wrong setting. The dataclasses below
are the single source of key names and types; ``RULES`` adds, per key, what values are allowed.
Any problem raises Gpt2tuneError with one line such as
``params.yaml: train.steps = -5: must be an integer >= 1``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpt2tune.errors import Gpt2tuneError


@dataclass(frozen=True)
class ModelParams:
    name: str
    base_url: str


@dataclass(frozen=True)
class DataParams:
    path: str
    encoding: str
    val_fraction: float
    val_path: str = ""


@dataclass(frozen=True)
class TrainParams:
    """The train section. Defaults equal params.yaml's (a test keeps them in step), so code and
    tests can write ``TrainParams(steps=10, n_ctx=64)``; params.yaml itself must name every key."""

    steps: int = 1000
    batch_size: int = 1
    learning_rate: float = 2e-5
    seed: int = 0
    n_ctx: int = 1024
    sample_every: int = 100
    sample_length: int = 100
    save_every: int = 1000
    val_every: int = 100
    val_batch_count: int = 8
    accumulate_gradients: int = 1
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float = 0.0
    noise: float = 0.0
    only_train_transformer_layers: bool = False
    memory_saving_gradients: bool = False
    restore_from: str = "latest"
    max_minutes: float = 0.0
    precision: str = "float32"
    xla: bool = False
    strategy: str = "auto"


@dataclass(frozen=True)
class Sampling:
    """How text is generated: one value passed through the API, the sample stage, the
    interactive loop and the sampler, so a new setting is one field here plus its use."""

    nsamples: int = 2
    length: int = 200
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class SampleParams(Sampling):
    prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str
    experiment: str
    registered_model: str = "gpt2tune"  # defaults as in params.yaml, for code and tests
    registered_alias: str = "candidate"


@dataclass(frozen=True)
class Params:
    model: ModelParams
    data: DataParams
    train: TrainParams
    sample: SampleParams
    mlflow: MlflowParams

    def flat(self) -> dict[str, object]:
        """``{"train.steps": 1000, ...}`` for mlflow.log_params; prompts as a JSON list string."""
        out: dict[str, object] = {}
        for section in dataclasses.fields(self):
            for key, value in dataclasses.asdict(getattr(self, section.name)).items():
                out[f"{section.name}.{key}"] = (
                    json.dumps(list(value), ensure_ascii=False)
                    if isinstance(value, tuple)
                    else value
                )
        return out


# ---------------------------------------------------------------------------------------------
# What each key allows. The type comes from the dataclass annotation; a rule adds the range and
# the words that finish "must be ...". Same order as the dataclasses.


@dataclass(frozen=True)
class Rule:
    allowed: str  # finishes the sentence "params.yaml: key = value: must be ..."
    ok: Callable[[Any], bool] = lambda v: True  # runs only on values of the right type


def _int(lo: int, hi: int | None = None, note: str = "") -> Rule:
    text = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
    return Rule(text + note, lambda v: v >= lo and (hi is None or v <= hi))


def _text_codec(name: str) -> bool:
    # str.encode/bytes.decode refuse bytes-to-bytes codecs such as base64 that codecs.lookup knows.
    try:
        "".encode(name)
        b"".decode(name)
    except LookupError:
        return False
    return True


def _choice(*options: str) -> Rule:
    return Rule("one of " + ", ".join(options), lambda v: v in options)


_RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_USERINFO = re.compile(r"://[^/@\s]*@")  # credentials in a URL: never in params.yaml
_SEED = _int(0, 2**32 - 1)  # numpy's legacy seeding refuses anything outside uint32

RULES: dict[str, Rule] = {
    "model.name": Rule(
        "a release folder name such as 124M, 355M, 774M or 1558M "
        "(letters, digits, '.', '_', '-'; no '/' or '..'; not 'finetuned', the assemble output)",
        lambda v: bool(_RELEASE_NAME.fullmatch(v)) and ".." not in v and v != "finetuned",
    ),
    "model.base_url": Rule(
        "an http://, https:// or file:// URL or a local folder, without user:password@ "
        "(put credentials in ~/.netrc)",
        lambda v: (
            bool(v.strip())
            and (
                not _URL_SCHEME.match(v) or v.lower().startswith(("http://", "https://", "file://"))
            )
            and not _USERINFO.search(v)
        ),
    ),
    "data.path": Rule("a non-empty path, folder or glob", lambda v: bool(v.strip())),
    "data.encoding": Rule("a text codec Python knows, such as utf-8 or latin-1", _text_codec),
    "data.val_fraction": Rule("a number in [0, 0.5)", lambda v: 0 <= v < 0.5),
    "data.val_path": Rule('a path to a separate validation text ("" = hold out val_fraction)'),
    "train.steps": _int(1),
    "train.batch_size": _int(1),
    "train.learning_rate": Rule("a number > 0", lambda v: v > 0),
    "train.seed": _SEED,
    "train.n_ctx": _int(1, note=" (and at most the model's n_ctx, 1024 for GPT-2)"),
    "train.sample_every": _int(0, note=" (0 = never)"),
    "train.sample_length": _int(1),
    "train.save_every": _int(0, note=" (0 = only at the end)"),
    "train.val_every": _int(0, note=" (0 = only at the end)"),
    "train.val_batch_count": _int(1),
    "train.accumulate_gradients": _int(1),
    "train.optimizer": _choice("adam", "adamw", "sgd"),
    "train.weight_decay": Rule("a number >= 0 (used by adamw and sgd)", lambda v: v >= 0),
    "train.lr_schedule": _choice("constant", "cosine"),
    "train.warmup_steps": _int(0),
    "train.grad_clip": Rule("a number >= 0 (global-norm clipping; 0 = off)", lambda v: v >= 0),
    "train.noise": Rule(
        "a number in [0, 1) (share of input tokens replaced)", lambda v: 0 <= v < 1
    ),
    "train.only_train_transformer_layers": Rule("true or false"),
    "train.memory_saving_gradients": Rule("true or false"),
    "train.restore_from": Rule(
        "latest, fresh, or the path of a checkpoint or model folder",
        lambda v: bool(v.strip()),
    ),
    "train.max_minutes": Rule("a number >= 0 (0 = no limit)", lambda v: v >= 0),
    "train.precision": _choice("float32", "mixed_bfloat16", "mixed_float16"),
    "train.xla": Rule("true or false"),
    "train.strategy": _choice("auto", "one", "mirrored", "multi_worker"),
    "sample.nsamples": _int(1),
    "sample.length": _int(1),
    "sample.temperature": Rule("a number >= 0 (0 = greedy)", lambda v: v >= 0),
    "sample.top_k": _int(0, note=" (0 = off)"),
    "sample.top_p": Rule("a number in [0, 1] (0 = off)", lambda v: 0 <= v <= 1),
    "sample.seed": _SEED,
    # An empty prompt would give the model no tokens to condition on.
    "sample.prompts": Rule(
        "a list (may be empty) of non-empty strings", lambda v: all(p.strip() for p in v)
    ),
    "mlflow.tracking_uri": Rule(
        'a string ("" = MLFLOW_TRACKING_URI or the default) without user:password@ '
        "(set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead)",
        lambda v: not _USERINFO.search(v),
    ),
    "mlflow.experiment": Rule("a non-empty string", lambda v: bool(v.strip())),
    "mlflow.registered_model": Rule(
        'a model name without "/" or ":" ("" = do not register)',
        lambda v: not v or (bool(v.strip()) and not set(v) & set("/:")),
    ),
    "mlflow.registered_alias": Rule(
        'letters, digits, "_" or "-", not "latest" or v<number> ("" = no alias)',
        lambda v: bool(re.fullmatch(r"[\w-]*", v)) and not re.fullmatch(r"(?i)latest|v\d+", v),
    ),
}

# section -> dataclass, and section -> {key: type}: the dataclasses are the one list of names.
SECTIONS: dict[str, type] = typing.get_type_hints(Params)
_FIELDS: dict[str, dict[str, Any]] = {s: typing.get_type_hints(c) for s, c in SECTIONS.items()}


_BAD = object()  # returned by _coerce for a value of the wrong type


def _coerce(value: Any, typ: Any) -> Any:
    """The value as `typ`, or _BAD. No silent conversions: "1000" and true are not integers."""
    if typ is bool:  # and 1 or "yes" are not booleans
        return value if isinstance(value, bool) else _BAD
    if isinstance(value, bool):  # bool subclasses int, but `steps: true` is surely a mistake
        return _BAD
    if typ is int:
        return value if isinstance(value, int) else _BAD
    if typ is float:  # an int is fine where a float is expected: `learning_rate: 1`
        if not isinstance(value, (int, float)):
            return _BAD
        try:
            value = float(value)
        except OverflowError:
            return _BAD
        return value if math.isfinite(value) else _BAD
    if typ is str:
        return value if isinstance(value, str) else _BAD
    if typ == tuple[str, ...]:
        ok = isinstance(value, list) and all(isinstance(p, str) for p in value)
        return tuple(value) if ok else _BAD
    raise TypeError(f"no coercion for {typ!r}")  # a new field type needs a branch above


def _show(value: Any) -> str:
    """A value the way YAML would spell it (true, null, "1000"), cut short to keep one line."""
    if isinstance(value, str):  # a password in a URL is not repeated in the error
        value = _USERINFO.sub("://***@", value)
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
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


def validate_params(raw: object, source: str = "params.yaml") -> Params:
    """Check an already-parsed params.yaml and build Params; raise Gpt2tuneError on the first
    problem. Unknown keys are reported before missing ones, since a misspelled key shows up as
    both and "did you mean" is the more useful message."""
    if raw is None:
        raise Gpt2tuneError(f"{source}: file is empty; expected sections {', '.join(SECTIONS)}")
    if not isinstance(raw, dict):
        raise Gpt2tuneError(
            f"{source}: top level must be a mapping of sections ({', '.join(SECTIONS)}), "
            f"got {_kind(raw)}"
        )
    # Where each bare key lives, so `temperature` under train can point to sample.temperature.
    home = {k.split(".", 1)[1]: k for k in RULES} | {s: s for s in SECTIONS}
    for section in raw:
        if section not in SECTIONS:
            raise _unknown(source, str(section), list(SECTIONS), home)

    built = {}
    for section, cls in SECTIONS.items():
        fields = _FIELDS[section]
        if section not in raw:
            raise Gpt2tuneError(
                f"{source}: {section}: missing section (with keys {', '.join(fields)})"
            )
        body = raw[section]
        if not isinstance(body, dict):
            raise Gpt2tuneError(
                f"{source}: {section} = {_show(body)}: must be a mapping with keys "
                f"{', '.join(fields)} (got {_kind(body)})"
            )
        for key in body:
            if key not in fields:
                raise _unknown(source, f"{section}.{key}", list(fields), home)
        values = {}
        for key, typ in fields.items():
            name, rule = f"{section}.{key}", RULES[f"{section}.{key}"]
            if key not in body:
                raise Gpt2tuneError(f"{source}: {name}: missing; must be {rule.allowed}")
            value = _coerce(body[key], typ)
            if value is _BAD:
                raise Gpt2tuneError(
                    f"{source}: {name} = {_show(body[key])}: must be {rule.allowed} "
                    f"(got {_kind(body[key])})"
                )
            if not rule.ok(value):
                raise Gpt2tuneError(
                    f"{source}: {name} = {_show(body[key])}: must be {rule.allowed}"
                )
            values[key] = value
        built[section] = cls(**values)
    params = Params(**built)
    _check_combinations(params, source)
    return params


def _check_combinations(params: Params, source: str) -> None:
    """Keys that are fine alone but contradict each other."""
    t = params.train
    if t.optimizer == "adam" and t.weight_decay:
        raise Gpt2tuneError(
            f"{source}: train.weight_decay = {t.weight_decay}: has no effect with "
            "train.optimizer = adam (TF1's Adam has no decay); use adamw, or set it to 0"
        )


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


# YAML 1.1 reads `learning_rate: 2e-5` as the string "2e-5" (it wants a dot); 1.2 and DVC
# read a float. Accept the exponent form so users can write learning rates naturally.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read, parse and validate the params file; every problem is one-line Gpt2tuneError."""
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
        raise Gpt2tuneError(f"{where}: invalid YAML: {problem}") from None
    return validate_params(raw, source)
