"""Small file helpers shared by the library: the files a model folder holds, the project root,
flushing to disk, writing so that a crash never leaves a file half-written (temp file, then
rename), the lock file that keeps one process at a time at some work, and how a path is shown
in messages."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gpt2tune.errors import Gpt2tuneError

# The seven files of an OpenAI GPT-2 release, as fetch_model downloads them.
RELEASE_FILES: tuple[str, ...] = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
# The files besides the weights that a loadable model folder needs (the graph file
# model.ckpt.meta of a release is never read).
MODEL_FOLDER_FILES: tuple[str, ...] = ("hparams.json", "encoder.json", "vocab.bpe", "checkpoint")


def check_model_folder(folder: str | os.PathLike, option: str = "") -> Path:
    """`folder` as a Path, checked to exist and to hold a model folder's files (cheap: nothing
    is read). The Gpt2tuneError names `option` (such as --model) when the folder was given on
    the command line, else calls it "model folder"."""
    path = Path(folder)
    name = f"{option} {str(folder)!r}" if option else f"model folder {folder}"
    if not path.is_dir():
        fix = (
            f"relative to {os.getcwd()}; give {option} a model folder such as models/124M "
            "(`gpt2tune fetch` downloads it) or models/finetuned"
            if option
            else "in the pipeline, `dvc repro` makes it"
        )
        raise Gpt2tuneError(f"{name} does not exist ({fix})")
    if not any((path / f).exists() for f in (*MODEL_FOLDER_FILES, "model.ckpt.index")):
        raise Gpt2tuneError(
            f"{name} is not a GPT-2 model folder: it has none of {', '.join(MODEL_FOLDER_FILES)}"
        )
    return path


def project_root() -> Path:
    """The DVC project root: ``$DVC_ROOT`` (which DVC sets to the main workspace, also for
    ``dvc exp run --temp/--queue``), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def in_experiment_copy() -> bool:
    """Whether this runs in DVC's temporary copy of the project: `dvc exp run --temp` and
    queued experiments run the pipeline under .dvc/tmp/exps/, with ``$DVC_ROOT`` naming the
    main workspace (a workspace run has the two equal)."""
    root = os.environ.get("DVC_ROOT")
    return bool(root) and Path.cwd().resolve() != Path(root).resolve()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush `path`'s data to disk, so that a rename after it can never name an empty file."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def file_size(path: str | os.PathLike) -> int:
    """The size of `path` in bytes; 0 if there is no such file."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8) in one rename; see `write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` in one rename; readers see the old or the new file.

    The data is flushed to disk before the rename, so not even a power cut right after it
    leaves an empty file. A failed write (a full disk) is a one-line Gpt2tuneError, and the
    old file is still there.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise Gpt2tuneError(
            f"could not write {path}: {e.strerror or e}; check free disk space and "
            "permissions (the previous version of the file is unchanged)"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def display_path(path: str | os.PathLike) -> str:
    """`path` for a message: relative to the working directory if it lies below it, else as
    given; with "/" separators."""
    path = Path(path)
    try:
        return path.absolute().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


class LockBusy(Exception):
    """Another process holds the lock; `holder` is its process id as it wrote it ("?")."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"held by process {holder}")
        self.holder = holder


@contextmanager
def exclusive_lock(path: str | os.PathLike, wait_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive `flock` on the file `path` for the `with` block, waiting at most
    `wait_s` seconds (float("inf"): as long as it takes) for another process to let go;
    LockBusy if it does not. The file holds the holder's process id (for messages) and is
    removed as the lock is let go. The kernel releases the lock when its holder dies, even by
    kill -9, so a lock file left behind is never an obstacle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if time.monotonic() >= deadline:
                raise LockBusy(holder) from None
            time.sleep(0.05)
            continue
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
