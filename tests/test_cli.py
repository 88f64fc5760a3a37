"""The `gpt2tune` command (gpt2tune.cli): --help from the key declarations, --set and --params,
the stage scripts as thin calls of the same code, `evaluate`, and the old model names.

Commands run as a user runs them, in a subprocess in a test project: `python -m gpt2tune`
(the console script `gpt2tune` is the same function, checked once where installed)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sys

import numpy as np
import pytest
import yaml
from helpers import REPO, VENV_BIN
from helpers.models import tiny_model
from helpers.processes import run_in, run_stage, stage_env
from helpers.projects import (
    make_project,
    project_mlflow,
    tiny_params,
    training_run_id,
    write_params,
)
from helpers.vocab import TINY_CORPUS

from gpt2tune import save_model
from gpt2tune.cli import COMMANDS
from gpt2tune.config.docs import yaml_value
from gpt2tune.config.params import load_params, reference
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import RELEASE_FILES

STAGES = sorted({c.stage for c in COMMANDS.values() if c.stage})


def gpt2tune(root, *args: str, **kw):
    return run_in(root, sys.executable, "-m", "gpt2tune", *args, **kw)


def assert_lists_keys(text: str, sections: tuple[str, ...]) -> None:
    """Every key of `sections` with its default, as reference() declares them."""
    ref = reference()
    for section in sections:
        for k in ref[section][1]:
            shown = f"{section}.{k.name} = {yaml_value(k.default)[:40]}"
            assert shown in text, f"{shown!r} not in the help"
            assert k.help in text


def tree_hash(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def project(tmp_path, tiny_vocab_dir):
    """A test project whose base model `tiny` has the tiny vocabulary (enough to encode)."""
    make_project(tmp_path, TINY_CORPUS * 20)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(tiny_vocab_dir / name, tmp_path / "models" / "tiny" / name)
    return tmp_path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_vocab_dir):
    """A project trained (2 steps, validated at steps 0 and 2 on 3 windows) and assembled,
    each stage run with stderr piped and TensorFlow's log level as a user has it; (the
    project, {stage: its stderr})."""
    root = make_project(tmp_path_factory.mktemp("trained") / "project", TINY_CORPUS * 20,
                        train={"val_every": 2, "val_batch_count": 3, "batch_size": 2})  # fmt: skip
    save_model(tiny_model(tiny_vocab_dir, 0), root / "models" / "tiny")
    env = stage_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL")
    logs = {}
    for stage in ("encode", "train", "assemble"):
        proc = run_stage(root, stage, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[stage] = proc.stderr
    return root, logs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_vocab_dir):
    folder = tmp_path_factory.mktemp("cli") / "model"
    save_model(tiny_model(tiny_vocab_dir, 0), folder)
    return folder


# --------------------------------------------------------------------------- help and arguments


def test_main_help_names_every_command(tmp_path):
    proc = gpt2tune(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    for name, cmd in COMMANDS.items():
        assert re.search(rf"^\s+{name}\s", proc.stdout, re.M), name
        assert cmd.summary.split()[0] in proc.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help_lists_every_key_it_reads(tmp_path, name):
    proc = gpt2tune(tmp_path, name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--set" in proc.stdout and "--params" in proc.stdout
    assert_lists_keys(proc.stdout, COMMANDS[name].sections)
    assert not list(tmp_path.iterdir())  # no params.yaml needed, nothing written


def test_help_shows_the_values_of_params_yaml_beside_the_defaults(tmp_path):
    write_params(tmp_path, train={"steps": 20})
    proc = gpt2tune(tmp_path, "train", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "train.steps = 1000; params.yaml: 20  (" in proc.stdout
    assert "train.learning_rate = 0.00002  (" in proc.stdout  # as in the file: one value
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(tiny_params(train={"steps": 7})))
    proc = gpt2tune(tmp_path, "train", "--params", str(other), "--help")
    assert f"train.steps = 1000; {other}: 7  (" in proc.stdout


def test_help_with_a_broken_params_yaml_is_still_help(tmp_path):
    text = yaml.safe_dump(tiny_params(), sort_keys=False).replace("  steps:", "  stpes:", 1)
    (tmp_path / "params.yaml").write_text(text)
    proc = gpt2tune(tmp_path, "train", "--help")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert_lists_keys(proc.stdout, COMMANDS["train"].sections)
    assert "params.yaml not read (" in proc.stdout and "stpes" in proc.stdout


def test_console_script_is_the_same_command(tmp_path):
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'gpt2tune = "gpt2tune.cli:main"' in pyproject
    script = VENV_BIN / "gpt2tune"
    if not script.exists():
        pytest.skip(f"{script} not installed (pip install -e . --no-deps)")
    proc = run_in(tmp_path, str(script), "encode", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == gpt2tune(tmp_path, "encode", "--help").stdout


def test_sections_cover_the_stage_params_of_dvc_yaml():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert sorted(stages) == STAGES  # every stage is a command, every stage command a stage
    for name, cmd in COMMANDS.items():
        if cmd.stage:
            for param in stages[cmd.stage].get("params", []):
                assert param.split(".")[0] in cmd.sections, (name, param)
            assert stages[cmd.stage]["cmd"] == f"python stages/{cmd.stage}.py"


def test_stage_help_prints_help_and_changes_nothing(project):
    before = tree_hash(project)
    for stage in STAGES:
        proc = run_stage(project, stage, "--help")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: stages/{stage}.py")
        name = next(n for n, c in COMMANDS.items() if c.stage == stage)
        assert_lists_keys(proc.stdout, COMMANDS[name].sections)
    assert tree_hash(project) == before


@pytest.mark.parametrize("how", ["stage", "command"])
def test_unknown_argument_is_one_line(project, how):
    before = tree_hash(project)
    if how == "stage":
        proc = run_stage(project, "encode", "--frobnicate")
    else:
        proc = gpt2tune(project, "encode", "--frobnicate")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--frobnicate" in proc.stderr
    assert tree_hash(project) == before


# --------------------------------------------------------------------------- --set and --params


def test_set_overrides_the_file_and_parses_yaml(tmp_path):
    write_params(tmp_path, sample={"length": 8})
    path = tmp_path / "params.yaml"
    sets = ["sample.length=7", "sample.prompts=[a b, c]", "train.learning_rate=1e-3"]
    p = load_params(path, sets)
    assert (p.sample.length, p.sample.prompts, p.train.learning_rate) == (7, ("a b", "c"), 1e-3)
    assert load_params(path).sample.length == 8  # the file is unchanged


@pytest.mark.parametrize(
    "key, value", [("train.steps", "abc"), ("sample.top_p", "2"), ("train.xla", "yes please")]
)
def test_bad_set_is_the_files_error_naming_set(tmp_path, key, value):
    write_params(tmp_path)
    section, name = key.split(".")
    bad = tmp_path / "bad.yaml"
    write_params(tmp_path, **{section: {name: yaml.safe_load(value)}})
    shutil.move(tmp_path / "params.yaml", bad)
    write_params(tmp_path)
    with pytest.raises(Gpt2tuneError) as from_file:
        load_params(bad)
    with pytest.raises(Gpt2tuneError) as from_set:
        load_params(tmp_path / "params.yaml", [f"{key}={value}"])
    assert str(from_set.value) == str(from_file.value).replace(str(bad), "--set")
    proc = gpt2tune(tmp_path, "encode", "--set", f"{key}={value}")
    assert proc.returncode == 1
    assert proc.stderr == f"error: {from_set.value}\n"


@pytest.mark.parametrize(
    "item, words",
    [
        ("train.stepz=5", "--set: train.stepz: unknown key; did you mean train.steps?"),
        ("steps=5", "expected section.key=value"),
        ("train.steps", "expected section.key=value"),
        ("train.steps=[1", "--set train.steps:1:"),
    ],
)
def test_set_mistakes_are_one_line(tmp_path, item, words):
    write_params(tmp_path)
    with pytest.raises(Gpt2tuneError, match=re.escape(words)):
        load_params(tmp_path / "params.yaml", [item])


def test_params_option_reads_another_file(tmp_path):
    (tmp_path / "other").mkdir()
    write_params(tmp_path / "other")
    proc = gpt2tune(tmp_path, "encode", "--params", "other/params.yaml")
    # the file was read and passed: the run stops at the missing model, named by the encode step
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: models/tiny/encoder.json not found"), proc.stderr
    proc = gpt2tune(tmp_path, "encode", "--params", "nowhere.yaml")
    assert proc.returncode == 1 and proc.stderr.startswith("error: nowhere.yaml: file not found")


# --------------------------------------------------------------------------- the same code


def test_encode_stage_and_command_write_the_same_bytes(project):
    encoded = project / "data" / "encoded"
    proc = run_stage(project, "encode")
    assert proc.returncode == 0, proc.stderr
    by_stage = tree_hash(encoded)
    shutil.rmtree(encoded)
    proc = gpt2tune(project, "encode")
    assert proc.returncode == 0, proc.stderr
    assert tree_hash(encoded) == by_stage and "train.npy" in by_stage


def test_chat_is_sample_interactive_and_takes_set(model_dir, tmp_path):
    write_params(tmp_path, sample=dict(length=5, nsamples=1, top_k=0, temperature=1.0))
    env = stage_env(PYTHONUNBUFFERED="1")
    text = "Human reason\n"
    staged = run_stage(tmp_path, "sample", "--interactive", "--model", str(model_dir),
                       input=text, env=env)  # fmt: skip
    chatted = gpt2tune(tmp_path, "chat", "--model", str(model_dir), input=text, env=env)
    assert staged.returncode == chatted.returncode == 0, staged.stderr + chatted.stderr
    assert " SAMPLE 1 " in chatted.stdout and chatted.stdout == staged.stdout
    two = gpt2tune(tmp_path, "chat", "--model", str(model_dir), "--set", "sample.nsamples=2",
                   input=text, env=env)  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert " SAMPLE 2 " in two.stdout and " SAMPLE 2 " not in chatted.stdout


# --------------------------------------------------------------------------- evaluate


def test_evaluate_is_the_validation_loss(model_dir, tmp_path):
    import tensorflow as tf

    from gpt2tune import load_model
    from gpt2tune.data.batches import eval_windows
    from gpt2tune.train.evaluate import evaluate_loss, text_tokens
    from gpt2tune.train.trainer import lm_loss

    write_params(tmp_path, train={"n_ctx": 16, "val_batch_count": 5, "batch_size": 2})
    (tmp_path / "eval.txt").write_text(TINY_CORPUS * 3, encoding="utf-8")
    p = load_params(tmp_path / "params.yaml")
    model = load_model(model_dir)
    tokens = np.array(model.encoder.encode(TINY_CORPUS * 3))
    assert np.array_equal(text_tokens(str(tmp_path / "eval.txt"), str(model_dir), p), tokens)
    windows = eval_windows(tokens, 16, 5)
    direct = float(lm_loss(model.params, model.hparams, tf.constant(windows)))
    result = evaluate_loss(model, tokens, p, progress=False)
    assert result["loss"] == pytest.approx(direct, rel=1e-6)
    assert result["perplexity"] == math.exp(result["loss"]) and result["windows"] == 5

    proc = gpt2tune(tmp_path, "evaluate", "--model", str(model_dir), "--data", "eval.txt")
    assert proc.returncode == 0, proc.stderr
    loss, ppl = map(float, re.match(r"loss (\S+)  perplexity (\S+)", proc.stdout).groups())
    assert loss == pytest.approx(direct, abs=1e-6)
    assert ppl == pytest.approx(math.exp(direct), rel=1e-5)
    assert "evaluating" in proc.stderr


def test_evaluate_logs_a_run_of_its_own(model_dir, tmp_path):
    write_params(tmp_path)
    (tmp_path / "eval.txt").write_text(TINY_CORPUS * 3, encoding="utf-8")
    proc = gpt2tune(tmp_path, "evaluate", "--model", str(model_dir), "--data", "eval.txt",
                    "--mlflow", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    loss = float(re.match(r"loss (\S+)", proc.stdout).group(1))
    run_id = re.search(r"logged to MLflow run (\w+)", proc.stdout).group(1)
    assert not (tmp_path / "metrics" / "mlflow_run.json").exists()  # training's run untouched
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "gpt2tune"
    assert run.data.metrics["eval_loss"] == pytest.approx(loss, abs=1e-6)
    assert run.data.params["data"] == "eval.txt"
    # Told apart from trainings by name and by a tag a search filter selects on.
    assert run.info.run_name == f"evaluate {model_dir} on eval.txt"
    assert run.data.tags["gpt2tune.kind"] == "evaluate"
    kind = "tags.gpt2tune.kind = 'train'"
    assert not client.search_runs([run.info.experiment_id], kind)


@pytest.mark.parametrize(
    "model, data, named",
    [("model", "missing.txt", "--data 'missing.txt'"), ("models/nothere", "eval.txt", "--model"),
     (".", "eval.txt", "--model"), ("model", "", "--data ''"), ("model", "*.md", "--data")],
)  # fmt: skip
def test_evaluate_bad_input_is_one_line_naming_the_option(model_dir, tmp_path, model, data, named):
    write_params(tmp_path)
    (tmp_path / "eval.txt").write_text(TINY_CORPUS, encoding="utf-8")
    shutil.copytree(model_dir, tmp_path / "model")
    proc = gpt2tune(tmp_path, "evaluate", "--model", model, "--data", data)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and named in proc.stderr, proc.stderr
    assert "params.yaml" not in proc.stderr and "data.path" not in proc.stderr


def test_evaluate_val_is_the_base_val_loss_of_training(trained):
    root, _ = trained
    base = json.loads((root / "metrics" / "train.json").read_text())["base_val_loss"]
    proc = gpt2tune(root, "evaluate", "--model", "models/tiny", "--data", "val")
    assert proc.returncode == 0, proc.stderr
    loss = float(re.match(r"loss (\S+)", proc.stdout).group(1))
    assert loss == pytest.approx(base, abs=2e-6)
    assert "(3 windows," in proc.stdout  # train.val_batch_count's windows of val.npy


def test_stage_logs_have_no_progress_bars_or_tensorflow_noise(trained):
    """stderr piped, as in a log or `dvc queue logs`: no MLflow artifact bar (assemble logs
    the model) and no oneDNN "DT_INT32 only on AVX-512" line (assemble runs the model)."""
    _, logs = trained
    for stage, err in logs.items():
        assert "Downloading artifacts" not in err and "Uploading artifacts" not in err, stage
        assert "|\u2588" not in err and "oneDNN supports" not in err, (stage, err[-2000:])


def test_training_runs_carry_their_kind(trained):
    root, _ = trained
    client = project_mlflow(root)
    run = client.get_run(training_run_id(root))
    assert run.data.tags["gpt2tune.kind"] == "train"
    found = client.search_runs([run.info.experiment_id], "tags.gpt2tune.kind = 'train'")
    assert [r.info.run_id for r in found] == [run.info.run_id]


# --------------------------------------------------------------------------- old model names


def test_old_name_117M_fetches_124M_into_its_folder(tmp_path):
    source = tmp_path / "srv" / "124M"
    source.mkdir(parents=True)
    for name in RELEASE_FILES:
        (source / name).write_bytes(f"{name} of 124M\n".encode())
    work = tmp_path / "work"
    work.mkdir()
    write_params(work, model={"name": "117M", "base_url": str(tmp_path / "srv")})
    proc = gpt2tune(work, "fetch")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("old name of 124M") == 1
    for name in RELEASE_FILES:  # in models/117M, where dvc.yaml's models/${model.name} is
        assert (work / "models" / "117M" / name).read_bytes() == (source / name).read_bytes()
    assert not (work / "models" / "124M").exists()


# --------------------------------------------------------------------------- score


def test_score_prints_the_api_results_as_json_lines(model_dir, tmp_path):
    from gpt2tune import load_model, score

    texts = ["Human reason", "has this peculiar fate"]
    want = score(load_model(model_dir), texts, tokens=True)
    (tmp_path / "texts.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n\n" for t in texts), encoding="utf-8"
    )
    proc = gpt2tune(tmp_path, "score", "--model", str(model_dir), "--file", "texts.jsonl",
                    "--tokens")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [g["text"] for g in got] == texts
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"] and g["logprob"] == pytest.approx(w["logprob"], abs=1e-5)
        assert g["perplexity"] == pytest.approx(math.exp(-g["mean_logprob"]))
        assert [t for t, _ in g["token_logprobs"]] == [t for t, _ in w["token_logprobs"]]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    bad = gpt2tune(tmp_path, "score", "--model", str(model_dir), "--file", "bad.jsonl")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert "bad.jsonl line 1" in bad.stderr and "'text'" in bad.stderr
