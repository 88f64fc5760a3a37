"""The train stage as a user runs it (`python stages/train.py` in a project folder, MLflow in
the project's sqlite store): a NaN loss fails the MLflow run and keeps the last checkpoint;
SIGTERM checkpoints, exits 143 and marks the run killed; the rerun resumes in the same run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers.mlflowserver import free_ports
from helpers.models import tiny_model
from helpers.processes import run_stage, stage_env, start_stage
from helpers.projects import make_project, project_mlflow, training_run_id, update_params
from helpers.vocab import TINY_CORPUS

from gpt2tune import save_model


class StageProject:
    def __init__(self, root: Path):
        self.root = root

    def set_train(self, **changes) -> None:
        update_params(self.root, "train", **changes)

    def stage(self, name: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_stage(self.root, name, timeout=timeout)

    def popen(self, name: str, **env: str) -> subprocess.Popen:
        return start_stage(self.root, name, env=stage_env(**env))

    def state(self) -> dict | None:
        try:
            return json.loads((self.root / "checkpoint/run1/train_state.json").read_text())
        except (OSError, ValueError):
            return None

    def client(self):
        return project_mlflow(self.root)

    def run_id(self) -> str:
        return training_run_id(self.root)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_vocab_dir):
    root = make_project(
        tmp_path_factory.mktemp("stage") / "project", TINY_CORPUS * 20,
        train=dict(
            steps=6, batch_size=2, learning_rate=0.001, n_ctx=16, sample_every=0, save_every=3,
            val_every=3, val_batch_count=2,
        ),
        mlflow=dict(tracking_uri="sqlite:///mlflow.db", experiment="stage-test"),
    )  # fmt: skip
    save_model(tiny_model(tiny_vocab_dir, 0, n_embd=32, n_layer=2), root / "models" / "tiny")
    p = StageProject(root)
    proc = p.stage("encode")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return p


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_nan_loss_fails_the_mlflow_run_and_keeps_the_last_checkpoint(project):
    project.set_train(optimizer="sgd", learning_rate=1e12, save_every=1, steps=6)
    try:
        proc = project.stage("train")
    finally:
        project.set_train(optimizer="adam", learning_rate=0.001, save_every=3)
    assert proc.returncode == 1
    line = one_error_line(proc)
    m = re.search(r"loss became (nan|inf) at step (\d+); the last good checkpoint", line)
    assert m and "train.learning_rate" in line, line
    assert project.state()["step"] == int(m.group(2)) - 1  # saved before the loss blew up
    run = project.client().get_run(project.run_id())
    assert run.info.status == "FAILED"


@pytest.mark.slow  # two train stages; test_train.py stops fit by signal in-process: ~25 s
def test_sigterm_checkpoints_exits_143_and_the_rerun_continues_the_same_run(project):
    project.set_train(steps=100_000, save_every=0)
    proc = project.popen("train")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (project.root / "metrics/mlflow_run.json").exists():
                history = project.client().get_metric_history(project.run_id(), "loss")
                if len(history) >= 3:  # not the failed run of the test above: it has 1
                    break
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    stopped = project.state()["step"]
    assert f"stopped by SIGTERM: step {stopped} saved" in out
    run_id = project.run_id()
    assert project.client().get_run(run_id).info.status == "KILLED"

    project.set_train(steps=stopped + 3)
    proc = project.stage("train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from step {stopped}" in proc.stdout
    assert project.run_id() == run_id  # the same MLflow run continues
    client = project.client()
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, stopped + 4))  # each step once
    assert json.loads((project.root / "metrics/train.json").read_text())["steps"] == stopped + 3


def test_kill_9_then_rerun_continues_the_same_mlflow_run_without_duplicate_steps(project):
    """kill -9 after the loop has logged steps past its last checkpoint: the rerun resumes
    from the checkpoint, redoes those steps, and logs each step to the same run once.

    The kill comes at an exact point, right before step 10's train_state.json is renamed in
    (step 5 is the saved one, steps 6-10 are logged), so the test depends neither on timing
    nor on the tests before it (seed 1: a run of its own, whatever run folder they left)."""
    project.set_train(seed=1, steps=12, save_every=5, val_every=5)
    try:
        kill = "stages/train.py:replace:train_state.json:2"
        proc = run_stage(project.root, "train", kill_at=kill)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        saved, run_id = project.state()["step"], project.run_id()
        assert saved == 5 and project.state()["mlflow_run_id"] == run_id
        done = max(m.step for m in project.client().get_metric_history(run_id, "loss"))
        # Steps 6-10 ran; MLflow calls go through a sender thread (tracking never holds up a
        # step), so the last few may not have reached the store before the kill. Whatever
        # did is not logged twice by the rerun (below).
        assert done <= 10

        rerun = project.stage("train")
    finally:
        project.set_train(seed=0)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from step {saved}" in rerun.stdout
    assert "removed 1 temporary file(s)" in rerun.stdout  # the killed save's .tmp
    assert project.run_id() == run_id
    client = project.client()
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, 13))  # each step exactly once
    val_steps = sorted(m.step for m in client.get_metric_history(run_id, "val_loss"))
    assert val_steps == [0, 5, 10, 12]


@pytest.mark.slow  # two TensorFlow + MLflow processes: ~40 s on 2 idle cores
def test_multi_worker_stage_only_the_chief_writes(project):
    """`train.strategy: multi_worker`: two `python stages/train.py` on 127.0.0.1 with
    TF_CONFIG train together; only worker 0 writes the checkpoint, metrics and MLflow run."""
    project.set_train(strategy="multi_worker", restore_from="fresh", steps=4, save_every=2)

    def mlflow_runs() -> list:
        experiment = project.client().get_experiment_by_name("stage-test")
        return project.client().search_runs([experiment.experiment_id]) if experiment else []

    runs_before = len(mlflow_runs())
    hosts = [f"127.0.0.1:{port}" for port in free_ports(2)]
    procs = []
    try:
        for i in range(2):
            tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}
            procs.append(project.popen("train", TF_CONFIG=json.dumps(tf_config)))
        (chief_out, chief_err), (other_out, other_err) = (p.communicate(timeout=300) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        project.set_train(strategy="auto", restore_from="latest")
    assert procs[0].returncode == 0, chief_err[-3000:]
    assert procs[1].returncode == 0, other_err[-3000:]
    assert project.state()["step"] == 4
    metrics = json.loads((project.root / "metrics/train.json").read_text())
    assert metrics["steps"] == 4 and json.loads(chief_out.strip().splitlines()[-1]) == metrics
    assert '"steps"' not in other_out  # the other worker reports nothing
    assert len(mlflow_runs()) == runs_before + 1  # one MLflow run, the chief's
    steps = [m.step for m in project.client().get_metric_history(project.run_id(), "loss")]
    assert sorted(steps) == [1, 2, 3, 4]


def test_run_killed_before_its_first_checkpoint_is_marked_killed_at_the_next_start(project):
    """kill -9 before the first checkpoint is complete (its loss history not yet renamed
    in, so no train_state.json names it): nothing resumes that MLflow run, so the next start
    of the run folder marks it KILLED instead of leaving it RUNNING for ever."""
    project.set_train(seed=2, steps=2, save_every=0, val_every=0)
    try:
        kill = "stages/train.py:replace:history.json:1"
        proc = run_stage(project.root, "train", kill_at=kill)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        killed = project.run_id()
        assert project.client().get_run(killed).info.status == "RUNNING"
        rerun = project.stage("train")
    finally:
        project.set_train(seed=0, steps=6, save_every=3, val_every=3)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"marked MLflow run {killed} KILLED" in rerun.stderr
    assert project.run_id() != killed  # a new run: the killed one had no checkpoint
    client = project.client()
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(project.run_id()).info.status == "FINISHED"
