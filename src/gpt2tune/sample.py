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

import dataclasses
import sys
import typing
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.keys import BAD, coerce, types_of
from gpt2tune.memory import available_memory
from gpt2tune.model import GPT2, NEG_INF, decode_step, forward
from gpt2tune.params import SampleParams, Sampling

CACHE_STEP = 64  # key/value caches hold prompt + new tokens rounded up to this many positions


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


def _choose(logits: tf.Tensor, knobs: dict[str, tf.Tensor], seed: tf.Tensor) -> tf.Tensor:
    """Next token ids [batch] from last-position logits [batch, n_vocab]; `knobs` are the
    Sampling fields that shape each choice, as tensors (see `_knobs`)."""
    temperature = knobs["temperature"]

    def sample():
        filtered = _top_p(_top_k(logits / temperature, knobs["top_k"]), knobs["top_p"])
        return tf.random.stateless_categorical(filtered, 1, seed, dtype=tf.int32)[:, 0]

    # temperature 0 means greedy; dividing by it would give inf/NaN logits.
    return tf.cond(
        temperature > 0, sample, lambda: tf.argmax(logits, axis=-1, output_type=tf.int32)
    )


# Sampling fields the host loop uses itself; every other one reaches `_choose` as a tensor,
# so a new setting needs no change to the compiled sampler's signature or its call.
HOST_FIELDS = ("nsamples", "length", "seed")
_TF_TYPES = {bool: tf.bool, int: tf.int32, float: tf.float32}
_KNOB_TYPES = {
    name: _TF_TYPES[t] for name, t in typing.get_type_hints(Sampling).items()
    if name not in HOST_FIELDS
}  # fmt: skip


def _knobs(s: Sampling) -> dict[str, tf.Tensor]:
    return {name: tf.constant(getattr(s, name), dtype) for name, dtype in _KNOB_TYPES.items()}


