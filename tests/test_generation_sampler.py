"""Generation: cached sampling agrees with a plain argmax loop, is seeded, compiles once."""

import json
from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf
from helpers.models import tiny_model

from gpt2tune import Gpt2tuneError, Sampling, generate, generate_many, generate_tokens
from gpt2tune.config.params import SampleParams
from gpt2tune.generation.sampler import TOP_K_STATIC, _choose, _knobs, _kth_largest, _penalize
from gpt2tune.generation.samples import records_markdown, sample_records
from gpt2tune.model.gpt2 import GPT2, variable_shapes

HP = {"n_vocab": 50, "n_ctx": 24, "n_embd": 32, "n_head": 2, "n_layer": 2}


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    # Large weights give peaked distributions, so greedy and sampled paths differ visibly.
    w = {n: rng.normal(1.0 if n.endswith("/g") else 0.0, 0.5, s).astype(np.float32)
         for n, s in variable_shapes(HP).items()}  # fmt: skip
    return GPT2(HP, w)


def argmax_loop(model, context, length, penalty=1.0):
    """Greedy decoding with no cache: a full forward pass for every new token, with CTRL's
    repetition penalty on every token of the context and output so far."""
    tokens = list(context)
    for _ in range(length):
        window = (
            tokens[-HP["n_ctx"] :] if len(tokens) < HP["n_ctx"] else tokens[-HP["n_ctx"] // 2 :]
        )
        logits = model(np.array([window], np.int32)).numpy()[0, -1]
        seen = np.isin(np.arange(len(logits)), tokens)
        logits = np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)
        tokens.append(int(logits.argmax()))
    return tokens[len(context) :]


def test_greedy_equals_no_cache_argmax_loop(model):
    ctx = [3, 14, 15, 9, 2]
    ids = generate_tokens(model, ctx, length=15, nsamples=2, top_k=1, seed=1)
    assert ids.shape == (2, 15) and ids.dtype == np.int32
    expected = argmax_loop(model, ctx, 15)
    assert ids[0].tolist() == expected and ids[1].tolist() == expected
    greedy = generate_tokens(model, ctx, length=15, temperature=0.0)
    assert greedy[0].tolist() == expected


def test_sliding_window_beyond_context(model):
    ctx = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    ids = generate_tokens(model, ctx, length=40, top_k=1)  # 10 + 40 > n_ctx = 24
    assert ids.shape == (1, 40)
    tokens = list(ctx)
    expected = []
    while len(expected) < 40:  # reference: half-context strides, like the sampler documents
        window = tokens if len(tokens) < HP["n_ctx"] else tokens[-HP["n_ctx"] // 2 :]
        tokens = list(window)
        while len(tokens) < HP["n_ctx"] and len(expected) < 40:
            tok = int(model(np.array([tokens], np.int32)).numpy()[0, -1].argmax())
            tokens.append(tok)
            expected.append(tok)
    assert ids[0].tolist() == expected


def test_same_seed_same_tokens_and_no_retracing(model):
    a = generate_tokens(model, [1, 2, 3], length=12, nsamples=3, temperature=1.0, seed=7)
    b = generate_tokens(model, [1, 2, 3], length=12, nsamples=3, temperature=1.0, seed=7)
    c = generate_tokens(model, [1, 2, 3], length=12, nsamples=3, temperature=1.0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(r) for r in a}) > 1  # samples in a batch differ from each other
    # Other prompts, lengths, batch sizes and settings reuse the one compiled function.
    generate_tokens(model, [4, 5, 6, 7, 8, 9], length=5, nsamples=1, top_k=5, top_p=0.9, seed=1)
    generate_tokens(model, None, length=30, nsamples=2, temperature=0.5, seed=2)
    generate_tokens(model, [1, 2], length=5, repetition_penalty=1.3, stop=("a", "b"), seed=3)
    generate_tokens(model, [1, 2], length=5, repetition_penalty=0.5, temperature=0.0, seed=3)
    assert set(model._sampler.tracing_counts().values()) == {1}


def test_top_k_and_top_p_restrict_choices(model):
    ctx = [5, 6, 7]
    logits = model(np.array([ctx], np.int32)).numpy()[0, -1]
    order = np.argsort(-logits)
    firsts = generate_tokens(model, ctx, length=1, nsamples=64, top_k=3, seed=3)[:, 0]
    assert set(firsts.tolist()) <= set(order[:3].tolist())
    assert len(set(firsts.tolist())) > 1
    p = np.exp(logits - logits.max())
    p /= p.sum()
    nucleus = order[: int(np.searchsorted(np.cumsum(p[order]), 0.5)) + 1]
    firsts = generate_tokens(model, ctx, length=1, nsamples=64, top_p=0.5, seed=3)[:, 0]
    assert set(firsts.tolist()) <= set(nucleus.tolist())


