"""What fetch_model downloaded, so that a later run can tell a damaged file from a whole one.

A final file name says that a download arrived whole, not that the file is still whole: a file
cut or edited afterwards would be used as is (a vocab.bpe cut in half silently changes every
text's tokens) and its damaged hash locked into dvc.lock. So fetch_model records each file's
size and SHA-256 in ``models/<name>/.gpt2tune-manifest.json`` when it gets its final name, and
every later run checks the folder against it and fetches a damaged file again.

A file the manifest does not list (a folder from before manifests, or copied by hand) is
checked as far as possible -- the tokenizer files of OpenAI's releases have known hashes --
and then recorded as it is: offline there is nothing else to compare the checkpoint with. The
manifest is part of the DVC output, so a copy checked out of the DVC cache keeps it.
Checking reads every file once (about a second per GB).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from gpt2tune.files import write_text_atomic

MANIFEST = ".gpt2tune-manifest.json"


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, dict]:
    """{file: {"size": ..., "sha256": ...}}; {} when absent or unreadable (it is then rebuilt
    from the files, as for a folder that never had one)."""
    try:
        raw = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = raw["files"]
        return {
            name: entry
            for name, entry in files.items()
            if isinstance(entry, dict)
            and type(entry.get("size")) is int
            and isinstance(entry.get("sha256"), str)
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def damaged_files(
    folder: Path, names: Iterable[str], unlisted: Callable[[Path, str], str | None]
) -> dict[str, str]:
    """{file: why} for each of `names` in `folder` that disagrees with the manifest, or, for a
    file it does not list, that `unlisted(path, name)` finds wrong (it returns why, or None)."""
    listed, bad = read_manifest(folder), {}
    for name in names:
        path = folder / name
        entry = listed.get(name)
        if entry is None:
            why = unlisted(path, name)
        elif path.stat().st_size != entry["size"]:
            why = f"{path.stat().st_size} bytes, {entry['size']} when downloaded"
        elif sha256_of(path) != entry["sha256"]:
            why = "same size but other bytes (SHA-256) than when downloaded"
        else:
            why = None
        if why:
            bad[name] = why
    return bad


def record(folder: Path, names: Iterable[str]) -> None:
    """Add the files of `names` the manifest does not list yet, as they are now; rewrite it
    only if something was added (a complete, unchanged folder is left untouched)."""
    listed = read_manifest(folder)
    new = {
        name: {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
        for name in names
        if name not in listed
    }
    if new:
        files = dict(sorted({**listed, **new}.items()))
        write_text_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=2) + "\n")


def forget(folder: Path, name: str) -> None:
    """Remove `name` from the manifest (it is about to be fetched again)."""
    listed = read_manifest(folder)
    if listed.pop(name, None) is not None:
        write_text_atomic(folder / MANIFEST, json.dumps({"files": listed}, indent=2) + "\n")
