"""The offline journal: the calls an MLflow run's tracking server missed while it was away.

Each call that could not be sent is appended as one JSON line to
``metrics/mlflow_offline/<run id>.jsonl`` at the project root. A run created while offline has
a local id ``offline-<hex>``; once replayed, ``<offline id>.json`` maps it to the real id.
Replaying a journal sends its calls in order (creating the run first if only the journal knows
it) and deletes the file when everything is in, so a replay that is itself interrupted is
simply repeated; calls appended while a replay runs (by the training thread, see
gpt2tune.tracking.outbox) are kept and replayed in turn. When the journal is written and replayed is
gpt2tune.tracking.run's business.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from pathlib import Path

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import display_path, project_root, write_text_atomic
from gpt2tune.paths import MLFLOW_OFFLINE
from gpt2tune.tracking.client import MlflowRun, Unreachable, reason

OFFLINE_PREFIX = "offline-"
# Appending and deleting a journal are local file operations that the training thread and
# the sender thread both make; the lock keeps a replay from deleting what was just appended.
_lock = threading.Lock()


def offline_dir() -> Path:
    return project_root() / MLFLOW_OFFLINE


def journal_path(run_id: str) -> Path:
    return offline_dir() / f"{run_id}.jsonl"


def new_offline_id() -> str:
    return OFFLINE_PREFIX + uuid.uuid4().hex


def pending() -> list[Path]:
    """Every journal still to be replayed, oldest name first."""
    folder = offline_dir()
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def append(path: Path, op: dict) -> None:
    line = json.dumps(op, ensure_ascii=False) + "\n"
    with _lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()  # a crash right after loses nothing the call reported as kept


def read_ops(path: Path) -> list[dict]:
    return _parse(path.read_bytes())


def _parse(data: bytes) -> list[dict]:
    ops = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            ops.append(json.loads(line))
        except ValueError:
            pass  # the half line of a process killed mid-write; the call it recorded never returned
    return ops


def mapped_run_id(offline_id: str) -> str | None:
    """The real run id a local ``offline-...`` id was replayed into, if it was."""
    try:
        return json.loads((offline_dir() / f"{offline_id}.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def replay(run: MlflowRun, path: Path, offline_id: str | None) -> None:
    """Send the calls kept in `path` to `run`'s server, then delete the file. With the
    `offline_id` the run still has, the run is created first from the journal's "start"
    record. Unreachable if the server fails part-way (the file is kept, to be replayed again)."""
    while path.exists():
        _replay_once(run, path, offline_id)


def _consume(path: Path, size: int) -> None:
    """Drop the first `size` bytes of the journal (sent); delete it if nothing came after."""
    with _lock:
        data = path.read_bytes()
        if len(data) <= size:
            path.unlink()
        else:
            path.with_suffix(".tmp").write_bytes(data[size:])
            path.with_suffix(".tmp").replace(path)


def _replay_once(run: MlflowRun, path: Path, offline_id: str | None) -> None:
    with _lock:  # whole lines only: never half of one being appended
        data = path.read_bytes()
    ops = _parse(data)
    try:
        if offline_id and run.run_id == offline_id:  # the run itself is still to be made
            start = next((op for op in ops if op["op"] == "start"), None)
            if start is None:
                raise Gpt2tuneError(f"{path} lacks the record that creates run {offline_id}")
            run.create_run(start["params"], start["tags"], start.get("name"), start.get("ts"))
            write_text_atomic(
                offline_dir() / f"{offline_id}.json", json.dumps({"run_id": run.run_id})
            )
        for op in ops:
            if op["op"] != "start":
                run.send(op)
    except Gpt2tuneError:
        raise
    except Exception as e:
        raise Unreachable(reason(e)) from None
    _consume(path, len(data))
    print(f"sent {len(ops)} kept MLflow record(s) from {display_path(path)}", file=sys.stderr)
