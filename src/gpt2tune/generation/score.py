"""Scoring: the log-probability a model gives each token of a text (`gpt2tune score`).

    results = gpt2tune.score(model, ["Human reason", "has this peculiar fate"])
    results[0]["logprob"], results[0]["mean_logprob"], results[0]["perplexity"]

A text of n tokens t_1..t_n is scored as GPT-2 reads it: after ``<|endoftext|>`` (t_0), so
the first token is conditioned on that, and log p(t_1..t_n) = sum_j log p(t_j | t_0..t_{j-1}).
Natural logarithms; perplexity = exp(-mean log-probability).

Texts longer than the context (n + 1 > n_ctx) slide a window of n_ctx tokens by
s = n_ctx // 2: token j (0-based in t_0..t_n) is predicted in the window that starts at the
smallest multiple of s, a_j, with j < a_j + n_ctx, i.e. from the tokens a_j..j-1. So a token
within the first n_ctx positions sees everything before it, and every later one sees at least
n_ctx - s (half a context, rounded up) tokens before it. Each window scores only the tokens no
earlier window can, so a text costs about n / s forward passes of n_ctx tokens.

Windows of every text are batched together, right-padded to the longest of their batch:
GPT-2 is causal, so padding after a position changes nothing before it, and padded positions
are simply not read. The result does not depend on the batch size or on the other texts (up
to float32 rounding in the matmuls).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.model.gpt2 import GPT2

DEFAULT_BATCH = 8  # windows per forward pass


def window_starts(n_positions: int, n_ctx: int) -> list[int]:
    """The starts of the windows over a sequence of n_positions tokens (t_0..t_n): 0, s, 2s,
    ... while a token is left that no earlier window predicts with enough context."""
    s = max(1, n_ctx // 2)
    starts = [0]
    while starts[-1] + n_ctx < n_positions:
        starts.append(starts[-1] + s)
    return starts


def _windows(ids: Sequence[int], eot: int, n_ctx: int) -> list[tuple[np.ndarray, int, int]]:
    """(window tokens, first target j, end target j) of each window of [eot, *ids]: the
    window starting at a predicts targets lo..hi-1, the ones whose a_j is a."""
    x = np.asarray([eot, *ids], np.int32)
    out = []
    for k, a in enumerate(window_starts(len(x), n_ctx)):
        lo = 1 if k == 0 else a + n_ctx - max(1, n_ctx // 2)
        hi = min(a + n_ctx, len(x))
        out.append((x[a:hi], lo, hi))
    return out


def token_logprobs(
    model: GPT2, texts_ids: Sequence[Sequence[int]], batch_size: int = DEFAULT_BATCH
) -> list[np.ndarray]:
    """Each text's per-token log-probabilities (float64, one per token id), see the module
    docstring for the windows."""
    if batch_size < 1:
        raise Gpt2tuneError(f"batch size = {batch_size}: must be at least 1")
    eot = model.encoder.eot_token if model.encoder is not None else model.hparams["n_vocab"] - 1
    n_ctx = model.hparams["n_ctx"]
    jobs = []  # (text index, window tokens, lo, hi, window start)
    for i, ids in enumerate(texts_ids):
        for w, lo, hi in _windows(ids, eot, n_ctx):
            jobs.append((i, w, lo, hi, hi - len(w)))
    out = [np.zeros(len(ids), np.float64) for ids in texts_ids]
    # Longest first, so a batch's windows are of similar lengths (little padding).
    jobs.sort(key=lambda job: -len(job[1]))
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b : b + batch_size]
        width = len(batch[0][1])
        tokens = np.zeros((len(batch), width), np.int32)
        for r, (_, w, *_) in enumerate(batch):
            tokens[r, : len(w)] = w
        logp = tf.nn.log_softmax(model(tokens), axis=-1).numpy()
        for r, (i, w, lo, hi, a) in enumerate(batch):
            pos = np.arange(lo, hi) - a - 1  # the logits at position p predict token p + 1
            out[i][lo - 1 : hi - 1] = logp[r, pos, w[pos + 1]]
    return out


def score(
    model: GPT2,
    texts: str | Iterable[str],
    *,
    tokens: bool = False,
    batch_size: int = DEFAULT_BATCH,
) -> list[dict]:
    """Per text: {"text", "tokens" (count), "logprob" (total), "mean_logprob", "perplexity"},
    and with `tokens` "token_logprobs": [[token text, log-probability], ...]. `texts`: one
    string or several; an empty text is refused (it has no token to score)."""
    if model.encoder is None:
        raise Gpt2tuneError("this model has no encoder: load it with gpt2tune.load_model(folder)")
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise Gpt2tuneError(f"text {i} is {type(t).__name__}, not a string")
        ids.append(model.encoder.encode(t, allow_endoftext=True))
        if not ids[-1]:
            raise Gpt2tuneError(f"text {i} is empty: it has no token to score")
    results = []
    for t, tok, lp in zip(texts, ids, token_logprobs(model, ids, batch_size), strict=True):
        total = float(lp.sum())
        mean = total / len(lp)
        r = {"text": t, "tokens": len(lp), "logprob": total, "mean_logprob": mean,
             "perplexity": math.exp(-mean)}  # fmt: skip
        if tokens:
            r["token_logprobs"] = [[model.encoder.decode([k]), float(v)]
                                   for k, v in zip(tok, lp, strict=True)]  # fmt: skip
        results.append(r)
    return results
