"""Fetch a released GPT-2 checkpoint: the ``fetch_model`` pipeline step.

``fetch_model("124M")`` downloads the seven files of an OpenAI GPT-2 model from
``{base_url}/{name}/`` into ``{dest_root}/{name}/`` with one tqdm progress bar per file.
``base_url`` may also be a local folder (a path or a ``file://`` URL), which is copied with
the same care. ``download_file`` is the single-file primitive underneath, usable on its own.

How "complete" is recorded
--------------------------
The final file name *is* the record. Bytes in flight go to ``<file>.part``; only when the
whole file has arrived and its size matches what the server announced (Content-Length or
Content-Range) -- or the source file's size, for a local copy -- is it flushed to disk and
renamed to its final name with :func:`os.replace`, which is atomic within a folder. So no
manifest or checksum file can disagree with the data, and:

* a file present under its final name is never downloaded, checked or rewritten again
  (delete it to force a fresh download);
* a folder holding all seven final names and no ``.part`` is a finished model, returned
  without contacting the server at all;
* a ``.part`` left by an interrupted run is resumed with an HTTP ``Range`` request.

Checksums of the tokenizer files
--------------------------------
``encoder.json`` and ``vocab.bpe`` are the same for every official release, and their SHA-256
is known (:data:`OFFICIAL_FILES`). A download of one of them is checked before it gets its
final name when it is *meant* to be the official file: when ``base_url`` is OpenAI's address,
or when the file has exactly the official size (a same-size file with other bytes is damage,
not another vocabulary; a custom tokenizer of another size is left alone). A mismatch is
downloaded once more from scratch, then refused with both digests.

Lengths
-------
A body is only accepted when its length agrees with the server's: Content-Length or
Content-Range. A body cut short is resumed; one longer than announced is refused. After a
plain 200 the byte past the end is asked for (``Range: bytes=<size>-``): a server answers 416
there, so a 206 means the Content-Length undercounted the file, and the rest is fetched.

Failures
--------
Connection errors, timeouts, bodies cut short, HTTP 429 and 5xx are transient: they are
retried with exponential backoff. ``retries`` bounds the consecutive failures that make no
progress and ``deadline`` the seconds spent on them, so an unreachable server is reported
within about a minute while a flaky but moving download carries on to the end. Everything
a user can fix surfaces as a one-line :class:`~gpt2tune.errors.Gpt2tuneError`.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit
from urllib.request import url2pathname

import requests
import urllib3.exceptions
from tqdm import tqdm

from gpt2tune.errors import Gpt2tuneError

OFFICIAL_MODELS: tuple[str, ...] = ("124M", "355M", "774M", "1558M")
MODEL_FILES: tuple[str, ...] = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
# name -> (size in bytes, SHA-256) of the tokenizer files shared by all official releases
OFFICIAL_FILES: dict[str, tuple[int, str]] = {
    "encoder.json": (1042301, "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": (456318, "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}

PART_SUFFIX = ".part"
CHUNK_SIZE = 1 << 16  # small enough for a lively progress bar, large enough to be cheap
MAX_BACKOFF = 30.0  # seconds; longer waits only delay the "unreachable" verdict

# "bytes 0-99/1234" in a 206, "bytes */1234" in a 416; the total may be "*" (unknown).
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def fetch_model(
    name: str,
    base_url: str = DEFAULT_BASE_URL,
    dest_root: str | os.PathLike = "models",
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
    if _is_complete(dest):
        return dest  # a finished model is never touched again, not even with a HEAD request
    folder = _locate(base_url, name)
    with requests.Session() as session:  # one session: the seven files share a connection
        for file in MODEL_FILES:
            source = folder / file if isinstance(folder, Path) else folder + quote(file)
            try:
                download_file(
                    source,
                    dest / file,
                    official=_is_official(base_url),
                    session=session,
                    progress=progress,
                    retries=retries,
                    connect_timeout=connect_timeout,
                    read_timeout=read_timeout,
                    backoff=backoff,
                )
            except _NotFound as exc:
                raise _model_not_found(name, f"{exc.where} ({exc.detail})") from None
    return dest


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
    policy = _Policy(retries, connect_timeout, read_timeout, backoff, deadline)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):  # a checksum mismatch is downloaded once more, from scratch
            with _progress_bar(dest.name, progress) as bar:
                if isinstance(url, str) and urlsplit(url).scheme.lower() in ("http", "https"):
                    # A session of our own is closed afterwards; the caller's is left open.
                    with nullcontext(session) if session else requests.Session() as http:
                        _HttpTransfer(url, part, http, bar, policy).run()
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
        _fsync(part)  # the data must be on disk before its final name says it is complete
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
    return base_url.strip().rstrip("/").lower() == DEFAULT_BASE_URL.lower()


def _checksum_mismatch(path: Path, name: str, official: bool) -> str | None:
    """Why `path` cannot be the official `name` it is meant to be, or None if it is fine
    (or is not meant to be official: a custom tokenizer of another size)."""
    if name not in OFFICIAL_FILES:
        return None
    size, digest = OFFICIAL_FILES[name]
    if not official and _size(path) != size:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() == digest:
        return None
    return f"SHA-256 {h.hexdigest()} ({_size(path)} bytes), expected {digest} ({size} bytes)"


def _is_complete(dest: Path) -> bool:
    return all((dest / f).is_file() for f in MODEL_FILES) and not any(
        (dest / (f + PART_SUFFIX)).exists() for f in MODEL_FILES
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


class _NotFound(Gpt2tuneError):
    """A missing source file; fetch_model rewords it to name the model."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"{where} was not found ({detail}); check the address")
        self.where, self.detail = where, detail


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
        raise _NotFound(str(src), "no such file")
    total = src.stat().st_size
    bar.reset(total=total)
    with open(src, "rb") as fin, open(part, "wb") as fout:
        while chunk := fin.read(CHUNK_SIZE):
            fout.write(chunk)
            bar.update(len(chunk))
    if _size(part) != total:
        raise Gpt2tuneError(f"{src} changed size while being copied to {part}; rerun the copy")


