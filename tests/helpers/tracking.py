"""MLflow servers that misbehave (a port that accepts and never answers) and a training
tracked against one, timed part by part (tests/test_tracking_stalls.py and bench/tracking.py);
a data/encoded to log as a run's datasets."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import NamedTuple

from gpt2tune.config.params import TrainParams


class BlackHole:
    """A TCP port on 127.0.0.1 that never answers: it accepts connections and reads nothing
    ("accept"), or never accepts, with its accept queue already full ("backlog")."""

    def __init__(self, mode: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0 if mode == "backlog" else 64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        if mode == "backlog":  # fill the queue (backlog 0 holds one or two on Linux)
            for _ in range(4):
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(self.sock.getsockname())
                self.held.append(c)
        else:
            threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:  # closed
                return

    def close(self) -> None:
        for s in [self.sock, *self.held]:
            s.close()


class Waits(NamedTuple):
    """Where a tracked training's wall time went, in seconds."""

    start: float  # entering training_run: reaching the store, creating the run
    fit: float  # the training itself (train.fit), its tracking calls included
    in_calls: float  # of which inside the tracking calls of the training loop
    end: float  # leaving training_run: sending what is queued, or keeping it offline


def tracked_training(model, train_tokens, val_tokens, cfg: TrainParams, run_dir: Path,
                     store, params: dict, during=None):  # fmt: skip
    """Train `model` tracked in `store` (MlflowParams) as stages/train.py does: `train.fit`
    inside `tracking.training_run`, logging losses and samples; `during(session)`, if given,
    runs first, outside every figure. Returns (Waits, the tracking session)."""
    from gpt2tune.tracking import run as tracking
    from gpt2tune.train.loop import fit

    in_calls = 0.0

    def timed(call):
        def timed_call(*args):
            nonlocal in_calls
            start = time.monotonic()
            try:
                return call(*args)
            finally:
                in_calls += time.monotonic() - start

        return timed_call

    t0 = time.monotonic()
    with tracking.training_run(store, params) as run:
        t1 = time.monotonic()
        if during is not None:
            during(run)
        t_fit = time.monotonic()
        fit(model, train_tokens, val_tokens, cfg, run_dir, run_fingerprint="fp",
            log_metrics=timed(tracking.log_metrics),
            log_sample=timed(lambda text, step: tracking.log_text(text, f"samples/{step}.txt")),
            state_extra={"mlflow_run_id": run.info.run_id}, progress=False)  # fmt: skip
        t2 = time.monotonic()
    return Waits(t1 - t0, t2 - t_fit, in_calls, time.monotonic() - t2), run


def encoded_dir(root: Path, train: list[int], val: list[int]) -> tuple[Path, dict]:
    """root/data/encoded as the encode stage leaves it: train.npy, val.npy and their stats."""
    import numpy as np

    out = root / "data" / "encoded"
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train.npy", np.array(train, dtype=np.uint16))
    np.save(out / "val.npy", np.array(val, dtype=np.uint16))
    stats = {"n_vocab": 50257, "train_tokens": len(train), "val_tokens": len(val)}
    (out / "stats.json").write_text(json.dumps(stats))
    return out, stats
