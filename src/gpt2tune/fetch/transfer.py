"""One resumable HTTP download into a ``.part`` file: attempts, resumes, retries and length
checks. :func:`gpt2tune.fetch.download.download_file` decides what happens to the file after.

Each attempt asks for the bytes past what the ``.part`` holds (``Range: bytes=<size>-``) and
appends them. A body is only accepted when its length agrees with the server's (Content-Length
or Content-Range): one cut short is resumed, one longer than announced is refused. After a
plain 200 the byte past the end is asked for: a server answers 416 there, so a 206 means the
Content-Length undercounted the file, and the rest is fetched.

Connection errors, timeouts, bodies cut short, HTTP 429 and 5xx are transient: retried with
exponential backoff (or the server's Retry-After). ``retries`` bounds the consecutive failures
that make no progress and ``deadline`` the seconds spent on them; a failure after which the
file grew starts a fresh budget. So an unreachable server is reported within about a minute,
while a flaky but moving download carries on to the end.

urllib3's ``Retry`` is not used: it retries only until a response's headers arrive (most
failures here break the body, and each retry needs a new Range), it has no overall deadline,
and it would have to be mounted on the caller's session.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3.exceptions
from tqdm import tqdm

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import file_size

CHUNK_SIZE = 1 << 16  # small enough for a lively progress bar, large enough to be cheap
MAX_BACKOFF = 30.0  # seconds; longer waits only delay the "unreachable" verdict

# "bytes 0-99/1234" in a 206, "bytes */1234" in a 416; the total may be "*" (unknown).
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


@dataclass(frozen=True)
class Policy:
    """How hard to try: see the module docstring."""

    retries: int
    connect_timeout: float
    read_timeout: float
    backoff: float
    deadline: float


class NotFound(Gpt2tuneError):
    """A missing source file; fetch_model rewords it to name the model."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"{where} was not found ({detail}); check the address")
        self.where, self.detail = where, detail


class _Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the wait the server asked for, if any."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class HttpTransfer:
    """One resumable download of ``url`` into ``part``: the attempts and their bookkeeping."""

    def __init__(
        self, url: str, part: Path, session: requests.Session, bar: tqdm, policy: Policy
    ) -> None:
        self.url, self.part, self.session, self.bar, self.policy = url, part, session, bar, policy
        # The largest .part seen. Only growth beyond it counts as progress, so a server
        # that ignores Range and drops every connection cannot keep us looping forever.
        self.high_water = file_size(part)

    def run(self) -> None:
        """Attempt until the file is whole; Gpt2tuneError once the budget is spent."""
        budget = _Budget(self.policy)
        while True:
            # Never wait longer to connect than the deadline leaves, so "unreachable" stays quick.
            try:
                with _translated_errors(self.url):
                    connect = max(0.1, min(self.policy.connect_timeout, budget.remaining()))
                    return self._attempt((connect, self.policy.read_timeout))
            except _Transient as failure:
                if file_size(self.part) > self.high_water:
                    # The server is alive and the file grew: resume at once with a fresh budget.
                    self.high_water = file_size(self.part)
                    budget.reset()
                elif not budget.wait(failure):
                    raise _give_up(self.url, self.part, failure, budget) from None

    def _get(self, range_from: int | None, timeout: tuple[float, float]) -> requests.Response:
        # identity: the byte counts we check and resume from must be the file's own bytes.
        headers = {"Accept-Encoding": "identity"}
        if range_from is not None:
            headers["Range"] = f"bytes={range_from}-"
        return self.session.get(self.url, headers=headers, stream=True, timeout=timeout)

    def _attempt(self, timeout: tuple[float, float]) -> None:
        offset = file_size(self.part)
        with self._get(offset or None, timeout) as resp:
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

    def _body_range(self, resp: requests.Response, offset: int) -> tuple[int, int | None]:
        """Where the body starts in the file and the file's total size (None: unknown)."""
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise Gpt2tuneError(
                f"{self.url} was sent with Content-Encoding {encoding!r} although none was "
                "requested, so its size cannot be checked; use another base_url"
            )
        if resp.status_code == 200:  # the whole file, even if we asked to resume
            return 0, _content_length(resp)
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
            raise _too_long(self.url, total)

    def _check_size(self, total: int | None) -> None:
        if total is None:
            return  # no announced length: a body that ended cleanly is all we can go by
        size = file_size(self.part)
        if size < total:
            raise _Transient(f"connection closed after {size} of {total} bytes")
        if size > total:
            self._discard()
            raise _too_long(self.url, total)

    def _confirm_end(self, timeout: tuple[float, float]) -> None:
        """After a 200, ask for the byte past the end: an honest server answers 416. A 206
        means the Content-Length undercounted the file (the rest is fetched next attempt)."""
        size = file_size(self.part)
        with self._get(size, timeout) as resp:
            if resp.status_code == 200:  # ignores Range: its announced length must agree
                total = _content_length(resp)
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
            raise _too_long(self.url, total)
        raise _Transient(
            f"the body ended after {size} bytes but the file has {total} (a wrong Content-Length)"
        )

    def _discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.high_water = 0


