"""Reduced-precision weights for generation (gpt2tune.model.precision, sample.precision):
each matmul within the error its rounding allows, whole models within float32's greedy
choices where the margin allows, and float32, the files and training untouched."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf

from gpt2tune import Gpt2tuneError, generate_tokens
from gpt2tune.generation.sampler import _sampler, decoding_precision
from gpt2tune.model.checkpoint import load_model, save_model
from gpt2tune.model.gpt2 import GPT2, forward, variable_shapes
from gpt2tune.model.precision import matmul_t, prepare, quantize_rows

HP = {"n_vocab": 50, "n_ctx": 24, "n_embd": 32, "n_head": 2, "n_layer": 2}
REDUCED = ("bfloat16", "int8")


@pytest.fixture(scope="module")
def model():
    # A large wte against small block weights: peaked next-token distributions, so float32's
    # greedy choices have margins that rounding the weights cannot close.
    rng = np.random.default_rng(0)
    std = {"model/wte": 1.0, "model/wpe": 0.1}
    w = {n: rng.normal(1.0 if n.endswith("/g") else 0.0, std.get(n, 0.1), s).astype(np.float32)
         for n, s in variable_shapes(HP).items()}  # fmt: skip
    return GPT2(HP, w)


def matrices():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 48)).astype(np.float32)
    w = rng.normal(0, 0.02, (48, 40)).astype(np.float32)  # [in, out], OpenAI's layout
    w[:, 7] = 0  # an all-zero output row: int8's scale must not divide by zero
    return x, w


@pytest.mark.parametrize("xla", [False, True])
def test_bfloat16_matmul_within_three_roundings(xla):
    # x and w each rounded to bfloat16 (8 bits of mantissa: relative error <= 2^-9), the dot
    # accumulated in float32 (n x 2^-24), the result rounded to bfloat16 (2^-9 of |y|): to
    # first order |error| <= (3 x 2^-9 + n 2^-24) x sum |x| |w| per output.
    x, w = matrices()
    w_t = prepare({"model/h0/mlp/c_fc/w": w[None], "model/wte": w.T}, "bfloat16")
    fn = tf.function(matmul_t, jit_compile=True) if xla else matmul_t
    y = fn(tf.constant(x), w_t["model/h0/mlp/c_fc/w_t"]).numpy()
    exact = x.astype(np.float64) @ w
    bound = (3 * 2**-9 + 48 * 2**-24 + 2**-16) * (np.abs(x) @ np.abs(w))
    assert y.dtype == np.float32 and y.shape == exact.shape
    assert np.all(np.abs(y - exact) <= bound), np.max(np.abs(y - exact) / (bound + 1e-30))
    assert np.all(y[:, 7] == 0)


@pytest.mark.parametrize("xla", [False, True])
def test_int8_matmul_within_half_a_step_per_weight(xla):
    # Each weight is off by at most its row's scale / 2, so an output by at most
    # scale / 2 x sum |x|, plus float32 accumulation over n terms.
    x, w = matrices()
    q, scale = (t.numpy() for t in quantize_rows(tf.constant(w.T)))
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and q.min() >= -127
    assert scale[7] == 1 and not q[7].any()
    assert np.all(np.abs(q * scale[:, None] - w.T) <= scale[:, None] / 2 * (1 + 2**-20))
    fn = tf.function(matmul_t, jit_compile=True) if xla else matmul_t
    y = fn(tf.constant(x), tf.constant(q), tf.constant(scale)).numpy()
    exact = x.astype(np.float64) @ w
    s = np.abs(x) @ (np.abs(w) + scale / 2)
    bound = np.abs(x).sum(1, keepdims=True) * scale / 2 + 50 * 2**-24 * s
    assert np.all(np.abs(y - exact) <= bound), np.max(np.abs(y - exact) / (bound + 1e-30))


def test_int8_model_is_the_float32_model_of_its_dequantized_weights(model):
    # The int8 path rounds nothing but the weights: it computes what float32 computes on
    # q x scale (the input embedding's rows float32, the output embedding int8), up to
    # float32's own rounding in another order (~n 2^-24 per dot, over 9 dots: 1e-4 of max).
    params = prepare(model.params, "int8")
    oracle = dict(model.params)
    for name in model.params:
        if name + "_t" in params:
            w = tf.cast(params[name + "_t"], tf.float32) * params[name + "_t_scale"][:, None]
            oracle[name] = tf.transpose(w)[None]
    out = tf.cast(params["model/wte_out"], tf.float32) * params["model/wte_out_scale"][:, None]
    # A float32 "prepared" output embedding with unit scales: x @ out^T, nothing rounded.
    oracle.update({"model/wte_out": out, "model/wte_out_scale": tf.ones([HP["n_vocab"]])})
    tokens = tf.constant([[1, 5, 9, 2, 7, 3]])
    got = forward(params, HP, tokens)[0].numpy()
    want = forward(oracle, HP, tokens)[0].numpy()
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    # ... and that is not float32's own answer (the weights were rounded).
    assert not np.allclose(got, forward(model.params, HP, tokens)[0].numpy(), rtol=1e-4)


def greedy_margins(model, context, length):
    """float32 greedy tokens and, along them, float32's logits (teacher-forced)."""
    ref = generate_tokens(model, context, length, temperature=0)[0]
    seq = tf.constant([list(context) + ref.tolist()], tf.int32)
    logits = forward(model.params, HP, seq)[0].numpy()[0, len(context) - 1 : -1]
    return ref, seq, logits


