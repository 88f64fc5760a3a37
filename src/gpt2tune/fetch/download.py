"""Fetch a released GPT-2 checkpoint: the ``fetch_model`` pipeline step.

``fetch_model("124M")`` downloads the seven files of an OpenAI GPT-2 model from
``{base_url}/{name}/`` into ``{dest_root}/{name}/`` with one tqdm progress bar per file (the old
names 117M and 345M fetch 124M and 355M, into a folder of the old name: :data:`OLD_NAMES`).
``base_url`` may also be a local folder (a path or a ``file://`` URL), which is copied with
the same care. ``download_file`` is the single-file primitive underneath, usable on its own.

How "complete" is recorded
--------------------------
The final file name says the download arrived whole. Bytes in flight go to ``<file>.part``;
only when the whole file has arrived and its size matches what the server announced
(Content-Length or Content-Range) -- or the source file's size, for a local copy -- is it
flushed to disk and renamed to its final name with :func:`os.replace`, which is atomic within a
folder. Its size and SHA-256 then go into ``.gpt2tune-manifest.json`` beside it
(:mod:`gpt2tune.fetch.manifest`), which says whether it is *still* whole:

* a file under its final name that agrees with the manifest is never downloaded again; one
  that does not (cut short, edited) is deleted with a warning and fetched again;
* a folder holding all seven files, whole, and no ``.part`` is a finished model, returned
  without contacting the server at all;
* a ``.part`` left by an interrupted run is resumed with an HTTP ``Range`` request;
* a folder left empty by a failed first download (a 404) is removed.

Checksums of the tokenizer files
--------------------------------
``encoder.json`` and ``vocab.bpe`` are the same for every official release, and their SHA-256
is known (:data:`OFFICIAL_FILES`). A download of one of them is checked before it gets its
final name when it is *meant* to be the official file: when ``base_url`` is OpenAI's address,
or when the file has exactly the official size (a same-size file with other bytes is damage,
not another vocabulary; a custom tokenizer of another size is left alone). A mismatch is
downloaded once more from scratch, then refused with both digests.

Lengths and failures
--------------------
Bodies are checked against the length the server announced, cut-short ones resumed, and
transient failures (connection errors, timeouts, HTTP 429 and 5xx) retried within a budget of
attempts and seconds; see :mod:`gpt2tune.fetch.transfer`. Everything a user can fix surfaces as a
one-line :class:`~gpt2tune.errors.Gpt2tuneError`.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import quote, urlsplit
from urllib.request import url2pathname

import requests
from tqdm import tqdm

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.fetch import manifest
from gpt2tune.fetch.transfer import CHUNK_SIZE, HttpTransfer, NotFound, Policy
from gpt2tune.files import RELEASE_FILES, file_size, fsync_file
from gpt2tune.paths import MODELS
from gpt2tune.urls import OPENAI_MODELS

OFFICIAL_MODELS: tuple[str, ...] = ("124M", "355M", "774M", "1558M")
# OpenAI's first names of two releases, still in gpt-2-simple and old notebooks: the same files,
# published under the new names. The folder keeps the name asked for (DVC's out is
# models/${model.name}); the download is the release under its new name.
OLD_NAMES: dict[str, str] = {"117M": "124M", "345M": "355M"}
# name -> (size in bytes, SHA-256) of the tokenizer files shared by all official releases
OFFICIAL_FILES: dict[str, tuple[int, str]] = {
    "encoder.json": (1042301, "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": (456318, "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}

PART_SUFFIX = ".part"


def fetch_model(
    name: str,
    base_url: str = OPENAI_MODELS,
    dest_root: str | os.PathLike = MODELS,
    *,
    progress: bool | None = None,
    retries: int = 5,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    backoff: float = 1.0,
) -> Path:
    """Download (or copy) GPT-2 model ``name`` into ``dest_root/name`` and return that folder.

    ``progress``: True/False forces the bars on/off; None shows them only on a terminal.
    The other keywords are passed to :func:`download_file` for every file.
    """
    _check_name(name)
    dest = Path(dest_root) / name
    official = _is_official(base_url)
    if dest.is_dir():
        _remove_damaged(dest, official)
    if _is_complete(dest):
        manifest.record(dest, RELEASE_FILES)  # adopts files from before manifests
        return dest  # a whole model is never downloaded again, not even with a HEAD request
    release = OLD_NAMES.get(name, name)
    if release != name:
        print(f"model {name} is OpenAI's old name of {release}: fetching {release} into {dest}",
              file=sys.stderr)  # fmt: skip
    try:
        folder = _locate(base_url, release)
    except Gpt2tuneError:
        if release == name:
            raise
        folder = _locate(base_url, name)  # a local copy kept under the old name
    try:
        with requests.Session() as session:  # one session: the seven files share a connection
            for file in RELEASE_FILES:
                source = folder / file if isinstance(folder, Path) else folder + quote(file)
                download_file(
                    source, dest / file, official=official, session=session, progress=progress,
                    retries=retries, connect_timeout=connect_timeout, read_timeout=read_timeout,
                    backoff=backoff,
                )  # fmt: skip
    except NotFound as exc:
        raise _model_not_found(name, f"{exc.where} ({exc.detail})") from None
    finally:
        if dest.is_dir() and not any(dest.iterdir()):  # a 404 on the first file, say
            dest.rmdir()
    manifest.record(dest, RELEASE_FILES)
    return dest


def _remove_damaged(dest: Path, official: bool) -> None:
    """Delete the files of a model folder that are no longer what was downloaded (see
    gpt2tune.fetch.manifest), saying so on stderr, so that they are fetched again."""
    present = [f for f in RELEASE_FILES if (dest / f).is_file()]
    bad = manifest.damaged_files(
        dest, present, lambda path, name: _checksum_mismatch(path, name, official)
    )
    for name, why in bad.items():
        print(f"warning: {dest / name} is damaged ({why}); fetching it again", file=sys.stderr)
        manifest.forget(dest, name)
        (dest / name).unlink()


def download_file(
    url: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    official: bool = False,
    session: requests.Session | None = None,
    progress: bool | None = None,
    retries: int = 5,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    backoff: float = 1.0,
    deadline: float = 60.0,
) -> Path:
    """Fetch ``url`` into ``dest`` via ``dest.part``, resuming and retrying; return ``dest``.

    ``url`` is an http(s) URL, a ``file://`` URL or a local path. If ``dest`` already exists
    it is complete by construction (see the module docstring) and is returned untouched.
    ``retries``: consecutive attempts without progress allowed after the first failure;
    ``backoff``: first wait in seconds, doubled after each such failure; ``deadline``: seconds
    after which a run of failures is given up even if retries remain. ``official``: the file
    is meant to be OpenAI's own (see "Checksums" above); the size rule applies regardless.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + PART_SUFFIX)
    if dest.exists():
        # The rename happened, so the final file is whole; a .part beside it can only be a
        # copy someone left there, and resuming it would be pointless.
        part.unlink(missing_ok=True)
        return dest
    policy = Policy(retries, connect_timeout, read_timeout, backoff, deadline)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):  # a checksum mismatch is downloaded once more, from scratch
            with _progress_bar(dest.name, progress) as bar:
                if isinstance(url, str) and urlsplit(url).scheme.lower() in ("http", "https"):
                    # A session of our own is closed afterwards; the caller's is left open.
                    with nullcontext(session) if session else requests.Session() as http:
                        HttpTransfer(url, part, http, bar, policy).run()
                else:
                    _copy_local(_local_path(url), part, bar)
            mismatch = _checksum_mismatch(part, dest.name, official)
            if mismatch is None:
                break
            part.unlink()
            if attempt == 2:
                raise Gpt2tuneError(
                    f"{url} is not the official {dest.name}: {mismatch} (downloaded twice); "
                    "the server or a proxy is sending damaged data -- retry later or use "
                    "another base_url"
                )
        fsync_file(part)  # the data must be on disk before its final name says it is complete
        os.replace(part, dest)
    except OSError as exc:  # requests' errors are OSErrors too, but never escape the above
        where = exc.filename or part
        raise Gpt2tuneError(
            f"could not save {url} as {dest}: {exc.strerror or exc} ({where}); "
            "check the path, free disk space and permissions"
        ) from None
    return dest


