"""The outbox: MLflow calls sent by a background thread, so that training never waits on the
network (or on a locked sqlite store).

The training thread only appends a call to a bounded queue (:meth:`Outbox.put`); one sender
thread takes the calls in order and hands each to `deliver`, which sends it (True) or says it
must be kept (False). Kept calls go to `spill` -- gpt2tune.tracking.run's offline journal. When the
queue is full, or when the stage ends and the sender has not caught up within its deadline
(:meth:`Outbox.close`), the training thread spills the call in flight and every queued one
itself, in order, and the sender drops the result of the call it was making. That call may
then reach the server *and* the journal; replaying it is harmless, since a (metric, step) pair
the run holds is skipped and texts, folders and the status are simply written again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

DRAIN_CAP_S = 120.0  # the longest a stage's end waits for a store that keeps answering
QUEUE_LIMIT = 10_000  # calls; a metrics call is a few hundred bytes, so a few MB at most


class Outbox:
    """A sender thread between the training loop and `deliver`; `spill` keeps what it cannot
    send. `spill` must only touch the local disk: the training thread calls it too."""

    def __init__(
        self,
        deliver: Callable[[dict], bool],
        spill: Callable[[list[dict]], None],
        limit: int = QUEUE_LIMIT,
    ) -> None:
        self.deliver, self.spill, self.limit = deliver, spill, limit
        self.cond = threading.Condition()
        self.queue: deque[dict] = deque()
        self.inflight: dict | None = None
        self.epoch = 0  # bumped when the training thread takes the calls over
        self.closing = False
        self.handled = 0  # calls the sender has finished with (sent or kept): its progress
        self.error: Exception | None = None  # a failure that is not the store being away
        self.thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
        self.thread.start()

    def put(self, op: dict) -> None:
        """Queue one call (never waits on the network); raise what the sender hit, if fatal."""
        with self.cond:
            self._raise_error()
            self.queue.append(op)
            if len(self.queue) > self.limit:
                self._take_over()
            self.cond.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued call is sent or spilled, for at most `timeout_s` without a
        call getting through (a store that does not answer costs timeout_s; a slow one that
        answers, such as a busy sqlite file, is waited for, up to DRAIN_CAP_S); True if so."""
        start = time.monotonic()
        end, seen = start + timeout_s, self.handled
        with self.cond:
            while self.queue or self.inflight is not None:
                now = time.monotonic()
                if self.handled != seen:  # progress: the store answers, give it more time
                    seen, end = self.handled, min(now + timeout_s, start + DRAIN_CAP_S)
                if end - now <= 0:
                    return False
                self.cond.wait(end - now)
            self._raise_error()
            return True

    def close(self, deadline_s: float) -> bool:
        """Let the sender finish for at most `deadline_s`, then spill whatever is left;
        False if anything was."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            drained = self.drain(deadline_s)
            if not drained:
                self._take_over()
            self._raise_error()
            return drained

    def _raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _take_over(self) -> None:
        """(With the lock held.) Spill the call in flight and the queue, in order."""
        ops = ([self.inflight] if self.inflight is not None else []) + list(self.queue)
        self.queue.clear()
        self.inflight = None
        self.epoch += 1
        self.spill(ops)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    return
                op = self.inflight = self.queue.popleft()
                epoch = self.epoch
            error = None
            try:
                sent = self.deliver(op)
            except Exception as e:  # handed to the training thread at its next call
                sent, error = False, e
            with self.cond:
                self.handled += 1
                if epoch == self.epoch:  # else the training thread has spilled it already
                    self.inflight = None
                    if not sent:
                        self.spill([op])
                    if error is not None and self.error is None:
                        self.error = error
                self.cond.notify_all()
