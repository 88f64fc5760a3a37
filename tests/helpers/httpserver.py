"""A real HTTP server on 127.0.0.1 for tests: serves a folder, with injectable faults.

Just a base URL::

    with serve_folder(tmp_path / "models") as base_url:
        fetch_model("124M", base_url, dest)

The request log and fault knobs::

    with FolderServer(root, drop_after=1000) as server:
        fetch_model("124M", server.url, dest)
        assert server.requests[-1].range == "bytes=1000-"

It answers HEAD and GET (200, or 206 + Content-Range for ``Range: bytes=N-`` and
``bytes=N-M``, 416 past the end) over HTTP/1.1 keep-alive, like a static file host.
"""

from __future__ import annotations

import http.client
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # the URL path, e.g. "/124M/checkpoint"
    range: str | None  # the Range header as sent, e.g. "bytes=1000-"


class _Serving:
    """An HTTP server on a free 127.0.0.1 port, in a thread, for the length of a `with`; the
    request handler (`_handler()`) reaches this object as `self.server.owner`."""

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def __enter__(self):
        self._httpd = _Server(("127.0.0.1", 0), self._handler())
        self._httpd.owner = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class FolderServer(_Serving):
    """Serve ``root`` on ``self.url``; every request is appended to ``self.requests``.

    Faults (all off by default):
      fail_first:  answer ``fail_status`` (with ``Retry-After: retry_after`` if given) to the
                   first N requests, whatever they ask for.
      drop_after:  for the first ``drop_count`` GETs of each file, close the connection once
                   the body reaches byte ``drop_after`` of the file (Content-Length still
                   promises the full body). An absolute offset, so a resumed request that
                   starts at or past it gets no bytes at all: drop_count=10**9 never recovers.
      ignore_range: always answer 200 with the whole file.
      stall:       for the first GET of each file, wait this many seconds after the headers.
      length_delta: announce a Content-Length this many bytes off the true body length in
                   every 200 (negative: the body runs past it; positive: it ends short).
      replace_first: {file name: bytes} served instead of that file to its first GET.
    """

    def __init__(
        self,
        root: Path,
        *,
        fail_first: int = 0,
        fail_status: int = 503,
        retry_after: float | None = None,
        drop_after: int | None = None,
        drop_count: int = 1,
        ignore_range: bool = False,
        stall: float = 0.0,
        length_delta: int = 0,
        replace_first: dict[str, bytes] | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.fail_first, self.fail_status, self.retry_after = fail_first, fail_status, retry_after
        self.drop_after, self.drop_count = drop_after, drop_count
        self.ignore_range, self.stall = ignore_range, stall
        self.length_delta, self.replace_first = length_delta, replace_first or {}
        self.requests: list[Request] = []
        self.url = ""
        self._gets: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return _Handler

    def requests_for(self, name: str) -> list[Request]:
        """The logged requests whose path ends with ``/name``."""
        return [r for r in self.requests if r.path.endswith("/" + name)]

    # ------------------------------------------------------------------ serving

    def handle(self, h: BaseHTTPRequestHandler, send_body: bool) -> None:
        path = urlsplit(h.path).path
        with self._lock:
            self.requests.append(Request(h.command, path, h.headers.get("Range")))
            failing = len(self.requests) <= self.fail_first
            if send_body:
                self._gets[path] += 1
            nth_get = self._gets[path]
        if failing:
            extra = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
            return _send_status(h, self.fail_status, extra)
        file = self._resolve(path)
        if file is None:
            return _send_status(h, 404)
        data = file.read_bytes()
        if send_body and nth_get == 1 and file.name in self.replace_first:
            data = self.replace_first[file.name]
        span = self._span(h.headers.get("Range"), len(data))
        if span is None:
            return _send_status(h, 416, {"Content-Range": f"bytes */{len(data)}"})
        start, end, partial = span
        h.send_response(206 if partial else 200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Accept-Ranges", "bytes")
        lie = 0 if partial else self.length_delta
        h.send_header("Content-Length", str(end - start + lie))
        if lie:
            # Said up front, so the client never reuses a connection whose stream the wrong
            # length has desynchronised (whether the extra bytes had arrived would be a race).
            h.send_header("Connection", "close")
        if partial:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        h.end_headers()
        if not send_body:
            return
        body = data[start:end]
        dropping = self.drop_after is not None and nth_get <= self.drop_count
        if dropping:
            body = body[: max(0, self.drop_after - start)]
        if self.stall and nth_get == 1:
            time.sleep(self.stall)
        h.wfile.write(body)
        if lie:
            h.close_connection = True  # the body and its length disagree: end the exchange
        if dropping and len(body) < end - start:
            h.wfile.flush()
            h.close_connection = True  # the client sees EOF short of Content-Length

    def _span(self, header: str | None, size: int) -> tuple[int, int, bool] | None:
        """(start, end, is_partial) of the body to send; None for an unsatisfiable range."""
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", (header or "").strip())
        if self.ignore_range or not match:
            return 0, size, False
        start = int(match[1])
        if start >= size:
            return None
        end = min(int(match[2]) + 1, size) if match[2] else size
        return start, end, True

    def _resolve(self, url_path: str) -> Path | None:
        target = (self.root / unquote(url_path).lstrip("/")).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            return None
        return target


def _send_status(h: BaseHTTPRequestHandler, code: int, headers: dict | None = None) -> None:
    body = f"{code}\n".encode()
    h.send_response(code)
    for key, value in (headers or {}).items():
        h.send_header(key, value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real file host (and requests) would use

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.server.owner.handle(self, send_body=False)

    def do_GET(self) -> None:  # noqa: N802
        self.server.owner.handle(self, send_body=True)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep pytest output clean


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: _Serving

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up (timeout) leaves a broken pipe behind; that is expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ForwardingProxy(_Serving):
    """A plain HTTP forward proxy on 127.0.0.1 (what ``HTTP_PROXY=http://...`` points at):
    it relays each request to the absolute URL it names and logs that URL in ``self.urls``."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.url = ""

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return _ProxyHandler


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.owner.urls.append(self.path)
        target = urlsplit(self.path)  # a proxy is sent the absolute URL
        skip = {"host", "connection", "proxy-connection", "proxy-authorization"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
        try:
            path = target.path + (f"?{target.query}" if target.query else "")
            upstream.request(self.command, path, headers=headers)
            resp = upstream.getresponse()
            body = resp.read()
            self.send_response(resp.status, resp.reason)
            for key, value in resp.getheaders():
                if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            upstream.close()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextmanager
def serve_folder(root: Path, **fault_options: object) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1 and yield the base URL (no trailing slash)."""
    with FolderServer(root, **fault_options) as server:  # type: ignore[arg-type]
        yield server.url


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextmanager
def silent_server() -> Iterator[str]:
    """An http URL whose server accepts connections (via the backlog) but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
