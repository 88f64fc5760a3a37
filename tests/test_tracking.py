"""MLflow tracking against a real `mlflow server` that the tests kill and start again.

What is checked is what a user would look at afterwards: the run on the server holds every
step exactly once, the params, texts and folders, whatever happened to the server meanwhile.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from helpers.projects import seed_mlflow_store
from helpers.tracking import encoded_dir
from mlflow.tracking import MlflowClient

from gpt2tune.config.params import MlflowParams
from gpt2tune.tracking import journal
from gpt2tune.tracking import run as tracking
from gpt2tune.tracking.client import resolve_tracking_uri
from gpt2tune.tracking.datasets import token_sets

PARAMS = {"train.steps": 8, "model.name": "tiny"}
SECRET = "s3cret-pw"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    seed_mlflow_store(tmp_path / "mlflow.db")
    return tmp_path


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def log_steps(steps) -> None:
    for s in steps:
        tracking.log_metrics({"loss": 10.0 - s, "tokens_per_s": 100.0}, s)


def test_resumed_run_logs_each_step_once(workdir):
    cfg = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="resume")
    client = MlflowClient(resolve_tracking_uri(cfg.tracking_uri))
    with tracking.training_run(cfg, PARAMS) as run:
        log_steps(range(1, 6))
        run_id = run.info.run_id
        tracking.end_run("KILLED")  # as the train stage does when stopped by a signal
    assert client.get_run(run_id).info.status == "KILLED"
    # A resumed training repeats the steps after its last checkpoint (3..5), then goes on.
    with tracking.training_run(cfg, PARAMS, run_id) as run:
        assert run.info.run_id == run_id
        for s in range(3, 9):
            tracking.log_metrics({"loss": 100.0 + s}, s)
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    first = {m.step: m.value for m in history}
    assert [first[s] for s in (3, 4, 5, 6)] == [7.0, 6.0, 5.0, 106.0]  # first value kept
    assert steps_of(client, run_id, "tokens_per_s") == [1, 2, 3, 4, 5]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_logged_history_fills_only_the_steps_the_run_lacks(workdir):
    """What a kill -9 kept in the sender's queue is in the saved history: logged again in
    one call, it fills the run's gaps and leaves what the run holds as it is."""
    cfg = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="history")
    client = MlflowClient(resolve_tracking_uri(cfg.tracking_uri))
    with tracking.training_run(cfg, PARAMS) as run:
        tracking.log_metrics({"val_loss": 4.0, "base_val_loss": 4.0}, 0)
        log_steps([1, 2])  # steps 3 and 4 never reached the store
        run_id = run.info.run_id
    history = {"loss": [[s, 50.0 + s] for s in (1, 2, 3, 4)], "val_loss": [[0, 9.0], [4, 3.5]]}
    with tracking.training_run(cfg, PARAMS, run_id):
        tracking.log_history(history)
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert loss == {1: 9.0, 2: 8.0, 3: 53.0, 4: 54.0}  # one value a step, the first kept
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    assert val == {0: 4.0, 4: 3.5}
    assert [m.value for m in client.get_metric_history(run_id, "base_val_loss")] == [4.0]


def test_server_dying_mid_run_loses_nothing(workdir, server, monkeypatch, capsys):
    cfg = MlflowParams(tracking_uri=server.url, experiment="dies-mid-run")
    monkeypatch.setenv("GPT2TUNE_MLFLOW_RETRY_S", "1")
    with tracking.training_run(cfg, PARAMS) as run:
        run_id = run.info.run_id
        log_steps([1, 2, 3])
        tracking.log_text("sample at 3", "samples/train/step_000003.txt")
        assert tracking.flush()  # sent before the server dies
        server.kill()
        log_steps([4, 5, 6])  # the first of these finds the server gone, the others are kept
        tracking.log_text("sample at 6", "samples/train/step_000006.txt")
        assert tracking.flush()  # the sender thread has tried, and kept, them
        kept = workdir / "metrics" / "mlflow_offline" / f"{run_id}.jsonl"
        err = capsys.readouterr().err
        assert "unreachable" in err and str(kept.relative_to(workdir)) in err, err
        assert len(kept.read_text().splitlines()) == 4
        server.start()
        server.wait_ready()
        # The server is back: the next call, once the retry interval is over, sends all.
        time.sleep(1.1)
        log_steps([7])
        assert tracking.flush()
        assert not kept.exists()
        client = MlflowClient(server.url)
        assert steps_of(client, run_id, "loss") == list(range(1, 8))
        log_steps([8])
    assert steps_of(client, run_id, "loss") == list(range(1, 9))
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["train.steps"] == "8"
    names = [a.path for a in client.list_artifacts(run_id, "samples/train")]
    assert names == ["samples/train/step_000003.txt", "samples/train/step_000006.txt"]
    assert json.loads((workdir / "metrics" / "mlflow_run.json").read_text())["run_id"] == run_id


