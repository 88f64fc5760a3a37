"""MLflow bookkeeping: one run per training, shared by the train, assemble and sample stages.

The train stage starts the run and records its id in `metrics/mlflow_run.json`; the later
stages reopen that run, so params, loss curves, samples and the assembled model of one
fine-tuning stay together. Relative `sqlite:///` stores resolve against the DVC project root
(`$DVC_ROOT`, which DVC sets to the main workspace also for `dvc exp run --temp/--queue`), so
every experiment lands in the same `mlflow.db` that `mlflow ui` shows.

When the tracking store is away
-------------------------------
Tracking never holds up a training step: training's calls are queued for a sender thread
(:mod:`gpt2tune.tracking.outbox`; reopened runs call directly), and a stage waits for the
store at most
``GPT2TUNE_MLFLOW_WAIT_S`` seconds (default 3) at its start (one HTTP timeout, no retry) and as
long at its end. A store that does not answer (an http(s) server down, dying, silent; a sqlite
store another process holds locked) never stops a stage: what it missed (the run's creation
with params and tags, metrics, texts, folders to upload, the status) goes, one JSON line per
call, to ``metrics/mlflow_offline/<run id>.jsonl``, named in a warning. A run created offline
has a local id ``offline-<hex>`` (in `metrics/mlflow_run.json` and the checkpoint's state). The
file is replayed in order once the store answers: retried with a backoff from 0.5 s up to every
``GPT2TUNE_MLFLOW_RETRY_S`` seconds (default 60) while logging, at the stage's end, by later
stages or ``gpt2tune replay``. Replaying creates the run if needed (``<offline
id>.json`` maps the local id to the real one), skips (metric, step) pairs the run holds, and
deletes the file when all is in, so an interrupted replay is simply repeated. Folders are
uploaded as they are at replay time. Other failures of a sqlite or file store, and a deleted
experiment, fail loudly: waiting will not cure them. The journal files are
:mod:`gpt2tune.tracking.journal`'s, the MLflow calls :mod:`gpt2tune.tracking.client`'s; this
module decides
between them (:class:`gpt2tune.tracking.session.Session`) and holds the functions the stages call.

Resumed runs: a training that reopens its run logs no (metric, step) pair twice, so the loss
curve of a resumed training has each step once, with the value first recorded.

Credentials for a tracking server come from the environment (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``, or a ``user:password@`` in ``$MLFLOW_TRACKING_URI``); every
address this module prints or writes down goes through :func:`redact`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpt2tune.config.params import MlflowParams, ServeParams
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import display_path, in_experiment_copy, write_text_atomic
from gpt2tune.paths import MLFLOW_RUN
from gpt2tune.tracking import journal
from gpt2tune.tracking.client import (
    EXP_TAG,
    Unreachable,
    missing,
    param_value,
    reason,
    run_tags,
    start_timeouts,
    transient,
)
from gpt2tune.tracking.journal import OFFLINE_PREFIX
from gpt2tune.tracking.session import Session
from gpt2tune.urls import redact


def replay_pending(cfg: MlflowParams) -> int:
    """Send every journal under metrics/mlflow_offline to the server; return how many
    remain (0: all sent). Gpt2tuneError if the server is still unreachable."""
    files = journal.pending()
    for path in files:
        session = Session(cfg, path.stem)
        try:
            session.connect()
            session.catch_up()
        except Unreachable as e:
            raise Gpt2tuneError(
                f"MLflow server {redact(session.uri)} is still unreachable ({e}); "
                f"{len(files)} offline file(s) kept in {display_path(journal.offline_dir())}"
            ) from None
    return len(journal.pending())


# ------------------------------------------------------------------- the public functions

# What made a run: "train" (a training, with its assemble and sample) or "evaluate"
# (`gpt2tune evaluate --mlflow`), so `tags.gpt2tune.kind = 'train'` lists the trainings only.
KIND_TAG = "gpt2tune.kind"

_active: Session | None = None


@contextmanager
def _activate(session: Session, background: bool) -> Iterator[Session]:
    global _active
    if background:
        session.start_sending()
    previous, _active = _active, session
    status = "FAILED"
    try:
        yield session
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _active = previous
        try:
            if not session.ended:  # end_run() already set the status
                session.call({"op": "status", "status": status, "ts": _now_ms()})
        finally:
            session.finish()


def _write_run_file(session: Session) -> None:
    MLFLOW_RUN.parent.mkdir(parents=True, exist_ok=True)
    info = {"run_id": session.run_id, "experiment_id": session.experiment_id,
            "tracking_uri": redact(session.uri)}  # fmt: skip
    if session.offline or session.kept():
        info["offline_file"] = display_path(session.journal)
    write_text_atomic(MLFLOW_RUN, json.dumps(info, indent=2) + "\n")


def _open(session: Session, prepare) -> str | None:
    """Reach the store and run `prepare` (which may create the run) within start_timeouts();
    the reason if the store is away (the session is then offline). Errors that waiting
    cannot cure raise."""
    try:
        with start_timeouts():
            session.connect()
            prepare()
            session.catch_up()  # creates an offline-made run; sends what was kept
    except Exception as e:
        if isinstance(e, Gpt2tuneError) or not transient(session.uri, e):
            raise
        return reason(e)
    return None


# The tag naming the run folder (absolute) of a training's run: a RUNNING run of the same
# folder found at the next start of that folder is one whose training died.
RUN_FOLDER_TAG = "gpt2tune.run_folder"


@contextmanager
def training_run(
    cfg: MlflowParams,
    params: dict,
    run_id: str | None = None,
    record: bool = True,
    *,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    kind: str = "train",
    run_folder: Path | None = None,
):
    """Start (or, given `run_id` of a resumed training, reopen) the run and record its id
    in metrics/mlflow_run.json (not with `record=False`: a run of its own, such as
    `gpt2tune evaluate --mlflow`). A store that is away does not stop training (see above).
    A new run is called `name` (default: the DVC experiment's name) and gets `tags` too, and
    the tag KIND_TAG = `kind` ("train", "evaluate"), which a search filter can select on; a
    reopened one whose `params` changed (more `train.steps`) is renamed `name` and gets a
    ``continued.<key>`` tag per changed param (params cannot change in MLflow).

    With `run_folder`, the training's checkpoint folder: the run is tagged with it, and the
    run metrics/mlflow_run.json named, if it is of the same folder and still RUNNING (its
    training was killed before its first checkpoint, so nothing resumes it), is marked KILLED.
    A resumed run made offline whose journal is gone continues in a new run (one line says so).
    """
    session = Session(cfg, run_id or "")
    name = name or os.environ.get("DVC_EXP_NAME")
    all_tags = {**run_tags(), KIND_TAG: kind, **(tags or {})}
    if run_folder is not None:
        all_tags[RUN_FOLDER_TAG] = str(Path(run_folder).resolve())
    previous = _recorded_run_id(MLFLOW_RUN) if record and run_folder is not None else None
    _restart_lost(session, params, all_tags, name)

    def prepare() -> None:
        if session.run_id and not session.run_id.startswith(OFFLINE_PREFIX):
            try:
                session.client.get_run(session.run_id)
                session.client.update_run(session.run_id, status="RUNNING")
            except Exception as e:
                if not missing(e):
                    raise
                session.run_id = session.local_id = ""  # the store was reset: a new run
        if not session.run_id:
            session.create_run(params, all_tags, name)
        if previous:
            _end_abandoned(session, previous, all_tags[RUN_FOLDER_TAG])

    why = _open(session, prepare)
    if why is not None and not session.run_id:  # made later, from the journal's first record
        session.run_id = session.local_id = journal.new_offline_id()
        journal.append(session.journal, _start_record(params, all_tags, name))
    if why is not None:
        session.went_offline(why)
    if record:
        _write_run_file(session)
    try:
        with _activate(session, background=True):
            if run_id:  # after the journal's records, if any, so that it applies to the run
                session.call({"op": "continue", "params": params, "name": name})
            yield session
    finally:  # also after a failure or a stop: what was kept is sent if the server is back
        _wind_up(session, record)


def _start_record(params: dict, tags: dict[str, str], name: str | None) -> dict:
    """The journal record that creates a run made offline, when it is replayed."""
    kept = {k: param_value(v) for k, v in params.items()}
    return {"op": "start", "params": kept, "tags": tags, "name": name, "ts": _now_ms()}


def _restart_lost(session: Session, params: dict, tags: dict[str, str], name: str | None):
    """A run made offline whose journal is gone is made anew: a new journal begins with the
    record that creates it, so that replaying it (now, or once the store answers) makes a new
    MLflow run and maps the offline id to it, for the stages after this one too."""
    if session.lost():
        print(
            f"warning: MLflow run {session.run_id} was made offline and its journal "
            f"{display_path(session.journal)} is not here (not copied with the run folder?); "
            "its records so far are lost: going on in a new MLflow run",
            file=sys.stderr,
        )
        journal.append(session.journal, _start_record(params, tags, name))


def _end_abandoned(session: Session, run_id: str, run_folder: str) -> None:
    """Mark `run_id` KILLED if it is a RUNNING run of `run_folder` other than this one: its
    training died (kill -9, a power cut) before its first checkpoint, so none will resume it.
    The run-folder lock the train stage holds means no training of that folder is alive."""
    run_id = journal.mapped_run_id(run_id) or run_id
    if run_id == session.run_id or run_id.startswith(OFFLINE_PREFIX):
        return
    try:
        old = session.client.get_run(run_id)
    except Exception as e:
        if missing(e):
            return
        raise
    if old.info.status == "RUNNING" and old.data.tags.get(RUN_FOLDER_TAG) == run_folder:
        session.client.set_terminated(run_id, status="KILLED")
        print(f"marked MLflow run {run_id} KILLED: its training in {display_path(run_folder)} "
              "stopped before its first checkpoint", file=sys.stderr)  # fmt: skip


def _recorded_run_id(run_file: Path) -> str | None:
    """The run id in metrics/mlflow_run.json (`run_file`), None if there is none."""
    try:
        run_id = json.loads(Path(run_file).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run_id if isinstance(run_id, str) and run_id else None


def _wind_up(session: Session, record: bool = True) -> None:
    if record:
        _write_run_file(session)  # the real id, if the store came back during training
    if session.offline or session.kept():
        print(
            f"warning: MLflow store {redact(session.uri)} is still unreachable; this "
            f"training's records are kept in {display_path(session.journal)} and are sent by the "
            "next stage that reaches it (assemble, sample) or `gpt2tune replay`",
            file=sys.stderr,
        )


@contextmanager
def reopen_run(cfg: MlflowParams, run_file: Path = MLFLOW_RUN, params: dict | None = None):
    """Reopen the training's run (from `metrics/mlflow_run.json`) to add artifacts to it;
    first send whatever the training kept offline. A run made offline whose journal is gone
    is made anew, with `params` (one line says so)."""
    run_id = _recorded_run_id(run_file)
    if run_id is None:
        raise Gpt2tuneError(f"{run_file} is missing or unreadable: run `dvc repro train` first")
    session = Session(cfg, run_id)
    _restart_lost(session, params or {}, run_tags(), os.environ.get("DVC_EXP_NAME"))

    def prepare() -> None:
        if not session.run_id.startswith(OFFLINE_PREFIX):
            try:
                session.client.get_run(session.run_id)
            except Exception as e:
                if not missing(e):
                    raise
                raise Gpt2tuneError(
                    f"MLflow run {session.run_id} named in {run_file} is not in "
                    f"{redact(session.uri)}; rerun training with `dvc repro -f train`"
                ) from None

    why = _open(session, prepare)
    if why is not None:
        session.went_offline(why)
    # No training steps to keep going here, and a model folder's upload may take minutes:
    # calls are made in the stage's thread. A store found away at the start is not tried
    # again within the stage (the next one, or `python -m gpt2tune.tracking.run`, replays).
    session.next_try = float("inf") if session.offline else 0.0
    with _activate(session, background=False):
        yield session


def flush(timeout_s: float = 60.0) -> bool:
    """Wait at most `timeout_s` until every call made so far is sent or kept in the journal
    (True if so). Stages need not call it: leaving the run does, with a short deadline."""
    outbox = _current().outbox
    return outbox is None or outbox.drain(timeout_s)


def _current() -> Session:
    if _active is None:
        raise RuntimeError("no MLflow run is open: call inside training_run() or reopen_run()")
    return _active


def end_run(status: str) -> None:
    """End the open run now with an MLflow status such as "KILLED" (instead of the
    FINISHED / FAILED that leaving training_run or reopen_run would set)."""
    session = _current()
    session.call({"op": "status", "status": status, "ts": _now_ms()})
    session.ended = True


def log_metrics(metrics: dict, step: int) -> None:
    _current().call(
        {
            "op": "metrics",
            "step": int(step),
            "ts": _now_ms(),
            "values": {k: float(v) for k, v in metrics.items()},
        }  # fmt: skip
    )


def log_history(history: dict) -> None:
    """Log a training's loss history (`{"loss": [[step, value], ...], "val_loss": ...}`)
    again, in one call: the run keeps the values it holds, and gains the steps it lacks, such
    as those still queued when a kill -9 stopped the training that saved this history."""
    points = [(key, int(s), float(v)) for key in ("loss", "val_loss") for s, v in history[key]]
    points += [("base_val_loss", 0, float(v)) for s, v in history["val_loss"] if s == 0]
    _current().call({"op": "history", "ts": _now_ms(), "points": points})


def set_tag(key: str, value: str) -> None:
    _current().call({"op": "tags", "tags": {key: str(value)}})


def log_text(text: str, artifact_file: str) -> None:
    _current().call({"op": "text", "text": text, "file": artifact_file})


def log_table(data: dict[str, list], artifact_file: str) -> None:
    """Append rows (column -> values) to the run's MLflow table `artifact_file` (a .json)."""
    _current().call({"op": "table", "data": data, "file": artifact_file})


def log_datasets(records: list[dict]) -> None:
    """Log the training's token sets as the run's dataset inputs (records of
    gpt2tune.tracking.datasets.token_sets); logging them again, as a resumed training does,
    adds nothing."""
    _current().call({"op": "inputs", "datasets": records})


def log_folder(folder: str | os.PathLike, artifact_path: str) -> None:
    path = str(Path(folder).resolve())
    _current().call({"op": "folder", "path": path, "artifact_path": artifact_path})


def log_file(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Upload one file (such as a chart) to the run's artifacts, under `artifact_path`."""
    _current().call(
        {"op": "file", "path": str(Path(path).resolve()), "artifact_path": artifact_path}
    )


def log_model(
    folder: str | os.PathLike,
    sampling_defaults: Any,
    registered_model: str = "gpt2tune",
    alias: str = "candidate",
    caps: ServeParams | None = None,
) -> None:
    """Log `folder` to the open run as an MLflow Model (see gpt2tune.servable) and, unless
    `registered_model` is "", register it as a new version, tagged with its DVC experiment's
    name. `alias` ("" = none) moves to that version only when this runs in the workspace:
    the version of a `dvc exp run --temp/--queue` experiment, whose model is not the one in
    the workspace's models/finetuned, waits for `gpt2tune promote`. `caps` (the serve
    section; None = its defaults) bound what one request to it may ask. Like every call, it
    waits in the offline journal while the server is away."""
    from gpt2tune.servable import caps_dict, defaults_of

    path = Path(folder)
    if not path.is_dir():
        raise Gpt2tuneError(f"model folder {path} does not exist; nothing to log to MLflow")
    exp = os.environ.get("DVC_EXP_NAME", "")
    _current().call({"op": "model", "path": str(path.resolve()),
                     "defaults": defaults_of(sampling_defaults),
                     "serve": caps_dict(caps or ServeParams()),
                     "registered_model": registered_model, "alias": alias,
                     "move_alias": not in_experiment_copy(),
                     "tags": {EXP_TAG: exp} if exp else {}})  # fmt: skip


def _now_ms() -> int:
    return int(time.time() * 1000)
