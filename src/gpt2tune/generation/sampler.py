"""Text generation with the key/value cache: temperature, top-k and nucleus (top-p) sampling.

The decoding loop runs in XLA-compiled calls of CHUNK steps (a `tf.while_loop`, as in
OpenAI's `sample.py`), each piece traced once per model: prompts, lengths, sampling settings
and stop strings are tensors or host-side, so new values never retrace; XLA compiles once
per batch size and cache size. Inside a call the key/value caches are written in place, one
slot per step, and sampling (penalty, temperature, top-k, top-p, the draw) is part of the
compiled step. Between calls the host marks rows whose text holds a stop string. Prompts of
different lengths share a batch, left-padded and masked. Randomness is stateless and derived
from `seed`, so the same seed gives the same text: the draws are those of
`tf.random.stateless_categorical` from the same keys. When a generation needs more than the
model's context, decoding continues from the last `n_ctx // 2` tokens (a sliding window moved
in half-context strides).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from gpt2tune.config.params import Sampling
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.generation.checks import check_request, resolve_sampling
from gpt2tune.model.gpt2 import CACHE_STEP, GPT2, NEG_INF, decode_step, flat_caches, prefill
from gpt2tune.model.precision import prepare

# The largest k found with XLA's own top_k, which needs k at compile time; a larger k takes
# `_kth_largest_search` (measured on [1, 50257] under XLA: 0.22 ms vs 0.8-1.1 ms).
TOP_K_STATIC = 128


def _kth_largest(x: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
    """Each row's k-th largest value [batch, 1] (k a tensor, 1..n): for k up to TOP_K_STATIC
    the k-th of XLA's top_k of that many, else a 32-step binary search over the floats'
    order-preserving int codes, each step one fused count over the row. Both exactly top_k's
    k-th value."""
    most = min(TOP_K_STATIC, x.shape[-1])
    return tf.cond(
        k <= most,
        lambda: tf.gather(tf.math.top_k(x, most).values, k - 1, axis=1)[:, None],
        lambda: _kth_largest_search(x, k),
    )


def _kth_largest_search(x: tf.Tensor, k: tf.Tensor) -> tf.Tensor:

    def code(bits):  # an involution: float bits <-> ints in the floats' order
        return tf.bitwise.bitwise_xor(bits, tf.bitwise.right_shift(bits, 31) & 0x7FFFFFFF)

    keys = tf.cast(code(tf.bitcast(x, tf.int32)), tf.int64)
    lo = tf.fill([tf.shape(x)[0], 1], tf.constant(-(2**31), tf.int64))
    hi = tf.fill([tf.shape(x)[0], 1], tf.constant(2**31 - 1, tf.int64))

    def body(i, lo, hi):  # the largest t with at least k codes >= t stays in [lo, hi]
        mid = (lo + hi + 1) // 2
        enough = tf.reduce_sum(tf.cast(keys >= mid, tf.int32), -1, keepdims=True) >= k
        return i + 1, tf.where(enough, mid, lo), tf.where(enough, hi, mid - 1)

    _, lo, _ = tf.while_loop(lambda i, lo, hi: i < 32, body, (tf.constant(0), lo, hi))
    return tf.bitcast(code(tf.cast(lo, tf.int32)), tf.float32)


def _top_k(logits: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
    def mask():
        kth = _kth_largest(logits, tf.minimum(k, tf.shape(logits)[-1]))
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


def _draw(logits: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """One token per row [batch] from logits [batch, n_vocab] and a uniform u [batch] float64:
    the inverse-CDF draw of `tf.random.stateless_categorical`'s CPU kernel (float64
    exp(logit - max), cumulated; the first class whose sum exceeds u x total), so with that
    kernel's own uniform (`_uniforms`) it picks the same token, here inside XLA (whose
    categorical draws a different, Gumbel-max stream)."""
    # The barrier keeps the filters (penalty, temperature, top-k) out of the cumsum's fusion:
    # XLA would recompute them in each of the scan's passes (measured 3-8 ms a token).
    [logits] = xla.optimization_barrier(logits)
    x = tf.cast(logits, tf.float64)
    cdf = tf.cumsum(tf.exp(x - tf.reduce_max(x, -1, keepdims=True)), axis=-1)
    below = tf.reduce_sum(tf.cast(cdf <= u[:, None] * cdf[:, -1:], tf.int32), -1)
    return tf.minimum(below, tf.shape(logits)[-1] - 1)


def _choose(
    logits: tf.Tensor, knobs: dict[str, tf.Tensor], u: tf.Tensor, seen: tf.Tensor
) -> tf.Tensor:
    """Next token ids [batch] from last-position logits [batch, n_vocab]; `knobs` are the
    Sampling fields that shape each choice, as tensors (see `_knobs`); `u` [batch] float64
    each row's uniform for this step (see `_uniforms`); `seen` the tokens each row has seen
    (see `_penalize`)."""
    logits = _penalize(logits, seen, knobs["repetition_penalty"])
    temperature = knobs["temperature"]

    def sample():
        filtered = _top_p(_top_k(logits / temperature, knobs["top_k"]), knobs["top_p"])
        return _draw(filtered, u)

    # temperature 0 means greedy; dividing by it would give inf/NaN logits.
    return tf.cond(
        temperature > 0, sample, lambda: tf.argmax(logits, axis=-1, output_type=tf.int32)
    )


def _seen(history: tf.Tensor, n_vocab: int) -> tf.Tensor:
    """[batch, n_vocab] bool: which tokens occur in each row of `history` [batch, seq] (-1:
    padding, no token)."""
    rows = tf.broadcast_to(tf.range(tf.shape(history)[0])[:, None], tf.shape(history))
    counts = tf.scatter_nd(
        tf.stack([rows, tf.maximum(history, 0)], -1),
        tf.cast(history >= 0, tf.int32),
        [tf.shape(history)[0], n_vocab],
    )
    return counts > 0


def _uniforms(keys: tf.Tensor, first: tf.Tensor, n: int) -> tf.Tensor:
    """[n, batch] float64: row b's uniform for steps first..first+n-1 of a segment, from its
    segment key keys[b] with the step folded in: the uniform `tf.random.stateless_categorical`
    would draw from that key (its CPU kernel; `_draw` uses it inside XLA). Outside XLA, whose
    Philox stream differs."""
    b = tf.shape(keys)[0]
    steps = tf.cast(tf.repeat(tf.range(first, first + n), b), tf.int64)
    rows = tf.tile(keys, [n, 1])

    def one(key_step):
        key, i = key_step
        step_key = tf.random.experimental.stateless_fold_in(key, i)
        return tf.random.stateless_uniform([], step_key, dtype=tf.float64)

    return tf.reshape(tf.map_fn(one, (rows, steps), fn_output_signature=tf.float64), [n, b])


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


def _generation_params(
    model: GPT2, precision: str, prepared: Mapping[str, tf.Tensor] | None = None
) -> Callable[[], dict[str, tf.Tensor]]:
    """What the compiled loop reads. float32: the live weights (training's samples see each
    step's). Otherwise the weights prepared in `precision` now, once, and kept with this
    sampler (precision.prepare), or `prepared` as given (the SavedModel's variables), plus
    any extra tensors (LoRA adapters) read live."""
    if precision == "float32":
        return model.forward_params
    prepared = prepare(model.params, precision) if prepared is None else dict(prepared)
    return lambda: {
        **prepared,
        **{k: v for k, v in model.forward_params().items() if k not in model.params},
    }


def _in_step(weights: dict[str, tf.Tensor], i: tf.Tensor) -> dict[str, tf.Tensor]:
    """`weights` with the reduced-precision ones (bfloat16, int8) tied to the loop's step `i`
    by an optimization barrier, so that XLA sees them as changing each step. XLA:CPU has no
    bfloat16 or int8 dot: it converts the matrix to float32 first, and for a weight that is
    the same in every step its loop-invariant code motion hoists that convert out of the
    loop, so each call wrote a float32 copy of every matrix (~8 ms for 124M) and the steps read
    float32, 4 bytes a weight. Tied to the step, the convert stays in the step and fuses into
    the dot (`convert_dot_fusion`), which reads the 2 or 1 bytes: 124M at batch 1 from 52.9 to
    98.9 (bfloat16) and 95.6 (int8) new tokens/s (bench/NOTES.md entry 26). The barrier
    passes the buffers through; nothing is copied. float32 weights: `weights` as they are."""
    names = [k for k, v in weights.items() if v.dtype in (tf.bfloat16, tf.int8)]
    if not names:
        return weights
    _, *tied = xla.optimization_barrier(i, *[weights[k] for k in names])
    return {**weights, **dict(zip(names, tied, strict=True))}


# Decoding steps per compiled call: between calls the host may mark rows stopped (their text
# holds a stop string). Each call copies the caches once (TensorFlow does not donate them).
CHUNK = 8


class Decoder:
    """A model's compiled decoding pieces, each traced once (every input a tensor, so new
    prompts, settings or stop strings never retrace); the XLA ones compile once per batch
    size and cache size.

    A segment is `start` (the prompt pass over left-padded prompts, outside XLA: its length
    varies), `first` (the first token) and `chunk` calls, each CHUNK decoding steps in one
    XLA while loop that writes the caches in place and samples inside the step. Randomness
    is stateless: row keys (seed, sample index, segment) and the step give each draw's
    uniform (`_uniforms`, outside XLA), so a row's tokens do not depend on its batch.
    """

    def __init__(
        self,
        model: GPT2,
        precision: str = "float32",
        prepared: Mapping[str, tf.Tensor] | None = None,
    ):
        hp = self.hparams = model.hparams
        params = _generation_params(model, precision, prepared)
        f32 = precision == "float32"  # else the logits read the prepared copy of wte
        head_dim = hp["n_embd"] // hp["n_head"]
        cache = tf.TensorSpec([None, None, head_dim], tf.float32)  # flat: see flat_caches
        caches = [(cache, cache)] * hp["n_layer"]
        rows, vec = tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.bool)
        knobs = {name: tf.TensorSpec([], dtype) for name, dtype in _KNOB_TYPES.items()}
        scalar = tf.TensorSpec([], tf.int32)
        seen = tf.TensorSpec([None, hp["n_vocab"]], tf.bool)
        # Reduced precision passes an empty wte_t: its logits read `model/wte_out`.
        wte_t = tf.TensorSpec([hp["n_embd"], hp["n_vocab"]] if f32 else [0, 0], tf.float32)

        def start(context, pads, history, size, keys):
            # Once per call, not kept: training changes wte between samples.
            wte_t = tf.transpose(model.params["model/wte"]) if f32 else tf.zeros([0, 0])
            logits, caches = prefill(params(), hp, wte_t if f32 else None, context, pads, size)
            keys = tf.map_fn(lambda k: tf.random.experimental.stateless_fold_in(k[:2], k[2]), keys)
            return wte_t, logits, flat_caches(caches), keys, _seen(history, hp["n_vocab"])

        def first(logits, knobs, u, seen, done, stop_token, fill):
            new = tf.where(done, fill, _choose(logits, knobs, u, seen))
            return new, done | tf.equal(new, stop_token)

        def chunk(wte_t, token, slot, caches, pads, seen, done, knobs, u, n, stop_token, fill):
            weights, wte_t = params(), wte_t if f32 else None
            out = tf.zeros([CHUNK, tf.shape(token)[0]], tf.int32)

            def body(i, token, caches, seen, done, out):
                seen = seen | (tf.one_hot(token, hp["n_vocab"]) > 0)
                step = _in_step(weights, i)
                logits, caches = decode_step(step, hp, wte_t, token, slot + i, caches, pads)
                # Finished samples keep emitting `fill` while the others go on.
                new = tf.where(done, fill, _choose(logits, knobs, tf.gather(u, i), seen))
                out = xla.dynamic_update_slice(out, new[None], [i, 0])
                return i + 1, new, caches, seen, done | tf.equal(new, stop_token), out

            _, token, caches, seen, done, out = tf.while_loop(
                lambda i, *_: i < n, body, (tf.constant(0), token, caches, seen, done, out)
            )
            return tf.transpose(out), token, caches, seen, done

        keys3 = tf.TensorSpec([None, 3], tf.int64)
        self.start = tf.function(start, input_signature=[
            tf.TensorSpec([None, None], tf.int32), rows, tf.TensorSpec([None, None], tf.int32),
            scalar, keys3])  # fmt: skip
        u1 = tf.TensorSpec([None], tf.float64)
        self.first = tf.function(
            first, input_signature=[tf.TensorSpec([None, hp["n_vocab"]], tf.float32), knobs, u1,
                                    seen, vec, scalar, scalar],
            jit_compile=True)  # fmt: skip
        self.chunk = tf.function(
            chunk, input_signature=[wte_t, rows, scalar, caches, rows, seen, vec, knobs,
                                    tf.TensorSpec([CHUNK, None], tf.float64), scalar, scalar,
                                    scalar],
            jit_compile=True)  # fmt: skip
        self.uniforms = tf.function(  # CHUNK steps' uniforms from step `first`
            lambda keys, first: _uniforms(keys, first, CHUNK),
            input_signature=[tf.TensorSpec([None, 2], tf.int64), scalar],
        )
        self.sample_segment = self._segment_function()

    def tracing_counts(self) -> dict[str, int]:
        """How often each piece was traced (1 each: new values never retrace)."""
        names = ("start", "first", "chunk", "uniforms")
        return {n: getattr(self, n).experimental_get_tracing_count() for n in names}

    def _segment_function(self) -> tf.types.experimental.GenericFunction:
        # The whole segment as one graph, without stop strings (the SavedModel export calls
        # it): the same pieces as `segment`, its chunk loop a tf.while_loop.
        n_ctx = self.hparams["n_ctx"]

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
            pads = tf.zeros([tf.shape(context)[0]], tf.int32)
            t = tf.shape(context)[1]
            size = tf.minimum(n_ctx, (t + steps + CACHE_STEP - 1) // CACHE_STEP * CACHE_STEP)
            wte_t, logits, caches, keys, seen = self.start(context, pads, history, size, keys)
            done = tf.zeros_like(pads, tf.bool)
            fill = tf.maximum(stop_token, 0)
            token, done = self.first(logits, knobs, self.uniforms(keys, 0)[0], seen, done,
                                     stop_token, fill)  # fmt: skip
            out = tf.TensorArray(tf.int32, size=1, dynamic_size=True, infer_shape=False)
            out = out.write(0, token[None])  # [steps, batch] pieces

            def cond(i, token, caches, seen, done, out):
                return (i < steps) & ~tf.reduce_all(done)

            def body(i, token, caches, seen, done, out):
                n = tf.minimum(CHUNK, steps - i)
                new, token, caches, seen, done = self.chunk(
                    wte_t, token, t + i - 1, caches, pads, seen, done, knobs,
                    self.uniforms(keys, i), n, stop_token, fill)  # fmt: skip
                out = out.write(out.size(), tf.transpose(new[:, :n]))
                return i + n, token, caches, seen, done, out

            *_, out = tf.while_loop(cond, body, (tf.constant(1), token, caches, seen, done, out))
            return tf.transpose(out.concat())  # [batch, generated]

        return sample_segment


def _build_sampler(
    model: GPT2, precision: str = "float32", prepared: Mapping[str, tf.Tensor] | None = None
) -> tf.types.experimental.GenericFunction:
    """One segment as one tf.function, for a SavedModel: `sample_segment(context [batch, seq]
    int32, history [batch, any] int32, steps, knobs, keys [batch, 3] int64, stop_token) ->
    [batch, generated] int32` (see `Decoder`; no stop strings, no padding). A reduced
    `precision` reads `prepared` (precision.prepare's names) if given, every batch at it."""
    return Decoder(model, precision, prepared).sample_segment


# The compiled decoding loop and its knob types, for generation/savedmodel.py (the
# SavedModel's `generate` signature runs this very loop).
build_sampler, KNOB_TYPES = _build_sampler, _KNOB_TYPES


def decoding_precision(precision: str, rows: int) -> str:
    """The precision a batch of `rows` rows decodes at: `precision`, except float32 for 2 rows
    or more on a machine without a GPU. XLA:CPU's bfloat16 and int8 dots convert each weight
    to float32 inside the dot's loop (see `_in_step`), which reuses nothing across rows: at 2
    and 8 rows they were 1.7-2.8x slower than float32 on the 2-core AVX-512 CPU of
    docs/benchmarks.md. At 1 row they read fewer bytes and are 1.5-1.8x float32's speed."""
    if precision == "float32" or rows < 2 or tf.config.list_logical_devices("GPU"):
        return precision
    return "float32"


def copies_to_make(model: GPT2, precision: str, rows: int) -> str:
    """The precision whose weights generating `rows` rows at `precision` prepares first
    (precision.prepare), "float32" if none: what the memory check adds."""
    at = decoding_precision(precision, rows)
    return "float32" if at == "float32" or at in model._samplers_at else at


def _sampler(model: GPT2, precision: str = "float32") -> Decoder:
    # One set of compiled pieces per model and precision, made on first use and reused for
    # every call; GPT2.set_extra_tensors drops them (and the prepared weights they hold).
    if precision != "float32":
        if precision not in model._samplers_at:
            model._samplers_at[precision] = Decoder(model, precision)
        return model._samplers_at[precision]
    if getattr(model, "_sampler", None) is None:
        model._sampler = Decoder(model)
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
    copies = copies_to_make(model, s.precision, s.nsamples)
    check_request(model.hparams, len(ctx), s.length, s.nsamples, copies=copies)
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
    """`s.nsamples` rows per context: int32 [rows, length]. Contexts of different lengths are
    left-padded and masked, each row computed as alone; they must then each fit in one
    window with `length` new tokens (rows whose windows slide must share one length, as their
    segments must). Row j of a context draws from its own key (seed, j), so its tokens are
    the same whatever else is in the batch. A row whose tokens so far make `finished(row)`
    true stops being generated within CHUNK tokens (then it emits <|endoftext|>); once every
    row has stopped, fewer than `length` tokens come back."""
    length, n_ctx, eot = s.length, model.hparams["n_ctx"], _eot(model)
    seed = int(np.random.SeedSequence().entropy % 2**31) if s.seed is None else int(s.seed)
    rows = [list(c) for c in contexts for _ in range(s.nsamples)]
    index = np.tile(np.arange(s.nsamples, dtype=np.int64), len(contexts))
    new = np.zeros((len(rows), 0), np.int32)
    done = np.zeros(len(rows), bool)
    segment = 0
    while new.shape[1] < length and not done.all():
        tokens = [r + n.tolist() for r, n in zip(rows, new, strict=True)]
        windows = [t if len(t) < n_ctx else t[-max(1, n_ctx // 2) :] for t in tokens]
        width = max(map(len, windows))
        steps = min(length - new.shape[1], n_ctx - width)
        if steps < 1:
            raise Gpt2tuneError(
                f"a model with a context of {n_ctx} token(s) cannot slide its window"
            )
        keys = np.stack([np.full_like(index, seed), index, np.full_like(index, segment)], 1)
        # The penalty's seen set is the whole history, not just the window: a token that
        # slid out of the model's view is still a repeat.
        history = [t + [-1] * (max(map(len, tokens)) - len(t)) for t in tokens]
        check = None if finished is None else _so_far(finished, new)
        try:
            dec = _sampler(model, decoding_precision(s.precision, len(rows)))
            out, done = _segment(
                dec, eot, windows, np.asarray(history, np.int32),
                steps, _knobs(s), keys, eot if stop_at_endoftext else -1, done, check,
            )  # fmt: skip
        except tf.errors.ResourceExhaustedError:  # an accelerator's memory, which we can't see
            raise Gpt2tuneError(
                f"out of memory generating {len(rows)} sample(s) of {length} tokens; "
                "lower sample.nsamples, sample.batch_size or sample.length"
            ) from None
        new = np.concatenate([new, out], axis=1)
        segment += 1
    new = new[:, :length]
    if stop_at_endoftext:
        # A later window does not know which samples stopped in an earlier one: pad here.
        stopped = np.cumsum(new == eot, axis=1) > 0
        new = np.where(stopped, eot, new)
        new = np.pad(new, ((0, 0), (0, length - new.shape[1])), constant_values=eot)
    return new


def _so_far(finished: Callable[[np.ndarray], bool], before: np.ndarray):
    # `finished` of a row's tokens: those of earlier segments, then this one's so far.
    return lambda r, seg: finished(np.append(before[r], seg))


def _segment(dec, eot, windows, history, steps, knobs, keys, stop_token, done, finished):
    """One window's prompt pass and up to `steps` new tokens, CHUNK steps per compiled call:
    -> (tokens [rows, generated], which rows are done). Rows done already emit <|endoftext|>;
    after each call, a row not done for which `finished(row, its tokens in this segment)`
    holds is marked done; the loop ends when every row is."""
    width = max(map(len, windows))
    pads = np.array([width - len(w) for w in windows], np.int32)
    context = np.array([[eot] * (width - len(w)) + w for w in windows], np.int32)
    size = min(dec.hparams["n_ctx"], -(-(width + steps) // CACHE_STEP) * CACHE_STEP)
    wte_t, logits, caches, keys, seen = dec.start(context, pads, history, size, keys)
    token, done = dec.first(logits, knobs, dec.uniforms(keys, 0)[0], seen, done, stop_token, eot)
    out, done, i = [token.numpy()[:, None]], done.numpy(), 1

    def mark(done):
        if finished is None:
            return done
        seg = np.concatenate(out, axis=1)
        return done | np.array([not d and finished(r, seg[r]) for r, d in enumerate(done)])

    done = mark(done)
    while i < steps and not done.all():
        n = min(CHUNK, steps - i)
        new, token, caches, seen, done = dec.chunk(
            wte_t, token, width + i - 1, caches, pads, seen, done, knobs, dec.uniforms(keys, i),
            n, stop_token, eot)  # fmt: skip
        out.append(new.numpy()[:, :n])
        done, i = mark(done.numpy()), i + n
    return np.concatenate(out, axis=1), done


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

    Prompts of any token lengths share a batch, left-padded (padding masked out, positions
    counted from each row's first token), when each fits in the model's context with
    `length` new tokens: each row's logits are its unbatched run's within float32 rounding.
    Prompts whose window must slide go in batches of one token length (their windows slide
    together). A row's randomness is its own (see `_generate_rows`).
    """
    if model.encoder is None:
        raise Gpt2tuneError("this model has no encoder; load it with gpt2tune.load_model(folder)")
    s = resolve_sampling(sampling, None, overrides)
    ids = [_context(model, model.encoder.encode(p) if p else None) for p in prompts]
    groups: dict[int, list[int]] = {}  # -1: fits in one window, whatever its length
    for i, ctx in enumerate(ids):
        fits = len(ctx) + s.length <= model.hparams["n_ctx"]
        groups.setdefault(-1 if fits else len(ctx), []).append(i)
    texts: list[list[str]] = [[] for _ in prompts]
    for group in groups.values():
        for at in range(0, len(group), batch_size):
            chunk = group[at : at + batch_size]
            longest = max(len(ids[i]) for i in chunk)
            n_rows = s.nsamples * len(chunk)
            copies = copies_to_make(model, s.precision, n_rows)
            check_request(model.hparams, longest, s.length, n_rows, copies=copies)
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