def test_server_down_at_start_is_replayed_by_the_next_stage(workdir, server, monkeypatch, capsys):
    # Credentials come from the environment and must not show up anywhere on the way.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url.replace("://", f"://alice:{SECRET}@"))
    cfg = MlflowParams(tracking_uri="", experiment="down-at-start")
    server.kill()
    with tracking.training_run(cfg, PARAMS) as run:
        offline_id = run.info.run_id
        assert offline_id.startswith("offline-")
        log_steps(range(1, 5))
        tracking.log_text("a sample", "samples/train/step_000004.txt")
        for step in (4, 8):  # kept, then appended to the one table in order when replayed
            tracking.log_table({"step": [step], "text": [f"at {step}"]}, "samples/table.json")
        tracking.log_datasets(token_sets(*encoded_dir(workdir, [1, 2, 3], [4]), "d.txt"))
    info = json.loads((workdir / "metrics" / "mlflow_run.json").read_text())
    assert info["run_id"] == offline_id
    kept = workdir / "metrics" / "mlflow_offline" / f"{offline_id}.jsonl"
    assert info["offline_file"] == str(kept.relative_to(workdir))
    err = capsys.readouterr().err
    assert "still unreachable" in err and info["offline_file"] in err
    assert "alice:***@" not in err and "***@127.0.0.1" in err

    # The assemble stage, later, with the server back: the run is made from the kept file.
    server.start()
    server.wait_ready()
    (workdir / "models" / "finetuned").mkdir(parents=True)
    (workdir / "models" / "finetuned" / "hparams.json").write_text("{}")
    with tracking.reopen_run(cfg) as run:
        run_id = run.info.run_id
        tracking.log_folder("models/finetuned", "model")
    assert not run_id.startswith("offline-") and not kept.exists()
    client = MlflowClient(server.url)
    got = client.get_run(run_id)
    assert got.data.params == {k: str(v) for k, v in PARAMS.items()}
    assert steps_of(client, run_id, "loss") == [1, 2, 3, 4]
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/hparams.json"]
    table = json.loads(
        Path(client.download_artifacts(run_id, "samples/table.json", "t")).read_text()
    )
    assert table == {"columns": ["step", "text"], "data": [[4, "at 4"], [8, "at 8"]]}
    assert sorted(i.dataset.name for i in got.inputs.dataset_inputs) == ["d.txt-train", "d.txt-val"]
    assert got.info.status == "FINISHED"

    # A resumed training with the local id lands in the same run, without repeating steps.
    with tracking.training_run(cfg, PARAMS, offline_id) as run:
        assert run.info.run_id == run_id
        log_steps(range(3, 7))
    assert steps_of(client, run_id, "loss") == list(range(1, 7))

    written = [p.read_text() for p in (workdir / "metrics").rglob("*") if p.is_file()]
    everything = " ".join(written) + capsys.readouterr().err + json.dumps(got.data.params)
    everything += json.dumps(got.data.tags)
    assert SECRET not in everything


# Each process: import MLflow first, then for every try meet the other process at a file
# barrier and open a fresh sqlite store (MLflow creates its schema on first open).
OPEN_FRESH_STORES = """
import os, sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient  # imported before the barrier: both start together
from gpt2tune.tracking.client import MlflowRun
folder, tries = Path(sys.argv[1]), int(sys.argv[2])
for i in range(tries):
    (folder / f"ready-{i}-{os.getpid()}").touch()
    while len(list(folder.glob(f"ready-{i}-*"))) < 2:
        time.sleep(0.005)
    run = MlflowRun(f"sqlite:///{folder / f'mlflow-{i}.db'}", "queue", "")
    try:
        run.connect()
        print("ok", run.experiment_id, flush=True)
    except Exception as e:
        print("failed", " ".join(str(e).split())[:300], flush=True)
"""


def test_two_processes_opening_a_fresh_sqlite_store_at_once_both_succeed(tmp_path):
    """`dvc queue start -j 2` in a project without mlflow.db: two train stages create
    MLflow's schema (and the experiment) at the same moment; each of 3 tries, both succeed
    and use the one experiment."""
    from helpers.processes import start_in

    tries = 3
    procs = [start_in(tmp_path, sys.executable, "-c", OPEN_FRESH_STORES, str(tmp_path),
                      str(tries)) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [out.splitlines() for out, _ in outs]
    for i in range(tries):
        got = [lines[i] for lines in results]
        assert all(line.startswith("ok ") for line in got), got
        assert got[0] == got[1], got  # one experiment, not two
    assert not list(tmp_path.glob("*.lock"))  # the lock files are gone with their holders


def test_continued_run_with_more_steps_records_the_new_value(workdir):
    """Raising train.steps continues the run (steps is not in the fingerprint): the run
    keeps the param it began with (MLflow params cannot change), gains the new value as a
    tag and takes the new name."""
    cfg = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="continued")
    client = MlflowClient(resolve_tracking_uri(cfg.tracking_uri))
    with tracking.training_run(cfg, {"train.steps": 20, "model.name": "tiny"},
                               name="tiny 20 steps") as run:  # fmt: skip
        run_id = run.info.run_id
    with tracking.training_run(cfg, {"train.steps": 30, "model.name": "tiny", "train.xla": True},
                               run_id, name="tiny 30 steps"):  # fmt: skip
        pass
    got = client.get_run(run_id)
    assert got.data.params == {"train.steps": "20", "model.name": "tiny", "train.xla": "True"}
    continued = {k: v for k, v in got.data.tags.items() if k.startswith("continued.")}
    assert continued == {"continued.train.steps": "30"}
    assert got.info.run_name == "tiny 30 steps"


