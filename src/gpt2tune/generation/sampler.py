"""Text generation with the key/value cache: temperature, top-k and nucleus (top-p) sampling.

The whole decoding loop runs inside one `tf.function` (a `tf.while_loop`, as in OpenAI's
`sample.py`), traced once per model: prompts, lengths and sampling settings are tensors, so
new values never retrace. Each step through the model is compiled with XLA (once per batch
size and cache size, a second or two for 124M) into a few fused kernels over fixed-size
key/value caches; sampling itself stays outside XLA. Randomness is stateless and derived
from `seed`, so the same seed gives the same text. When a generation needs more than the
model's context, decoding continues from the last `n_ctx // 2` tokens (a sliding window moved
in half-context strides).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from gpt2tune.config.params import Sampling
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.generation.checks import check_request, resolve_sampling
from gpt2tune.model.gpt2 import CACHE_STEP, GPT2, NEG_INF, decode_step, forward
from gpt2tune.model.precision import prepare


def _top_k(logits: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
    def mask():
        kth = tf.math.top_k(logits, k=tf.minimum(k, tf.shape(logits)[-1])).values[:, -1:]
        return tf.where(logits < kth, NEG_INF, logits)

    return tf.cond(k > 0, mask, lambda: logits)


def _top_p(logits: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p."""

    def mask():
        sorted_logits = tf.sort(logits, direction="DESCENDING", axis=-1)
        probs = tf.nn.softmax(sorted_logits, axis=-1)
        # A token is kept if the mass before it is still below p (so the first always is).
        before = tf.cumsum(probs, axis=-1, exclusive=True)
        kept = tf.where(before < p, sorted_logits, tf.reduce_max(logits, -1, keepdims=True))
        cutoff = tf.reduce_min(kept, axis=-1, keepdims=True)
        return tf.where(logits < cutoff, NEG_INF, logits)

    return tf.cond(p > 0, mask, lambda: logits)


def _penalize(logits: tf.Tensor, seen: tf.Tensor, penalty: tf.Tensor) -> tf.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019; transformers' rule too): a token already
    seen (`seen` [batch, n_vocab], bool) becomes less likely whatever its logit's sign, so
    positive logits are divided by `penalty` and negative ones multiplied. 1 changes nothing,
    bit for bit."""
    return tf.where(seen, tf.where(logits > 0, logits / penalty, logits * penalty), logits)


def _choose(
    logits: tf.Tensor, knobs: dict[str, tf.Tensor], keys: tf.Tensor, seen: tf.Tensor
) -> tf.Tensor:
    """Next token ids [batch] from last-position logits [batch, n_vocab]; `knobs` are the
    Sampling fields that shape each choice, as tensors (see `_knobs`); `keys` [batch, 2] each
    row's random key for this step; `seen` the tokens each row has seen (see `_penalize`)."""
    logits = _penalize(logits, seen, knobs["repetition_penalty"])
    temperature = knobs["temperature"]

    def draw(row_and_key):
        row, key = row_and_key
        return tf.random.stateless_categorical(row[None], 1, key, dtype=tf.int32)[0, 0]

    def sample():
        filtered = _top_p(_top_k(logits / temperature, knobs["top_k"]), knobs["top_p"])
        # One draw per row from its own key: a sample's text does not depend on its batch.
        return tf.map_fn(draw, (filtered, keys), fn_output_signature=tf.int32)

    # temperature 0 means greedy; dividing by it would give inf/NaN logits.
    return tf.cond(
        temperature > 0, sample, lambda: tf.argmax(logits, axis=-1, output_type=tf.int32)
    )


def _seen(history: tf.Tensor, n_vocab: int) -> tf.Tensor:
    """[batch, n_vocab] bool: which tokens occur in each row of `history` [batch, seq]."""
    rows = tf.broadcast_to(tf.range(tf.shape(history)[0])[:, None], tf.shape(history))
    counts = tf.scatter_nd(
        tf.stack([rows, history], -1), tf.ones_like(history), [tf.shape(history)[0], n_vocab]
    )
    return counts > 0