class _Budget:
    """The failures since the file last grew: how many, since when, and the wait after each."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.reset()

    def reset(self) -> None:
        self.failures, self.start = 0, time.monotonic()

    def remaining(self) -> float:
        return self.policy.deadline - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def wait(self, failure: _Transient) -> bool:
        """Count `failure` and sleep before the next attempt; False if the budget is spent."""
        self.failures += 1
        delay = failure.retry_after
        if delay is None:
            delay = self.policy.backoff * 2 ** (self.failures - 1)
        delay = min(delay, MAX_BACKOFF)
        if self.failures > self.policy.retries or self.elapsed() + delay > self.policy.deadline:
            return False
        time.sleep(delay)
        return True


@contextmanager
def _translated_errors(url: str) -> Iterator[None]:
    """requests' exceptions as a _Transient (worth retrying) or a Gpt2tuneError (final)."""
    try:
        yield
    except requests.exceptions.SSLError as exc:  # a certificate problem won't heal by retrying
        raise Gpt2tuneError(
            f"TLS error talking to {url}: {_one_line(exc)}; check the system certificates or proxy"
        ) from None
    except (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.HTTPError,  # from the raw body stream: cut short, timed out
    ) as exc:
        raise _Transient(_describe(exc)) from None
    except requests.RequestException as exc:
        raise Gpt2tuneError(f"could not download {url}: {_one_line(exc)}") from None


def _too_long(url: str, total: int | None) -> Gpt2tuneError:
    return Gpt2tuneError(
        f"{url} sent more than the {total} bytes it announced, so the download "
        "cannot be trusted; retry later or use another base_url"
    )


def _give_up(url: str, part: Path, failure: _Transient, budget: _Budget) -> Gpt2tuneError:
    size = file_size(part)
    kept = f"; {size} bytes kept in {part} for the next run" if size else ""
    attempts = budget.failures
    return Gpt2tuneError(
        f"could not download {url}: {failure} ({attempts} attempt"
        f"{'' if attempts == 1 else 's'} in {budget.elapsed():.0f} s"
        f"{kept}); check the network connection, proxy settings and base_url, then rerun"
    )


# --------------------------------------------------------------------------- responses


def _check_status(resp: requests.Response, url: str) -> None:
    code = resp.status_code
    if code in (200, 206):
        return
    if code in (404, 410):
        raise NotFound(url, f"HTTP {code}")
    if code == 429 or code >= 500:
        raise _Transient(f"HTTP {code} {resp.reason}", _retry_after(resp))
    raise Gpt2tuneError(
        f"{url} answered HTTP {code} {resp.reason}; check the address and that the server "
        "allows downloads"
    )


def _content_length(resp: requests.Response) -> int | None:
    length = resp.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


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