# --------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class _Policy:
    retries: int
    connect_timeout: float
    read_timeout: float
    backoff: float
    deadline: float


class _Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the wait the server asked for, if any."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _HttpTransfer:
    """One resumable download of ``url`` into ``part``: the attempts and their bookkeeping."""

    def __init__(
        self, url: str, part: Path, session: requests.Session, bar: tqdm, policy: _Policy
    ) -> None:
        self.url, self.part, self.session, self.bar, self.policy = url, part, session, bar, policy
        # The largest .part seen. Only growth beyond it counts as progress, so a server
        # that ignores Range and drops every connection cannot keep us looping forever.
        self.high_water = _size(part)

    def run(self) -> None:
        failures, streak_start = 0, time.monotonic()
        while True:
            remaining = self.policy.deadline - (time.monotonic() - streak_start)
            try:
                self._attempt_once(remaining)
                return
            except _Transient as exc:
                failure = exc
            now = time.monotonic()
            if _size(self.part) > self.high_water:
                # The server is alive and the file grew: resume at once with a fresh budget.
                self.high_water = _size(self.part)
                failures, streak_start = 0, now
                continue
            failures += 1
            delay = failure.retry_after
            if delay is None:
                delay = self.policy.backoff * 2 ** (failures - 1)
            delay = min(delay, MAX_BACKOFF)
            if failures > self.policy.retries or now + delay - streak_start > self.policy.deadline:
                raise self._give_up(failure, failures, now - streak_start)
            time.sleep(delay)

    def _give_up(self, failure: _Transient, attempts: int, seconds: float) -> Gpt2tuneError:
        size = _size(self.part)
        kept = f"; {size} bytes kept in {self.part} for the next run" if size else ""
        return Gpt2tuneError(
            f"could not download {self.url}: {failure} ({attempts} attempt"
            f"{'' if attempts == 1 else 's'} in {seconds:.0f} s"
            f"{kept}); check the network connection, proxy settings and base_url, then rerun"
        )

    def _attempt_once(self, remaining: float) -> None:
        """One request; translates requests' exceptions into transient or final failures."""
        # Never wait longer to connect than the deadline leaves, so "unreachable" stays quick.
        connect = max(0.1, min(self.policy.connect_timeout, remaining))
        try:
            self._attempt((connect, self.policy.read_timeout))
        except requests.exceptions.SSLError as exc:  # a certificate problem won't heal by retrying
            raise Gpt2tuneError(
                f"TLS error talking to {self.url}: {_one_line(exc)}; check the system "
                "certificates or proxy"
            ) from None
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError,  # from the raw body stream: cut short, timed out
        ) as exc:
            raise _Transient(_describe(exc)) from None
        except requests.RequestException as exc:
            raise Gpt2tuneError(f"could not download {self.url}: {_one_line(exc)}") from None

    def _attempt(self, timeout: tuple[float, float]) -> None:
        offset = _size(self.part)
        # identity: the byte counts we check and resume from must be the file's own bytes.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with self.session.get(self.url, headers=headers, stream=True, timeout=timeout) as resp:
            if resp.status_code == 416 and offset:
                parsed = _content_range(resp)  # "bytes */<total>"
                if parsed and parsed[2] == offset:
                    return  # .part already holds the whole file; only the rename was missing
                self._discard()  # .part is longer than the remote file: stale, start over
                return self._attempt(timeout)
            _check_status(resp, self.url)
            start, total = self._body_range(resp, offset)
            self._receive(resp, start, total)
            whole = resp.status_code == 200
        self._check_size(total)
        if whole:
            self._confirm_end(timeout)

    def _confirm_end(self, timeout: tuple[float, float]) -> None:
        """After a 200, ask for the byte past the end: an honest server answers 416. A 206
        means the Content-Length undercounted the file (the rest is fetched next attempt)."""
        size = _size(self.part)
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={size}-"}
        with self.session.get(self.url, headers=headers, stream=True, timeout=timeout) as resp:
            if resp.status_code == 200:  # ignores Range: its announced length must agree
                length = resp.headers.get("Content-Length", "")
                total = int(length) if length.isdigit() else None
            elif resp.status_code in (206, 416):
                parsed = _content_range(resp)
                total = parsed[2] if parsed else None
                if resp.status_code == 206 and (total is None or total <= size):
                    total = size + 1  # bytes past our end exist, whatever the header says
            else:
                _check_status(resp, self.url)  # a 5xx is retried; a 404 now is odd but final
                return
        if total is None or total == size:
            return
        if total < size:
            self._discard()
            raise self._too_long(total)
        raise _Transient(
            f"the body ended after {size} bytes but the file has {total} (a wrong Content-Length)"
        )

    def _body_range(self, resp: requests.Response, offset: int) -> tuple[int, int | None]:
        """Where the body starts in the file and the file's total size (None: unknown)."""
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise Gpt2tuneError(
                f"{self.url} was sent with Content-Encoding {encoding!r} although none was "
                "requested, so its size cannot be checked; use another base_url"
            )
        if resp.status_code == 200:  # the whole file, even if we asked to resume
            length = resp.headers.get("Content-Length")
            return 0, int(length) if length and length.isdigit() else None
        parsed = _content_range(resp)
        if parsed is None:  # a broken proxy, perhaps; the next attempt may go better
            header = resp.headers.get("Content-Range")
            raise _Transient(f"HTTP 206 with a malformed Content-Range {header!r}")
        start, _, total = parsed
        if start != offset:
            self._discard()
            raise _Transient(f"asked to resume at byte {offset} but got bytes from {start}")
        return start, total

    def _receive(self, resp: requests.Response, start: int, total: int | None) -> None:
        expected = None if total is None else total - start
        self.bar.reset(total=total)
        self.bar.update(start)
        got, overflow = 0, False
        with open(self.part, "ab" if start else "wb") as out:  # "wb": a 200 restarts at zero
            # The raw stream, not iter_content: urllib3's decoding buffer would drop the bytes
            # already received when a connection breaks, and identity encoding means the
            # raw bytes are the file's bytes.
            for chunk in resp.raw.stream(CHUNK_SIZE, decode_content=False):
                got += len(chunk)
                overflow = expected is not None and got > expected
                if overflow:
                    break
                out.write(chunk)
                self.bar.update(len(chunk))
        if overflow:  # only possible without a Content-Length, which urllib3 would enforce
            self._discard()
            raise self._too_long(total)

    def _check_size(self, total: int | None) -> None:
        if total is None:
            return  # no announced length: a body that ended cleanly is all we can go by
        size = _size(self.part)
        if size < total:
            raise _Transient(f"connection closed after {size} of {total} bytes")
        if size > total:
            self._discard()
            raise self._too_long(total)

    def _too_long(self, total: int | None) -> Gpt2tuneError:
        return Gpt2tuneError(
            f"{self.url} sent more than the {total} bytes it announced, so the download "
            "cannot be trusted; retry later or use another base_url"
        )

    def _discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.high_water = 0