# --------------------------------------------------------------------------- model folders


def _check_name(name: str) -> None:
    """A model name becomes a folder under dest_root and a URL segment: keep it a plain name."""
    plain = (
        isinstance(name, str)
        and name == name.strip()
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\:\0")
    )
    if not plain:
        raise Gpt2tuneError(
            f"model name {name!r} is not a plain folder name (no '/', '\\', ':', '..' or "
            f"empty name); use one of {', '.join(OFFICIAL_MODELS)}"
        )


def _is_official(base_url: str) -> bool:
    return base_url.strip().rstrip("/").lower() == OPENAI_MODELS.lower()


def _checksum_mismatch(path: Path, name: str, official: bool) -> str | None:
    """Why `path` cannot be the official `name` it is meant to be, or None if it is fine
    (or is not meant to be official: a custom tokenizer of another size)."""
    if name not in OFFICIAL_FILES:
        return None
    size, digest = OFFICIAL_FILES[name]
    if not official and file_size(path) != size:
        return None
    actual = manifest.sha256_of(path)
    if actual == digest:
        return None
    return f"SHA-256 {actual} ({file_size(path)} bytes), expected {digest} ({size} bytes)"


def _is_complete(dest: Path) -> bool:
    return all((dest / f).is_file() for f in RELEASE_FILES) and not any(
        (dest / (f + PART_SUFFIX)).exists() for f in RELEASE_FILES
    )