# Sampling fields the host loop uses itself; every other one reaches `_choose` as a tensor,
# so a new setting needs no change to the compiled sampler's signature or its call.
HOST_FIELDS = ("nsamples", "length", "seed", "stop", "precision")
_TF_TYPES = {bool: tf.bool, int: tf.int32, float: tf.float32}
_KNOB_TYPES = {
    name: _TF_TYPES[t] for name, t in typing.get_type_hints(Sampling).items()
    if name not in HOST_FIELDS
}  # fmt: skip


def _knobs(s: Sampling) -> dict[str, tf.Tensor]:
    return {name: tf.constant(getattr(s, name), dtype) for name, dtype in _KNOB_TYPES.items()}


# Over 60 lines: the decoding loop is one tf.function whose while_loop body and condition
# must close over the same tensors; its parts are named inner functions.
def _generation_params(model: GPT2, precision: str) -> Callable[[], dict[str, tf.Tensor]]:
    """What the compiled loop reads. float32: the live weights (training's samples see each
    step's). Otherwise the weights prepared in `precision` now, once, and kept with this
    sampler (precision.prepare), plus any extra tensors (LoRA adapters) read live."""
    if precision == "float32":
        return model.forward_params
    prepared = prepare(model.params, precision)
    return lambda: {
        **prepared,
        **{k: v for k, v in model.forward_params().items() if k not in model.params},
    }


