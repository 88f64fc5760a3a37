"""A real `mlflow server` on 127.0.0.1 for tests, which a test can kill and start again.

with MlflowServer(tmp_path / "mlflow") as server:
    server.wait_ready()
    ...
    server.kill()     # SIGKILL, as a crash would
    server.start()    # same port, same store: the runs logged before are still there
    server.wait_ready()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_ports(n: int) -> list[int]:
    """n TCP ports of 127.0.0.1 that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class MlflowServer:
    """`mlflow server` as a child process with its own sqlite store and artifact folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"http://127.0.0.1:{free_ports(1)[0]}"
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        port = self.url.rsplit(":", 1)[1]
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port,
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        # No job runner: it would start a handful of idle consumer processes.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.log, "ab") as log:
            # A session of its own, so that teardown can end the server and its workers.
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self) -> None:
        """Block until GET /health answers (the server takes a few seconds to start)."""
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                pytest.fail(f"mlflow server did not come up:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the server and its workers at once, as a crash or an OOM kill would."""
        self._stop(((signal.SIGKILL, 10),))

    def __exit__(self, *exc: object) -> None:
        self._stop(((signal.SIGTERM, 10), (signal.SIGKILL, 5)))

    def _stop(self, steps: tuple[tuple[int, float], ...]) -> None:
        if self.proc is None:
            return
        for sig, wait in steps:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                pass
        self.proc = None
