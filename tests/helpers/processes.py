"""The one way to run a stage or any command of a test project as a subprocess: this
virtualenv's tools first on PATH, the checkout's src/ importable, TensorFlow quiet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from helpers import KILLPOINT, REPO, VENV_BIN

# --------------------------------------------------------------------------- running stages


def stage_env(kill_at: str = "", **extra: str) -> dict[str, str]:
    """The environment of every stage, `dvc` or other command a test runs: this virtualenv's
    python, dvc and mlflow first on PATH, the checkout's src/ importable, TensorFlow quiet and
    on the CPU, no MLFLOW_TRACKING_URI from the caller's shell. With kill_at, the killpoint
    hook (tests/killpoint/sitecustomize.py) acts on it."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", **extra)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(KILLPOINT)] * bool(kill_at) + [str(REPO / "src")])
    if kill_at:
        env["GPT2TUNE_KILL_AT"] = kill_at
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def stage_command(stage: str, *args: str) -> list[str]:
    """`python stages/<stage>.py args`, the checkout's script, with this interpreter."""
    return [sys.executable, str(REPO / "stages" / f"{stage}.py"), *args]


def run_in(root: Path, *command: str, kill_at: str = "", env: dict | None = None,
           timeout: float = 300, **kw) -> subprocess.CompletedProcess:  # fmt: skip
    """Run a command in the folder root (a test project) and wait; output captured as text."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    env = stage_env(kill_at) if env is None else env
    return subprocess.run(command, cwd=root, env=env, timeout=timeout, **kw)


def start_in(root: Path, *command: str, kill_at: str = "", env: dict | None = None,
             **kw) -> subprocess.Popen:  # fmt: skip
    """Start a command in the folder root without waiting; stdout and stderr piped, as text."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    env = stage_env(kill_at) if env is None else env
    return subprocess.Popen(command, cwd=root, env=env, **kw)


def dvc(root: Path, *args: str, ok: bool = True, timeout: float = 300) -> str:
    """`dvc args` in the project root: its stdout + stderr, asserted to exit 0 (with ok=False,
    asserted to fail)."""
    proc = run_in(root, "dvc", *args, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, f"dvc {' '.join(args)}: {proc.returncode}\n{out[-6000:]}"
    return out


def run_stage(root: Path, stage: str, *args: str, **kw) -> subprocess.CompletedProcess:
    """`python stages/<stage>.py args` in root, as a user runs it; see run_in."""
    return run_in(root, *stage_command(stage, *args), **kw)


def start_stage(root: Path, stage: str, *args: str, **kw) -> subprocess.Popen:
    """`python stages/<stage>.py args` started in root; see start_in."""
    return start_in(root, *stage_command(stage, *args), **kw)


# The stage runs as the only child of a small Python, which then prints the child's peak RSS
# (getrusage of its children: the stage alone, whatever the test process ran before).
_PEAK_RSS = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


def run_stage_peak_rss(
    root: Path, stage: str, *args: str, **kw
) -> tuple[subprocess.CompletedProcess, float]:
    """run_stage, and the stage's peak resident memory in MiB (its output without that)."""
    proc = run_in(root, sys.executable, "-c", _PEAK_RSS, *stage_command(stage, *args), **kw)
    *rest, peak = proc.stderr.splitlines()
    proc.stderr = "".join(line + "\n" for line in rest)
    return proc, int(peak) / 1024


def wait_until_held(proc: subprocess.Popen, hold: str | os.PathLike, timeout: float,
                    output: Callable[[], object] | None = None) -> None:  # fmt: skip
    """Wait until `proc` stops at its killpoint hold (tests/killpoint: it creates
    `<hold>.held`); fail if it exits first or `timeout` seconds pass, with `output()` (by
    default what the process printed) as the message."""
    deadline = time.monotonic() + timeout
    while not Path(f"{hold}.held").exists():
        running = proc.poll() is None
        assert running and time.monotonic() < deadline, (output or proc.communicate)()
        time.sleep(0.1)


# --------------------------------------------------------------------------- DVC's queue


def _queue_worker_log(root: Path) -> str:
    """The tail of what DVC's first queue worker printed (`.dvc/tmp/exps/celery`)."""
    out = root / ".dvc" / "tmp" / "exps" / "celery" / "dvc-exp-worker-1.out"
    return out.read_text(errors="replace")[-3000:] if out.exists() else "(no worker log)"


def _queue_worker(root: Path) -> dict:
    """The process record of DVC's first queue worker ({} before one has started): its pid
    and, once it has exited, its returncode."""
    info = root / ".dvc" / "tmp" / "exps" / "celery" / "dvc-exp-worker-1.json"
    try:
        return json.loads(info.read_text())
    except (OSError, ValueError):
        return {}  # not written yet, or being replaced


def start_queue_worker(root: Path, log: Path, timeout: float = 60) -> None:
    """`dvc queue start` in root, and wait until its worker has recorded itself. The worker
    inherits the command's output, so that goes to the file log (appended), not a pipe,
    whose end would never come."""
    before = _queue_worker(root).get("pid")
    with open(log, "a") as fh:
        started = run_in(root, "dvc", "queue", "start", capture_output=False, stdout=fh,
                         stderr=subprocess.STDOUT, timeout=timeout)  # fmt: skip
    assert started.returncode == 0, log.read_text()
    deadline = time.monotonic() + timeout
    while _queue_worker(root).get("pid") in (None, before):
        assert time.monotonic() < deadline, f"no queue worker started:\n{log.read_text()}"
        time.sleep(0.5)


def drain_queue(root: Path, log: Path, timeout: float = 600, restarts: int = 3) -> str:
    """Wait until no experiment of root's DVC queue is Queued or Running; assert none Failed
    and return the last `dvc queue status`.

    DVC's worker can exit while experiments are still queued: every 10 s it asks itself,
    with a 1 s timeout, whether it has work, and on a busy machine the answer comes late
    (treeverse/dvc#10562; its log says "monitor: shutting down due to empty queue"). The
    user's remedy, in docs/experiments.md, is `dvc queue start` again; so is this, at most
    `restarts` times, each said on stdout."""
    deadline = time.monotonic() + timeout
    gone: tuple[int, float] | None = None  # (pid, since when) of a worker seen exited
    while True:
        status = dvc(root, "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            assert "Failed" not in status, f"{status}\n{_queue_worker_log(root)}"
            return status
        worker = _queue_worker(root)
        if "Running" in status or worker.get("returncode") is None:
            gone = None
        elif gone is None or gone[0] != worker["pid"]:
            gone = (worker["pid"], time.monotonic())
        # Exited for 15 s, not a record that a `dvc queue start` just run is about to replace.
        elif time.monotonic() - gone[1] > 15:
            assert restarts > 0, f"the worker keeps exiting:\n{status}\n{_queue_worker_log(root)}"
            restarts -= 1
            print(
                f"DVC's queue worker exited with experiments queued; starting it again:\n"
                f"{status}\n{_queue_worker_log(root)[-600:]}"
            )
            start_queue_worker(root, log)
            gone = None
        assert time.monotonic() < deadline, f"{status}\n{_queue_worker_log(root)}"
        time.sleep(3)
