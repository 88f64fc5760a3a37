"""The open MLflow run of a stage: every call sent to the store, or kept in the run's offline
journal while the store is away (gpt2tune.tracking.run explains when; this module is how).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from gpt2tune.config.params import MlflowParams
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import display_path
from gpt2tune.tracking import journal
from gpt2tune.tracking.client import (
    MlflowRun,
    Unreachable,
    reason,
    resolve_tracking_uri,
    transient,
    wait_s,
)
from gpt2tune.tracking.journal import OFFLINE_PREFIX
from gpt2tune.tracking.outbox import Outbox
from gpt2tune.urls import redact


class Session(MlflowRun):
    """One open run: sends each call to MLflow, or to the run's offline journal while the
    store is away. ``run.info.run_id`` is the run's id (``offline-...`` until the store has
    created it).

    Once :meth:`start_sending` has run, the stage's thread only queues calls (:meth:`call`);
    the outbox's sender thread makes every MLflow call and owns the state below, except that
    the stage's thread appends to the journal when the queue overflows or the stage ends.

    The offline state, which every method upholds:

    * ``offline`` is True from the Session's creation and from any failed attempt to reach a
      store that may come back (:func:`gpt2tune.tracking.client.transient`), until the store has
      answered *and* every journal of this run (that of its local ``offline-...`` id, then its
      own) has been sent in full and deleted; only :meth:`catch_up` sets it False, as its
      last step.
    * While offline nothing is sent: every call is appended to :attr:`journal`, so the
      journals hold, in order, every call made since the store was last reached. The store
      is tried again no sooner than ``next_try``.
    * No call is sent while a journal of the run exists (the stage's thread may have spilled
      calls into it while online): the journal is sent first, so the store sees the calls in
      the order they were made.
    * Other failures of a sqlite or file store raise, in the stage's thread at its next call.
    """

    def __init__(self, cfg: MlflowParams, run_id: str) -> None:
        # The id it had before the server made it, whose journal may still hold records.
        self.local_id = run_id if run_id.startswith(OFFLINE_PREFIX) else None
        run_id = (self.local_id and journal.mapped_run_id(self.local_id)) or run_id
        super().__init__(resolve_tracking_uri(cfg.tracking_uri), cfg.experiment, run_id)
        self.offline = True  # not reached yet
        self.next_try = 0.0
        self.failures = 0  # in a row, for the backoff
        self.warned = False
        self.ended = False
        self.outbox: Outbox | None = None
        self.abandoned = False

    @property
    def info(self) -> Session:  # `run.info.run_id`, as on an mlflow Run
        return self

    @property
    def journal(self) -> Path:
        return journal.journal_path(self.run_id)

    def kept(self) -> bool:
        """Whether a journal of this run holds calls not sent yet."""
        local = self.local_id and journal.journal_path(self.local_id).exists()
        return bool(local) or self.journal.exists()

    def lost(self) -> bool:
        """An offline-made run (``offline-...``) that neither a journal nor a mapping to a
        real id knows any more: only the run folder or metrics/mlflow_run.json was copied to
        this machine, or metrics/mlflow_offline was deleted. No store will ever hold it."""
        return bool(self.local_id) and self.run_id == self.local_id and not self.kept()

    def start_sending(self) -> None:
        self.outbox = Outbox(self._deliver, self._spill)

    def call(self, op: dict) -> None:
        """Queue one operation for MLflow (it never waits on the network); without a sender
        thread, send it now or keep it."""
        if self.outbox is not None:
            self.outbox.put(op)
        elif not self._deliver(op):
            journal.append(self.journal, op)

    def finish(self) -> None:
        """Give the sender at most wait_s() to send what is queued (with one more try of a
        store that is away); journal what is left."""
        if self.outbox is not None:
            self.next_try = 0.0
            # A sender still busy after the deadline starts nothing new (the process may exit).
            self.abandoned = not self.outbox.close(wait_s())

    def _deliver(self, op: dict) -> bool:
        """(Sender thread.) Send one operation; False if it is to be kept in the journal."""
        if self._try_online():
            try:
                self.send(op)
                return True
            except Exception as e:
                if not transient(self.uri, e):
                    raise
                self.went_offline(reason(e))
        return False

    def _spill(self, ops: list[dict]) -> None:
        for op in ops:
            journal.append(self.journal, op)

    def catch_up(self) -> None:
        """Send this run's journals, oldest first, creating the run if only they know it;
        then the session is online. Unreachable if the server fails meanwhile."""
        if self.local_id:
            self.run_id = journal.mapped_run_id(self.local_id) or self.run_id
            journal.replay(self, journal.journal_path(self.local_id), self.local_id)
        if not self.run_id.startswith(OFFLINE_PREFIX):
            journal.replay(self, self.journal, None)
        self.offline = False
        self.failures = 0

    def _try_online(self) -> bool:
        """True if online with nothing kept, or back online now (the store answers again and
        the journals are sent); False while the store is away or before next_try."""
        if not self.offline and not self.kept():
            return True
        if self.abandoned or (self.offline and time.monotonic() < self.next_try):
            return False
        was_offline = self.offline
        try:
            if was_offline:
                self.connect()
            self.catch_up()
        except Unreachable as e:
            self.went_offline(None if was_offline else str(e))
            return False
        except Gpt2tuneError as e:  # e.g. the experiment was deleted meanwhile: stop trying
            self.offline, self.next_try = True, float("inf")
            print(f"warning: {e}; the records are kept in {display_path(self.journal)}",
                  file=sys.stderr)  # fmt: skip
            return False
        if was_offline:
            print(
                f"MLflow store {redact(self.uri)} is back; the kept records are in run "
                f"{self.run_id}",
                file=sys.stderr,
            )
        return True

    def went_offline(self, why: str | None) -> None:
        """The store failed (`why`, warned about once; None: a retry failed again). Tried
        again after a backoff: 0.5 s, doubling up to GPT2TUNE_MLFLOW_RETRY_S."""
        self.offline = True
        cap = float(os.environ.get("GPT2TUNE_MLFLOW_RETRY_S", "60"))
        self.next_try = time.monotonic() + min(cap, 0.5 * 2 ** min(self.failures, 16))
        self.failures += 1
        if why is not None and not self.warned:
            self.warned = True
            print(
                f"warning: MLflow tracking store {redact(self.uri)} is unreachable ({why}); "
                f"carrying on, with what it misses kept in {display_path(self.journal)} and "
                "sent when it answers again (or by the next stage, or "
                "`gpt2tune replay`)",
                file=sys.stderr,
            )
