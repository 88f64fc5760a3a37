"""Small file helpers shared by the library: the files a model folder holds, the project root,
flushing to disk, writing so that a crash never leaves a file half-written (temp file, then
rename), and how a path is shown in messages."""

from __future__ import annotations

import os
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