@pytest.mark.parametrize("precision", REDUCED)
def test_greedy_tokens_equal_float32_while_the_margin_allows(model, precision):
    # If every logit is within e of float32's and float32's best beats its second by more
    # than 2e, the argmax cannot change: the precision's greedy tokens must equal float32's
    # up to the first step where the margin is below that (here: all 16, checked). e is the
    # measured error of the full pass; the compiled decoding rounds in another order, so the
    # margin asked is 4e.
    context, length = [1, 2, 3, 4], 16
    ref, seq, want = greedy_margins(model, context, length)
    got = forward(prepare(model.params, precision), HP, seq)[0].numpy()[0, len(context) - 1 : -1]
    err = np.abs(got - want).max(-1)
    top2 = np.sort(want, -1)[:, -2:]
    safe = np.cumprod(top2[:, 1] - top2[:, 0] > 4 * err).sum()
    assert safe == length, (safe, err)
    tokens = generate_tokens(model, context, length, temperature=0, precision=precision)[0]
    np.testing.assert_array_equal(tokens, ref)
    # The stated quality (docs/generation.md): relative error of the logits, tiny model.
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < {"bfloat16": 2**-9 * 3 * 9, "int8": 2**-7 * 9}[precision], rel


@pytest.mark.skipif(bool(tf.config.list_logical_devices("GPU")), reason="a CPU's rule")
@pytest.mark.parametrize("precision", REDUCED)
def test_batches_decode_in_float32_on_a_cpu(model, precision):
    # From 2 rows XLA:CPU's converted dots are slower than float32's (docs/benchmarks.md), so
    # a batch decodes at float32: the same tokens as float32's; one row reads `precision`.
    assert decoding_precision(precision, 1) == precision
    assert decoding_precision(precision, 2) == decoding_precision("float32", 1) == "float32"
    kw = dict(temperature=1.0, top_k=5, seed=3, nsamples=3)
    np.testing.assert_array_equal(
        generate_tokens(model, [3, 1], 6, precision=precision, **kw),
        generate_tokens(model, [3, 1], 6, **kw),
    )


