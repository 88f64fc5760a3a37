"""Scoring: per-token log-probabilities equal an independent computation from the full forward
pass, for texts shorter and longer than the context, batched or one at a time."""

import math

import numpy as np
import pytest
from helpers.models import tiny_model

from gpt2tune import Gpt2tuneError, score
from gpt2tune.generation.score import token_logprobs, window_starts

N_CTX = 16


@pytest.fixture(scope="module")
def model(tiny_vocab_dir):
    return tiny_model(tiny_vocab_dir, 0, n_ctx=N_CTX, n_embd=32, n_layer=2)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def independent(model, ids: list[int]) -> np.ndarray:
    """Token j of [eot, *ids] predicted by one full forward pass of its own over
    x[a_j:j] (a_j the stated rule: the smallest multiple of n_ctx // 2 with j < a_j + n_ctx),
    log-softmax in float64."""
    x = [model.encoder.eot_token, *ids]
    s = N_CTX // 2
    out = []
    for j in range(1, len(x)):
        a = s * max(0, math.ceil((j - N_CTX + 1) / s))
        assert j - a >= (j if j < N_CTX else N_CTX - s)  # all before it, or half a context
        logits = model(np.array([x[a:j]], np.int32)).numpy()[0, -1]
        out.append(log_softmax64(logits)[x[j]])
    return np.array(out)


def test_short_text_equals_the_full_forward_pass(model):
    ids = model.encoder.encode("Human reason")
    assert len(ids) + 1 <= N_CTX
    x = np.array([[model.encoder.eot_token, *ids]], np.int32)
    full = log_softmax64(model(x).numpy()[0])
    want = full[np.arange(len(ids)), ids]  # position p predicts token p + 1
    got = score(model, "Human reason", tokens=True)[0]
    np.testing.assert_allclose([lp for _, lp in got["token_logprobs"]], want, atol=1e-5)
    assert got["tokens"] == len(ids)
    assert got["logprob"] == pytest.approx(want.sum(), abs=1e-4)
    assert got["mean_logprob"] == pytest.approx(want.mean(), abs=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(-want.mean()), rel=1e-5)
    assert "".join(t for t, _ in got["token_logprobs"]) == got["text"]


def test_long_texts_slide_the_window_and_batches_equal_one_at_a_time(model):
    texts = [
        "Human reason, in one sphere of its cognition, is called upon to consider questions, "
        "which it cannot decline, as they are presented by its own nature",  # > 2 contexts
        "but which it cannot answer",  # shorter than the context
        "as they transcend every faculty of the mind.",
    ]
    ids = [model.encoder.encode(t) for t in texts]
    assert len(ids[0]) + 1 > 2 * N_CTX and len(ids[1]) + 1 < N_CTX
    assert len(window_starts(len(ids[0]) + 1, N_CTX)) > 2
    batched = token_logprobs(model, ids, batch_size=3)
    for one, got in zip(ids, batched, strict=True):
        np.testing.assert_allclose(got, independent(model, one), atol=1e-5)
        np.testing.assert_allclose(got, token_logprobs(model, [one], batch_size=1)[0], atol=1e-5)
    results = score(model, texts, batch_size=2)
    assert [r["tokens"] for r in results] == [len(i) for i in ids]
    for r, lp in zip(results, batched, strict=True):
        assert r["logprob"] == pytest.approx(lp.sum(), abs=1e-4)


def test_empty_text_is_refused(model):
    with pytest.raises(Gpt2tuneError, match="text 1 is empty"):
        score(model, ["Human", ""])