def _build_sampler(model: GPT2) -> tf.types.experimental.GenericFunction:
    hp = model.hparams
    # Compiled once per (batch, cache size); the cache size is rounded up to CACHE_STEP.
    step = tf.function(
        lambda wte_t, token, pos, caches: decode_step(model.params, hp, wte_t, token, pos, caches),
        jit_compile=True,
    )

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int32),  # context [batch, seq]
            tf.TensorSpec([], tf.int32),  # steps
            {name: tf.TensorSpec([], dtype) for name, dtype in _KNOB_TYPES.items()},
            tf.TensorSpec([2], tf.int64),  # seed
            tf.TensorSpec([], tf.int32),  # stop token (-1 = none)
        ]
    )
    def sample_segment(context, steps, knobs, seed, stop_token):
        logits, past = forward(model.params, hp, context)

        def pick(logits, i):
            s = tf.random.experimental.stateless_fold_in(seed, tf.cast(i, tf.int64))
            return _choose(logits[:, -1], knobs, s)

        token = pick(logits, 0)
        done = tf.equal(token, stop_token)
        out = tf.TensorArray(tf.int32, size=0, dynamic_size=True).write(0, token)
        start = tf.shape(context)[1]
        size = tf.minimum(hp["n_ctx"], (start + steps + CACHE_STEP - 1) // CACHE_STEP * CACHE_STEP)
        pad = [[0, 0], [0, 0], [0, size - start], [0, 0]]
        caches = [
            (tf.pad(past[:, i, 0], pad), tf.pad(past[:, i, 1], pad)) for i in range(hp["n_layer"])
        ]
        # Once per call, not kept: training changes wte between samples.
        wte_t = tf.transpose(model.params["model/wte"])

        def cond(i, caches, token, done, out):
            return (i < steps) & ~tf.reduce_all(done)

        def body(i, caches, token, done, out):
            # The token sampled at step i - 1 sits at position start + i - 1.
            logits, caches = step(wte_t, token, start + i - 1, caches)
            # Finished samples keep emitting the stop token while the others go on.
            new = tf.where(done, stop_token, pick(logits[:, None], i))
            return i + 1, caches, new, done | tf.equal(new, stop_token), out.write(i, new)

        head_dim = hp["n_embd"] // hp["n_head"]
        cache = tf.TensorShape([None, hp["n_head"], None, head_dim])
        invariants = (
            tf.TensorShape([]),
            [(cache, cache)] * hp["n_layer"],
            tf.TensorShape([None]),
            tf.TensorShape([None]),
            tf.TensorShape(None),
        )
        *_, out = tf.while_loop(
            cond, body, (tf.constant(1), caches, token, done, out), shape_invariants=invariants
        )
        return tf.transpose(out.stack())  # [batch, generated]

    return sample_segment


def _sampler(model: GPT2):
    # One compiled sampler per model, made on first use and reused for every call.
    if getattr(model, "_sampler", None) is None:
        model._sampler = _build_sampler(model)
    return model._sampler


# What `generate` and `generate_tokens` use for settings a call does not give.
API_DEFAULTS = Sampling(nsamples=1, length=100, temperature=1.0, top_k=0, top_p=0.0, seed=None)


def resolve_sampling(sampling: Sampling | None, length: int | None, overrides: dict) -> Sampling:
    """`sampling` (None: API_DEFAULTS; a `SampleParams` is fine) with `length` and the
    keyword overrides applied, checked. Seed None means fresh randomness."""
    names = [f.name for f in dataclasses.fields(Sampling)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"unknown sampling setting(s) {', '.join(unknown)}; known: {names}")
    if length is not None:
        overrides["length"] = length
    s = dataclasses.replace(API_DEFAULTS if sampling is None else sampling, **overrides)
    check_sampling(s)
    return s


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

    Settings come from `sampling` (a `gpt2tune.params.Sampling`; None: `API_DEFAULTS`), with
    `length` and keyword overrides (`nsamples=2, top_k=40, ...`) on top. `context` None or
    empty means unconditional (start from <|endoftext|>). Returns int32 `[nsamples, length]`;
    with `stop_at_endoftext`, a sample that emits <|endoftext|> is padded with it to `length`.
    """
    s = resolve_sampling(sampling, length, overrides)
    length, nsamples = s.length, s.nsamples
    n_ctx = model.hparams["n_ctx"]
    eot = _eot(model)
    ctx = [eot] if context is None or len(context) == 0 else [int(t) for t in context]
    check_request(model.hparams, len(ctx), length, nsamples)
    seed = int(np.random.SeedSequence().entropy % 2**31) if s.seed is None else int(s.seed)
    fn, knobs = _sampler(model), _knobs(s)
    tokens = np.tile(np.asarray(ctx, np.int32), (nsamples, 1))
    new = np.zeros((nsamples, 0), np.int32)
    segment = 0
    while new.shape[1] < length:
        window = tokens if tokens.shape[1] < n_ctx else tokens[:, -max(1, n_ctx // 2) :]
        steps = min(length - new.shape[1], n_ctx - window.shape[1])
        if steps < 1:
            raise Gpt2tuneError(
                f"a model with a context of {n_ctx} token(s) cannot slide its window"
            )
        try:
            out = fn(
                tf.constant(window),
                tf.constant(steps),
                knobs,
                tf.constant([seed, segment], tf.int64),
                tf.constant(eot if stop_at_endoftext else -1),
            ).numpy()
        except tf.errors.ResourceExhaustedError:  # an accelerator's memory, which we can't see
            raise Gpt2tuneError(
                f"out of memory generating {nsamples} sample(s) of {length} tokens; "
                "lower sample.nsamples or sample.length"
            ) from None
        new = np.concatenate([new, out], axis=1)
        tokens = np.concatenate([tokens, out], axis=1)
        segment += 1
        if stop_at_endoftext and (new == eot).any(axis=1).all():
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
    """Complete `prompt` (None or "" = unconditional); returns the completions only.
    Settings as in `generate_tokens`: `sampling`, then `length` and keyword overrides."""
    if model.encoder is None:
        raise Gpt2tuneError("this model has no encoder; load it with gpt2tune.load_model(folder)")
    s = resolve_sampling(sampling, length, overrides)  # checked before the prompt is encoded
    context = model.encoder.encode(prompt) if prompt else None
    ids = generate_tokens(model, context, sampling=s, stop_at_endoftext=stop_at_endoftext)
    texts = []
    for row in ids:
        row = row.tolist()
        if stop_at_endoftext and _eot(model) in row:
            row = row[: row.index(_eot(model))]
        texts.append(model.encoder.decode(row))
    return texts


def _eot(model: GPT2) -> int:
    # Without an encoder, the official convention: <|endoftext|> is the last token.
    return model.encoder.eot_token if model.encoder is not None else model.hparams["n_vocab"] - 1


def generation_memory(hparams: dict[str, int], nsamples: int, context: int, length: int) -> int:
    """Bytes that generating `length` tokens after `context` for `nsamples` samples at once
    needs on top of the weights (a lower bound: float32 activations only).

    The key/value cache holds 2 * n_layer * n_embd floats per sample and position, up to
    n_ctx positions, and is copied as it grows; the prompt's forward pass holds, for the
    layer being computed, the attention weights (n_head * context^2) and the MLP's hidden
    layer (4 * n_embd per position), and at the end the logits (n_vocab per position).
    """
    n_ctx, n_layer, n_embd = hparams["n_ctx"], hparams["n_layer"], hparams["n_embd"]
    positions = min(context + length, n_ctx)
    cache = nsamples * n_layer * 2 * positions * n_embd
    prompt = nsamples * context * (hparams["n_head"] * context + 4 * n_embd + hparams["n_vocab"])
    return 4 * (2 * cache + prompt)


def check_request(
    hparams: dict[str, int], context: int, length: int, nsamples: int, what: str = "the prompt"
) -> None:
    """Refuse, before any work, a prompt longer than the model's context or a batch whose
    generation would not fit in memory (rather than dying in TensorFlow part-way)."""
    n_ctx = hparams["n_ctx"]
    if context > n_ctx:
        raise Gpt2tuneError(
            f"{what} is {context} tokens but the model's context is {n_ctx} tokens; shorten it"
        )
    need, free = generation_memory(hparams, nsamples, context, length), available_memory()
    if free is not None and need > free:
        raise Gpt2tuneError(
            f"generating {nsamples} sample(s) of {length} tokens after {what} needs about "
            f"{need / 2**30:.1f} GiB of memory, but {free / 2**30:.1f} GiB is free; lower "
            "sample.nsamples (samples are generated together) or sample.length"
        )


def check_sampling(s: Sampling) -> None:
    """Raise Gpt2tuneError naming the first setting of `s` out of range: the rules are the
    ones params.yaml's `sample` keys are declared with (gpt2tune.params.Sampling), so the API
    and the file accept the same values. `seed=None` (fresh randomness) is the API's own."""
    types = types_of(Sampling)
    for f in dataclasses.fields(Sampling):
        value, rule = getattr(s, f.name), f.metadata["rule"]
        if f.name == "seed" and value is None:
            continue
        if isinstance(value, np.integer | np.floating):  # numpy scalars from callers' arrays
            value = value.item()
        typed = coerce(value, types[f.name])
        if typed is BAD or not rule.ok(typed):
            raise Gpt2tuneError(f"{f.name} = {value!r}: must be {rule.allowed}")


# --- the sample stage and the interactive prompt -----------------------------------------


def _generate_with(model: GPT2, prompt: str | None, sampling: Sampling) -> list[str]:
    """`generate` with these settings; unconditional samples end at <|endoftext|>,
    completions run the full length."""
    return generate(model, prompt, sampling=sampling, stop_at_endoftext=not prompt)


def sample_records(model: GPT2, cfg: SampleParams) -> list[dict]:
    """`cfg.nsamples` unconditional samples, then as many completions of each prompt.

    `cfg` is the `sample` section of params.yaml (`gpt2tune.params.SampleParams`).
    """
    # Every prompt is checked before the first sample is made, so a bad one fails at once.
    for i, prompt in enumerate(cfg.prompts):
        n = len(model.encoder.encode(prompt))
        check_request(model.hparams, n, cfg.length, cfg.nsamples, f"sample.prompts[{i}]")
    check_request(model.hparams, 1, cfg.length, cfg.nsamples, "the unconditional start")
    print(f"sampling {cfg.nsamples} x {len(cfg.prompts) + 1} text(s)...", file=sys.stderr)
    records = []
    # A bar per prompt on a terminal (tqdm's disable=None): each is minutes at 124M on a CPU.
    for prompt in tqdm((None, *cfg.prompts), desc="sample", unit="prompt", disable=None):
        texts = _generate_with(model, prompt, cfg)
        records += [{"prompt": prompt, "index": i, "text": t} for i, t in enumerate(texts)]
    return records


def records_markdown(records: list[dict], cfg: Sampling) -> str:
    # Every setting but nsamples (the samples themselves show it), in Sampling's order.
    settings = [f.name for f in dataclasses.fields(Sampling) if f.name != "nsamples"]
    parts = ["# Samples\n\n" + ", ".join(f"{k} {getattr(cfg, k)}" for k in settings) + "\n"]
    for r in records:
        title = "Unconditional" if r["prompt"] is None else f"Prompt: {r['prompt']}"
        body = r["text"] if r["prompt"] is None else f"**{r['prompt']}**{r['text']}"
        parts.append(f"## {title} — sample {r['index'] + 1}\n\n{body}\n")
    return "\n".join(parts)


def interactive(model: GPT2, cfg: Sampling, read=input, write=print) -> None:
    """The notebooks' interactive completion: type a context, get completions, again.

    Ctrl-D (end of input) or Ctrl-C leaves cleanly. An empty line samples unconditionally.
    """
    write("Type a context and press Enter (Ctrl-D or Ctrl-C to quit).")
    seed = cfg.seed
    while True:
        try:
            prompt = read("Model prompt >>> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        try:
            texts = _generate_with(model, prompt, dataclasses.replace(cfg, seed=seed))
        except KeyboardInterrupt:
            write("")
            return
        except Gpt2tuneError as e:
            write(f"error: {e}")
            continue
        seed += 1  # the same context twice gives new completions
        for i, text in enumerate(texts, 1):
            write(f"{'=' * 40} SAMPLE {i} {'=' * 40}\n{text}")
        write("=" * 90)