@pytest.mark.parametrize("k", [1, 40, TOP_K_STATIC, TOP_K_STATIC + 1, 700, 1000])
def test_kth_largest_is_exact_on_both_paths(k):
    """Up to TOP_K_STATIC the k-th of XLA's top_k, beyond it the binary search: each the
    k-th largest of the row counting ties, +0/-0 and negatives included, one compile for every
    k (a tensor)."""
    rng = np.random.default_rng(k)
    x = np.round(rng.standard_normal((3, 1000)), 1).astype(np.float32)  # many ties
    x[1, :500] = -0.0
    x[2] = -np.abs(x[2]) - 1
    want = -np.sort(-x, axis=1)[:, k - 1 : k]
    got = _xla_kth_largest(tf.constant(x), tf.constant(k)).numpy()
    np.testing.assert_array_equal(got, want)
    assert _xla_kth_largest.experimental_get_tracing_count() == 1


_xla_kth_largest = tf.function(_kth_largest, jit_compile=True)


def test_stop_at_endoftext_pads_with_it(model):
    eot = HP["n_vocab"] - 1
    ids = generate_tokens(model, [1], length=30, nsamples=16, temperature=3.0, seed=0,
                          stop_at_endoftext=True)  # fmt: skip
    stopped = [r for r in ids.tolist() if eot in r]
    assert stopped, "hot sampling should hit <|endoftext|> in some of 16 samples"
    for r in stopped:
        assert all(t == eot for t in r[r.index(eot) :])


def test_prompt_longer_than_context(model):
    with pytest.raises(Gpt2tuneError, match="prompt is 25 tokens but the model's context is 24"):
        generate_tokens(model, list(range(25)), length=1)


@pytest.mark.parametrize(
    "kw, match",
    [({"top_p": 1.5}, "top_p"), ({"temperature": -1.0}, "temperature"), ({"length": 0}, "length"),
     ({"top_k": -2}, "top_k"), ({"nsamples": 0}, "nsamples"),
     ({"repetition_penalty": 0.0}, "repetition_penalty = 0.0"), ({"stop": [""]}, "stop"),
     ({"stop": "abc"}, "stop = 'abc': must be a list")],
)  # fmt: skip
def test_bad_settings(model, kw, match):
    args = {"length": 3} | kw
    with pytest.raises(Gpt2tuneError, match=match):
        generate_tokens(model, [1], **args)


