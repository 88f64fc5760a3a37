"""A TensorFlow SavedModel of a GPT-2 folder, for TF Serving, Vertex AI or tf.saved_model.load.

    export_savedmodel("models/finetuned", "models/finetuned-savedmodel")
    gpt2tune export --format savedmodel                 # the same, from the command line

Two signatures, what a server needs and nothing of gpt2tune's at load time:

- `generate`: tokens [batch, seq] int32, max_new_tokens, temperature, top_k, top_p, seed
  (scalars) -> tokens [batch, max_new_tokens] int32, the new ids only. It runs the sampler's
  own compiled decoding loop (generation.sampler), so row i gets the ids that
  `generate_tokens(model, prompt, max_new_tokens, nsamples=batch, seed=seed, ...)` gives its
  row i (the same key (seed, i, segment)); a single row is `nsamples=1`. Longer requests than
  the context slide the window in-graph exactly as the sampler's host loop does. The other
  sampling settings (repetition_penalty) are the export's `sample` section, fixed.
- `score`: tokens [batch, seq] int32 -> log_probs [batch, seq - 1] float32, the
  log-probability of token t + 1 given tokens 0..t (the model's full forward pass).

Each weight is saved once, as the variable it is (variables/); the transposed embedding the
decoder multiplies by is computed in-graph per call, as in the sampler. The export's
`sample.precision` picks which weights: float32, OpenAI's as they are; bfloat16 or int8,
precision.prepare's [out, in] matrices (and int8's row scales) in their place, the input
embedding float32 (124M: 405 or 282 MB against 498). Both signatures compute with them;
a one-row `generate` gets what gpt2tune gives one row at that precision, and bigger batches
decode at it too (gpt2tune decodes 2 rows or more at float32 on a CPU, where that is faster;
the SavedModel holds no float32 copy to do so). Bad requests fail with InvalidArgument
naming the input (TF Serving answers it with HTTP 400). The folder also holds encoder.json
and vocab.bpe, the tokenizer, and a README.txt with a TF Serving request.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf

from gpt2tune.config.params import Sampling
from gpt2tune.errors import Gpt2tuneError, first_line
from gpt2tune.generation import sampler
from gpt2tune.model import hf
from gpt2tune.model.checkpoint import load_model
from gpt2tune.model.gpt2 import GPT2, forward
from gpt2tune.model.precision import prepare

# The limits of the sample section's keys (config/params.py), checked in-graph.
MAX_NEW_TOKENS = 10**6
MAX_SEED = 2**32 - 1
# The scalar inputs of `generate`, in order, with their dtypes (the signature's names).
GENERATE_INPUTS = {
    "max_new_tokens": tf.int32,
    "temperature": tf.float32,
    "top_k": tf.int32,
    "top_p": tf.float32,
    "seed": tf.int64,
}

# The README's line on the weights, per sample.precision at export.
WEIGHTS = {
    "float32": "float32 (sample.precision)",
    "bfloat16": "bfloat16 matrices (sample.precision; both signatures compute with them,\n"
    "and every row of a batch decodes at bfloat16)",
    "int8": "int8 matrices with a float32 scale per row (sample.precision; both signatures\n"
    "compute with them, and every row of a batch decodes at int8)",
}

README = """\
A TensorFlow SavedModel of {model}, written by `gpt2tune export --format savedmodel`.

