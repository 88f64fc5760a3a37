"""gpt2tune.paths names the pipeline's folders and files once: dvc.yaml's deps, outs, metrics
and plots are exactly those paths (plus the stage scripts, the library and the inputs named by
params), so a path changed in one place and not the other fails here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from helpers import REPO

from gpt2tune import paths

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def named_paths() -> set[str]:
    """Every path gpt2tune.paths declares, as posix strings."""
    found = set()
    for value in vars(paths).values():
        values = value.values() if isinstance(value, dict) else [value]
        found.update(v.as_posix() for v in values if isinstance(v, Path))
    return found


def dvc_paths() -> set[str]:
    """The paths of dvc.yaml's stages (deps, outs, metrics), plots and artifacts, base models
    as named by paths.base_model."""
    found: set[str] = set()
    for spec in DVC["stages"].values():
        for field in ("deps", "outs", "metrics"):
            for item in spec.get(field, []):
                found.add(next(iter(item)) if isinstance(item, dict) else item)
    for plot in DVC.get("plots", []):
        for spec in plot.values():
            found.update(spec["y"])
    found.update(artifact["path"] for artifact in DVC.get("artifacts", {}).values())
    model = paths.base_model("${model.name}").as_posix()
    return {model if p == model else p for p in found}


def test_dvc_yaml_uses_exactly_the_named_paths():
    ours = dvc_paths()
    # What dvc.yaml names besides the pipeline's own files: code, and params' inputs.
    inputs = {p for p in ours if p.startswith(("stages/", "src/", "${data."))}
    assert inputs == {f"stages/{s}.py" for s in DVC["stages"]} | {"src/gpt2tune", "${data.path}"}
    named = named_paths() | {paths.base_model("${model.name}").as_posix()}
    # Folders that are no DVC output of their own: the parents, MLflow's offline journal and
    # the runs the train stage keeps aside.
    not_dvc = {paths.MODELS, paths.METRICS, paths.MLFLOW_OFFLINE, paths.KEPT_RUNS,
               paths.INDEX_CACHE}  # fmt: skip
    # A file of data/encoded only with data.prompt_field: the sample stage depends on the folder.
    not_dvc.add(paths.VAL_RECORDS)
    assert ours - inputs == named - {p.as_posix() for p in not_dvc}


def test_the_check_sees_a_changed_path():
    assert "metrics/train.json" in dvc_paths() and "data/encoded" in dvc_paths()
    assert paths.TRAIN_METRICS.as_posix() == "metrics/train.json"
    assert "checkpoint/run1" in named_paths() and "checkpoint/run2" not in named_paths()


def test_git_ignores_every_folder_that_is_not_gits():
    """The committed .gitignore files keep DVC's cached outputs (every model folder, whatever
    model.name says, samples/, data/encoded), the run folders and MLflow's store out of git
    without DVC adding a line: a line DVC adds is taken back when a later stage of the same
    `dvc repro` fails, and the next `git add -A` would commit the weights."""
    outs = [
        o if isinstance(o, dict) else {o: {}} for s in DVC["stages"].values() for o in s["outs"]
    ]
    cached = [path for out in outs for path, spec in out.items() if spec.get("cache") is not False]
    model = paths.base_model("${model.name}").as_posix()
    folders = [p for p in cached if p != model] + [
        paths.base_model(name).as_posix() for name in ("124M", "117M", "hf:distilgpt2")
    ]  # fmt: skip
    folders += [p.as_posix() for p in (paths.RUN_DIR, paths.KEPT_RUNS, paths.MLFLOW_OFFLINE)]
    files = [f"{folder}/a-file" for folder in folders] + ["mlflow.db"]
    check = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=REPO, text=True,
                           input="\n".join(files), capture_output=True)  # fmt: skip
    assert sorted(check.stdout.split()) == sorted(files)
    assert "models/finetuned" in folders and "samples" in folders
