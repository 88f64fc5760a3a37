"""The TF model against an independent NumPy GPT-2, and the key/value cache against full passes."""

import math

import numpy as np
import pytest

from gpt2tune import Gpt2tuneError
from gpt2tune.model.gpt2 import GPT2, init_model, variable_shapes

HP = {"n_vocab": 97, "n_ctx": 32, "n_embd": 64, "n_head": 4, "n_layer": 2}


def np_gpt2(w: dict, hp: dict, tokens: np.ndarray) -> np.ndarray:
    """GPT-2 written from the paper in float64 NumPy, one position loop for attention."""

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    w = {k: v.astype(np.float64) for k, v in w.items()}
    out = []
    for seq in tokens:
        t = len(seq)
        x = w["model/wte"][seq] + w["model/wpe"][:t]
        for i in range(hp["n_layer"]):
            p = lambda n, i=i: w[f"model/h{i}/{n}"]  # noqa: E731
            h = ln(x, p("ln_1/g"), p("ln_1/b"))
            qkv = h @ p("attn/c_attn/w")[0] + p("attn/c_attn/b")
            q, k, v = np.split(qkv, 3, axis=-1)
            hd = hp["n_embd"] // hp["n_head"]
            heads = []
            for hh in range(hp["n_head"]):
                sl = slice(hh * hd, (hh + 1) * hd)
                a = np.zeros((t, hd))
                for pos in range(t):
                    s = q[pos, sl] @ k[: pos + 1, sl].T / math.sqrt(hd)
                    s = np.exp(s - s.max())
                    a[pos] = (s / s.sum()) @ v[: pos + 1, sl]
                heads.append(a)
            x = x + np.concatenate(heads, -1) @ p("attn/c_proj/w")[0] + p("attn/c_proj/b")
            h = ln(x, p("ln_2/g"), p("ln_2/b"))
            h = gelu(h @ p("mlp/c_fc/w")[0] + p("mlp/c_fc/b"))
            x = x + h @ p("mlp/c_proj/w")[0] + p("mlp/c_proj/b")
        x = ln(x, w["model/ln_f/g"], w["model/ln_f/b"])
        out.append(x @ w["model/wte"].T)
    return np.stack(out)


def random_weights(hp, seed=0):
    """Non-trivial weights everywhere (gains and biases too) so every tensor matters."""
    rng = np.random.default_rng(seed)
    return {
        n: (rng.normal(1.0 if n.endswith("/g") else 0.0, 0.1, s)).astype(np.float32)
        for n, s in variable_shapes(hp).items()
    }


@pytest.fixture(scope="module")
def model():
    return GPT2(HP, random_weights(HP))


def test_variables_have_openai_names_and_shapes(model):
    assert model.params["model/wte"].shape == (97, 64)
    assert model.params["model/wpe"].shape == (32, 64)
    assert model.params["model/h1/attn/c_attn/w"].shape == (1, 64, 192)
    assert model.params["model/h0/mlp/c_fc/w"].shape == (1, 64, 256)
    assert model.params["model/h0/mlp/c_proj/w"].shape == (1, 256, 64)
    assert len(model.params) == 2 + 12 * 2 + 2
    assert len(model.trainable_variables) == len(model.params)


def test_logits_match_numpy_reference(model):
    tokens = np.random.default_rng(1).integers(0, 97, size=(3, 32)).astype(np.int32)
    logits = model(tokens).numpy()
    assert logits.shape == (3, 32, 97) and logits.dtype == np.float32
    ref = np_gpt2(model.weights_numpy(), HP, tokens)
    assert np.abs(logits - ref).max() <= 1e-4


def test_cached_decoding_equals_full_pass(model):
    import tensorflow as tf

    tokens = np.random.default_rng(2).integers(0, 97, size=(2, 20)).astype(np.int32)
    full = model(tokens).numpy()
    logits, past = model.forward(tokens[:, :7])  # prefill a prompt, then one token at a time
    steps = [logits.numpy()]
    for i in range(7, 20):
        logits, present = model.forward(tokens[:, i : i + 1], past=past)
        past = tf.concat([past, present], axis=-2)
        steps.append(logits.numpy())
    assert past.shape == (2, 2, 2, 4, 20, 16)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_decode_step_over_fixed_size_caches_equals_full_pass(model):
    """The sampler's one-token step (slot-written caches of a fixed size, masked beyond the
    position) gives the full pass's logits, through the same blocks."""
    import tensorflow as tf

    from gpt2tune.model.gpt2 import decode_step, flat_caches

    tokens = np.random.default_rng(3).integers(0, 97, size=(2, 12)).astype(np.int32)
    full = model(tokens).numpy()
    _, past = model.forward(tokens[:, :5])
    pad = [[0, 0], [0, 0], [0, 32 - 5], [0, 0]]  # cache size n_ctx, positions 0..4 filled
    caches = flat_caches(
        [(tf.pad(past[:, i, 0], pad), tf.pad(past[:, i, 1], pad)) for i in range(2)]
    )
    wte_t = tf.transpose(model.params["model/wte"])
    # Under XLA, as the sampler runs it: the cache is written by a dynamic update slice.
    step = tf.function(lambda *a: decode_step(model.params, HP, wte_t, *a), jit_compile=True)
    for pos in range(5, 12):
        logits, caches = step(tokens[:, pos], tf.constant(pos), caches)
        np.testing.assert_allclose(logits.numpy(), full[:, pos], atol=1e-5)
    assert caches[0][0].shape == (2 * 4, 32, 16)  # [batch x head, size, head_dim]