def _check_status(resp: requests.Response, url: str) -> None:
    code = resp.status_code
    if code in (200, 206):
        return
    if code in (404, 410):
        raise _NotFound(url, f"HTTP {code}")
    if code == 429 or code >= 500:
        raise _Transient(f"HTTP {code} {resp.reason}", _retry_after(resp))
    raise Gpt2tuneError(
        f"{url} answered HTTP {code} {resp.reason}; check the address and that the server "
        "allows downloads"
    )


def _content_range(resp: requests.Response) -> tuple[int | None, int | None, int | None] | None:
    """(first byte, last byte, total) from Content-Range, unknown parts None; None if absent."""
    match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    if not match:
        return None
    first, last, total = (int(g) if g and g.isdigit() else None for g in match.groups())
    return first, last, total


def _retry_after(resp: requests.Response) -> float | None:
    """The server's Retry-After in seconds; the HTTP-date form is rare enough to ignore."""
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "")))
    except ValueError:
        return None


def _describe(exc: Exception) -> str:
    """A short reason for a network failure; requests' own messages run to several lines."""
    text = str(exc)
    if isinstance(exc, requests.Timeout) or "timed out" in text:
        return "timed out"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError)):
        return "connection broken mid-transfer"
    errno = re.search(r"\[Errno [^\]]*\][^'\")]*", text)
    return f"connection failed ({errno.group(0).strip() if errno else type(exc).__name__})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


# --------------------------------------------------------------------------- small helpers


def _progress_bar(name: str, progress: bool | None) -> tqdm:
    # disable=None lets tqdm turn itself off when stderr is not a terminal (CI, dvc repro logs).
    disable = None if progress is None else not progress
    return tqdm(
        desc=name, unit="B", unit_scale=True, unit_divisor=1024, disable=disable, leave=True
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
