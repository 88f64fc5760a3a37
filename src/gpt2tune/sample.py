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

import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.memory import available_memory
from gpt2tune.model import GPT2, conv1d, forward, merge_heads, mlp, norm, split_heads

NEG_INF = -1e10
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


def _choose(logits, temperature, top_k, top_p, seed):
    """Next token ids [batch] from last-position logits [batch, n_vocab]."""

    def sample():
        filtered = _top_p(_top_k(logits / temperature, top_k), top_p)
        return tf.random.stateless_categorical(filtered, 1, seed, dtype=tf.int32)[:, 0]

    # temperature 0 means greedy; dividing by it would give inf/NaN logits.
    return tf.cond(
        temperature > 0, sample, lambda: tf.argmax(logits, axis=-1, output_type=tf.int32)
    )


def _decode_step(
    params, hp, wte_t: tf.Tensor, token: tf.Tensor, pos: tf.Tensor, caches: list
) -> tuple[tf.Tensor, list]:
    """Logits [batch, n_vocab] for one new token per sample at position `pos`, and the caches
    with its keys and values written at `pos`. `caches` holds one (keys, values) pair per
    layer, each [batch, head, size, head_dim] with positions 0..pos-1 filled; positions after
    pos are masked out. `wte_t` is the token embedding transposed, [n_embd, n_vocab]: for a
    few rows, h @ wte_t streams it 3-5x faster than h @ wte^T (transpose_b), and it is a
    third of the weights read per token.

    The same arithmetic as `model.forward` on one position, arranged for decoding: compiled
    with XLA (the sampler's `jit_compile`), so fixed-size caches (a position is written, the
    cache never grows or is restacked) and the ~30 small ops of a layer fused into a few
    kernels instead of dispatched one by one.
    """
    n_head, head_dim = hp["n_head"], hp["n_embd"] // hp["n_head"]
    size = tf.shape(caches[0][0])[2]
    slot = tf.range(size)[:, None] == pos  # [size, 1]: where this token's key/value go
    seen = tf.range(size) <= pos  # the keys it attends to
    # gather, not [pos]: XLA would take a slice start as a constant and compile per position.
    h = tf.gather(params["model/wte"], token[:, None]) + tf.gather(params["model/wpe"], pos)
    new = []
    for i, (past_k, past_v) in enumerate(caches):
        p = f"model/h{i}/"
        x = norm(h, params[p + "ln_1/g"], params[p + "ln_1/b"])
        c = conv1d(x, params[p + "attn/c_attn/w"], params[p + "attn/c_attn/b"])
        q, k, v = (split_heads(t, n_head) for t in tf.split(c, 3, axis=2))
        k, v = tf.where(slot, k, past_k), tf.where(slot, v, past_v)
        w = tf.matmul(q, k, transpose_b=True) * (1 / math.sqrt(head_dim))
        w = tf.where(seen, w, NEG_INF)
        a = merge_heads(tf.matmul(tf.nn.softmax(w, axis=-1), v))
        h = h + conv1d(a, params[p + "attn/c_proj/w"], params[p + "attn/c_proj/b"])
        layer = {k_[len(p) :]: v_ for k_, v_ in params.items() if k_.startswith(p + "mlp/")}
        h = h + mlp(norm(h, params[p + "ln_2/g"], params[p + "ln_2/b"]), layer)
        new.append((k, v))
    h = norm(h[:, 0], params["model/ln_f/g"], params["model/ln_f/b"])
    return tf.matmul(h, wte_t), new


def _build_sampler(model: GPT2) -> tf.types.experimental.GenericFunction:
    hp = model.hparams
    # Compiled once per (batch, cache size); the cache size is rounded up to CACHE_STEP.
    step = tf.function(
        lambda wte_t, token, pos, caches: _decode_step(model.params, hp, wte_t, token, pos, caches),
        jit_compile=True,
    )

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int32),  # context [batch, seq]
            tf.TensorSpec([], tf.int32),  # steps
            tf.TensorSpec([], tf.float32),  # temperature
            tf.TensorSpec([], tf.int32),  # top_k
            tf.TensorSpec([], tf.float32),  # top_p
            tf.TensorSpec([2], tf.int64),  # seed
            tf.TensorSpec([], tf.int32),  # stop token (-1 = none)
        ]
    )
    def sample_segment(context, steps, temperature, top_k, top_p, seed, stop_token):
        logits, past = forward(model.params, hp, context)

        def pick(logits, i):
            s = tf.random.experimental.stateless_fold_in(seed, tf.cast(i, tf.int64))
            return _choose(logits[:, -1], temperature, top_k, top_p, s)

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


