"""Test projects: the committed code and pipeline of the checkout plus a params.yaml the test
writes itself (never the checkout's params.yaml, models/, data/ or metrics/, which a user's
run or `dvc exp apply` changes), their MLflow store and git history."""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from helpers import REPO

# --------------------------------------------------------------------------- test projects

# What a test project takes from the checkout: the code and the pipeline, as committed by design.
PROJECT_FILES = (
    "dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore", "hf/README.md",
    "models/.gitignore",
)  # fmt: skip
PROJECT_CODE = ("src/gpt2tune", "stages")


def copy_project(dest: Path) -> None:
    """The project's code (src/gpt2tune, stages/) and pipeline (dvc.yaml, DVC's config,
    .gitignore) into dest. Nothing a run or an experiment changes: no params.yaml (write one
    with write_params), models/, data/, metrics/, samples/, dvc.lock or checkpoint/."""
    for rel in PROJECT_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    for rel in PROJECT_CODE:
        for src in sorted((REPO / rel).rglob("*.py")):
            target = dest / src.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def tiny_params(**sections: dict) -> dict:
    """A complete, valid params.yaml as a dict, sized for tests: model `tiny`, two training
    steps on 16-token windows, no intermediate samples, checkpoints or validation. Each keyword
    (model=..., train=...) updates that section's keys."""
    from gpt2tune.config.params import default_raw

    params = default_raw()  # every key declared, at its default; then sized for tests
    params["model"].update(name="tiny", base_url="http://127.0.0.1:9/models")  # nothing there
    params["train"].update(
        steps=2, batch_size=1, n_ctx=16, sample_every=0, sample_length=8, save_every=0,
        val_every=0, val_batch_count=2,
    )  # fmt: skip
    params["sample"].update(length=8, prompts=[])
    for name, changes in sections.items():
        params[name].update(changes)
    return params


def write_params(root: Path, **sections: dict) -> dict:
    """root/params.yaml from tiny_params(**sections); returns what it wrote. An MLflow
    sqlite store in the project (the default) starts as an empty one (seed_mlflow_store)."""
    params = tiny_params(**sections)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    uri = params["mlflow"]["tracking_uri"]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative path
        seed_mlflow_store(root / uri.removeprefix("sqlite:///"))
    return params


def seed_mlflow_store(path: Path) -> None:
    """An empty MLflow sqlite store at `path`, unless one is there: a copy of one that MLflow
    made in this test process. MLflow makes a new store by running its schema migrations,
    4-5 s of CPU every time; a copy holds the same tables and the Default experiment."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_empty_mlflow_store(), path)


@functools.cache  # once per test process
def _empty_mlflow_store() -> Path:
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="gpt2tune-empty-mlflow-"))
    atexit.register(shutil.rmtree, folder, True)
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


def project_mlflow(root: Path):
    """An MlflowClient on the project's own sqlite store (root/mlflow.db)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def training_run_id(root: Path) -> str:
    """The MLflow run id the train stage recorded in root/metrics/mlflow_run.json."""
    return json.loads((root / "metrics/mlflow_run.json").read_text())["run_id"]


def update_params(root: Path, section: str, **changes) -> None:
    """Change some keys of one section of root/params.yaml, keeping the rest."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section].update(changes)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(root: Path, corpus: str, **sections: dict) -> Path:
    """copy_project(root), `corpus` as data/dset.txt and write_params(root, **sections)."""
    copy_project(root)
    (root / "data").mkdir()
    (root / "data" / "dset.txt").write_text(corpus, encoding="utf-8")
    write_params(root, **sections)
    return root


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


def commit_project(root: Path) -> None:
    """Make `root` a git repository whose first commit holds all its files (DVC needs git)."""
    git(root, "init", "-q")
    git(root, "config", "user.name", "gpt2tune test")
    git(root, "config", "user.email", "test@example.invalid")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project under test")


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root (hidden ones and .git included): a hash of each file's
    bytes, "dir" for folders; equal snapshots mean nothing under root changed."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out
