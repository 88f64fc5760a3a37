"""The README's journeys, run end to end as a user would, in a throwaway git repository with
real DVC and an MLflow sqlite store: they must leave nothing broken behind.

- Ctrl-C during `dvc repro`, `dvc repro` again, an experiment refused for its settings, the
  smoke run, then `git add -A && git commit`: no model, checkpoint, sample, encoded data or
  MLflow store ever reaches git, and `dvc repro -f fetch_model` still works afterwards.
- A queued sweep: its experiments register versions tagged with their names, @candidate
  stays on the workspace's model, and `gpt2tune promote <experiment>` moves it.

The base model is a tiny GPT-2 copied from a local folder (model.base_url a path).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import REPO
from helpers.models import tiny_model
from helpers.processes import (
    drain_queue,
    dvc,
    run_in,
    start_in,
    start_queue_worker,
    wait_until_held,
)
from helpers.projects import commit_project, git, make_project, project_mlflow, training_run_id
from helpers.vocab import TINY_CORPUS

from gpt2tune import save_model
from gpt2tune.paths import (
    LOSS_CHART,
    LOSS_PLOTS,
    MEMORIZATION,
    MLFLOW_RUN,
    TIMING,
    TRAIN_METRICS,
)

# What a run may leave for git: DVC's lock, the params `dvc exp run -S` wrote, and the train
# and sample stages' small cache: false outputs, which are git's by design (`dvc metrics diff` and
# `dvc exp show` read them from commits).
FOR_GIT = {"dvc.lock", "params.yaml"} | {
    p.as_posix()
    for p in (TRAIN_METRICS, TIMING, LOSS_CHART, MLFLOW_RUN, MEMORIZATION, *LOSS_PLOTS.values())
}


def journey_project(tmp_path: Path, vocab_dir: Path) -> Path:
    """A committed project as a user's clone is: the repository's .gitignore files (also
    data/.gitignore, which ignores data/encoded), data/dset.txt in git (in the real
    repository DVC brings it), a tiny base model in a local folder, MLflow in mlflow.db."""
    served = tmp_path / "served"
    save_model(tiny_model(vocab_dir, 0), served / "tiny")
    (served / "tiny" / "model.ckpt.meta").write_bytes(b"")  # the release has one
    root = make_project(
        tmp_path / "project", TINY_CORPUS * 20,
        model=dict(name="tiny", base_url=str(served)),
        train=dict(steps=6, save_every=2, n_ctx=16),
        sample=dict(nsamples=1, length=4),
        mlflow=dict(tracking_uri="sqlite:///mlflow.db", experiment="journeys"),
    )  # fmt: skip
    shutil.copy2(REPO / "data" / ".gitignore", root / "data" / ".gitignore")
    commit_project(root)
    git(root, "add", "-f", "data/dset.txt")
    git(root, "commit", "-q", "-m", "the corpus")
    return root


def for_git(root: Path) -> set[str]:
    """The paths `git status` offers to commit (untracked files listed one by one)."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    return {line[3:] for line in status.splitlines()}  # "XY path": git() would strip a space


def interrupted_repro(root: Path, hold: Path) -> str:
    """`dvc repro` with Ctrl-C pressed while it trains: the train stage is held at its first
    save (tests/killpoint), then its whole process group gets SIGINT, as a terminal sends it."""
    proc = start_in(root, "dvc", "repro", start_new_session=True,
                    kill_at=f"stages/train.py:replace:train_state.json:1:{hold}")  # fmt: skip
    try:
        wait_until_held(proc, hold, 240)
        os.killpg(proc.pid, signal.SIGINT)
        hold.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out + err
    return out + err


