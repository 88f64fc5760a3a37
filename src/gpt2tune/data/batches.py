"""Training batches from a token array: random windows for training, fixed ones for validation.

:func:`random_windows` draws random contiguous windows of ``n_ctx + 1`` tokens (inputs
``w[:, :-1]``, targets ``w[:, 1:]``); :func:`eval_windows` gives evenly spaced, non-overlapping
where possible, deterministic windows for the validation loss. A corpus shorter than
``n_ctx + 1`` tokens gives windows of the whole corpus (:func:`window_length`). The loss mask
of prompt -> completion records (data/records.py) is cut into windows at the same starts:
``eval_windows`` of it directly (its starts depend only on the length), random ones with
:func:`random_starts` and :func:`take_windows`.
"""

from __future__ import annotations

import numpy as np

from gpt2tune.errors import Gpt2tuneError


def window_length(n_tokens: int, n_ctx: int) -> int:
    """Tokens per window, counting the shifted target: n_ctx + 1, or the whole stream if it is
    shorter. Gpt2tuneError if there are fewer than 2 tokens (no input-target pair)."""
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
    if n_tokens < 2:
        raise Gpt2tuneError(
            f"the training text is only {n_tokens} token(s) long; training needs at least 2 "
            "(an input and the token after it): add text to data.path and run `dvc repro encode`"
        )
    return min(n_ctx + 1, n_tokens)


def random_windows(
    tokens: np.ndarray, n_ctx: int, batch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """int32 [batch_size, window_length] random contiguous windows of `tokens`
    (inputs ``w[:, :-1]``, targets ``w[:, 1:]``); the same rng state gives the same batch."""
    starts = random_starts(len(tokens), n_ctx, batch_size, rng)
    return take_windows(tokens, starts, window_length(len(tokens), n_ctx))


def random_starts(
    n_tokens: int, n_ctx: int, batch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Where random_windows' windows start: also where their loss masks' do."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    length = window_length(n_tokens, n_ctx)
    return rng.integers(0, n_tokens - length + 1, size=batch_size)


def take_windows(array: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """int32 [len(starts), length]: array[s : s + length] for each start s (tokens, or the
    loss mask beside them)."""
    return np.asarray(array[starts[:, None] + np.arange(length)], dtype=np.int32)


def eval_windows(tokens: np.ndarray, n_ctx: int, count: int) -> np.ndarray:
    """int32 [k, window_length] windows evenly spaced through `tokens`, first at 0 and last at
    the end, k = min(count, how many fit without overlapping) and at least 1; always the same.
    k is 0 (shape [0, len(tokens)]) when there are fewer than 2 tokens, e.g. an empty val.npy:
    then there is nothing to validate on."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    n = len(tokens)
    if n < 2:
        return np.zeros((0, n), np.int32)
    length = window_length(n, n_ctx)
    k = min(count, max(1, n // length))
    span = n - length  # last possible start
    starts = np.array([0] if k == 1 else [j * span // (k - 1) for j in range(k)])
    return np.asarray(tokens[starts[:, None] + np.arange(length)], dtype=np.int32)