def test_init_like_openai():
    hp = dict(HP, n_vocab=1000, n_embd=128)
    w = init_model(hp, seed=3).weights_numpy()
    assert abs(w["model/wte"].std() - 0.02) < 0.001
    assert abs(w["model/wpe"].std() - 0.01) < 0.001
    assert abs(w["model/h0/attn/c_attn/w"].std() - 0.02) < 0.001
    assert (w["model/h0/ln_1/g"] == 1).all() and (w["model/h1/mlp/c_fc/b"] == 0).all()
    w2 = init_model(hp, seed=3).weights_numpy()
    assert all((w[k] == w2[k]).all() for k in w)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({**HP, "n_head": 5}, "not divisible"),
        ({**HP, "n_layer": 0}, "n_layer = 0"),
        ({k: v for k, v in HP.items() if k != "n_ctx"}, "missing n_ctx"),
        ({**HP, "n_embd": "64"}, "n_embd = '64'"),
    ],
)
def test_bad_hparams(bad, match):
    with pytest.raises(Gpt2tuneError, match=match):
        init_model(bad)


def test_wrong_weight_shape_names_tensor():
    w = random_weights(HP)
    w["model/h1/ln_2/b"] = np.zeros(65, np.float32)
    with pytest.raises(
        Gpt2tuneError, match=r"model/h1/ln_2/b has shape \[65\] but hparams need \[64\]"
    ):
        GPT2(HP, w)


def test_too_long_input_is_a_clear_error(model):
    with pytest.raises(Gpt2tuneError, match="33 positions exceed the model's context of 32"):
        model(np.zeros((1, 33), np.int32))


def test_any_integer_dtype_is_accepted_floats_are_not(model):
    tokens = np.arange(6).reshape(1, 6)
    ref = model(tokens.astype(np.int32)).numpy()
    np.testing.assert_array_equal(model(tokens.astype(np.int64)).numpy(), ref)
    np.testing.assert_array_equal(model(tf_int64(tokens)).numpy(), ref)
    with pytest.raises(Gpt2tuneError, match="integer ids, got float32"):
        model(tokens.astype(np.float32))


def tf_int64(a):
    import tensorflow as tf

    return tf.constant(a, tf.int64)


def test_left_padded_rows_give_their_unpadded_logits(model):
    """The sampler's ragged batch: rows of 3, 7 and 5 tokens left-padded to 7 (prompt pass),
    then decoded a step at a time: each row's logits are its own unpadded pass's."""
    import tensorflow as tf

    from gpt2tune.model.gpt2 import decode_step, flat_caches, prefill

    rng = np.random.default_rng(4)
    rows = [rng.integers(0, 97, size=n).tolist() for n in (3 + 4, 7 + 4, 5 + 4)]
    prompts, width = [r[:-4] for r in rows], 7
    pads = np.array([width - len(p) for p in prompts], np.int32)
    tokens = np.array([[0] * (width - len(p)) + p for p in prompts], np.int32)
    wte_t = tf.transpose(model.params["model/wte"])
    logits, caches = prefill(model.params, HP, wte_t, tokens, pads, 16)
    caches = flat_caches(caches)
    step = tf.function(lambda *a: decode_step(model.params, HP, wte_t, *a), jit_compile=True)
    for i in range(4):
        for b, r in enumerate(rows):  # row b alone, unpadded, through the full pass
            alone = model(np.array([r[: len(prompts[b]) + i]], np.int32)).numpy()[0, -1]
            np.testing.assert_allclose(logits.numpy()[b], alone, atol=1e-5)
        new = np.array([r[len(p) + i] for r, p in zip(rows, prompts, strict=True)], np.int32)
        logits, caches = step(new, tf.constant(width + i), caches, pads)
