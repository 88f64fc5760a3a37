"""One MLflow run on a tracking store, through MlflowClient: reach the store and the
experiment, create the run, and send the calls gpt2tune makes (metrics, texts, folders, the
status). It knows nothing of a server being away; gpt2tune.tracking.session.Session adds that.

Calls are plain dicts (``{"op": "metrics", ...}``) so that the same record can be sent now or
written to the offline journal and sent later. A metric (key, step) the run already holds is
never sent again, so a resumed training's loss curve has each step once, with the value first
recorded.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import LockBusy, exclusive_lock, project_root
from gpt2tune.urls import redact

METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
PARAMS_PER_BATCH = 100  # and its limit for params
CONTINUED_PREFIX = "continued."  # tags of a resumed run's changed settings (MlflowRun._continue)

# MLflow's HTTP defaults retry for minutes; a tool should say "unreachable" in seconds. These
# are for the calls the sender thread makes during training (gpt2tune.tracking.outbox), which never
# hold up a step; the calls a stage waits for get start_timeouts() instead. Set for this
# process only (a user's own values win), since MLflow reads them at every request.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def wait_s() -> float:
    """Seconds a stage waits for an unresponsive store at its start, and again at its end."""
    return float(os.environ.get("GPT2TUNE_MLFLOW_WAIT_S", "3"))


@contextmanager
def start_timeouts() -> Iterator[None]:
    """MLflow HTTP calls without retries and with a wait_s() timeout, for the calls a stage
    makes before it starts (reach the server, create the run): a server that accepts and
    never answers then costs one timeout, not three. Only while nothing else of ours calls
    MLflow (the sender thread is started after)."""
    keys = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({keys[0]: str(max(1, round(wait_s()))), keys[1]: "0"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Unreachable(Exception):
    """The tracking server did not answer; the caller keeps the call for later."""


def is_server(uri: str) -> bool:
    """An http(s) tracking server, which may come back; other stores fail loudly instead."""
    return uri.lower().startswith(("http://", "https://"))


def transient(uri: str, e: BaseException) -> bool:
    """A failure that waiting may cure: any failure of an http(s) server, or a sqlite store
    that another process holds locked ("database is locked" after MLflow's busy timeout)."""
    return is_server(uri) or isinstance(e, Unreachable) or "database is locked" in str(e)


def missing(e: BaseException) -> bool:
    """MLflow's answer for a run (or experiment) the store does not hold."""
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def reason(e: BaseException) -> str:
    """One short, credential-free line about a failed MLflow call."""
    text = " ".join(str(e).split())
    if isinstance(e, Unreachable):
        return text  # already made by reason()
    if "NewConnectionError" in text or "Connection refused" in text:
        return "connection refused"
    if "database is locked" in text:
        return "the sqlite store is locked by another process"
    if "too many 5" in text:  # urllib3's "too many 500 error responses"
        return "the server keeps answering HTTP 5xx"
    if "timed out" in text.lower():
        return "timed out"
    return redact(text)[:200] or type(e).__name__


def param_value(v) -> str:
    # MLflow caps a param value at 6000 characters; long prompt lists are cut, not rejected.
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def resolve_tracking_uri(uri: str) -> str:
    """params' tracking_uri made absolute: "" = $MLFLOW_TRACKING_URI or the project's mlflow.db."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(project_root() / uri[len(prefix) :])
    return uri


EXP_TAG = "dvc.exp_name"  # the DVC experiment of a run, and of a registered model version

# What an experiment is for, to MLflow 3's UI: model training, not a GenAI app (whose page
# opens on traces). A kind the experiment already has (the user's) is left as it is.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"

# How long a stage waits for another process to finish opening (creating) a sqlite store.
STORE_LOCK_WAIT_S = 300.0


def store_lock(uri: str) -> Path | None:
    """The lock file beside a sqlite store's file (`mlflow.db.lock`), None for other stores.

    MLflow creates a sqlite store's schema when it first opens the file; two processes doing
    so at once (`dvc queue start -j 2` in a project without mlflow.db) both run the
    migrations and one fails ("duplicate column name: step"), as two creating the experiment
    at once would ("UNIQUE constraint failed"). MlflowRun.connect holds this lock meanwhile."""
    prefix = "sqlite:///"
    path = uri[len(prefix) :].split("?")[0] if uri.startswith(prefix) else ""
    return Path(path + ".lock") if path and path != ":memory:" else None


def run_tags() -> dict[str, str]:
    """DVC experiment name and git commit, so an MLflow run leads back to its code."""
    tags = {}
    if os.environ.get("DVC_EXP_NAME"):
        tags[EXP_TAG] = os.environ["DVC_EXP_NAME"]
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


class MlflowRun:
    """Run `run_id` of `experiment` on the store at `uri` (an absolute tracking URI)."""

    def __init__(self, uri: str, experiment: str, run_id: str) -> None:
        self.uri, self.experiment, self.run_id = uri, experiment, run_id
        self.experiment_id: str | None = None
        self.client = None
        self.seen: set[tuple[str, int]] | None = None  # (key, step) pairs the run holds

    def connect(self) -> None:
        """Reach the store and the experiment; Unreachable for a server that is away,
        Gpt2tuneError for a store that is misconfigured."""
        from mlflow.tracking import MlflowClient

        deleted, self.experiment_id = None, None
        lock = store_lock(self.uri)
        try:
            with exclusive_lock(lock, STORE_LOCK_WAIT_S) if lock else nullcontext():
                self.client = MlflowClient(tracking_uri=self.uri)  # creates a new store's schema
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is not None and exp.lifecycle_stage == "deleted":
                    deleted = exp.experiment_id
                elif exp is not None:
                    self.experiment_id = exp.experiment_id
                    if KIND_TAG not in exp.tags:  # made before gpt2tune tagged experiments
                        try:
                            self.client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
                        except Exception:  # noqa: BLE001 - a label: never a reason to stop
                            pass
                else:
                    location = None
                    if self.uri.startswith("sqlite:"):
                        # MLflow would put artifacts in ./mlruns of the current folder, which
                        # for `dvc exp run --temp` is a temporary copy; keep them beside
                        # mlflow.db.
                        location = (project_root() / "mlartifacts").as_uri()
                    self.experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=location, tags={KIND_TAG: KIND}
                    )
        except LockBusy as e:  # as for a sqlite store locked by another process: wait later
            raise Unreachable(
                f"process {e.holder} has been opening the sqlite store for "
                f"{STORE_LOCK_WAIT_S:g} s ({lock})"
            ) from None
        except Exception as e:
            if transient(self.uri, e):
                raise Unreachable(reason(e)) from None
            raise Gpt2tuneError(
                f"cannot use the MLflow tracking store {redact(self.uri)} "
                f"(params.yaml mlflow.tracking_uri): {reason(e)}"
            ) from None
        if self.experiment_id is None:  # waiting would not bring a deleted experiment back
            raise Gpt2tuneError(
                f"MLflow experiment {self.experiment!r} (params.yaml mlflow.experiment) is "
                f"deleted in {redact(self.uri)}: restore it with `mlflow experiments restore "
                f"--experiment-id {deleted}` or set another mlflow.experiment"
            )

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
        items = [Param(k, param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH])

    def send(self, op: dict) -> None:
        """Make the call `op` records; MLflow's exception if it fails."""
        from mlflow.entities import Metric

        kind, c = op["op"], self.client
        if kind in ("metrics", "history"):
            if kind == "metrics":
                points = [(k, op["step"], v) for k, v in op["values"].items()]
            else:  # a saved loss history logged again: only the steps the run lacks go out
                points = [tuple(point) for point in op["points"]]
            seen = self._seen()
            fresh = [(k, step, v) for k, step, v in points if (k, step) not in seen]
            metrics = [Metric(k, float(v), op["ts"], step) for k, step, v in fresh]
            for i in range(0, len(metrics), METRICS_PER_BATCH):
                c.log_batch(self.run_id, metrics=metrics[i : i + METRICS_PER_BATCH])
            seen.update((k, step) for k, step, _ in fresh)
        elif kind == "text":
            c.log_text(self.run_id, op["text"], op["file"])
        elif kind == "table":  # appended to the run's table of that name
            c.log_table(self.run_id, op["data"], op["file"])
        elif kind == "folder":
            if os.path.isdir(op["path"]):
                c.log_artifacts(self.run_id, op["path"], op["artifact_path"])
        elif kind == "tags":
            for k, v in op["tags"].items():
                c.set_tag(self.run_id, k, v)
        elif kind == "file":
            if os.path.isfile(op["path"]):
                c.log_artifact(self.run_id, op["path"], op.get("artifact_path"))
        elif kind == "continue":
            self._continue(op["params"], op.get("name"))
        elif kind == "status":  # update_run would leave end_time unset: no duration in the UI
            c.set_terminated(self.run_id, status=op["status"], end_time=op.get("ts"))
        elif kind == "inputs":  # the token sets (gpt2tune.tracking.datasets); MLflow dedups
            from gpt2tune.tracking.datasets import dataset_inputs

            c.log_inputs(self.run_id, datasets=dataset_inputs(op["datasets"]))
        elif kind == "model":
            from gpt2tune.servable import send_model

            send_model(self.uri, self.run_id, op)
        else:
            raise ValueError(f"unknown offline record {kind!r}")

    def _continue(self, params: dict[str, object], name: str | None) -> None:
        """A resumed training's settings, on the run it continues. MLflow params cannot
        change: a param the run holds with another value gets the new one as the tag
        ``continued.<key>`` (``continued.train.steps``), one it lacks is logged, and the run
        takes the new `name` ("tiny 30 steps ...", not the "20 steps" it began with)."""
        from mlflow.entities import Param, RunTag

        held = self.client.get_run(self.run_id).data.params
        values = {k: param_value(v) for k, v in params.items()}
        changed = {k: v for k, v in values.items() if k in held and held[k] != v}
        fresh = [Param(k, v) for k, v in values.items() if k not in held]
        tags = [RunTag(CONTINUED_PREFIX + k, v) for k, v in changed.items()]
        if changed and name:
            tags.append(RunTag("mlflow.runName", name))
        for i in range(0, len(fresh), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=fresh[i : i + PARAMS_PER_BATCH])
        if tags:
            self.client.log_batch(self.run_id, tags=tags)

    def _seen(self) -> set[tuple[str, int]]:
        if self.seen is None:
            run = self.client.get_run(self.run_id)
            self.seen = {
                (key, m.step)
                for key in run.data.metrics
                for m in self.client.get_metric_history(self.run_id, key)
            }
        return self.seen


def promote(uri: str, name: str, alias: str, target: str) -> str:
    """Point `alias` of registered model `name` (store `uri`) at version `target` (a number)
    or at the newest version that DVC experiment `target` registered; returns what was done,
    in one line. Gpt2tuneError if there is no such version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not name or not alias:
        key = "registered_model" if not name else "registered_alias"
        raise Gpt2tuneError(f'params.yaml: mlflow.{key} is "": there is no alias to move')
    if not re.fullmatch(r"[\w.-]+", target):
        raise Gpt2tuneError(f"{target!r}: give a version number or a DVC experiment's name")
    client = MlflowClient(tracking_uri=uri)
    try:
        try:
            before = client.get_model_version_by_alias(name, alias).version
        except MlflowException:
            before = None  # no version has the alias yet
        if target.isdigit():
            version = client.get_model_version(name, target)
        else:
            found = client.search_model_versions(
                f"name = '{name}' and tags.`{EXP_TAG}` = '{target}'"
            )
            if not found:
                raise Gpt2tuneError(
                    f"no version of {name} comes from DVC experiment {target!r} (`dvc exp show` "
                    f"lists the experiments; or give a version number)"
                )
            version = max(found, key=lambda v: int(v.version))
        client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as e:
        raise Gpt2tuneError(f"could not move @{alias} of {name} to {target}: {reason(e)}") from None
    exp = (version.tags or {}).get(EXP_TAG)
    where = f"version {version.version}" + (f" (DVC experiment {exp})" if exp else "")
    was = f"; it was on version {before}" if before and before != version.version else ""
    return f"@{alias} of {name} is {where}{was}"
