"""MLflow bookkeeping: one run per training, shared by the train, assemble and sample stages.

The train stage starts the run and records its id in `metrics/mlflow_run.json`; the later
stages reopen that run, so params, loss curves, samples and the assembled model of one
fine-tuning stay together. Relative `sqlite:///` stores resolve against the DVC project root
(`$DVC_ROOT`, which DVC sets to the main workspace also for `dvc exp run --temp/--queue`), so
every experiment lands in the same `mlflow.db` that `mlflow ui` shows.

When the tracking server is away
--------------------------------
An http(s) tracking server that cannot be reached -- down when training starts, or dying
mid-run -- never stops a stage. Whatever could not be sent (the run's creation with its
params and tags, metrics, texts, folders to upload, the final status) is appended, one JSON
line per call, to ``metrics/mlflow_offline/<run id>.jsonl`` at the project root, and a
warning on stderr names that file. A run created while offline gets a local id
``offline-<hex>`` (in `metrics/mlflow_run.json` and the checkpoint's state). The file is
replayed, in order, as soon as the server answers again: tried at most every
``GPT2TUNE_MLFLOW_RETRY_S`` seconds (default 60) while logging, at the end of the stage, and
by every later stage (assemble, sample) or ``python -m gpt2tune.tracking``. Replaying
creates the run if needed (``metrics/mlflow_offline/<offline id>.json`` then maps the local
id to the real one), skips (metric, step) pairs the run already holds, and deletes the file
when everything is in, so a replay that is itself interrupted is simply repeated. Folders are
uploaded from where they are at replay time. A store that is not an http(s) server (sqlite,
a folder) fails loudly instead, since nothing will bring it back by waiting. The journal
files are :mod:`gpt2tune.journal`'s, the MLflow calls :mod:`gpt2tune.mlrun`'s; this module
decides between them (:class:`Session`) and holds the functions the stages call.

Resumed runs: a training that reopens its run logs no (metric, step) pair twice, so the loss
curve of a resumed training has each step once, with the value first recorded.

Credentials for a tracking server come from the environment (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``, or a ``user:password@`` in ``$MLFLOW_TRACKING_URI``); every
address this module prints or writes down goes through :func:`redact`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gpt2tune import journal
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import display_path, project_root, write_text_atomic
from gpt2tune.journal import OFFLINE_PREFIX
from gpt2tune.mlrun import MlflowRun, Unreachable, is_server, param_value, reason
from gpt2tune.params import MlflowParams
from gpt2tune.urls import redact

RUN_FILE = Path("metrics/mlflow_run.json")


def resolve_tracking_uri(uri: str) -> str:
    """params' tracking_uri made absolute: "" = $MLFLOW_TRACKING_URI or the project's mlflow.db."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(project_root() / uri[len(prefix) :])
    return uri


def run_tags() -> dict[str, str]:
    """DVC experiment name and git commit, so an MLflow run leads back to its code."""
    tags = {}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    commit = os.environ.get("DVC_EXP_BASELINE_REV")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = ""
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.commit"] = commit
    return tags


