"""Tracking stores that stall instead of failing: a server that accepts and never answers, one
whose accept queue is full, a sqlite store another process holds locked, and a deleted
experiment. Real sockets and processes on 127.0.0.1, a real `mlflow server`, real TensorFlow
on a tiny model trained through `train.fit` with the tracking functions the train stage uses.

What is checked is what a user would notice: where a training's time goes (the stage's waits
at its start and end, the training loop's tracking calls), the stage's exit, and whether every
step reaches the store in the end. The whole training's wall time against each store, sqlite
included, is measured by bench/tracking.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers.tracking import BlackHole, tracked_training
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

import gpt2tune
from gpt2tune.config.params import MlflowParams, TrainParams
from gpt2tune.model.checkpoint import load_model, save_model
from gpt2tune.model.encoder import load_encoder
from gpt2tune.model.gpt2 import init_model
from gpt2tune.tracking import run as tracking
from gpt2tune.tracking.client import resolve_tracking_uri

STEPS = 40
TRAIN = TrainParams(steps=STEPS, batch_size=2, learning_rate=3e-3, seed=0, n_ctx=16,
                    sample_every=10, sample_length=4, save_every=0, val_every=20,
                    val_batch_count=2, accumulate_gradients=1)  # fmt: skip
TOKENS = np.tile(np.array([5, 17, 42, 99, 7, 63, 200], np.int32), 60)
PARAMS = {"train.steps": STEPS, "model.name": "tiny"}
WAIT_S = 2  # GPT2TUNE_MLFLOW_WAIT_S for these tests: what a stage may wait at start and end


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_vocab_dir):
    n_vocab = gpt2tune.load_encoder(tiny_vocab_dir).n_vocab
    hp = {"n_vocab": n_vocab, "n_ctx": 16, "n_embd": 32, "n_head": 2, "n_layer": 2}
    folder = tmp_path_factory.mktemp("base") / "model"
    save_model(init_model(hp, load_encoder(tiny_vocab_dir), seed=0), folder)
    return folder


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A project folder of its own, with the store's waits and retries short."""
    monkeypatch.chdir(tmp_path)
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    short = {"GPT2TUNE_MLFLOW_WAIT_S": str(WAIT_S), "GPT2TUNE_MLFLOW_RETRY_S": "1"}
    for name, value in short.items():
        monkeypatch.setenv(name, value)
    return tmp_path


def train(base_dir, run_dir, uri: str, experiment: str, during=None):
    """One tracked training as stages/train.py runs it; (Waits, session)."""
    cfg = MlflowParams(tracking_uri=uri, experiment=experiment)
    return tracked_training(load_model(base_dir), TOKENS, TOKENS[:100], TRAIN, run_dir, cfg,
                            PARAMS, during)  # fmt: skip


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.parametrize("mode", ["accept", "backlog"])
def test_black_hole_server_costs_no_training_time(mode, workdir, base_dir, server, capsys):
    hole = BlackHole(mode)
    try:
        waits, run = train(base_dir, workdir / "run", hole.url, "black-hole")
    finally:
        hole.close()
    # Before, every call waited 3 x 20 s for the server. Now the stage waits one HTTP timeout
    # of WAIT_S at its start (no retry: `start_timeouts`) and at most WAIT_S at its end (the
    # queue's deadline), and the training loop's calls only queue. Each bound is half a
    # timeout above what it allows: a second timeout, or one call waiting on the network,
    # breaks it whatever the machine's load (the whole training's wall time, compared with
    # a sqlite store's, is in docs/resilience.md's reliability table).
    assert waits.start < 1.5 * WAIT_S and waits.end < 1.5 * WAIT_S, waits
    assert waits.in_calls < 0.5 * WAIT_S, waits
    offline_id = run.info.run_id
    assert offline_id.startswith("offline-") and run.kept()
    err = capsys.readouterr().err
    assert "unreachable" in err and "Traceback" not in err
    kept = [json.loads(line) for line in run.journal.read_text().splitlines()]
    val_steps = sorted(op["step"] for op in kept if "val_loss" in op.get("values", {}))
    texts = [op["file"] for op in kept if op["op"] == "text"]
    assert val_steps and texts

    # Later, with a server that answers, the journal goes in whole, each step once.
    cfg = MlflowParams(tracking_uri=server.url, experiment="black-hole")
    assert tracking.replay_pending(cfg) == 0
    run_id = tracking.journal.mapped_run_id(offline_id)
    client = MlflowClient(server.url)
    assert metric_steps(client, run_id, "loss") == list(range(1, STEPS + 1))
    assert metric_steps(client, run_id, "val_loss") == val_steps
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.data.params["train.steps"] == str(STEPS)
    assert sorted(a.path for a in client.list_artifacts(run_id, "samples")) == sorted(texts)