Signatures (`saved_model_cli show --all --dir .` lists them):
  generate  tokens [batch, seq] int32, max_new_tokens int32, temperature float32,
            top_k int32, top_p float32, seed int64  ->  tokens [batch, max_new_tokens] int32
            (the new token ids; temperature 0 is greedy, top_k 0 and top_p 0 are off;
            row i of a batch samples from (seed, i), as gpt2tune's nsamples rows do)
  score     tokens [batch, seq] int32  ->  log_probs [batch, seq - 1] float32
            (log-probability of each token given those before it)
Every input is required. A prompt is 1..{n_ctx} token ids (the model's context) below
{n_vocab}; longer generations slide the window as gpt2tune does. Fixed at export:
repetition_penalty {repetition_penalty}, and the weights: {weights}.
The tokenizer (GPT-2's byte-level BPE) is encoder.json and vocab.bpe in this folder;
<|endoftext|> is id {eot}.

Python (no gpt2tune needed):
  import tensorflow as tf
  m = tf.saved_model.load("{folder}")
  m.signatures["generate"](tokens=tf.constant([[{eot}]]), max_new_tokens=tf.constant(20),
      temperature=tf.constant(0.8), top_k=tf.constant(40), top_p=tf.constant(0.0),
      seed=tf.constant(0, tf.int64))["tokens"]

TF Serving (this folder is version 1 of model gpt2; each decoding step is compiled with XLA,
which TF Serving's CPU build runs only with --xla_cpu_compilation_enabled=true):
  docker run -p 8501:8501 -v "{mount}:/models/gpt2/1" -e MODEL_NAME=gpt2 \\
      tensorflow/serving --xla_cpu_compilation_enabled=true
  curl -d '{{"signature_name": "generate", "inputs": {{"tokens": [[{eot}]], "max_new_tokens": 20,
      "temperature": 0.8, "top_k": 40, "top_p": 0.0, "seed": 0}}}}' \\
      localhost:8501/v1/models/gpt2:predict
  curl -d '{{"signature_name": "score", "inputs": {{"tokens": [[{eot}, 464, 3290]]}}}}' \\
      localhost:8501/v1/models/gpt2:predict
"""


def _decoding_loop(
    model: GPT2, precision: str, weights: dict[str, tf.Variable]
) -> tf.types.experimental.GenericFunction:
    # The one place this module reaches into the sampler: its compiled decoding loop,
    # sample_segment(context, history, steps, knobs, keys, stop_token) -> [batch, steps],
    # reading `weights` at a reduced precision (float32 reads the model's own, the same).
    return sampler.build_sampler(model, precision, weights)


def _weights(model: GPT2, precision: str) -> dict[str, tf.Variable]:
    """The variables saved: the model's own in float32; else precision.prepare's weights,
    each a variable (a constant would put it in saved_model.pb, which protobuf caps at 2 GB)."""
    if precision == "float32":
        return dict(model.params)
    prepared = prepare(model.params, precision)
    return {
        name: v if isinstance(v, tf.Variable) else tf.Variable(v, trainable=False, name=name)
        for name, v in prepared.items()
    }


def _knobs(sampling: Sampling, **given: tf.Tensor) -> dict[str, tf.Tensor]:
    # The sampler's knobs: those of the signature's inputs, the rest fixed from `sampling`.
    fixed = {n: tf.constant(getattr(sampling, n), t) for n, t in sampler.KNOB_TYPES.items()}
    return {**fixed, **given}


def _check_tokens(tokens: tf.Tensor, hparams: dict[str, int]) -> list[tf.Operation]:
    n_ctx, n_vocab = hparams["n_ctx"], hparams["n_vocab"]
    seq = tf.shape(tokens)[1]
    return [
        tf.debugging.assert_greater_equal(seq, 1, message="tokens: give at least one token id"),
        tf.debugging.assert_less_equal(
            seq, n_ctx, message=f"tokens: longer than the model context of {n_ctx} tokens"
        ),
        tf.debugging.assert_non_negative(tokens, message="tokens: ids must be >= 0"),
        tf.debugging.assert_less(
            tokens, n_vocab, message=f"tokens: ids must be below {n_vocab}, the vocabulary size"
        ),
    ]


def _check_settings(max_new_tokens, temperature, top_k, top_p, seed) -> list[tf.Operation]:
    # The rules of params.yaml's sample keys (config/params.py Sampling).
    def between(x, low, high, name, allowed):
        ok = tf.logical_and(x >= low, x <= high)
        return tf.debugging.Assert(ok, [f"{name} must be {allowed}, got", x])

    return [
        between(max_new_tokens, 1, MAX_NEW_TOKENS, "max_new_tokens", f"1..{MAX_NEW_TOKENS}"),
        between(temperature, 0.0, float("inf"), "temperature", ">= 0 (0 = greedy)"),
        between(top_k, 0, 2**31 - 1, "top_k", ">= 0 (0 = off)"),
        between(top_p, 0.0, 1.0, "top_p", "in [0, 1] (0 = off)"),
        between(seed, 0, MAX_SEED, "seed", f"0..{MAX_SEED}"),
    ]


def _slide(sample_segment, n_ctx: int, tokens, max_new_tokens, knobs, seed):
    """The sampler's host loop (sampler._generate_rows) as a tf.while_loop: segments of at
    most the context, each from the last n_ctx // 2 tokens once the context is full, row i
    keyed (seed, i, segment); the seen set of the repetition penalty is the whole history."""
    batch = tf.shape(tokens)[0]
    index = tf.range(batch, dtype=tf.int64)

    def cond(segment, history, new):
        return tf.shape(new)[1] < max_new_tokens

    def body(segment, history, new):
        length = tf.shape(history)[1]
        window = tf.cond(length < n_ctx, lambda: history, lambda: history[:, -max(1, n_ctx // 2) :])
        steps = tf.minimum(max_new_tokens - tf.shape(new)[1], n_ctx - tf.shape(window)[1])
        keys = tf.stack([tf.fill([batch], seed), index, tf.fill([batch], segment)], 1)
        out = sample_segment(window, history, steps, knobs, keys, tf.constant(-1))
        return segment + 1, tf.concat([history, out], 1), tf.concat([new, out], 1)

    start = (tf.constant(0, tf.int64), tokens, tf.zeros([batch, 0], tf.int32))
    rows = tf.TensorShape([None, None])
    _, _, new = tf.while_loop(cond, body, start, shape_invariants=(tf.TensorShape([]), rows, rows))
    return new[:, :max_new_tokens]


class Servable(tf.Module):
    """What is saved: the model's variables (each once) and the two signature functions."""

    def __init__(self, model: GPT2, sampling: Sampling):
        super().__init__(name="gpt2tune")
        hp = model.hparams
        self.params = _weights(model, sampling.precision)  # tracked: the SavedModel's variables/
        sample_segment = _decoding_loop(model, sampling.precision, self.params)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None], tf.int32, name="tokens"),
                *(tf.TensorSpec([], t, name=n) for n, t in GENERATE_INPUTS.items()),
            ]
        )
        def generate(tokens, max_new_tokens, temperature, top_k, top_p, seed):
            checks = _check_tokens(tokens, hp) + _check_settings(
                max_new_tokens, temperature, top_k, top_p, seed
            )
            with tf.control_dependencies(checks):
                knobs = _knobs(sampling, temperature=temperature, top_k=top_k, top_p=top_p)
                new = _slide(sample_segment, hp["n_ctx"], tokens, max_new_tokens, knobs, seed)
            return {"tokens": new}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="tokens")])
        def score(tokens):
            with tf.control_dependencies(_check_tokens(tokens, hp)):
                logits, _ = forward(self.params, hp, tokens)
            logp = tf.nn.log_softmax(logits[:, :-1], axis=-1)
            return {"log_probs": tf.gather(logp, tokens[:, 1:], batch_dims=2)}

        self.generate, self.score = generate, score


