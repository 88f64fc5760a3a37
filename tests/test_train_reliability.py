"""The train stage when things go wrong around it, and what it reports: a run killed after
its last checkpoint is reported, not retrained; a save that fails leaves the saved run as it
was; a second training in the same folder is refused; temporary files of a killed save are
removed; metrics/train.json holds reproducible numbers (the base model's validation loss
among them), metrics/loss.png the chart; the MLflow run has a name and a description.

Each test runs `python stages/train.py` in a test project (helpers.projects), with
kill -9 or a hold at an exact rename from tests/killpoint/."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.models import tiny_model
from helpers.processes import run_stage, stage_env, start_stage, wait_until_held
from helpers.projects import make_project, project_mlflow, training_run_id, update_params
from helpers.vocab import TINY_CORPUS

from gpt2tune import save_model

STEPS = 4
TRAIN = dict(steps=STEPS, batch_size=2, learning_rate=0.001, n_ctx=16, save_every=2, val_every=2)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tiny_vocab_dir) -> Path:
    """A project with models/tiny and data/encoded, never trained: tests copy it."""
    root = make_project(
        tmp_path_factory.mktemp("reliability") / "project", TINY_CORPUS * 20, train=TRAIN,
        mlflow=dict(tracking_uri="sqlite:///mlflow.db", experiment="reliability"),
    )  # fmt: skip
    save_model(tiny_model(tiny_vocab_dir, 0, n_embd=32, n_layer=2), root / "models" / "tiny")
    proc = run_stage(root, "encode")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def copy_of(encoded: Path, dest: Path) -> Path:
    shutil.copytree(encoded, dest, symlinks=True)
    return dest


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]


def all_runs(root: Path) -> list:
    c = project_mlflow(root)
    return c.search_runs([c.get_experiment_by_name("reliability").experiment_id])


def metric_steps(root: Path, rid: str, key: str) -> list[int]:
    return sorted(m.step for m in project_mlflow(root).get_metric_history(rid, key))


def snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(encoded, tmp_path_factory) -> Path:
    """Killed (-9) after its final checkpoint, just before metrics/loss.tsv was renamed in;
    then run again. Yields the project after the second run."""
    root = copy_of(encoded, tmp_path_factory.mktemp("finished") / "project")
    killed(run_stage(root, "train", kill_at="stages/train.py:replace:loss.tsv:1"))
    assert json.loads((root / "checkpoint/run1/train_state.json").read_text())["step"] == STEPS
    assert not (root / "metrics/train.json").exists()
    root.joinpath("run1-before").write_text(json.dumps(snapshot(root / "checkpoint/run1")))
    root.joinpath("rerun.out").write_text(ok(run_stage(root, "train")).stdout)
    return root


def test_a_run_killed_after_its_last_checkpoint_is_reported_not_retrained(finished):
    out = finished.joinpath("rerun.out").read_text()
    assert f"already holds this run's {STEPS} steps" in out, out
    assert "training from the base model" not in out
    # No step recomputed: the run folder is byte-identical, and MLflow has each step once.
    assert snapshot(finished / "checkpoint/run1") == json.loads(
        finished.joinpath("run1-before").read_text()
    )
    runs = all_runs(finished)
    assert len(runs) == 1 and runs[0].info.run_id == training_run_id(finished)  # no second run
    assert runs[0].info.status == "FINISHED"
    assert metric_steps(finished, training_run_id(finished), "loss") == list(range(1, STEPS + 1))
    metrics = json.loads((finished / "metrics/train.json").read_text())
    assert metrics["steps"] == STEPS and metrics["val_perplexity"] > 1
    rows = (finished / "metrics/loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows] == ["step", *map(str, range(1, STEPS + 1))]


def test_train_json_holds_base_val_loss_and_perplexity_also_in_mlflow(finished):
    metrics = json.loads((finished / "metrics/train.json").read_text())
    assert set(metrics) == {
        "steps", "tokens_seen", "loss_last10", "base_val_loss", "val_loss", "val_perplexity"
    }  # fmt: skip
    assert metrics["tokens_seen"] == STEPS * 2 * 16  # 2 windows of 16 predicted tokens a step
    c, rid = project_mlflow(finished), training_run_id(finished)
    (base,) = c.get_metric_history(rid, "base_val_loss")
    assert base.step == 0 and base.value == pytest.approx(metrics["base_val_loss"])
    first_val = min(c.get_metric_history(rid, "val_loss"), key=lambda m: m.step)
    assert first_val.step == 0 and first_val.value == base.value
    (ppl,) = c.get_metric_history(rid, "val_perplexity")
    assert ppl.step == STEPS and ppl.value == pytest.approx(metrics["val_perplexity"])
    (last10,) = c.get_metric_history(rid, "loss_last10")
    assert last10.value == pytest.approx(metrics["loss_last10"])
    timing = json.loads((finished / "metrics/timing.json").read_text())
    assert set(timing) <= {"tokens_per_s", "train_seconds"}  # timings live here, not there


def test_loss_chart_in_metrics_and_in_mlflow(finished, tmp_path):
    png = (finished / "metrics/loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    c, rid = project_mlflow(finished), training_run_id(finished)
    assert "loss.png" in [a.path for a in c.list_artifacts(rid)]
    logged = Path(c.download_artifacts(rid, "loss.png", str(tmp_path)))
    assert logged.read_bytes() == png


def test_run_name_and_description(finished):
    run = project_mlflow(finished).get_run(training_run_id(finished))
    assert run.info.run_name == "tiny 4 steps lr 0.001"
    stats = json.loads((finished / "data/encoded/stats.json").read_text())
    note = run.data.tags["mlflow.note.content"]
    assert "data/dset.txt" in note and f"{stats['train_tokens']} training tokens" in note, note


def test_dvc_experiment_name_is_the_run_name(encoded, tmp_path):

    root = copy_of(encoded, tmp_path / "project")
    update_params(root, "train", steps=1, val_every=0, save_every=0)
    ok(run_stage(root, "train", env=stage_env(DVC_EXP_NAME="tidy-lamb")))
    assert project_mlflow(root).get_run(training_run_id(root)).info.run_name == "tidy-lamb"


def test_two_identical_runs_give_byte_identical_metrics(finished, encoded, tmp_path):
    """A straight run against `finished` (killed, then reported from its checkpoint)."""
    root = copy_of(encoded, tmp_path / "project")
    ok(run_stage(root, "train"))
    for name in ("train.json", "loss.tsv", "val_loss.tsv", "loss.png"):
        assert (root / "metrics" / name).read_bytes() == (
            finished / "metrics" / name
        ).read_bytes(), name


def test_a_failed_save_of_another_run_keeps_the_saved_run_and_its_history(finished, tmp_path):
    """A finished run, then a fresh training that dies while saving its first checkpoint
    (kill -9 right before `checkpoint` is renamed in), then more steps: the saved run
    continues with its whole history (the history used to be overwritten first)."""
    root = tmp_path / "project"
    shutil.copytree(finished, root, symlinks=True)
    update_params(root, "train", restore_from="fresh")
    killed(run_stage(root, "train", kill_at="stages/train.py:replace:run1/.checkpoint.tmp:1"))
    update_params(root, "train", restore_from="latest", steps=STEPS + 2)
    out = ok(run_stage(root, "train")).stdout
    assert f"resuming from step {STEPS}" in out, out
    rows = (root / "metrics/loss.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == list(range(1, STEPS + 3))
    assert rows[:STEPS] == (finished / "metrics/loss.tsv").read_text().splitlines()[1:]
    names = sorted(p.name for p in (root / "checkpoint/run1").iterdir())
    assert [n for n in names if n.startswith("model-")] == [
        f"model-{STEPS + 2}.data-00000-of-00001",
        f"model-{STEPS + 2}.history.json",
        f"model-{STEPS + 2}.index",
    ]  # the killed run's model-2 files are gone with the older checkpoint


def test_a_second_training_in_the_same_folder_is_refused(encoded, tmp_path):
    root = copy_of(encoded, tmp_path / "project")
    go = tmp_path / "go"
    # The first training is held right before its first checkpoint is named.
    first = start_stage(
        root, "train", kill_at=f"stages/train.py:replace:run1/.checkpoint.tmp:1:{go}"
    )
    try:
        wait_until_held(first, go, 240, lambda: first.communicate()[1][-3000:])
        before = snapshot(root)
        second = run_stage(root, "train")
        lines = (second.stdout + second.stderr).strip().splitlines()
        assert second.returncode == 1 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: another training (process {first.pid}) is using "
                                   "checkpoint/run1"), lines[0]  # fmt: skip
        assert snapshot(root) == before  # nothing changed
        go.touch()
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err[-3000:]
    assert not (root / "checkpoint/run1.lock").exists()


def test_temporary_files_of_a_killed_save_are_removed_by_the_next_run(encoded, tmp_path):
    root = copy_of(encoded, tmp_path / "project")
    run1 = root / "checkpoint/run1"
    killed(run_stage(root, "train", kill_at="stages/train.py:replace:train_state.json:1"))
    assert (run1 / ".train_state.json.tmp").exists()
    (run1 / "model-2.data-00000-of-00001.tempstate123").write_bytes(b"\0" * 64)  # SaveV2's
    out = ok(run_stage(root, "train")).stdout
    assert (
        f"removed 2 temporary file(s) of an interrupted save from {run1.relative_to(root)}" in out
    )
    assert not [p.name for p in run1.iterdir() if ".tmp" in p.name or "tempstate" in p.name]
