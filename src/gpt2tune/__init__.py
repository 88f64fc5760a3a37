"""gpt2tune: fine-tune GPT-2 on your own text with TensorFlow 2.

The public API is loaded lazily, so stages that need no TensorFlow (downloading, params
checking) start fast:

    import gpt2tune
    m = gpt2tune.load_model("models/124M")
    texts = gpt2tune.generate(m, "Human reason ...", length=100)
    texts = gpt2tune.generate(m, "Human reason ...", sampling=gpt2tune.Sampling(top_k=40))
    scores = gpt2tune.score(m, ["Human reason ..."])  # log-probabilities, perplexity
"""

from __future__ import annotations

import importlib
import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) buries our own messages.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _xla_flags(flags: str, cpu_flags: set[str]) -> str:
    """XLA_FLAGS as gpt2tune runs them: `flags` plus --xla_cpu_prefer_vector_width=512 on a
    CPU with AVX-512, unless `flags` already set a width. XLA:CPU emits 256-bit vector code
    by default (older Intel parts slowed their clocks for 512-bit code), and generation's
    matrix-vector dots, one core each, read the weights faster in 512-bit code: 124M float32
    at batch 1 from 57.0 to 66.7 new tokens/s on the 2-core AVX-512 AMD EPYC of
    docs/benchmarks.md (bench/NOTES.md entry 28). XLA_FLAGS=--xla_cpu_prefer_vector_width=256
    keeps XLA's default."""
    if "avx512f" not in cpu_flags or "--xla_cpu_prefer_vector_width" in flags:
        return flags
    return f"{flags} --xla_cpu_prefer_vector_width=512".strip()


# Before TensorFlow reads XLA_FLAGS, at its first XLA compile (a compile before gpt2tune is
# imported keeps the flags it had).
_given = os.environ.get("XLA_FLAGS", "")
if (_wanted := _xla_flags(_given, _cpu_flags())) != _given:
    os.environ["XLA_FLAGS"] = _wanted

from gpt2tune.errors import Gpt2tuneError  # noqa: E402

_API = {
    "GPT2": "gpt2tune.model.gpt2",
    "init_model": "gpt2tune.model.gpt2",
    "load_model": "gpt2tune.model.checkpoint",
    "save_model": "gpt2tune.model.checkpoint",
    "Encoder": "gpt2tune.model.encoder",
    "load_encoder": "gpt2tune.model.encoder",
    "generate": "gpt2tune.generation.sampler",
    "generate_tokens": "gpt2tune.generation.sampler",
    "generate_many": "gpt2tune.generation.sampler",
    "score": "gpt2tune.generation.score",
    "Sampling": "gpt2tune.config.params",
}

__all__ = ["Gpt2tuneError", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gpt2tune' has no attribute {name!r}")
