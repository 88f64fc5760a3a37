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
