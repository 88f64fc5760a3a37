"""Signals: Ctrl-C (SIGINT) and SIGTERM stop training after the step in flight, which is
then saved, instead of losing it; `Stopped` is what `fit` raises after that save."""

from __future__ import annotations

import signal
import threading


class Stopped(KeyboardInterrupt):
    """Training stopped on a signal after saving its last step. A KeyboardInterrupt, so that
    callers treat it as an interruption (MLflow marks the run killed, not failed)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name))


class stop_on_signals:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM (what preemptible machines and `kill` send)
    into a request to stop after the current step, so that step is finished and saved, not
    lost; a second signal interrupts at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __enter__(self):
        self.signal: str | None = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                self._previous[name] = signal.signal(getattr(signal, name), self._handler)
        return self

    def _handler(self, signum, frame):
        self.signal = signal.Signals(signum).name
        self._restore()

    def _restore(self):
        for name, previous in self._previous.items():
            signal.signal(getattr(signal, name), previous)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()
        return False