class Session(MlflowRun):
    """One open run: sends each call to MLflow, or to the run's offline journal while the
    server is away. ``run.info.run_id`` is the run's id (``offline-...`` until the server has
    created it).

    The offline state, which every method upholds:

    * ``offline`` is True from the Session's creation and from any failed attempt to reach an
      http(s) server, until the server has answered *and* every journal of this run (that of
      its local ``offline-...`` id, then its own) has been sent in full and deleted; only
      :meth:`_catch_up` sets it False, as its last step.
    * While offline nothing is sent: every call is appended to :attr:`journal`, so the
      journals hold, in order, every call made since the server was last reached. The server
      is tried again no sooner than ``next_try``.
    * While online, no call waits in a journal, so a call sent now is sent after every older
      one: the server sees the calls in the order they were made.
    * A store that is not an http(s) server is never used offline: its failures raise.
    """

    def __init__(self, cfg: MlflowParams, run_id: str) -> None:
        # The id it had before the server made it, whose journal may still hold records.
        self.local_id = run_id if run_id.startswith(OFFLINE_PREFIX) else None
        run_id = (self.local_id and journal.mapped_run_id(self.local_id)) or run_id
        super().__init__(resolve_tracking_uri(cfg.tracking_uri), cfg.experiment, run_id)
        self.offline = True  # not reached yet
        self.next_try = 0.0
        self.warned = False
        self.ended = False

    @property
    def info(self) -> Session:  # `run.info.run_id`, as on an mlflow Run
        return self

    @property
    def journal(self) -> Path:
        return journal.journal_path(self.run_id)

    def call(self, op: dict) -> None:
        """Send one operation to MLflow, or append it to the journal."""
        if self._try_online():
            try:
                self.send(op)
                return
            except Exception as e:
                if not is_server(self.uri):
                    raise
                self._went_offline(reason(e))
        journal.append(self.journal, op)

    def _catch_up(self) -> None:
        """Send this run's journals, oldest first, creating the run if only they know it;
        then the session is online. Unreachable if the server fails meanwhile."""
        if self.local_id:
            self.run_id = journal.mapped_run_id(self.local_id) or self.run_id
            journal.replay(self, journal.journal_path(self.local_id), self.local_id)
        if not self.run_id.startswith(OFFLINE_PREFIX):
            journal.replay(self, self.journal, None)
        self.offline = False

    def _try_online(self) -> bool:
        """True if online, or back online now (the server answers again and the journals are
        sent); False while the server is away or before next_try."""
        if not self.offline:
            return True
        if time.monotonic() < self.next_try:
            return False
        try:
            self.connect()
            self._catch_up()
        except Unreachable:
            self._went_offline(None)
            return False
        print(
            f"MLflow server {redact(self.uri)} is back; the kept records are in run {self.run_id}",
            file=sys.stderr,
        )
        return True

    def _went_offline(self, why: str | None) -> None:
        """The server failed (`why`, warned about once; None: a retry failed again)."""
        self.offline = True
        self.next_try = time.monotonic() + float(os.environ.get("GPT2TUNE_MLFLOW_RETRY_S", "60"))
        if why is not None and not self.warned:
            self.warned = True
            print(
                f"warning: MLflow tracking server {redact(self.uri)} is unreachable ({why}); "
                f"carrying on, with what it misses kept in {display_path(self.journal)} and "
                "sent when it answers again (or by the next stage, or "
                "`python -m gpt2tune.tracking`)",
                file=sys.stderr,
            )


def replay_pending(cfg: MlflowParams) -> int:
    """Send every journal under metrics/mlflow_offline to the server; return how many
    remain (0: all sent). Gpt2tuneError if the server is still unreachable."""
    files = journal.pending()
    for path in files:
        session = Session(cfg, path.stem)
        try:
            session.connect()
            session._catch_up()
        except Unreachable as e:
            raise Gpt2tuneError(
                f"MLflow server {redact(session.uri)} is still unreachable ({e}); "
                f"{len(files)} offline file(s) kept in {display_path(journal.offline_dir())}"
            ) from None
    return len(journal.pending())


# ------------------------------------------------------------------- the public functions

_active: Session | None = None


@contextmanager
def _activate(session: Session) -> Iterator[Session]:
    global _active
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
        if not session.ended:  # end_run() already set the status
            session.call({"op": "status", "status": status, "ts": _now_ms()})


def _write_run_file(session: Session) -> None:
    RUN_FILE.parent.mkdir(parents=True, exist_ok=True)
    info = {"run_id": session.run_id, "experiment_id": session.experiment_id,
            "tracking_uri": redact(session.uri)}  # fmt: skip
    if session.offline:
        info["offline_file"] = display_path(session.journal)
    write_text_atomic(RUN_FILE, json.dumps(info, indent=2) + "\n")