def test_offline_run_whose_journal_is_gone_continues_in_a_new_run(workdir, capsys):
    """A run made offline, resumed where only checkpoint/run1 and metrics/mlflow_run.json
    came along (metrics/mlflow_offline is not committed): training, then assemble and sample
    (which reopen the run), go on in one new run instead of failing."""
    cfg = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="lost-journal")
    client = MlflowClient(resolve_tracking_uri(cfg.tracking_uri))
    run_file = workdir / "metrics" / "mlflow_run.json"
    run_file.parent.mkdir()
    for stage in ("train", "assemble"):
        lost = journal.new_offline_id()
        run_file.write_text(json.dumps({"run_id": lost}))
        if stage == "train":
            opened = tracking.training_run(cfg, PARAMS, lost, name="tiny 8 steps")
        else:
            opened = tracking.reopen_run(cfg, params=PARAMS)
        with opened as run:
            log_steps([1, 2])
        err = capsys.readouterr().err
        warned = [line for line in err.splitlines() if "going on in a new MLflow run" in line]
        assert len(warned) == 1 and lost in warned[0], err
        assert "Traceback" not in err
        got = client.get_run(run.info.run_id)
        assert got.data.params == {k: str(v) for k, v in PARAMS.items()}
        assert steps_of(client, got.info.run_id, "loss") == [1, 2]
        assert got.info.status == "FINISHED"
        # The stages after it find the same run through the offline id.
        with tracking.reopen_run(cfg) as again:
            assert again.info.run_id == got.info.run_id


def test_runs_name_their_token_sets_and_share_them(workdir):
    """Each training run's Datasets: its train and val tokens, by content (the .npy's MD5),
    source and token counts; runs on the same tokens share them, a resumed run adds none,
    and other tokens are other datasets. The experiment is a model-training one."""
    import hashlib

    cfg = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="lineage")
    client = MlflowClient(resolve_tracking_uri(cfg.tracking_uri))
    folder, stats = encoded_dir(workdir, [1, 2, 3, 4, 5], [6, 7])
    sets = token_sets(folder, stats, "data/dset.txt")
    run_ids = []
    for resume in (None, None, "first"):
        with tracking.training_run(cfg, PARAMS, run_ids[0] if resume else None) as run:
            tracking.log_datasets(sets)
            run_ids.append(run.info.run_id)
    first, second = (client.get_run(r).inputs.dataset_inputs for r in run_ids[:2])
    assert len(first) == 2 and run_ids[2] == run_ids[0]  # resumed: no third input
    got = {i.dataset.name: i for i in first}
    assert sorted(got) == ["dset.txt-train", "dset.txt-val"]
    for split, n in (("train", 5), ("val", 2)):
        d = got[f"dset.txt-{split}"].dataset
        assert d.digest == hashlib.md5((folder / f"{split}.npy").read_bytes()).hexdigest()
        assert json.loads(d.source) == {"uri": "data/dset.txt"} and d.source_type == "local"
        assert json.loads(d.profile) == {"tokens": n, "n_vocab": 50257}
        assert "uint16" in d.schema
        context = {t.key: t.value for t in got[f"dset.txt-{split}"].tags}["mlflow.data.context"]
        assert context == {"train": "training", "val": "validation"}[split]
    assert sorted((i.dataset.name, i.dataset.digest) for i in second) == sorted(
        (i.dataset.name, i.dataset.digest) for i in first
    )
    # Other tokens, a separate validation text: other digests, the val set's own source.
    folder, stats = encoded_dir(workdir, [1, 2, 3, 4, 6], [6, 7])
    other = {r["name"]: r for r in token_sets(folder, stats, "data/dset.txt", "data/v.txt")}
    assert sorted(other) == ["dset.txt-train", "v.txt-val"]
    assert other["dset.txt-train"]["digest"] != got["dset.txt-train"].dataset.digest
    assert json.loads(other["v.txt-val"]["source"]) == {"uri": "data/v.txt"}

    exp = client.get_experiment_by_name("lineage")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_experiments_made_before_get_the_kind_unless_they_have_one(workdir):
    client = MlflowClient(resolve_tracking_uri("sqlite:///mlflow.db"))
    old = client.create_experiment("old")  # made by an earlier gpt2tune: no kind
    genai = client.create_experiment("mine", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("old", "mine"):
        with tracking.training_run(MlflowParams(experiment=name), PARAMS):
            pass
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(genai).tags["mlflow.experimentKind"] == "genai_development"