def test_a_sampling_value_is_the_same_as_its_keywords(model):
    s = Sampling(nsamples=3, length=12, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    a = generate_tokens(model, [1, 2, 3], sampling=s)
    b = generate_tokens(model, [1, 2, 3], length=12, nsamples=3, temperature=1.0, top_k=5,
                        top_p=0.9, seed=7)  # fmt: skip
    np.testing.assert_array_equal(a, b)
    assert generate_tokens(model, [1, 2, 3], 4, sampling=s).shape == (3, 4)  # length wins
    assert not np.array_equal(generate_tokens(model, [1, 2, 3], sampling=s, seed=8), a)
    with pytest.raises(Gpt2tuneError, match="top_p = 1.5"):
        generate_tokens(model, [1], sampling=Sampling(top_p=1.5))
    with pytest.raises(TypeError, match="unknown sampling setting.* topk"):
        generate_tokens(model, [1], sampling=s, topk=3)


def test_markdown_names_every_setting_but_nsamples():
    cfg = SampleParams(nsamples=1, length=5, temperature=0.5, top_k=3, top_p=0.9, seed=4,
                       prompts=("Hi",))  # fmt: skip
    records = [{"prompt": None, "index": 0, "text": "a"}, {"prompt": "Hi", "index": 0, "text": "b"}]
    md = records_markdown(records, cfg)
    assert md.startswith(
        "# Samples\n\nlength 5, temperature 0.5, top_k 3, top_p 0.9, seed 4, "
        "repetition_penalty 1.0, stop [], precision float32\n"
    )
    assert "## Prompt: Hi — sample 1\n\n**Hi**b\n" in md


def test_repetition_penalty_follows_the_ctrl_rule():
    logits = tf.constant([[2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0]])
    seen = tf.constant([[True, True, False, False], [False, False, True, True]])
    out = _penalize(logits, seen, tf.constant(2.0)).numpy()
    np.testing.assert_array_equal(out, [[1.0, -2.0, 0.5, -3.0], [2.0, -1.0, 0.25, -6.0]])
    np.testing.assert_array_equal(_penalize(logits, seen, tf.constant(1.0)).numpy(), logits)
    # Greedy choice after the penalty: token 0 (seen) falls below token 2 (unseen).
    greedy = Sampling(temperature=0.0, top_k=0, repetition_penalty=5.0)
    u = tf.zeros([2], tf.float64)
    chosen = _choose(logits, _knobs(greedy), u, seen).numpy()
    assert chosen.tolist() == [2, 0]
    plain = _choose(logits, _knobs(Sampling(temperature=0.0)), u, seen).numpy()
    assert plain.tolist() == [0, 0]


def test_greedy_with_a_penalty_avoids_the_repeat_plain_greedy_makes(model):
    ctx = [3, 14, 15, 9, 2]
    plain = generate_tokens(model, ctx, length=15, temperature=0.0)[0].tolist()
    assert len(set(ctx + plain)) < len(ctx + plain)  # the premise: plain greedy repeats
    penalised = generate_tokens(model, ctx, length=15, temperature=0.0, repetition_penalty=3.0)
    assert penalised[0].tolist() == argmax_loop(model, ctx, 15, penalty=3.0)
    assert penalised[0].tolist() != plain
    repeats = [len(ctx + r) - len(set(ctx + r)) for r in (plain, penalised[0].tolist())]
    assert repeats[1] < repeats[0]


@pytest.fixture(scope="module")
def text_model(tiny_vocab_dir):
    return tiny_model(tiny_vocab_dir, 0, n_ctx=24, n_embd=32, n_layer=2)


def test_stop_cuts_each_text_before_the_first_stop_string(text_model):
    s = Sampling(nsamples=3, length=30, temperature=1.0, top_k=0, seed=5)
    full = generate(text_model, "Human reason", sampling=s)
    stop = full[0][6:8]  # a string the first sample holds, at or after its 7th character
    assert stop
    cut = generate(text_model, "Human reason", sampling=s, stop=[stop, "never in the text"])
    for whole, part in zip(full, cut, strict=True):
        assert part == (whole[: whole.index(stop)] if stop in whole else whole)
    assert len(cut[0]) <= 6 < len(full[0])
    # Beyond the context (sliding windows): the same cut; all rows stopping ends early.
    long = generate(text_model, None, sampling=s, length=60, stop=[stop], stop_at_endoftext=True)
    whole = generate(text_model, None, sampling=s, length=60, stop_at_endoftext=True)
    assert long == [t[: t.index(stop)] if stop in t else t for t in whole]


def test_batch_size_does_not_change_the_samples(text_model):
    enc = text_model.encoder
    prompts = ("Human reason", "The mind", "Human reason is", "One sphere", "The mind of")
    assert len({len(enc.encode(p)) for p in prompts}) < len(prompts)  # some share a length
    base = SampleParams(nsamples=2, length=12, temperature=1.0, top_k=0, seed=3, prompts=prompts)
    runs = [sample_records(text_model, replace(base, batch_size=b)) for b in (1, 3)]
    assert json.dumps(runs[0]) == json.dumps(runs[1])
    texts = [r["text"] for r in runs[0]]
    assert len(set(texts)) > len(prompts)  # samples of one prompt differ from each other
    assert [r["prompt"] for r in runs[0]] == [None, None] + [p for p in prompts for _ in "ab"]
    # The same texts as one prompt at a time, and other settings reuse the one compiled sampler.
    alone = [generate(text_model, p, sampling=base) for p in prompts]
    assert generate_many(text_model, prompts, sampling=base, batch_size=2) == alone
    generate_many(text_model, prompts, sampling=base, batch_size=4, repetition_penalty=1.5,
                  stop=["e"])  # fmt: skip
    assert set(text_model._sampler.tracing_counts().values()) == {1}


def reference_sampler(model, ctx, length, nsamples, seed, temperature, top_k=0, top_p=0.0,
                      penalty=1.0):  # fmt: skip
    """The sampler as it was before its loop moved into XLA, written plainly: a full pass per
    token (no cache), tf.math.top_k, and one tf.random.stateless_categorical draw per row from
    its key (seed, sample index, segment 0) with the step folded in."""
    fold = tf.random.experimental.stateless_fold_in
    rows = []
    for j in range(nsamples):
        key = fold(tf.constant([seed, j], tf.int64), tf.constant(0, tf.int64))
        tokens = list(ctx)
        for i in range(length):
            logits = model(np.array([tokens], np.int32))[:, -1]
            seen = tf.constant(np.isin(np.arange(HP["n_vocab"]), tokens)[None])
            logits = _penalize(logits, seen, tf.constant(penalty)) / temperature
            if top_k:
                kth = tf.math.top_k(logits, k=top_k).values[:, -1:]
                logits = tf.where(logits < kth, -1e10, logits)
            if top_p:
                srt = tf.sort(logits, direction="DESCENDING")
                before = tf.cumsum(tf.nn.softmax(srt), axis=-1, exclusive=True)
                cutoff = tf.reduce_min(tf.where(before < top_p, srt, srt[:, :1]))
                logits = tf.where(logits < cutoff, -1e10, logits)
            step_key = fold(key, tf.constant(i, tf.int64))
            tokens.append(int(tf.random.stateless_categorical(logits, 1, step_key)[0, 0]))
        rows.append(tokens[len(ctx) :])
    return rows


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
     dict(temperature=1.0, top_k=7, top_p=0.9, penalty=1.5)],
)  # fmt: skip
def test_samples_equal_the_plain_stateless_categorical_sampler(model, kw):
    # The compiled loop (in-place caches, sampling inside XLA) draws the same tokens at the
    # same seed as a row-by-row stateless_categorical over full passes: the old stream.
    ctx, length, n, seed = [3, 14, 15], 12, 3, 11
    s = {k: v for k, v in kw.items() if k != "penalty"}
    ids = generate_tokens(model, ctx, length=length, nsamples=n, seed=seed, top_k=s.pop("top_k", 0),
                          repetition_penalty=kw.get("penalty", 1.0), **s)  # fmt: skip
    assert ids.tolist() == reference_sampler(model, ctx, length, n, seed, **kw)