@pytest.mark.skipif(bool(tf.config.list_logical_devices("GPU")), reason="XLA:CPU's converts")
@pytest.mark.parametrize("precision", REDUCED)
def test_the_decoding_loop_reads_the_reduced_weights(model, precision, monkeypatch):
    # XLA:CPU converts a bfloat16 or int8 matrix to float32 for its dot. Hoisted out of the
    # loop as loop-invariant, that convert wrote a float32 copy of every matrix per call and
    # each step read the copy, 4 bytes a weight (bench/NOTES.md entry 26); sampler._in_step
    # keeps it in the step. So the compiled chunk's top level makes no float32 matrix of a
    # prepared weight's shape: the converts are inside the loop, fused into the dots.
    dec = _sampler(model, precision)
    calls, chunk = [], dec.chunk
    monkeypatch.setattr(dec, "chunk", lambda *a: calls.append(a) or chunk(*a))
    generate_tokens(model, [3, 1], 6, temperature=1.0, top_k=5, seed=3, precision=precision)
    hlo = chunk.experimental_get_compiler_ir(*calls[0])(stage="optimized_hlo")
    top = hlo[hlo.index("\nENTRY") :]  # the while body and its fusions come before it
    assert " while(" in top
    prepared = prepare(model.params, precision)
    shapes = {tuple(v.shape) for k, v in prepared.items() if v.dtype != tf.float32}
    assert len(shapes) >= 4, shapes  # c_attn, c_fc, mlp/c_proj, wte_out (+ attn/c_proj)
    made = [line for line in top.splitlines() if "parameter(" not in line]  # wte is one
    for out, inp in shapes:
        assert not [line for line in made if f"= f32[{out},{inp}]" in line], (out, inp)
    # Not a vacuous search: inside the loop, the fused converts make these very shapes.
    body = hlo[: hlo.index("\nENTRY")]
    assert all(f"f32[{out},{inp}]" in body for out, inp in shapes)


def test_float32_untouched(model):
    # float32 prepares nothing (the same variables), reduced precision does not change the
    # variables, and float32 generation and logits afterwards are bit-identical.
    assert all(v is model.params[k] for k, v in prepare(model.params, "float32").items())
    before = {k: v.numpy().copy() for k, v in model.params.items()}
    tokens0 = generate_tokens(model, [3, 1], 6, temperature=1.0, top_k=5, seed=3)
    logits0 = model(np.array([[3, 1, 4]], np.int32)).numpy()
    for p in REDUCED:
        generate_tokens(model, [3, 1], 6, temperature=1.0, top_k=5, seed=3, precision=p)
    for k, v in model.params.items():
        assert v.dtype == tf.float32 and np.array_equal(v.numpy(), before[k]), k
    np.testing.assert_array_equal(
        generate_tokens(model, [3, 1], 6, temperature=1.0, top_k=5, seed=3), tokens0
    )
    np.testing.assert_array_equal(model(np.array([[3, 1, 4]], np.int32)).numpy(), logits0)


@pytest.mark.slow  # two samplers compiled for a vocabulary-sized model: ~35 s under load
def test_saved_model_files_unchanged_by_reduced_generation(tmp_path, tiny_vocab_dir):
    from helpers.models import tiny_model

    folder = tmp_path / "m"
    save_model(tiny_model(tiny_vocab_dir), folder)
    digest = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir()}
    m = load_model(folder)
    for p in REDUCED:
        assert generate_tokens(m, [1, 2], 4, precision=p).shape == (1, 4)
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir()} == digest


def test_unknown_precision_is_one_clear_error(model):
    with pytest.raises(Gpt2tuneError, match="precision.*float32, bfloat16, int8"):
        generate_tokens(model, [1], 2, precision="float16")


@pytest.mark.slow  # ~6-12 s each under load
@pytest.mark.parametrize("precision", REDUCED)
def test_evaluate_at_a_precision(model, precision):
    # Cross-entropy moves by at most 2 x the largest change of a logit (log-softmax is
    # 2-Lipschitz in the max norm), so the loss at a precision is that close to float32's.
    from gpt2tune.config.params import Params, TrainParams
    from gpt2tune.data.batches import eval_windows
    from gpt2tune.train.evaluate import evaluate_loss

    tokens = np.random.default_rng(2).integers(0, HP["n_vocab"], 200)
    p = Params(train=TrainParams(n_ctx=16, batch_size=4, val_batch_count=6))
    base = evaluate_loss(model, tokens, p, False)
    got = evaluate_loss(model, tokens, p, False, precision)
    windows = tf.constant(eval_windows(tokens, 16, 6)[:, :-1], tf.int32)
    want = forward(model.params, HP, windows)[0].numpy()
    err = np.abs(forward(prepare(model.params, precision), HP, windows)[0].numpy() - want).max()
    assert got["windows"] == base["windows"] == 6
    assert 0 < abs(got["loss"] - base["loss"]) <= 2 * err * (1 + 1e-4) + 1e-6