LOCKER = textwrap.dedent("""
    import sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    db.execute("COMMIT")
""")
# MLflow sets `PRAGMA busy_timeout = 20000` on its sqlite sessions, so a lock shorter than
# 20 s is only a wait (which the sender thread now does instead of the training loop); held
# longer, MLflow's call fails with "database is locked", as in the 30 s.
LOCK_S = 22


@pytest.mark.slow  # waits out MLflow's 20 s sqlite busy wait: ~25 s
def test_locked_sqlite_store_is_journaled_then_replayed(workdir, base_dir, capsys):
    uri = "sqlite:///mlflow.db"
    locker = None

    def lock(run) -> None:
        nonlocal locker
        locker = subprocess.Popen([sys.executable, "-c", LOCKER, "mlflow.db", str(LOCK_S)],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert locker.stdout.readline().strip() == "locked"
        # At once, so that MLflow's busy wait for it runs out while the lock is held.
        tracking.log_text("locked", "samples/locked.txt")

    try:
        _, run = train(base_dir, workdir / "run", uri, "locked", during=lock)  # no error
        run.outbox.thread.join(timeout=60)  # its call in flight may still be in the busy wait
        assert "locked by another process" in capsys.readouterr().err
    finally:
        assert locker.wait(timeout=LOCK_S + 30) == 0
    assert tracking.replay_pending(MlflowParams(tracking_uri=uri, experiment="locked")) == 0
    client = MlflowClient(resolve_tracking_uri(uri))
    assert metric_steps(client, run.info.run_id, "loss") == list(range(1, STEPS + 1))
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.slow  # holds the lock past MLflow's 20 s busy wait: ~45 s
def test_sqlite_store_locked_at_the_start_gets_an_offline_run(workdir, base_dir, capsys):
    uri = "sqlite:///mlflow.db"
    client = MlflowClient(resolve_tracking_uri(uri))
    client.create_experiment("locked-start")  # the store exists, then another process locks it
    # Longer than LOCK_S: the model is loaded and MLflow's 20 s busy wait runs out meanwhile.
    hold = LOCK_S + 20
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, "mlflow.db", str(hold)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert locker.stdout.readline().strip() == "locked"
        ids = []
        _, run = train(base_dir, workdir / "run", uri, "locked-start",
                       during=lambda run: ids.append(run.info.run_id))  # fmt: skip
        offline_id = ids[0]  # the run is made from the journal once the store answers
        assert offline_id.startswith("offline-")
        err = capsys.readouterr().err
        assert "locked by another process" in err and f"{offline_id}.jsonl" in err, err
        run.outbox.thread.join(timeout=60)
    finally:
        assert locker.wait(timeout=hold + 30) == 0
    assert tracking.replay_pending(MlflowParams(tracking_uri=uri, experiment="locked-start")) == 0
    run_id = tracking.journal.mapped_run_id(offline_id)
    assert run_id and not list((workdir / "metrics" / "mlflow_offline").glob("*.jsonl"))
    assert metric_steps(client, run_id, "loss") == list(range(1, STEPS + 1))
    assert client.get_run(run_id).data.params["train.steps"] == str(STEPS)


STAGE = textwrap.dedent("""
    import sys
    from gpt2tune.tracking import run as tracking
    from gpt2tune.config.params import MlflowParams
    from gpt2tune.stage import run_stage

    def main():
        cfg = MlflowParams(tracking_uri=sys.argv[1], experiment="gone")
        with tracking.training_run(cfg, {"train.steps": 1}):
            tracking.log_metrics({"loss": 1.0}, 1)

    sys.exit(run_stage(main))
""")


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_deleted_experiment_is_one_line_and_nothing_written(store, workdir, server):
    uri = server.url if store == "server" else f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    if client.get_experiment_by_name("gone") is None:
        client.create_experiment("gone")
    exp = client.get_experiment_by_name("gone")
    if exp.lifecycle_stage != "deleted":
        client.delete_experiment(exp.experiment_id)
    proc = subprocess.run([sys.executable, "-c", STAGE, uri], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "'gone'" in lines[0] and "deleted" in lines[0]
    assert f"mlflow experiments restore --experiment-id {exp.experiment_id}" in lines[0]
    assert not (workdir / "metrics").exists()
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    assert runs == []
