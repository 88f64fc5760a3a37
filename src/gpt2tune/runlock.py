"""One training per run folder at a time, and the temporary files a killed one leaves.

Two trainings writing `checkpoint/run1` at once would overwrite each other's checkpoints and
state (the second used to die half-way with "check free disk space"). `hold(run_dir)` takes
an exclusive `flock` on `<run_dir>.lock`, beside the run folder (so that the folder DVC
hashes holds only the run), and refuses at once, in one line, when another process has it.
The kernel releases the lock when its holder dies, even by kill -9, so a stale lock file is
never an obstacle.

A save killed part-way (or failing on a full disk) can leave temporary files in the run
folder: TensorFlow's `*.tempstate*` data files and `.<name>.tmp` of `write_text_atomic`.
`clean_leftovers` removes them; the train stage calls it once it holds the lock, so no other
training is writing them at that moment.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import display_path


def lock_path(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + ".lock")


@contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold `run_dir`'s lock for the `with` block; Gpt2tuneError if another process holds it.
    The lock file holds the holder's process id (for the message) and is removed after."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise Gpt2tuneError(
                f"another training (process {holder}) is using {display_path(run_dir)}; "
                "wait for it to finish (or stop it) and run again"
            ) from None
        # The previous holder removes the file as it lets go: if it did so between our open
        # and our flock, we hold a lock on a file no one else will open; take the new one.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock, so no one locks a removed file
        os.close(fd)


def clean_leftovers(run_dir: str | os.PathLike) -> list[str]:
    """Remove the temporary files an interrupted save left in `run_dir`; returns their names."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if _is_temporary(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an interrupted save from {run_dir}")
    return sorted(p.name for p in stale)


def _is_temporary(name: str) -> bool:
    return ".tempstate" in name or (name.startswith(".") and name.endswith(".tmp"))