def test_prompts_of_different_lengths_share_a_batch_exactly(model):
    # Left-padded, masked, positions per row: each row's tokens are its unbatched run's.
    from gpt2tune.generation.sampler import _generate_rows

    s = Sampling(nsamples=2, length=10, temperature=1.0, top_k=0, seed=5)
    contexts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    together = _generate_rows(model, contexts, s, False)
    alone = np.concatenate([_generate_rows(model, [c], s, False) for c in contexts])
    np.testing.assert_array_equal(together, alone)


def test_a_finished_row_stops_within_a_chunk_and_all_finished_end_the_loop(model):
    from gpt2tune.generation.sampler import CHUNK, _generate_rows

    s = Sampling(nsamples=3, length=20, temperature=1.0, top_k=0, seed=2)
    eot = HP["n_vocab"] - 1
    free = _generate_rows(model, [[1, 2]], s, False)
    # Row 0 finishes after 2 tokens: from the next chunk on it emits <|endoftext|>; the
    # others are untouched, and the loop runs to the end.
    starts = [tuple(r[:2]) for r in free.tolist()]
    row = next(j for j, x in enumerate(starts) if starts.count(x) == 1)  # one row's own start
    some = _generate_rows(model, [[1, 2]], s, False, lambda r: tuple(r[:2]) == starts[row])
    assert (some[row, 1 + CHUNK :] == eot).all()
    np.testing.assert_array_equal(some[row, : 1 + CHUNK], free[row, : 1 + CHUNK])
    others = [j for j in range(3) if j != row]
    np.testing.assert_array_equal(some[others], free[others])
    # Every row finished after its first token: one call of CHUNK steps, not 20.
    assert _generate_rows(model, [[1, 2]], s, False, lambda r: len(r) >= 1).shape == (3, 1)
    assert _generate_rows(model, [[1, 2]], s, False, lambda r: len(r) >= 2).shape == (3, 1 + CHUNK)


def test_the_one_graph_segment_gives_the_same_tokens(model):
    # _build_sampler's sample_segment (what a SavedModel calls) runs the same pieces in a
    # tf.while_loop: the tokens of generate_tokens at the same seed.
    from gpt2tune.generation.sampler import _build_sampler

    s = Sampling(nsamples=2, length=11, temperature=1.0, top_k=4, seed=6)
    ctx = np.array([[5, 6, 7]] * 2, np.int32)
    keys = np.array([[6, 0, 0], [6, 1, 0]], np.int64)
    out = _build_sampler(model)(ctx, ctx, tf.constant(11), _knobs(s), keys, tf.constant(-1))
    np.testing.assert_array_equal(out.numpy(), generate_tokens(model, [5, 6, 7], sampling=s))
