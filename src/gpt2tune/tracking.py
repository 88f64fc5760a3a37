"""MLflow bookkeeping: one run per training, shared by the train, assemble and sample stages.

The train stage starts the run and records its id in `metrics/mlflow_run.json`; the later
stages reopen that run, so params, loss curves, samples and the assembled model of one
fine-tuning stay together. Relative `sqlite:///` stores resolve against the DVC project root
(`$DVC_ROOT`, which DVC sets to the main workspace also for `dvc exp run --temp/--queue`), so
every experiment lands in the same `mlflow.db` that `mlflow ui` shows.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import write_text_atomic
from gpt2tune.params import MlflowParams

RUN_FILE = Path("metrics/mlflow_run.json")

# MLflow's HTTP defaults retry for minutes; a tool should say "unreachable" in seconds.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def resolve_tracking_uri(uri: str) -> str:
    """params' tracking_uri made absolute: "" = $MLFLOW_TRACKING_URI or the project's mlflow.db."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(project_root() / uri[len(prefix) :])
    return uri


def _connect(cfg: MlflowParams) -> str:
    """Point MLflow at the store and return the experiment id, creating it if needed."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(cfg.tracking_uri)
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if uri.startswith("sqlite:"):
            # MLflow would put artifacts in ./mlruns of the current folder, which for
            # `dvc exp run --temp` is a temporary copy; keep them beside mlflow.db instead.
            location = (project_root() / "mlartifacts").as_uri()
        return mlflow.create_experiment(cfg.experiment, artifact_location=location)
    except (MlflowException, OSError) as e:
        raise Gpt2tuneError(
            f"cannot use the MLflow tracking store {uri} (params.yaml mlflow.tracking_uri): "
            f"{str(e).strip().splitlines()[0][:300]}"
        ) from None
    except Exception as e:  # requests' connection errors surface under several types
        raise Gpt2tuneError(
            f"cannot reach the MLflow tracking server {uri} (params.yaml mlflow.tracking_uri): "
            f"{type(e).__name__}; start it or fix the address"
        ) from None


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


@contextmanager
def training_run(cfg: MlflowParams, params: dict, run_id: str | None = None):
    """Start (or, given `run_id` of a resumed training, reopen) the run and record its id."""
    import mlflow

    experiment_id = _connect(cfg)
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except Exception:
            run_id = None  # the store was reset; start a new run rather than fail
    name = os.environ.get("DVC_EXP_NAME") if run_id is None else None
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=name) as run:
        mlflow.set_tags(run_tags())
        if run_id is None:
            mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        RUN_FILE.parent.mkdir(parents=True, exist_ok=True)
        info = {"run_id": run.info.run_id, "experiment_id": experiment_id,
                "tracking_uri": mlflow.get_tracking_uri()}  # fmt: skip
        write_text_atomic(RUN_FILE, json.dumps(info, indent=2) + "\n")
        yield run


def _param_value(v) -> str:
    # MLflow caps a param value at 6000 characters; long prompt lists are cut, not rejected.
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


@contextmanager
def reopen_run(cfg: MlflowParams, run_file: Path = RUN_FILE):
    """Reopen the training's run (from `metrics/mlflow_run.json`) to add artifacts to it."""
    import mlflow

    try:
        info = json.loads(Path(run_file).read_text())
    except (OSError, ValueError):
        raise Gpt2tuneError(
            f"{run_file} is missing or unreadable: run `dvc repro train` first"
        ) from None
    _connect(cfg)
    try:
        mlflow.get_run(info["run_id"])
    except Exception:
        raise Gpt2tuneError(
            f"MLflow run {info['run_id']} named in {run_file} is not in "
            f"{resolve_tracking_uri(cfg.tracking_uri)}; rerun training with `dvc repro -f train`"
        ) from None
    with mlflow.start_run(run_id=info["run_id"]) as run:
        yield run


def log_metrics(metrics: dict, step: int) -> None:
    import mlflow

    mlflow.log_metrics(metrics, step=step)


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(text, artifact_file)


def log_folder(folder: str | os.PathLike, artifact_path: str) -> None:
    import mlflow

    mlflow.log_artifacts(str(folder), artifact_path)


def end_run(status: str) -> None:
    """End the active run with an MLflow status such as "KILLED"."""
    import mlflow

    mlflow.end_run(status)
