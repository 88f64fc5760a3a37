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
a folder) fails loudly instead, since nothing will bring it back by waiting.

Resumed runs: a training that reopens its run logs no (metric, step) pair twice, so the loss
curve of a resumed training has each step once, with the value first recorded.

Credentials for a tracking server come from the environment (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``, or a ``user:password@`` in ``$MLFLOW_TRACKING_URI``); every
address this module prints or writes down goes through :func:`redact`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import write_text_atomic
from gpt2tune.params import MlflowParams

RUN_FILE = Path("metrics/mlflow_run.json")
OFFLINE_DIR = Path("metrics/mlflow_offline")  # below the project root
OFFLINE_PREFIX = "offline-"
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit

# MLflow's HTTP defaults retry for minutes; a tool should say "unreachable" in seconds.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def resolve_tracking_uri(uri: str) -> str:
    """params' tracking_uri made absolute: "" = $MLFLOW_TRACKING_URI or the project's mlflow.db."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(project_root() / uri[len(prefix) :])
    return uri


def redact(text: str) -> str:
    """`text` with the ``user:password@`` of every URL in it replaced by ``***@``."""
    return _USERINFO.sub("***@", text)


def _is_server(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def _offline_dir() -> Path:
    return project_root() / OFFLINE_DIR


def _reason(e: BaseException) -> str:
    """One short, credential-free line about a failed MLflow call."""
    text = " ".join(str(e).split())
    if isinstance(e, _Unreachable):
        return text  # already made by _reason
    if "NewConnectionError" in text or "Connection refused" in text:
        return "connection refused"
    if "too many 5" in text:  # urllib3's "too many 500 error responses"
        return "the server keeps answering HTTP 5xx"
    if "timed out" in text.lower():
        return "timed out"
    return redact(text)[:200] or type(e).__name__


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


def _param_value(v) -> str:
    # MLflow caps a param value at 6000 characters; long prompt lists are cut, not rejected.
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


class _Unreachable(Exception):
    """The tracking server did not answer; the caller buffers instead."""


class Session:
    """One open run: sends each call to MLflow, or to the offline file while it is away.

    ``run.info.run_id`` is the run's id (``offline-...`` until the server has created it).
    """

    def __init__(self, cfg: MlflowParams, run_id: str) -> None:
        self.uri = resolve_tracking_uri(cfg.tracking_uri)
        self.experiment = cfg.experiment
        # The id it had before the server made it, whose offline file may still hold records.
        self.local_id = run_id if run_id.startswith(OFFLINE_PREFIX) else None
        self.run_id = (self.local_id and _mapped(self.local_id)) or run_id
        self.experiment_id: str | None = None
        self.client = None
        self.seen: set[tuple[str, int]] | None = None  # (key, step) pairs the run holds
        self.offline = False
        self.next_try = 0.0
        self.warned = False
        self.ended = False

    @property
    def info(self) -> Session:  # `run.info.run_id`, as on an mlflow Run
        return self

    # --------------------------------------------------------------- connection

    def connect(self) -> None:
        """Reach the store and the experiment; _Unreachable for a server that is away,
        Gpt2tuneError for a store that is misconfigured."""
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                self.experiment_id = exp.experiment_id
            else:
                location = None
                if self.uri.startswith("sqlite:"):
                    # MLflow would put artifacts in ./mlruns of the current folder, which for
                    # `dvc exp run --temp` is a temporary copy; keep them beside mlflow.db.
                    location = (project_root() / "mlartifacts").as_uri()
                self.experiment_id = self.client.create_experiment(
                    self.experiment, artifact_location=location
                )
        except Exception as e:
            if _is_server(self.uri):
                raise _Unreachable(_reason(e)) from None
            raise Gpt2tuneError(
                f"cannot use the MLflow tracking store {redact(self.uri)} "
                f"(params.yaml mlflow.tracking_uri): {_reason(e)}"
            ) from None

    def _try_online(self) -> bool:
        """Back online if the server answers (and the offline file is replayed); False if not."""
        if not self.offline:
            return True
        if time.monotonic() < self.next_try:
            return False
        try:
            self.connect()
            self._replay_own()
        except _Unreachable:
            self._went_offline(None)
            return False
        self.offline = False
        print(
            f"MLflow server {redact(self.uri)} is back; the kept records are in run {self.run_id}",
            file=sys.stderr,
        )
        return True

    def _went_offline(self, reason: str | None) -> None:
        self.offline = True
        self.next_try = time.monotonic() + float(os.environ.get("GPT2TUNE_MLFLOW_RETRY_S", "60"))
        if reason is not None and not self.warned:
            self.warned = True
            print(
                f"warning: MLflow tracking server {redact(self.uri)} is unreachable ({reason}); "
                f"carrying on, with what it misses kept in {_display(self.buffer)} and sent "
                "when it answers again (or by the next stage, or `python -m gpt2tune.tracking`)",
                file=sys.stderr,
            )

    @property
    def buffer(self) -> Path:
        return _offline_dir() / f"{self.run_id}.jsonl"

    # --------------------------------------------------------------- calls

    def call(self, op: dict) -> None:
        """Send one operation to MLflow, or append it to the offline file."""
        if self._try_online():
            try:
                self._send(op)
                return
            except Exception as e:
                if not _is_server(self.uri):
                    raise
                self._went_offline(_reason(e))
        _append(self.buffer, op)

    def _send(self, op: dict) -> None:
        from mlflow.entities import Metric

        kind, c = op["op"], self.client
        if kind == "metrics":
            seen = self._seen()
            fresh = {k: v for k, v in op["values"].items() if (k, op["step"]) not in seen}
            metrics = [Metric(k, float(v), op["ts"], op["step"]) for k, v in fresh.items()]
            for i in range(0, len(metrics), METRICS_PER_BATCH):
                c.log_batch(self.run_id, metrics=metrics[i : i + METRICS_PER_BATCH])
            seen.update((k, op["step"]) for k in fresh)
        elif kind == "text":
            c.log_text(self.run_id, op["text"], op["file"])
        elif kind == "folder":
            if Path(op["path"]).is_dir():
                c.log_artifacts(self.run_id, op["path"], op["artifact_path"])
        elif kind == "status":  # update_run would leave end_time unset: no duration in the UI
            c.set_terminated(self.run_id, status=op["status"], end_time=op.get("ts"))
        elif kind == "model":
            from gpt2tune.servable import send_model

            send_model(self.uri, self.run_id, op)
        else:
            raise ValueError(f"unknown offline record {kind!r}")

    def _seen(self) -> set[tuple[str, int]]:
        if self.seen is None:
            run = self.client.get_run(self.run_id)
            self.seen = {
                (key, m.step)
                for key in run.data.metrics
                for m in self.client.get_metric_history(self.run_id, key)
            }
        return self.seen

    def create_run(
        self, params: dict[str, object], tags: dict[str, str], name: str | None, start=None
    ):
        """Create the run on the server with its params; MLflow adds its usual tags. `start`:
        when it began (ms), for a run made offline, so that its duration is the real one."""
        from mlflow.entities import Param
        from mlflow.tracking.context.registry import resolve_tags

        run = self.client.create_run(
            self.experiment_id, start_time=start, run_name=name, tags=resolve_tags(tags)
        )
        self.run_id = run.info.run_id
        self.seen = set()
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    # --------------------------------------------------------------- replay

    def _replay_own(self) -> None:
        """Send this run's offline files, oldest first, creating the run if only they know it."""
        if self.local_id:
            self.run_id = _mapped(self.local_id) or self.run_id
            _replay_file(self, _offline_dir() / f"{self.local_id}.jsonl", self.local_id)
        if not self.run_id.startswith(OFFLINE_PREFIX):
            _replay_file(self, _offline_dir() / f"{self.run_id}.jsonl", None)


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _append(path: Path, op: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(op, ensure_ascii=False) + "\n")
        fh.flush()  # a crash right after loses nothing the call reported as kept