@pytest.mark.slow  # three processes start TensorFlow: ~30 s
def test_cli_evaluate_and_chat_at_a_precision(tmp_path, tiny_vocab_dir):
    # `gpt2tune evaluate --precision` prints the loss evaluate_loss gives at it; chat and the
    # sample stage take sample.precision from params (here --set); a bad value is one line.
    import re
    import sys

    from helpers.models import tiny_model
    from helpers.processes import run_in
    from helpers.projects import write_params
    from helpers.vocab import TINY_CORPUS

    from gpt2tune.config.params import load_params
    from gpt2tune.train.evaluate import evaluate_loss

    folder = tmp_path / "m"
    save_model(tiny_model(tiny_vocab_dir), folder)
    write_params(tmp_path, train={"n_ctx": 16, "val_batch_count": 4, "batch_size": 2},
                 sample={"length": 4, "nsamples": 1})  # fmt: skip
    (tmp_path / "eval.txt").write_text(TINY_CORPUS, encoding="utf-8")
    m, p = load_model(folder), load_params(tmp_path / "params.yaml")
    want = evaluate_loss(m, np.array(m.encoder.encode(TINY_CORPUS)), p, False, "int8")["loss"]

    def gpt2tune(*args, **kw):
        return run_in(tmp_path, sys.executable, "-m", "gpt2tune", *args, **kw)

    proc = gpt2tune("evaluate", "--model", str(folder), "--data", "eval.txt", "--precision", "int8")
    assert proc.returncode == 0, proc.stderr
    assert float(re.match(r"loss (\S+)", proc.stdout).group(1)) == pytest.approx(want, abs=1e-6)
    chat = gpt2tune("chat", "--model", str(folder), "--set", "sample.precision=bfloat16",
                    input="Human reason\n")  # fmt: skip
    assert chat.returncode == 0 and " SAMPLE 1 " in chat.stdout, chat.stderr
    bad = gpt2tune("chat", "--model", str(folder), "--set", "sample.precision=fp8", input="")
    assert bad.returncode != 0 and "sample.precision" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("precision", REDUCED)
def test_the_memory_check_counts_the_copies_a_first_call_makes(model, precision):
    """The memory check before generating (generation_memory) adds the prepared weights,
    byte for byte what precision.prepare makes, and the temporaries of making them, for the
    one call that makes them: the first at that precision of a row at a time. A batch of 2
    rows on a CPU decodes at float32 and makes none; a call after the first finds them made."""
    from gpt2tune.generation.sampler import copies_to_make
    from gpt2tune.model.memory import PREPARE_TEMPORARIES, generation_memory, prepared_bytes

    fresh = GPT2(HP, model.weights_numpy())
    made = prepare(fresh.params, precision)
    added = sum(t.numpy().nbytes for n, t in made.items() if n not in fresh.params)
    assert prepared_bytes(HP, precision) == added
    assert prepared_bytes(HP, "float32") == 0

    assert copies_to_make(fresh, precision, 1) == precision
    on_cpu = not tf.config.list_logical_devices("GPU")
    assert copies_to_make(fresh, precision, 2) == ("float32" if on_cpu else precision)
    generate_tokens(fresh, [1, 2], 2, nsamples=1, precision=precision, temperature=0)
    assert copies_to_make(fresh, precision, 1) == "float32"  # kept with its sampler

    more = generation_memory(HP, 1, 2, 2, precision) - generation_memory(HP, 1, 2, 2)
    temporaries = PREPARE_TEMPORARIES[precision] * 4 * HP["n_vocab"] * HP["n_embd"]
    assert more == pytest.approx(1.1 * (added + temporaries), abs=2)  # GENERATION_MARGIN
