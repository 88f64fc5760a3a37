"""params.yaml: the declared defaults are the documented ones, the rendered file loads to them
with one short comment per key, and each kind of mistake gives one line naming the key and
what is allowed. Nothing here reads the checkout's params.yaml (test_param_docs does, on
purpose): the raw params come from the declarations."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from gpt2tune.config.docs import render_params_yaml
from gpt2tune.config.params import (
    SECTIONS,
    DataParams,
    MlflowParams,
    ModelParams,
    Params,
    SampleParams,
    TrainParams,
    default_raw,
    load_params,
    reference,
    validate_params,
)
from gpt2tune.errors import Gpt2tuneError

KANT = (
    "Human reason, in one sphere of its cognition, is called upon to consider questions, "
    "which it cannot decline, as they are presented by its own nature, but which it cannot "
    "answer, as they transcend every faculty of the mind."
)

DEFAULTS = Params(
    model=ModelParams(
        name="124M", base_url="https://openaipublic.blob.core.windows.net/gpt-2/models"
    ),
    data=DataParams(path="data/dset.txt", encoding="utf-8", val_fraction=0.05),
    train=TrainParams(),  # its defaults are pinned by the asserts below
    sample=SampleParams(
        nsamples=2, length=200, temperature=0.8, top_k=40, top_p=0.0, seed=0, prompts=(KANT,)
    ),
    mlflow=MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="gpt2tune"),
)


KEYS = [f"{s}.{k.name}" for s, (_, keys) in reference().items() for k in keys]


@pytest.fixture
def raw() -> dict:
    """A fresh, mutable copy of the declared defaults as plain YAML data."""
    return copy.deepcopy(default_raw())


@pytest.fixture
def params_file(tmp_path):
    """A params.yaml rendered from the declarations, as the repo's is."""
    path = tmp_path / "params.yaml"
    path.write_text(render_params_yaml(), encoding="utf-8")
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(Gpt2tuneError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_declared_defaults_are_the_documented_ones(params_file, raw):
    assert Params() == DEFAULTS
    assert validate_params(raw) == DEFAULTS
    params = load_params(params_file)
    assert params == DEFAULTS
    assert isinstance(params.train.learning_rate, float)
    assert isinstance(params.sample.prompts, tuple)
    t = params.train
    assert (t.steps, t.batch_size, t.learning_rate, t.n_ctx) == (1000, 1, 2e-5, 1024)
    assert (t.optimizer, t.lr_schedule, t.precision, t.strategy) == (
        "adam",
        "constant",
        "float32",
        "auto",
    )
    assert t.restore_from == "latest" and t.xla is False and params.data.val_path == ""


def test_every_field_declares_a_rule_and_a_help():
    declared = [
        f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
    ]
    assert KEYS == declared
    for section, (help_, keys) in reference().items():
        assert help_ and "\n" not in help_, section
        for k in keys:
            assert k.allowed and k.help and "\n" not in k.help + k.allowed, (section, k.name)
            assert k.type in ("int", "float", "bool", "str", "list of str")


def _key_lines(node: yaml.Node, prefix: str = ""):
    """(dotted key, key node, value node) for every mapping key, depth first."""
    for key_node, value_node in node.value:
        name = prefix + key_node.value
        yield name, key_node, value_node
        if isinstance(value_node, yaml.MappingNode):
            yield from _key_lines(value_node, name + ".")


def comment_problems(text: str) -> list[str]:
    """Keys of a params file without exactly one short comment (inline or on the line above)."""
    lines = text.splitlines()
    problems = []
    for name, key, value in _key_lines(yaml.compose(text)):
        row = key.start_mark.line
        # Whatever follows the key's value on its own line (or follows the colon for a section).
        one_line_value = value.start_mark.line == row == value.end_mark.line
        if one_line_value and not isinstance(value, yaml.MappingNode):
            rest = lines[row][value.end_mark.column :].strip()
        else:
            rest = lines[row][key.end_mark.column :].lstrip()[1:].strip()
        above = lines[row - 1].strip() if row > 0 else ""
        comments = [c for c in (rest, above) if c.startswith("#")]
        if len(comments) != 1:
            problems.append(f"{name}: {len(comments)} comments")
        elif len(comments[0]) > 100:
            problems.append(f"{name}: comment longer than 100 characters")
    return problems


def test_every_key_has_exactly_one_short_comment():
    text = render_params_yaml()
    assert comment_problems(text) == []
    keys = {name for name, _, _ in _key_lines(yaml.compose(text))}
    assert set(KEYS) | set(SECTIONS) == keys


def test_comment_check_catches_missing_and_doubled_comments():
    text = "a:  # section\n  b: 1\n  # about c\n  c: 2  # and again\n  d: [1, 2]  # fine\n"
    assert comment_problems(text) == ["a.b: 0 comments", "a.c: 2 comments"]


def test_flat_has_one_entry_per_key():
    flat = DEFAULTS.flat()
    assert list(flat) == KEYS
    assert flat["train.steps"] == 1000
    assert flat["sample.prompts"] == f'["{KANT}"]'
    assert all(isinstance(v, (int, float, str)) for v in flat.values())


def test_int_is_accepted_where_a_float_is_expected(raw):
    raw["train"]["learning_rate"] = 1
    raw["sample"]["top_p"] = 1
    params = validate_params(raw)
    assert params.train.learning_rate == 1.0 and isinstance(params.train.learning_rate, float)
    assert isinstance(params.sample.top_p, float)


def test_empty_prompts_and_zero_switches_are_allowed(raw):
    raw["sample"]["prompts"] = []
    raw["train"]["sample_every"] = 0
    raw["data"]["val_fraction"] = 0
    raw["mlflow"]["tracking_uri"] = ""
    params = validate_params(raw)
    assert params.sample.prompts == ()


def test_exponent_floats_without_a_dot_are_numbers(params_file):
    # Plain PyYAML reads 2e-5 as a string; DVC (YAML 1.2) reads a float. We side with DVC.
    path = params_file
    text = path.read_text(encoding="utf-8")
    assert "learning_rate: 0.00002" in text
    path.write_text(text.replace("learning_rate: 0.00002", "learning_rate: 2e-5"), encoding="utf-8")
    assert load_params(path).train.learning_rate == 2e-5


# Edits to the parsed params; section None means the top level.
def _set(section: str | None, key: str, value):
    return lambda raw: (raw[section] if section else raw).__setitem__(key, value)


def _rename(section: str | None, old: str, new: str):
    def edit(raw: dict) -> None:
        body = raw[section] if section else raw
        body[new] = body.pop(old)

    return edit


def _drop(section: str | None, key: str):
    return lambda raw: (raw[section] if section else raw).pop(key)


def _move(src: str, dst: str, key: str):
    return lambda raw: raw[dst].__setitem__(key, raw[src].pop(key))


# (edit to the default params, exact message) for every kind of mistake the issue lists.
BAD = {
    "negative steps": (
        _set("train", "steps", -5),
        "params.yaml: train.steps = -5: must be an integer >= 1",
    ),
    "steps as string": (
        _set("train", "steps", "1000"),
        'params.yaml: train.steps = "1000": must be an integer >= 1 (got text)',
    ),
    "steps as bool": (
        _set("train", "steps", True),
        "params.yaml: train.steps = true: must be an integer >= 1 (got true/false)",
    ),
    "steps as float": (
        _set("train", "steps", 10.0),
        "params.yaml: train.steps = 10.0: must be an integer >= 1 (got a number)",
    ),
    "top_p above 1": (
        _set("sample", "top_p", 1.5),
        "params.yaml: sample.top_p = 1.5: must be a number in [0, 1] (0 = off)",
    ),
    "negative length": (
        _set("sample", "length", -1),
        "params.yaml: sample.length = -1: must be an integer in 1..1000000",
    ),
    "negative temperature": (
        _set("sample", "temperature", -1),
        "params.yaml: sample.temperature = -1: must be a number >= 0 (0 = greedy)",
    ),
    "val_fraction too big": (
        _set("data", "val_fraction", 0.6),
        "params.yaml: data.val_fraction = 0.6: must be a number in [0, 0.5)",
    ),
    "learning rate not finite": (
        _set("train", "learning_rate", float("inf")),
        "params.yaml: train.learning_rate = Infinity: must be a number > 0 (got a number)",
    ),
    "seed too big for numpy": (
        _set("train", "seed", 2**32),
        "params.yaml: train.seed = 4294967296: must be an integer in 0..4294967295",
    ),
    "misspelled key": (
        _rename("train", "steps", "stpes"),
        "params.yaml: train.stpes: unknown key; did you mean train.steps?",
    ),
    "key in the wrong section": (
        _move("sample", "train", "temperature"),
        "params.yaml: train.temperature: unknown key; did you mean sample.temperature?",
    ),
    "unknown key, nothing close": (
        _set("mlflow", "zzz", 1),
        "params.yaml: mlflow.zzz: unknown key; valid: tracking_uri, experiment, "
        "registered_model, registered_alias",
    ),
    "missing key": (
        _drop("train", "batch_size"),
        "params.yaml: train.batch_size: missing; must be an integer in 1..100000",
    ),
    "missing section": (
        _drop(None, "mlflow"),
        "params.yaml: mlflow: missing section (with keys tracking_uri, experiment, "
        "registered_model, registered_alias)",
    ),
    "unknown section": (
        _rename(None, "sample", "sampel"),
        "params.yaml: sampel: unknown section; did you mean sample?",
    ),
    "section not a mapping": (
        _set(None, "data", "data/dset.txt"),
        'params.yaml: data = "data/dset.txt": must be a mapping with keys path, encoding, '
        "format, field, prompt_field, val_fraction, val_path, max_line_mb, "
        "follow_symlinks_outside (got text)",
    ),
    "prompts not a list": (
        _set("sample", "prompts", "hello"),
        'params.yaml: sample.prompts = "hello": must be a list (may be empty) of non-empty '
        "strings (got text)",
    ),
    "prompts with a non-string": (
        _set("sample", "prompts", ["hello", 3]),
        'params.yaml: sample.prompts = ["hello", 3]: must be a list (may be empty) of non-empty '
        "strings (got a list)",
    ),
    "empty prompt": (
        _set("sample", "prompts", [""]),
        'params.yaml: sample.prompts = [""]: must be a list (may be empty) of non-empty strings',
    ),
    "model name climbing out": (
        _set("model", "name", "../x"),
        'params.yaml: model.name = "../x": must be a release folder name such as 124M, 355M, '
        "774M or 1558M (letters, digits, '.', '_', '-'; no '/' or '..'; not 'finetuned', "
        "the assemble output), or hf:<folder> for a Hugging Face GPT-2 folder",
    ),
    "model name with a slash": (
        _set("model", "name", "a/b"),
        'params.yaml: model.name = "a/b": must be a release folder name such as 124M, 355M, '
        "774M or 1558M (letters, digits, '.', '_', '-'; no '/' or '..'; not 'finetuned', "
        "the assemble output), or hf:<folder> for a Hugging Face GPT-2 folder",
    ),
    "model name as number": (
        _set("model", "name", 124),
        "params.yaml: model.name = 124: must be a release folder name such as 124M, 355M, "
        "774M or 1558M (letters, digits, '.', '_', '-'; no '/' or '..'; not 'finetuned', "
        "the assemble output), or hf:<folder> for a Hugging Face GPT-2 folder (got an integer)",
    ),
    "model name of the assemble output": (
        _set("model", "name", "finetuned"),
        'params.yaml: model.name = "finetuned": must be a release folder name such as 124M, '
        "355M, 774M or 1558M (letters, digits, '.', '_', '-'; no '/' or '..'; not 'finetuned', "
        "the assemble output), or hf:<folder> for a Hugging Face GPT-2 folder",
    ),
    "base_url with another scheme": (
        _set("model", "base_url", "ftp://example.com/models"),
        'params.yaml: model.base_url = "ftp://example.com/models": must be an http://, '
        "https:// or file:// URL or a local folder, without user:password@ (put credentials "
        "in ~/.netrc)",
    ),
    "base_url with a password": (
        _set("model", "base_url", "https://bob:hunter2@example.com/models"),
        'params.yaml: model.base_url = "https://***@example.com/models": must be an http://, '
        "https:// or file:// URL or a local folder, without user:password@ (put credentials "
        "in ~/.netrc)",
    ),
    "tracking_uri with a password": (
        _set("mlflow", "tracking_uri", "http://bob:hunter2@mlflow.example:5000"),
        'params.yaml: mlflow.tracking_uri = "http://***@mlflow.example:5000": must be a string '
        '("" = MLFLOW_TRACKING_URI or the default) without user:password@ (set '
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead)",
    ),
    "unknown encoding": (
        _set("data", "encoding", "utf-9"),
        'params.yaml: data.encoding = "utf-9": must be a text codec Python knows, such as '
        "utf-8 or latin-1",
    ),
    "bytes-only codec": (
        _set("data", "encoding", "base64"),
        'params.yaml: data.encoding = "base64": must be a text codec Python knows, such as '
        "utf-8 or latin-1",
    ),
    "unknown optimizer": (
        _set("train", "optimizer", "adagrad"),
        'params.yaml: train.optimizer = "adagrad": must be one of adam, adamw, sgd',
    ),
    "precision misspelled": (
        _set("train", "precision", "bf16"),
        'params.yaml: train.precision = "bf16": must be one of float32, mixed_bfloat16, '
        "mixed_float16",
    ),
    "switch as a number": (
        _set("train", "xla", 1),
        "params.yaml: train.xla = 1: must be true or false (got an integer)",
    ),
    "switch as text": (
        _set("train", "memory_saving_gradients", "yes"),
        'params.yaml: train.memory_saving_gradients = "yes": must be true or false (got text)',
    ),
    "noise of one": (
        _set("train", "noise", 1),
        "params.yaml: train.noise = 1: must be a number in [0, 1) (share of input tokens replaced)",
    ),
    "unknown strategy": (
        _set("train", "strategy", "tpu"),
        'params.yaml: train.strategy = "tpu": must be one of auto, one, mirrored, multi_worker',
    ),
    "empty restore_from": (
        _set("train", "restore_from", ""),
        'params.yaml: train.restore_from = "": must be latest, fresh, or the path of a '
        "checkpoint or model folder",
    ),
    "weight decay with plain adam": (
        _set("train", "weight_decay", 0.1),
        "params.yaml: train.weight_decay = 0.1: has no effect with train.optimizer = adam "
        "(TF1's Adam has no decay); use adamw, or set it to 0",
    ),
    "empty experiment": (
        _set("mlflow", "experiment", ""),
        'params.yaml: mlflow.experiment = "": must be a non-empty string',
    ),
    "registered model name with a slash": (
        _set("mlflow", "registered_model", "team/gpt2"),
        'params.yaml: mlflow.registered_model = "team/gpt2": must be a model name without "/" '
        'or ":" ("" = do not register)',
    ),
    "reserved alias": (
        _set("mlflow", "registered_alias", "latest"),
        'params.yaml: mlflow.registered_alias = "latest": must be letters, digits, "_" or "-", '
        'not "latest" or v<number> ("" = no alias)',
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_give_one_line_naming_key_and_allowed(raw, case):
    edit, expected = BAD[case]
    edit(raw)
    assert error_of(validate_params, raw) == expected


def test_long_values_are_cut_short(raw):
    raw["sample"]["prompts"] = "x" * 500
    msg = error_of(validate_params, raw)
    assert len(msg) < 200 and "..." in msg


@pytest.mark.parametrize(
    ("raw_value", "expected"),
    [
        (
            None,
            "params.yaml: file is empty; expected sections "
            "model, data, train, assemble, sample, serve, mlflow, export",
        ),
        (
            ["model"],
            "params.yaml: top level must be a mapping of sections "
            "(model, data, train, assemble, sample, serve, mlflow, export), got a list",
        ),
    ],
)
def test_top_level_must_be_a_mapping(raw_value, expected):
    assert error_of(validate_params, raw_value) == expected


def test_source_names_the_file(raw):
    raw["train"]["steps"] = 0
    assert error_of(validate_params, raw, "conf/p.yaml").startswith("conf/p.yaml: train.steps = 0")


def test_missing_file(tmp_path):
    path = tmp_path / "params.yaml"
    msg = error_of(load_params, path)
    assert msg.startswith(f"{path}: file not found")


def test_invalid_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  name: 124M\n    base_url: x\n")
    assert error_of(load_params, path) == (
        f"{path}:3:13: invalid YAML: mapping values are not allowed here"
    )


def test_control_character_names_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  name: 1\x0124M\n")
    assert error_of(load_params, path).startswith(f"{path}:2:10: invalid YAML: unacceptable")


def test_duplicate_key_is_an_error(params_file):
    path = params_file
    text = path.read_text(encoding="utf-8")
    assert "  steps: 1000" in text
    path.write_text(text.replace("  steps: 1000", "  steps: 1000\n  steps: 5"), encoding="utf-8")
    msg = error_of(load_params, path)
    assert msg.startswith(f"{path}:") and "duplicate key 'steps'" in msg


def test_non_utf8_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"model: \xff\n")
    assert error_of(load_params, path) == f"{path}: not UTF-8 text (byte 7)"


def test_optimizer_choices_and_decay_rule_come_from_the_registry(raw):
    from gpt2tune.train.optim import OPTIMIZERS

    (optimizer,) = [k for k in reference()["train"][1] if k.name == "optimizer"]
    assert list(optimizer.choices) == list(OPTIMIZERS)
    assert optimizer.allowed == "one of " + ", ".join(OPTIMIZERS)
    raw["train"]["weight_decay"] = 0.1
    for name, spec in OPTIMIZERS.items():
        raw["train"]["optimizer"] = name
        if spec.weight_decay == "none":
            assert "has no effect with train.optimizer" in error_of(validate_params, raw)
        else:
            assert validate_params(raw).train.weight_decay == 0.1


@pytest.mark.parametrize(
    "value",
    ["", "yes", "null", "1000", "2e-5", "a # b", " lead", "x: y", "[1]", "ünï", "124M", "y", "09",
     "0o10", "1:30", "oN"],
)  # fmt: skip
def test_rendered_values_read_back_as_themselves(value):
    from gpt2tune.config.docs import yaml_value
    from gpt2tune.config.schema import parse_yaml

    for v in (value, (value, "b"), 2e-5, 1e300, 0.1, True, 7):
        expected = {"k": list(v) if isinstance(v, tuple) else v}
        assert yaml.safe_load(f"k: {yaml_value(v)}") == expected
        assert parse_yaml(f"k: {yaml_value(v)}", "p.yaml") == expected


# --------------------------------------------------------------------------- YAML 1.1 vs 1.2

# A plain value YAML 1.1 (PyYAML) and YAML 1.2 (DVC's ruamel) read differently, where it
# lands in params.yaml, and the fix the one line names.
VERSION_DEPENDENT = [
    ("train.steps", "010", "010 is the octal number 8 in YAML 1.1 but 10 in YAML 1.2", "write 10"),
    ("train.steps", "0o10", "0o10 is text in YAML 1.1 but the octal number 8", "write 8"),
    ("train.steps", "09", "09 is text in YAML 1.1 but 9 in YAML 1.2", "write 9"),
    ("train.max_minutes", "1:30", "1:30 is 90 (base 60) in YAML 1.1 but text", "write 90"),
    ("train.xla", "yes", "yes is true in YAML 1.1 but text in YAML 1.2", "write true"),
    ("train.xla", "OFF", "OFF is false in YAML 1.1", "write false"),
    ("train.xla", "y", "y is true in YAML 1.1", "write true"),
    ("data.field", "n", "n is false in YAML 1.1", "'n' in quotes for text"),
    ("train.xla", "oN", "oN looks like YAML 1.1's boolean true", "write true"),
]


@pytest.mark.parametrize(("dotted", "value", "why", "fix"), VERSION_DEPENDENT)
def test_values_yaml_versions_read_differently_are_refused(tmp_path, dotted, value, why, fix):
    section, name = dotted.split(".")
    path = tmp_path / "params.yaml"
    text = render_params_yaml()
    line = next(li for li in text.splitlines() if li.startswith(f"  {name}:"))
    lines = text.splitlines()
    n = lines.index(line) + 1
    path.write_text(text.replace(line, f"  {name}: {value}", 1), encoding="utf-8")
    assert error_of(load_params, path).startswith(f"{path}:{n}:{len(name) + 5}: {name}: {why}")
    assert fix in error_of(load_params, path)
    render = tmp_path / "ok.yaml"
    render.write_text(text, encoding="utf-8")
    msg = error_of(load_params, render, [f"{dotted}={value}"])
    assert msg.startswith(f"--set {dotted}:1:1: {why}") and fix in msg
    # Quoted, the value is text to both versions, and checked as text.
    assert load_params(render, [f"data.field='{value}'"]).data.field == value


def test_dvc_reads_those_values_otherwise():
    """DVC's own reader (YAML 1.2) gives what the refusal says: steps 010 trained 8 steps
    while dvc.lock and `dvc exp show` recorded 10."""
    from dvc.utils.serialize import parse_yaml as dvc_parse_yaml

    read = dvc_parse_yaml("a: 010\nb: 0o10\nc: '1:30'\nd: 1:30\ne: yes\nf: 07\n", "p.yaml")
    assert read == {"a": 10, "b": 8, "c": "1:30", "d": "1:30", "e": "yes", "f": 7}
    assert yaml.safe_load("a: 010\nd: 1:30\ne: yes\n") == {"a": 8, "d": 90, "e": True}


def test_values_both_versions_read_alike_still_load(raw):
    from gpt2tune.config.schema import parse_yaml

    text = "a: 07\nb: 0x10\nc: 1_000\nd: 0\ne: true\nf: 'yes'\ng: no way\nh: [1, 2]\ni: !!str 010\n"
    assert parse_yaml(text, "p.yaml") == {
        "a": 7, "b": 16, "c": 1000, "d": 0, "e": True, "f": "yes", "g": "no way", "h": [1, 2],
        "i": "010",
    }  # fmt: skip


@pytest.mark.parametrize("where", ["file", "--set"])
def test_deep_nesting_is_one_line(params_file, where):
    """100,000 "[" used to cost a RecursionError 2,997 lines long."""
    deep = "[" * 100_000
    if where == "file":
        params_file.write_text(f"train:\n  steps: {deep}\n", encoding="utf-8")
        msg, at = error_of(load_params, params_file), f"{params_file}:2:"
    else:
        msg, at = (
            error_of(load_params, params_file, [f"train.steps={deep}"]),
            "--set train.steps:1:",
        )
    assert msg.startswith(at) and "nested more than 100 levels deep" in msg, msg[:300]
    assert len(msg) - len(at) < 150  # not the input echoed back (the path's length varies)


def test_sample_defaults_over_a_serve_cap_are_refused():
    """The sample section's values are the served model's defaults: over a serve cap, every
    request keeping them would be refused, so params.yaml is refused first."""
    raw = default_raw()
    raw["sample"]["length"] = 2000
    with pytest.raises(Gpt2tuneError, match=r"sample.length = 2000: over serve.max_length = 1024"):
        validate_params(raw)
