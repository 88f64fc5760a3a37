"""The fine-tuned model as a DVC artifact (dvc.yaml's `artifacts:`), offline: a project whose
assemble output is committed, pushed to a local DVC remote and given a version (`gto
register`, a git tag); `dvc artifacts get` from a git clone of it downloads models/finetuned
byte for byte, as a user of another machine would.

What is checked is DVC's artifact plumbing, not training: the assemble stage's inputs and
output are small stand-in files, committed with `dvc commit` as if the stage had run. (The
MLflow side of the lineage, the run's dataset inputs and the experiment's kind, is checked by
tests/test_tracking.py and the end-to-end tests/test_pipeline.py.)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers.processes import dvc as run_dvc
from helpers.processes import run_in
from helpers.projects import commit_project, copy_project, git, write_params

# The stand-in model folder: a few files of OpenAI's layout, a few bytes each.
MODEL = {
    "hparams.json": '{"n_layer": 2}', "encoder.json": "{}", "vocab.bpe": "#version: 0.2\n",
    "model.ckpt.index": "index bytes", "model.ckpt.data-00000-of-00001": "weights",
}  # fmt: skip


READ_ARTIFACTS = """
import json
from dvc.repo import Repo
with Repo(".") as repo:
    [artifact] = repo.artifacts.read()["dvc.yaml"].values()
print(json.dumps(artifact.to_dict()))
"""


def dvc(root, *args: str) -> str:
    return run_dvc(root, *args, timeout=240)


@pytest.mark.slow
def test_dvc_artifacts_get_downloads_the_finetuned_model(tmp_path):
    root = tmp_path / "project"
    copy_project(root)
    write_params(root)
    commit_project(root)
    # The assemble stage's inputs and output, as if the pipeline had run.
    for rel, text in {"models/tiny/hparams.json": "{}", "checkpoint/run1/state.json": "{}",
                      "metrics/mlflow_run.json": json.dumps({"run_id": "r"})}.items():  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for name, text in MODEL.items():
        (root / "models" / "finetuned").mkdir(parents=True, exist_ok=True)
        (root / "models" / "finetuned" / name).write_text(text)
    dvc(root, "commit", "--force", "assemble")
    dvc(root, "remote", "add", "--default", "store", str(tmp_path / "remote"))
    dvc(root, "push", "assemble")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "the assembled model")
    # A version of it: the git tag finetuned@v1.0.0 (GTO's, as DVC's model registry reads).
    proc = run_in(root, str(Path(sys.executable).with_name("gto")), "register", "finetuned",
                  "--version", "v1.0.0")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert git(root, "tag") == "finetuned@v1.0.0"

    # DVC sees the declaration: its type, description and labels (in a process of its own:
    # DVC sets up the logging of the process that imports it).
    proc = run_in(root, sys.executable, "-c", READ_ARTIFACTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifact = json.loads(proc.stdout)
    assert artifact["path"] == "models/finetuned" and artifact["type"] == "model"
    assert artifact["desc"] and "gpt2" in artifact["labels"]

    # Another machine: a clone, without the project's cache; the model comes from the remote.
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(root), str(clone))
    shutil.rmtree(root / ".dvc" / "cache")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    url = dvc(elsewhere, "artifacts", "get", str(clone), "finetuned", "--show-url")
    assert str(tmp_path / "remote") in url, url
    for args, out in ((), "latest"), (("--rev", "v1.0.0"), "v1"):
        dvc(elsewhere, "artifacts", "get", str(clone), "finetuned", *args, "-o", out)
        got = elsewhere / out
        assert sorted(p.name for p in got.iterdir()) == sorted(MODEL)
        assert all((got / name).read_text() == text for name, text in MODEL.items())