@pytest.mark.slow  # five DVC runs of the pipeline: 5 min on the 2 shared, busy cores here
def test_interrupt_refusal_smoke_run_and_commit_leave_git_clean(tmp_path, tiny_vocab_dir):
    root = journey_project(tmp_path, tiny_vocab_dir)
    out = interrupted_repro(root, tmp_path / "go")
    stopped = re.search(r"stopped by SIGINT: step (\d) saved in checkpoint/run1", out)
    assert stopped, out[-3000:]
    assert for_git(root) <= FOR_GIT, for_git(root)
    out = dvc(root, "repro")
    assert f"resuming from step {stopped[1]}" in out, out[-3000:]
    assert for_git(root) <= FOR_GIT, for_git(root)
    out = dvc(root, "exp", "run", "-S", "train.n_ctx=64", ok=False)  # over the model's 32
    assert "train.n_ctx = 64" in out, out[-3000:]
    assert for_git(root) <= FOR_GIT, for_git(root)
    out = dvc(root, "exp", "run", "-S", "train.n_ctx=8", "-S", "train.steps=2")  # smoke run
    # The 6-step run of the other settings is kept, not overwritten.
    assert "kept the run that was in checkpoint/run1 (6 steps, of other settings" in out, out
    assert for_git(root) <= FOR_GIT, for_git(root)

    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "results")
    committed = set(git(root, "show", "--name-only", "--format=", "HEAD").splitlines())
    assert committed <= FOR_GIT, committed
    tracked = git(root, "ls-files").splitlines()
    assert not [p for p in tracked if p.startswith(("models/", "checkpoint/", "samples/",
                "data/encoded/", "mlflow.db")) and p != "models/.gitignore"], tracked  # fmt: skip
    dvc(root, "repro", "-f", "fetch_model")  # the symptom: "already tracked by SCM"
    assert for_git(root) <= FOR_GIT, for_git(root)


def versions(root: Path) -> dict[str, object]:
    """{version number (a string): ModelVersion} of the registered model gpt2tune."""
    return {
        str(v.version): v for v in project_mlflow(root).search_model_versions("name = 'gpt2tune'")
    }


@pytest.mark.slow  # a pipeline run and a queued sweep of two: 4.7 min on 2 shared, busy cores
def test_queued_sweep_leaves_candidate_on_the_workspace_model_until_promoted(
    tmp_path, tiny_vocab_dir
):
    root = journey_project(tmp_path, tiny_vocab_dir)
    dvc(root, "repro")
    client = project_mlflow(root)
    workspace = client.get_model_version_by_alias("gpt2tune", "candidate")
    assert workspace.run_id == training_run_id(root)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "results before the sweep")

    dvc(root, "exp", "run", "--queue", "-S", "train.learning_rate=0.002,0.003")
    log = tmp_path / "queue-start.log"
    start_queue_worker(root, log)
    drain_queue(root, log)

    swept = {v.tags.get("dvc.exp_name"): v for k, v in versions(root).items() if k != "1"}
    assert len(swept) == 2 and None not in swept, swept
    # The alias stayed on the model in the workspace's models/finetuned.
    assert str(client.get_model_version_by_alias("gpt2tune", "candidate").version) == "1"
    runs = {name: client.get_run(v.run_id) for name, v in swept.items()}
    assert {n: r.data.tags["dvc.exp_name"] for n, r in runs.items()} == {n: n for n in runs}
    name = next(n for n, r in runs.items() if float(r.data.params["train.learning_rate"]) == 0.003)
    logs = run_in(root, "dvc", "queue", "logs", name).stdout
    assert "@candidate stays where it was" in logs and f"gpt2tune promote {name}" in logs, logs

    proc = run_in(root, "python", "-m", "gpt2tune", "promote", name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(
        f"@candidate of gpt2tune is version {swept[name].version} (DVC experiment {name}); "
        "it was on version 1"
    ), proc.stdout
    assert (
        client.get_model_version_by_alias("gpt2tune", "candidate").run_id == runs[name].info.run_id
    )
    proc = run_in(root, "python", "-m", "gpt2tune", "promote", "no-such-exp")
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith(
        "error: no version of gpt2tune comes from DVC experiment 'no-such-exp'"
    )