@contextmanager
def training_run(cfg: MlflowParams, params: dict, run_id: str | None = None):
    """Start (or, given `run_id` of a resumed training, reopen) the run and record its id
    in metrics/mlflow_run.json. A server that is away does not stop training (see above)."""
    session = Session(cfg, run_id or "")
    name = os.environ.get("DVC_EXP_NAME") if run_id is None else None
    try:
        session.connect()
        if session.run_id and not session.run_id.startswith(OFFLINE_PREFIX):
            try:
                session.client.get_run(session.run_id)
                session.client.update_run(session.run_id, status="RUNNING")
            except Exception:
                session.run_id = session.local_id = ""  # the store was reset: a new run
        if not session.run_id:
            session.create_run(params, run_tags(), name)
        session._catch_up()  # creates an offline-made run; sends what was kept
    except Exception as e:
        if isinstance(e, Gpt2tuneError) or not is_server(session.uri):
            raise
        if not session.run_id:  # the run is made later, from the journal's first record
            session.run_id = session.local_id = journal.new_offline_id()
            params = {k: param_value(v) for k, v in params.items()}
            start = {"op": "start", "params": params, "tags": run_tags(), "name": name,
                     "ts": _now_ms()}  # fmt: skip
            journal.append(session.journal, start)
        session._went_offline(reason(e))
    _write_run_file(session)
    try:
        with _activate(session):
            yield session
    finally:  # also after a failure or a stop: what was kept is sent if the server is back
        _wind_up(session)


def _wind_up(session: Session) -> None:
    if session.offline:
        session.next_try = 0.0  # one last try before the stage ends
        session._try_online()
    _write_run_file(session)  # the real id, if the server came back during training
    if session.offline:
        print(
            f"warning: MLflow server {redact(session.uri)} is still unreachable; this "
            f"training's records are kept in {display_path(session.journal)} and are sent by the "
            "next stage that reaches it (assemble, sample) or `python -m gpt2tune.tracking`",
            file=sys.stderr,
        )


@contextmanager
def reopen_run(cfg: MlflowParams, run_file: Path = RUN_FILE):
    """Reopen the training's run (from `metrics/mlflow_run.json`) to add artifacts to it;
    first send whatever the training kept offline."""
    try:
        run_id = json.loads(Path(run_file).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        run_id = None
    if not isinstance(run_id, str) or not run_id:
        raise Gpt2tuneError(
            f"{run_file} is missing or unreadable: run `dvc repro train` first"
        ) from None
    session = Session(cfg, run_id)
    try:
        session.connect()
        if not session.run_id.startswith(OFFLINE_PREFIX):
            try:
                session.client.get_run(session.run_id)
            except Exception:
                raise Gpt2tuneError(
                    f"MLflow run {session.run_id} named in {run_file} is not in "
                    f"{redact(session.uri)}; rerun training with `dvc repro -f train`"
                ) from None
        session._catch_up()
    except Exception as e:
        if isinstance(e, Gpt2tuneError) or not is_server(session.uri):
            raise
        session._went_offline(reason(e))
    with _activate(session):
        yield session


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


def log_text(text: str, artifact_file: str) -> None:
    _current().call({"op": "text", "text": text, "file": artifact_file})


def log_table(data: dict[str, list], artifact_file: str) -> None:
    """Append rows (column -> values) to the run's MLflow table `artifact_file` (a .json)."""
    _current().call({"op": "table", "data": data, "file": artifact_file})


def log_folder(folder: str | os.PathLike, artifact_path: str) -> None:
    path = str(Path(folder).resolve())
    _current().call({"op": "folder", "path": path, "artifact_path": artifact_path})


def log_model(folder: str | os.PathLike, spec: dict) -> None:
    """Log `folder` as an MLflow Model, as gpt2tune.servable.log_and_register describes."""
    _current().call({"op": "model", "path": str(Path(folder).resolve()), **spec})


def _now_ms() -> int:
    return int(time.time() * 1000)


if __name__ == "__main__":  # python -m gpt2tune.tracking: send what was kept offline
    from gpt2tune.params import load_params
    from gpt2tune.stage import run_stage

    def _main() -> None:
        left = replay_pending(load_params("params.yaml").mlflow)
        print("all kept MLflow records are sent" if not left else f"{left} file(s) left")

    sys.exit(run_stage(_main))