def generate_tokens(
    model: GPT2,
    context: Sequence[int] | np.ndarray | None,
    length: int,
    nsamples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop_at_endoftext: bool = False,
) -> np.ndarray:
    """Sample `length` new tokens after `context` for `nsamples` samples in one batch.

    `context` None or empty means unconditional (start from <|endoftext|>). Returns int32
    `[nsamples, length]`; with `stop_at_endoftext`, a sample that emits <|endoftext|> is
    padded with it to `length`.
    """
    n_ctx = model.hparams["n_ctx"]
    eot = _eot(model)
    ctx = [eot] if context is None or len(context) == 0 else [int(t) for t in context]
    _check_sampling(length, nsamples, temperature, top_k, top_p)
    check_request(model.hparams, len(ctx), length, nsamples)
    seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else int(seed)
    fn = _sampler(model)
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
                tf.constant(temperature, tf.float32),
                tf.constant(top_k),
                tf.constant(top_p, tf.float32),
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
    length: int = 100,
    nsamples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop_at_endoftext: bool = False,
) -> list[str]:
    """Complete `prompt` (None or "" = unconditional); returns the completions only."""
    if model.encoder is None:
        raise Gpt2tuneError("this model has no encoder; load it with gpt2tune.load_model(folder)")
    context = model.encoder.encode(prompt) if prompt else None
    ids = generate_tokens(
        model, context, length, nsamples, temperature, top_k, top_p, seed, stop_at_endoftext
    )
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


def _check_sampling(length, nsamples, temperature, top_k, top_p) -> None:
    checks = [
        ("length", length, isinstance(length, int) and length >= 1, "an integer >= 1"),
        ("nsamples", nsamples, isinstance(nsamples, int) and nsamples >= 1, "an integer >= 1"),
        ("temperature", temperature, temperature >= 0, ">= 0 (0 = greedy)"),
        ("top_k", top_k, isinstance(top_k, int) and top_k >= 0, "an integer >= 0 (0 = off)"),
        ("top_p", top_p, 0 <= top_p <= 1, "in [0, 1] (0 = off)"),
    ]
    for name, value, ok, allowed in checks:
        if not ok:
            raise Gpt2tuneError(f"{name} = {value!r}: must be {allowed}")


# --- the sample stage and the interactive prompt -----------------------------------------


def _generate_with(model: GPT2, prompt: str | None, cfg, seed: int) -> list[str]:
    """`generate` with the `sample` section's settings; unconditional samples end at
    <|endoftext|>, completions run the full length."""
    return generate(
        model, prompt, cfg.length, cfg.nsamples, cfg.temperature, cfg.top_k, cfg.top_p, seed,
        stop_at_endoftext=not prompt,
    )  # fmt: skip


def sample_records(model: GPT2, cfg) -> list[dict]:
    """`cfg.nsamples` unconditional samples, then as many completions of each prompt.

    `cfg` is the `sample` section of params.yaml (`gpt2tune.params.SampleParams`).
    """
    # Every prompt is checked before the first sample is made, so a bad one fails at once.
    for i, prompt in enumerate(cfg.prompts):
        n = len(model.encoder.encode(prompt))
        check_request(model.hparams, n, cfg.length, cfg.nsamples, f"sample.prompts[{i}]")
    check_request(model.hparams, 1, cfg.length, cfg.nsamples, "the unconditional start")
    records = []
    for prompt in (None, *cfg.prompts):
        texts = _generate_with(model, prompt, cfg, cfg.seed)
        records += [{"prompt": prompt, "index": i, "text": t} for i, t in enumerate(texts)]
    return records


def records_markdown(records: list[dict], cfg) -> str:
    head = (
        f"# Samples\n\nlength {cfg.length}, temperature {cfg.temperature}, top_k {cfg.top_k}, "
        f"top_p {cfg.top_p}, seed {cfg.seed}\n"
    )
    parts = [head]
    for r in records:
        title = "Unconditional" if r["prompt"] is None else f"Prompt: {r['prompt']}"
        body = r["text"] if r["prompt"] is None else f"**{r['prompt']}**{r['text']}"
        parts.append(f"## {title} — sample {r['index'] + 1}\n\n{body}\n")
    return "\n".join(parts)


def interactive(model: GPT2, cfg, read=input, write=print) -> None:
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
            texts = _generate_with(model, prompt, cfg, seed)
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