def _locate(base_url: str, name: str) -> str | Path:
    """The model's source folder: an http(s) URL ending in '/', or a local Path."""
    if urlsplit(base_url).scheme.lower() in ("http", "https"):
        return base_url.rstrip("/") + "/" + quote(name) + "/"
    folder = _local_path(base_url) / name
    if not folder.is_dir():
        raise _model_not_found(name, f"{folder} (no such folder)")
    return folder


def _model_not_found(name: str, where: str) -> Gpt2tuneError:
    return Gpt2tuneError(
        f"model {name!r} was not found at {where}; the official GPT-2 models are "
        f"{', '.join(OFFICIAL_MODELS)} -- check the model name and base_url"
    )


# --------------------------------------------------------------------------- local copies


def _local_path(url: str | os.PathLike) -> Path:
    if not isinstance(url, str):
        return Path(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise Gpt2tuneError(f"{url}: file:// URLs must name a local path (file:///path/...)")
        return Path(url2pathname(parts.path))
    if scheme == "" or len(scheme) == 1:  # a one-letter "scheme" is a Windows drive (C:\...)
        return Path(url)
    raise Gpt2tuneError(
        f"{url}: unsupported address scheme {parts.scheme!r}; use an http(s):// URL, "
        "a file:// URL or a local folder"
    )


def _copy_local(src: Path, part: Path, bar: tqdm) -> None:
    """Copy from scratch: local disks are fast and a local copy has nothing to resume."""
    if not src.is_file():
        raise NotFound(str(src), "no such file")
    total = src.stat().st_size
    bar.reset(total=total)
    with open(src, "rb") as fin, open(part, "wb") as fout:
        while chunk := fin.read(CHUNK_SIZE):
            fout.write(chunk)
            bar.update(len(chunk))
    if file_size(part) != total:
        raise Gpt2tuneError(f"{src} changed size while being copied to {part}; rerun the copy")


# --------------------------------------------------------------------------- small helpers


def _progress_bar(name: str, progress: bool | None) -> tqdm:
    # disable=None lets tqdm turn itself off when stderr is not a terminal (CI, dvc repro logs).
    disable = None if progress is None else not progress
    return tqdm(
        desc=name, unit="B", unit_scale=True, unit_divisor=1024, disable=disable, leave=True
    )