def _build_sampler(model: GPT2, precision: str) -> tf.types.experimental.GenericFunction:
    # Over ~60 lines: the compiled loop's pieces (prompt pass, caches, seen set, while_loop)
    # share one trace's tensors; split into functions they would only pass them all around.
    hp = model.hparams
    params = _generation_params(model, precision)
    # Compiled once per (batch, cache size); the cache size is rounded up to CACHE_STEP.
    step = tf.function(
        lambda wte_t, token, pos, caches: decode_step(params(), hp, wte_t, token, pos, caches),
        jit_compile=True,
    )

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int32),  # context [batch, seq]: the model's window
            tf.TensorSpec([None, None], tf.int32),  # history: every token so far, for `seen`
            tf.TensorSpec([], tf.int32),  # steps
            {name: tf.TensorSpec([], dtype) for name, dtype in _KNOB_TYPES.items()},
            tf.TensorSpec([None, 3], tf.int64),  # per row: seed, sample index, segment
            tf.TensorSpec([], tf.int32),  # stop token (-1 = none)
        ]
    )
    def sample_segment(context, history, steps, knobs, keys, stop_token):
        logits, past = forward(params(), hp, context)
        # Each row's key for this segment; step i folds in i (see pick).
        keys = tf.map_fn(lambda k: tf.random.experimental.stateless_fold_in(k[:2], k[2]), keys)

        def pick(logits, i, seen):
            step_keys = tf.map_fn(
                lambda k: tf.random.experimental.stateless_fold_in(k, tf.cast(i, tf.int64)), keys
            )
            return _choose(logits[:, -1], knobs, step_keys, seen)

        seen = _seen(history, hp["n_vocab"])
        token = pick(logits, 0, seen)
        done = tf.equal(token, stop_token)
        out = tf.TensorArray(tf.int32, size=0, dynamic_size=True).write(0, token)
        start = tf.shape(context)[1]
        size = tf.minimum(hp["n_ctx"], (start + steps + CACHE_STEP - 1) // CACHE_STEP * CACHE_STEP)
        pad = [[0, 0], [0, 0], [0, size - start], [0, 0]]
        caches = [
            (tf.pad(past[:, i, 0], pad), tf.pad(past[:, i, 1], pad)) for i in range(hp["n_layer"])
        ]
        # Once per call, not kept: training changes wte between samples. Reduced precision
        # reads its prepared copy of wte instead (None).
        wte_t = tf.transpose(model.params["model/wte"]) if precision == "float32" else None

        def cond(i, caches, token, done, seen, out):
            return (i < steps) & ~tf.reduce_all(done)

        def body(i, caches, token, done, seen, out):
            seen = seen | (tf.one_hot(token, hp["n_vocab"]) > 0)
            # The token sampled at step i - 1 sits at position start + i - 1.
            logits, caches = step(wte_t, token, start + i - 1, caches)
            # Finished samples keep emitting the stop token while the others go on.
            new = tf.where(done, stop_token, pick(logits[:, None], i, seen))
            return i + 1, caches, new, done | tf.equal(new, stop_token), seen, out.write(i, new)

        head_dim = hp["n_embd"] // hp["n_head"]
        cache = tf.TensorShape([None, hp["n_head"], None, head_dim])
        invariants = (
            tf.TensorShape([]),
            [(cache, cache)] * hp["n_layer"],
            tf.TensorShape([None]),
            tf.TensorShape([None]),
            tf.TensorShape([None, hp["n_vocab"]]),
            tf.TensorShape(None),
        )
        *_, out = tf.while_loop(
            cond,
            body,
            (tf.constant(1), caches, token, done, seen, out),
            shape_invariants=invariants,
        )
        return tf.transpose(out.stack())  # [batch, generated]

    return sample_segment


# The compiled decoding loop and its knob types, for generation/savedmodel.py (the
# SavedModel's `generate` signature runs this very loop).
build_sampler, KNOB_TYPES = _build_sampler, _KNOB_TYPES


def _sampler(model: GPT2, precision: str = "float32"):
    # One compiled sampler per model and precision, made on first use and reused for every
    # call; GPT2.set_extra_tensors drops them (and the prepared weights they hold).
    if precision != "float32":
        if precision not in model._samplers_at:
            model._samplers_at[precision] = _build_sampler(model, precision)
        return model._samplers_at[precision]
    if getattr(model, "_sampler", None) is None:
        model._sampler = _build_sampler(model, precision)
    return model._sampler


def generate_tokens(
    model: GPT2,
    context: Sequence[int] | np.ndarray | None,
    length: int | None = None,
    *,
    sampling: Sampling | None = None,
    stop_at_endoftext: bool = False,
    **overrides,
) -> np.ndarray:
    """Sample new tokens after `context` for `nsamples` samples in one batch.

    Settings come from `sampling` (a `gpt2tune.config.params.Sampling`; None: `API_DEFAULTS`), with
    `length` and keyword overrides (`nsamples=2, top_k=40, ...`) on top. `context` None or
    empty means unconditional (start from <|endoftext|>). Returns int32 `[nsamples, length]`;
    with `stop_at_endoftext`, a sample that emits <|endoftext|> is padded with it to `length`.
    `stop` strings apply to text: see `generate`.
    """
    s = resolve_sampling(sampling, length, overrides)
    ctx = _context(model, context)
    check_request(model.hparams, len(ctx), s.length, s.nsamples)
    return _generate_rows(model, [ctx], s, stop_at_endoftext)


def _context(model: GPT2, context: Sequence[int] | np.ndarray | None) -> list[int]:
    return [_eot(model)] if context is None or len(context) == 0 else [int(t) for t in context]


def _generate_rows(
    model: GPT2,
    contexts: list[list[int]],
    s: Sampling,
    stop_at_endoftext: bool,
    finished: Callable[[np.ndarray], bool] | None = None,
) -> np.ndarray:
    """`s.nsamples` rows per context (all of one length), context by context: int32
    [rows, length]. Row j of a context draws from its own key (seed, j), so its tokens are
    the same whatever else is in the batch. `finished(row)` true for every row stops early
    (after a segment), leaving fewer than `length` tokens."""
    length, n_ctx, eot = s.length, model.hparams["n_ctx"], _eot(model)
    seed = int(np.random.SeedSequence().entropy % 2**31) if s.seed is None else int(s.seed)
    fn, knobs = _sampler(model, s.precision), _knobs(s)
    tokens = np.repeat(np.asarray(contexts, np.int32), s.nsamples, axis=0)
    index = np.tile(np.arange(s.nsamples, dtype=np.int64), len(contexts))
    new = np.zeros((len(tokens), 0), np.int32)
    segment = 0
    while new.shape[1] < length:
        window = tokens if tokens.shape[1] < n_ctx else tokens[:, -max(1, n_ctx // 2) :]
        steps = min(length - new.shape[1], n_ctx - window.shape[1])
        if steps < 1:
            raise Gpt2tuneError(
                f"a model with a context of {n_ctx} token(s) cannot slide its window"
            )
        keys = np.stack([np.full_like(index, seed), index, np.full_like(index, segment)], 1)
        try:
            # The penalty's seen set is the whole history, not just the window: a token that
            # slid out of the model's view is still a repeat.
            out = fn(window, tokens, tf.constant(steps), knobs, keys,
                     tf.constant(eot if stop_at_endoftext else -1)).numpy()  # fmt: skip
        except tf.errors.ResourceExhaustedError:  # an accelerator's memory, which we can't see
            raise Gpt2tuneError(
                f"out of memory generating {len(tokens)} sample(s) of {length} tokens; "
                "lower sample.nsamples, sample.batch_size or sample.length"
            ) from None
        new = np.concatenate([new, out], axis=1)
        tokens = np.concatenate([tokens, out], axis=1)
        segment += 1
        if stop_at_endoftext and (new == eot).any(axis=1).all():
            break
        if finished is not None and new.shape[1] < length and all(map(finished, new)):
            break
    new = new[:, :length]
    if stop_at_endoftext:
        # A later window does not know which samples stopped in an earlier one: pad here.
        stopped = np.cumsum(new == eot, axis=1) > 0
        new = np.where(stopped, eot, new)
        new = np.pad(new, ((0, 0), (0, length - new.shape[1])), constant_values=eot)
    return new


def generate(
    model: GPT2,
    prompt: str | None = None,
    length: int | None = None,
    *,
    sampling: Sampling | None = None,
    stop_at_endoftext: bool = False,
    **overrides,
) -> list[str]:
    """Complete `prompt` (None or "" = unconditional); returns the completions only, each cut
    before the first of the `stop` strings. Settings as in `generate_tokens`: `sampling`, then
    `length` and keyword overrides."""
    s = resolve_sampling(sampling, length, overrides)  # checked before the prompt is encoded
    return generate_many(model, [prompt], sampling=s, stop_at_endoftext=stop_at_endoftext)[0]


def generate_many(
    model: GPT2,
    prompts: Sequence[str | None],
    *,
    sampling: Sampling | None = None,
    batch_size: int = 8,
    stop_at_endoftext: bool = False,
    **overrides,
) -> list[list[str]]:
    """`generate` for each prompt, up to `batch_size` prompts (x nsamples rows) per batch:
    per prompt its completions, the same texts `generate` gives it.

    GPT-2 has no padding token, so only prompts of one token length share a batch: every row
    is then computed exactly as alone (no padding, no mask, the same positions), and its
    randomness is its own (see `_generate_rows`). Prompts of other lengths go in other batches.
    """
    if model.encoder is None:
        raise Gpt2tuneError("this model has no encoder; load it with gpt2tune.load_model(folder)")
    s = resolve_sampling(sampling, None, overrides)
    ids = [_context(model, model.encoder.encode(p) if p else None) for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ctx in enumerate(ids):
        by_length.setdefault(len(ctx), []).append(i)
    texts: list[list[str]] = [[] for _ in prompts]
    for group in by_length.values():
        for at in range(0, len(group), batch_size):
            chunk = group[at : at + batch_size]
            check_request(model.hparams, len(ids[chunk[0]]), s.length, s.nsamples * len(chunk))
            rows = _generate_rows(
                model, [ids[i] for i in chunk], s, stop_at_endoftext, _stopped(model, s.stop)
            )
            for n, i in enumerate(chunk):
                rows_i = rows[n * s.nsamples : (n + 1) * s.nsamples]
                texts[i] = [_text(model, row, s.stop, stop_at_endoftext) for row in rows_i]
    return texts


def _text(model: GPT2, row: np.ndarray, stop: Sequence[str], at_endoftext: bool) -> str:
    """A row's text, cut at <|endoftext|> (if asked) and before the first `stop` string."""
    row = row.tolist()
    if at_endoftext and _eot(model) in row:
        row = row[: row.index(_eot(model))]
    text = model.encoder.decode(row)
    return text[: min([text.find(x) for x in stop if x in text], default=len(text))]


def _stopped(model: GPT2, stop: Sequence[str]) -> Callable[[np.ndarray], bool] | None:
    # Whether a row's text already holds a stop string: rows all stopped end generation.
    if not stop:
        return None
    return lambda row: any(x in model.encoder.decode(row.tolist()) for x in stop)


def _eot(model: GPT2) -> int:
    # Without an encoder, the official convention: <|endoftext|> is the last token.
    return model.encoder.eot_token if model.encoder is not None else model.hparams["n_vocab"] - 1