def _read_ops(path: Path) -> list[dict]:
    ops = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            ops.append(json.loads(line))
        except ValueError:
            pass  # the half line of a process killed mid-write; the call it recorded never returned
    return ops


def _mapped(offline_id: str) -> str | None:
    """The real run id a local ``offline-...`` id was replayed into, if it was."""
    try:
        return json.loads((_offline_dir() / f"{offline_id}.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def _replay_file(session: Session, path: Path, offline_id: str | None) -> None:
    """Send the operations kept in `path` to `session`'s server, then delete the file."""
    if not path.exists():
        return
    ops = _read_ops(path)
    try:
        if offline_id and session.run_id == offline_id:  # the run itself is still to be made
            start = next((op for op in ops if op["op"] == "start"), None)
            if start is None:
                raise Gpt2tuneError(f"{path} lacks the record that creates run {offline_id}")
            session.create_run(start["params"], start["tags"], start.get("name"), start.get("ts"))
            write_text_atomic(
                _offline_dir() / f"{offline_id}.json", json.dumps({"run_id": session.run_id})
            )
        for op in ops:
            if op["op"] != "start":
                session._send(op)
    except Gpt2tuneError:
        raise
    except Exception as e:
        raise _Unreachable(_reason(e)) from None
    path.unlink()
    print(f"sent {len(ops)} kept MLflow record(s) from {_display(path)}", file=sys.stderr)


def replay_pending(cfg: MlflowParams) -> int:
    """Send every offline file under metrics/mlflow_offline to the server; return how many
    files remain (0: all sent). Gpt2tuneError if the server is still unreachable."""
    folder = _offline_dir()
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    for path in files:
        session = Session(cfg, path.stem)
        try:
            session.connect()
            session._replay_own()
        except _Unreachable as e:
            raise Gpt2tuneError(
                f"MLflow server {redact(session.uri)} is still unreachable ({e}); "
                f"{len(files)} offline file(s) kept in {_display(folder)}"
            ) from None
    return len(list(folder.glob("*.jsonl"))) if folder.is_dir() else 0


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
            session.call({"op": "status", "status": status, "ts": int(time.time() * 1000)})


def _write_run_file(session: Session) -> None:
    RUN_FILE.parent.mkdir(parents=True, exist_ok=True)
    info = {"run_id": session.run_id, "experiment_id": session.experiment_id,
            "tracking_uri": redact(session.uri)}  # fmt: skip
    if session.offline:
        info["offline_file"] = _display(session.buffer)
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
        if session.run_id:
            session._replay_own()  # creates an offline-made run; sends what was kept
        else:
            session.create_run(params, run_tags(), name)
    except Exception as e:
        if isinstance(e, Gpt2tuneError) or not _is_server(session.uri):
            raise
        if not session.run_id:
            session.run_id = session.local_id = OFFLINE_PREFIX + uuid.uuid4().hex
            params = {k: _param_value(v) for k, v in params.items()}
            _append(session.buffer, {"op": "start", "params": params, "tags": run_tags(),
                                     "name": name, "ts": int(time.time() * 1000)})  # fmt: skip
        session._went_offline(_reason(e))
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
            f"training's records are kept in {_display(session.buffer)} and are sent by the "
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
        session._replay_own()
    except Exception as e:
        if isinstance(e, Gpt2tuneError) or not _is_server(session.uri):
            raise
        session._went_offline(_reason(e))
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
    session.call({"op": "status", "status": status, "ts": int(time.time() * 1000)})
    session.ended = True


def log_metrics(metrics: dict, step: int) -> None:
    _current().call(
        {
            "op": "metrics",
            "step": int(step),
            "ts": int(time.time() * 1000),
            "values": {k: float(v) for k, v in metrics.items()},
        }  # fmt: skip
    )


def log_text(text: str, artifact_file: str) -> None:
    _current().call({"op": "text", "text": text, "file": artifact_file})


def log_folder(folder: str | os.PathLike, artifact_path: str) -> None:
    path = str(Path(folder).resolve())
    _current().call({"op": "folder", "path": path, "artifact_path": artifact_path})


def log_model(folder: str | os.PathLike, spec: dict) -> None:
    """Log `folder` as an MLflow Model, as gpt2tune.servable.log_and_register describes."""
    path = str(Path(folder).resolve())
    _current().call({"op": "model", "path": path, **spec})


if __name__ == "__main__":  # python -m gpt2tune.tracking: send what was kept offline
    from gpt2tune.errors import run_stage
    from gpt2tune.params import load_params

    def _main() -> None:
        left = replay_pending(load_params("params.yaml").mlflow)
        print("all kept MLflow records are sent" if not left else f"{left} file(s) left")

    sys.exit(run_stage(_main))
