"""Writing small files so that a crash never leaves one half-written: temp file, then rename."""

from __future__ import annotations

import os
from pathlib import Path

from gpt2tune.errors import Gpt2tuneError


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8) in one rename; readers see the old or the new file.

    The data is flushed to disk before the rename, so not even a power cut right after it
    leaves an empty file. A failed write (a full disk) is a one-line Gpt2tuneError, and the
    old file is still there.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
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