def export_savedmodel(
    model_folder: str | os.PathLike, out_folder: str | os.PathLike, sampling: Sampling | None = None
) -> Path:
    """Write `model_folder` (OpenAI's layout) as a SavedModel folder, atomically.

    `out_folder` must be new, empty, or an earlier export (gpt2tune.model.hf's
    check_export_folder rules). `sampling`'s settings that are not inputs of `generate`
    (repetition_penalty) are fixed in it, and its precision picks the weights saved (see
    the module docstring); None takes Sampling's defaults.
    """
    out = Path(out_folder)
    if out.resolve() == Path(model_folder).resolve():
        raise Gpt2tuneError(f"export to {out_folder} would replace the model itself; pick --out")
    hf.check_export_folder(out)
    sampling = sampling or Sampling()
    model = load_model(model_folder)
    servable = Servable(model, sampling)
    signatures = {
        "generate": servable.generate.get_concrete_function(),
        "score": servable.score.get_concrete_function(),
    }
    readme = README.format(
        model=Path(model_folder).as_posix(),
        folder=out.as_posix(),
        mount=out.as_posix() if out.is_absolute() else f"$PWD/{out.as_posix()}",
        eot=model.encoder.eot_token,
        repetition_penalty=sampling.repetition_penalty,
        weights=WEIGHTS[sampling.precision],
        **model.hparams,
    )
    with hf.export_folder(out) as tmp:
        try:
            tf.saved_model.save(servable, str(tmp), signatures=signatures)
        except tf.errors.OpError as e:  # TensorFlow's own file writes: a full disk, say
            raise OSError(first_line(e)) from None
        for name in ("encoder.json", "vocab.bpe"):
            (tmp / name).write_bytes(model.encoder.files[name])
        (tmp / "README.txt").write_text(readme, encoding="utf-8")
    return out
