"""What the benchmarks share: the machine's own rates, measured in the same run, and the peer.

- `matmul_rate`: float32 matrix-multiply FLOP/s of TensorFlow on this machine (best of a few
  shapes, the model's own among them, one product or four side by side), the denominator
  of MFU.
- `read_bandwidth`: bytes/s TensorFlow streams through memory (reduce_sum over a buffer far
  larger than the caches, whole and in 16 parts), the denominator of the memory-bandwidth
  bound of generation.
- `run_peer`: one measurement with OpenAI's original code (bench/peer.py) in its own process,
  with the Python of the `bench` extra's environment (.venv-bench, see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # the checkout's gpt2tune, installed or not

SHAPES_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}


def add_shape_args(ap, vocab: bool = True, **defaults: int) -> None:
    """--n_layer --n_embd --n_head --n_ctx and (with `vocab`) --n_vocab: 124M's unless
    `defaults` gives others."""
    for k, v in {**SHAPES_124M, **defaults}.items():
        if vocab or k != "n_vocab":
            ap.add_argument(f"--{k}", type=int, default=v)


def hparams(args) -> dict[str, int]:
    return {k: getattr(args, k) for k in SHAPES_124M}


def loadavg() -> list[str]:
    """1, 5 and 15-minute load: the machine is shared, so every result carries it."""
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return [f"{x:.2f}" for x in os.getloadavg()]


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(shapes: list[tuple[int, int, int]], repeat: int = 5) -> tuple[float, list]:
    """Best float32 FLOP/s of tf.matmul over [m, k] x [k, n] for each (m, k, n) in shapes, as
    one product and as 4 independent products side by side (a model's step runs several at
    once; one product alone does not always keep every core busy)."""
    import tensorflow as tf

    best, rows = 0.0, []
    for m, k, n in shapes:
        a = [tf.random.normal([m, k]) for _ in range(4)]
        b = [tf.random.normal([k, n]) for _ in range(4)]
        one = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a[0], b[0])[:1, :1]))
        four = tf.function(
            lambda a, b: tf.add_n([tf.reduce_sum(tf.matmul(a[i], b[i])[:1, :1]) for i in range(4)])
        )
        one(a, b).numpy()  # trace
        four(a, b).numpy()
        rate = (
            2
            * m
            * k
            * n
            * max(
                1 / best_time(lambda f=one, a=a, b=b: f(a, b).numpy(), repeat),
                4 / best_time(lambda f=four, a=a, b=b: f(a, b).numpy(), repeat),
            )
        )
        rows.append([m, k, n, round(rate / 1e9, 1)])
        best = max(best, rate)
    return best, rows


def read_bandwidth(mb: int = 1024, repeat: int = 5) -> float:
    """Bytes/s TensorFlow reads from memory: `mb` MB of float32 summed, as one tensor and as
    16 tensors summed side by side (one big reduce_sum does not always keep both cores
    streaming; many independent ones, like a model's weight matrices, can). The best of both.
    """
    import tensorflow as tf

    n = mb * (1 << 20) // 4 // 16 * 16
    one = tf.random.uniform([n])
    parts = tf.split(one, 16)
    sum_one = tf.function(tf.reduce_sum)
    sum_parts = tf.function(lambda xs: tf.add_n([tf.reduce_sum(x) for x in xs]))
    sum_one(one).numpy()
    sum_parts(parts).numpy()
    s = min(best_time(lambda: sum_one(one).numpy(), repeat),
            best_time(lambda: sum_parts(parts).numpy(), repeat))  # fmt: skip
    return n * 4 / s


def peer_python() -> str:
    """The Python that has gpt-2-simple: $GPT2TUNE_PEER_PYTHON, else .venv-bench, else ours."""
    env = os.environ.get("GPT2TUNE_PEER_PYTHON")
    if env:
        return env
    venv = REPO / ".venv-bench" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_peer(kind: str, settings: dict) -> dict:
    """Run bench/peer.py `kind` with these settings in a fresh process; its JSON result."""
    cmd = [peer_python(), str(REPO / "bench" / "peer.py"), kind, json.dumps(settings)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        sys.exit(f"the peer run failed ({' '.join(cmd[:3])}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])
