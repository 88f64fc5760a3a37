"""GPT-2 as published, in TensorFlow 2: small pure functions over a dict of named weights.

Names and shapes are exactly those of OpenAI's checkpoint (`model/h0/attn/c_attn/w`, ...), so
weights move between this module and the official release without any renaming. The forward
pass optionally takes and returns a key/value cache ("past") laid out as in OpenAI's
`src/model.py`: `[batch, n_layer, 2, n_head, seq, head_dim]`. Training, that pass and the
sampler's one-token `decode_step` run the same blocks; only their key/value cache differs.

For training it can also compute in bfloat16 or float16 (weights stay float32 and are cast
where they are used; layer norm statistics and the softmax stay float32, logits come back
float32) and recompute each block in the backward pass instead of keeping its activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.model.precision import PREPARED_SUFFIXES, matmul_t

if TYPE_CHECKING:
    from gpt2tune.model.encoder import Encoder

HPARAM_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
NEG_INF = -1e10  # masked attention scores (float32: the softmax is never computed in float16)
# Decoding's key/value caches hold prompt + new tokens rounded up to this many positions, so
# the compiled step is traced once per 64 positions, not per length.
CACHE_STEP = 64

# new keys, values -> (keys and values to attend over, mask of visible keys, present)
KVCache = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor, Any]]


def check_hparams(hparams: Mapping[str, Any], source: str = "hparams") -> dict[str, int]:
    """Return the five GPT-2 hyperparameters as ints, or raise naming what is wrong."""
    missing = [k for k in HPARAM_KEYS if k not in hparams]
    if missing:
        raise Gpt2tuneError(f"{source}: missing {', '.join(missing)} (GPT-2 needs {HPARAM_KEYS})")
    out = {}
    for k in HPARAM_KEYS:
        v = hparams[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise Gpt2tuneError(f"{source}: {k} = {v!r}: must be a positive integer")
        out[k] = v
    if out["n_embd"] % out["n_head"]:
        raise Gpt2tuneError(
            f"{source}: n_embd = {out['n_embd']} is not divisible by n_head = {out['n_head']}"
        )
    return out


def variable_shapes(hparams: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """OpenAI's tensor names and shapes for these hyperparameters, in checkpoint order."""
    e = hparams["n_embd"]
    shapes = {"model/wte": (hparams["n_vocab"], e), "model/wpe": (hparams["n_ctx"], e)}
    for i in range(hparams["n_layer"]):
        p = f"model/h{i}/"
        shapes.update({
            p + "ln_1/g": (e,), p + "ln_1/b": (e,),
            p + "attn/c_attn/w": (1, e, 3 * e), p + "attn/c_attn/b": (3 * e,),
            p + "attn/c_proj/w": (1, e, e), p + "attn/c_proj/b": (e,),
            p + "ln_2/g": (e,), p + "ln_2/b": (e,),
            p + "mlp/c_fc/w": (1, e, 4 * e), p + "mlp/c_fc/b": (4 * e,),
            p + "mlp/c_proj/w": (1, 4 * e, e), p + "mlp/c_proj/b": (e,),
        })  # fmt: skip
    shapes["model/ln_f/g"] = (e,)
    shapes["model/ln_f/b"] = (e,)
    return shapes


# --- the forward pass: pure functions of (weights, inputs) -------------------------------


def gelu(x: tf.Tensor) -> tf.Tensor:
    # The tanh approximation GPT-2 was trained with (not the exact erf form).
    return 0.5 * x * (1 + tf.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


def norm(x: tf.Tensor, g: tf.Tensor, b: tf.Tensor, epsilon: float = 1e-5) -> tf.Tensor:
    # Statistics in float32 whatever x's dtype: a float16 variance of wide activations
    # overflows or loses the epsilon. The result goes back to x's dtype.
    x32 = tf.cast(x, tf.float32)
    u = tf.reduce_mean(x32, axis=-1, keepdims=True)
    s = tf.reduce_mean(tf.square(x32 - u), axis=-1, keepdims=True)
    y = (x32 - u) * tf.math.rsqrt(s + epsilon) * tf.cast(g, tf.float32) + tf.cast(b, tf.float32)
    return tf.cast(y, x.dtype)


def conv1d(
    x: tf.Tensor,
    w: tf.Tensor,
    b: tf.Tensor,
    lora: tuple[tf.Tensor, tf.Tensor] | None = None,
    w_scale: tf.Tensor | None = None,
) -> tf.Tensor:
    # OpenAI stores dense layers as 1x1 convolutions: w is [1, nx, nf]. Generation at reduced
    # precision passes a prepared w [nf, nx] (bfloat16, or int8 and its w_scale; precision.py).
    *start, nx = tf.unstack(tf.shape(x))
    x = tf.reshape(x, [-1, nx])
    if w.shape.rank == 2:
        y = matmul_t(x, w, w_scale) + b
        return tf.reshape(y, start + [tf.shape(w)[0]])
    y = tf.matmul(x, w[0]) + b
    if lora is not None:
        # A LoRA adapter (lora.py): A [nx, r], B [r, nf] already scaled by alpha / r. x A B
        # is two thin matmuls; the [nx, nf] product A B is never formed.
        y += tf.matmul(tf.matmul(x, lora[0]), lora[1])
    return tf.reshape(y, start + [tf.shape(w)[-1]])


def dense(x: tf.Tensor, p: Mapping[str, tf.Tensor], layer: str) -> tf.Tensor:
    """The block's dense `layer` ("attn/c_attn", ...), with its LoRA adapter if p has one."""
    a = p.get(layer + "/lora_a")
    lora = None if a is None else (a, p[layer + "/lora_b"])
    if layer + "/w_t" in p:  # generation's reduced-precision weights (precision.prepare)
        return conv1d(x, p[layer + "/w_t"], p[layer + "/b"], lora, p.get(layer + "/w_t_scale"))
    return conv1d(x, p[layer + "/w"], p[layer + "/b"], lora)


def split_heads(x: tf.Tensor, n_head: int) -> tf.Tensor:
    """[batch, seq, n_embd] -> [batch, head, seq, head_dim]"""
    b, t = tf.shape(x)[0], tf.shape(x)[1]
    return tf.transpose(tf.reshape(x, [b, t, n_head, x.shape[-1] // n_head]), [0, 2, 1, 3])


def merge_heads(x: tf.Tensor) -> tf.Tensor:
    """[batch, head, seq, head_dim] -> [batch, seq, n_embd]"""
    x = tf.transpose(x, [0, 2, 1, 3])
    b, t = tf.shape(x)[0], tf.shape(x)[1]
    return tf.reshape(x, [b, t, x.shape[-2] * x.shape[-1]])


# --- key/value caches: the one thing in which training, the full pass and decoding differ --
#
# `attn` computes the new positions' keys and values [batch, head, seq, head_dim] and hands
# them to a cache, a function k, v -> (keys, values, mask, present): the keys and values to
# attend over, which of them each query may see (a boolean mask broadcast against the scores
# [batch, head, query, key]) and what the layer returns as `present`.


def past_cache(past: tf.Tensor | None = None) -> KVCache:
    """The full pass: keys/values of `past` ([batch, 2, head, past_len, head_dim], or None)
    followed by the new ones, causally masked; present is the new positions' alone."""

    def cache(k, v):
        present = tf.stack([k, v], axis=1)  # [batch, 2, head, seq, head_dim]
        if past is not None:
            pk, pv = tf.unstack(past, axis=1)
            k, v = tf.concat([pk, k], axis=-2), tf.concat([pv, v], axis=-2)
        nd, ns = tf.shape(present)[-2], tf.shape(k)[-2]
        # Query i (of the last nd positions) sees key j (of ns) if j is not after it.
        mask = tf.range(nd)[:, None] >= tf.range(ns) - ns + nd
        return k, v, mask, present

    return cache


def padded_cache(pads: tf.Tensor, size: int | tf.Tensor) -> KVCache:
    """The sampler's prompt pass over left-padded prompts: row b's first `pads[b]` positions
    are padding, hidden from every query (as well as later positions, causally). Present is
    the keys and values padded on the right to `size` positions, the decoding caches'
    fixed size (see `slot_caches`)."""

    def cache(k, v):
        t = tf.shape(k)[-2]
        causal = tf.range(t)[:, None] >= tf.range(t)  # [query, key]
        real = tf.range(t)[None, :] >= pads[:, None]  # [batch, key]
        mask = causal[None, None] & real[:, None, None]
        grow = [[0, 0], [0, 0], [0, size - t], [0, 0]]
        return k, v, mask, (tf.pad(k, grow), tf.pad(v, grow))

    return cache


def flat_caches(caches: list[tuple[tf.Tensor, tf.Tensor]]) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """Caches [batch, head, size, head_dim] (prefill's) as `decode_step` and the sampler keep
    them: [batch x head, size, head_dim] (a free reshape; see `slot_caches` for why)."""
    return [tuple(tf.reshape(t, [-1, tf.shape(t)[2], tf.shape(t)[3]]) for t in c) for c in caches]


def slot_caches(
    caches: list[tuple[tf.Tensor, tf.Tensor]], slot: tf.Tensor, pads: tf.Tensor
) -> list[KVCache]:
    """Decoding one position: each layer's fixed-size (keys, values) cache, flat as
    [batch x head, size, head_dim] (`flat_caches`) with slots 0..slot-1 filled, gets the new
    key/value written at `slot` (XLA's dynamic update slice: inside the sampler's compiled
    loop the buffer is updated in place, one slot per step, never copied or rewritten). Row b
    sees slots pads[b]..slot: left padding and the slots not yet written are masked out.
    Present is the updated flat pair, and the keys, values and mask attended over are flat too
    (`attn` then flattens the queries). Only under XLA (`tf.function(jit_compile=True)`).

    Flat, because the attention's batched dot reads [batch x head, ...]: a buffer kept as
    [batch, head, ...] reached it through a reshape of the updated buffer, for which XLA:CPU
    duplicated the update into two fusions and copied every cache twice a step (48 copies of
    124M's caches per token; bench/NOTES.md)."""
    rows, size = tf.shape(caches[0][0])[0], tf.shape(caches[0][0])[1]
    slots = tf.range(size)[None]
    seen = (slots <= slot) & (slots >= pads[:, None])  # [batch, size]
    # Flat row r is batch row r // n_head (head-major within a row, as the reshape lays it).
    mask = tf.gather(seen, tf.range(rows) // (rows // tf.shape(pads)[0]))[:, None]
    at = [0, slot, 0]

    def layer_cache(past_k, past_v):
        def cache(k, v):
            flat = [-1, 1, tf.shape(k)[3]]  # k, v: [batch, head, 1, head_dim]
            k = xla.dynamic_update_slice(past_k, tf.reshape(k, flat), at)
            v = xla.dynamic_update_slice(past_v, tf.reshape(v, flat), at)
            return k, v, mask, (k, v)

        return cache

    return [layer_cache(k, v) for k, v in caches]


def attn(x: tf.Tensor, p: Mapping[str, tf.Tensor], n_head: int, cache: KVCache):
    c = dense(x, p, "attn/c_attn")
    q, k, v = (split_heads(t, n_head) for t in tf.split(c, 3, axis=2))
    k, v, mask, present = cache(k, v)
    if k.shape.rank == 3:  # a flat cache's [batch x head, size, head_dim] (slot_caches)
        shape = tf.shape(q)
        a = tf.reshape(attend(tf.reshape(q, [-1, shape[2], shape[3]]), k, v, mask), shape)
    else:
        a = attend(q, k, v, mask)
    return dense(merge_heads(a), p, "attn/c_proj"), present


def attend(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Scaled dot-product attention of queries q over keys k and values v (leading dims
    alike: [batch, head] or [batch x head]), where `mask` allows."""
    w = tf.cast(tf.matmul(q, k, transpose_b=True), tf.float32)  # softmax in float32: the
    w = w * tf.math.rsqrt(tf.cast(tf.shape(v)[-1], tf.float32))  # -1e10 mask overflows float16
    w = tf.nn.softmax(tf.where(mask, w, NEG_INF), axis=-1)
    return tf.matmul(tf.cast(w, v.dtype), v)


def mlp(x: tf.Tensor, p: Mapping[str, tf.Tensor]) -> tf.Tensor:
    h = gelu(dense(x, p, "mlp/c_fc"))
    return dense(h, p, "mlp/c_proj")


def block(x: tf.Tensor, p: Mapping[str, tf.Tensor], n_head: int, cache: KVCache | None = None):
    """One transformer block; `cache` (default: no past) decides how keys and values are kept."""
    a, present = attn(norm(x, p["ln_1/g"], p["ln_1/b"]), p, n_head, cache or past_cache())
    x = x + a
    x = x + mlp(norm(x, p["ln_2/g"], p["ln_2/b"]), p)
    return x, present


def cast_block(p: Mapping[str, tf.Tensor], dtype: tf.DType) -> dict[str, tf.Tensor]:
    """A block's weights in the compute dtype. Layer norm gains and biases stay float32
    (`norm` computes in float32); in float32 the casts are no-ops. Generation's prepared
    weights (precision.py) stay as prepared."""
    keep = ("ln_",)
    return {
        k: v if k.startswith(keep) or k.endswith(PREPARED_SUFFIXES) else tf.cast(v, dtype)
        for k, v in p.items()
    }


def recomputed_block(n_head: int, names: list[str], dtype: tf.DType):
    """`block` (without past or present) under tf.recompute_grad: the backward pass runs the
    block again instead of keeping its activations (OpenAI's memory_saving_gradients).

    The weights come in as explicit tensor arguments, so recompute_grad sees them as inputs
    and returns their gradients; the float32 -> dtype casts are inside, so they are
    recomputed too rather than kept.
    """

    def f(x: tf.Tensor, *weights: tf.Tensor) -> tf.Tensor:
        return block(x, cast_block(dict(zip(names, weights, strict=True)), dtype), n_head, None)[0]

    return tf.recompute_grad(f)


def transformer(
    params: Mapping[str, tf.Tensor],
    hparams: Mapping[str, int],
    h: tf.Tensor,
    caches: list[KVCache] | None,
    dtype: tf.DType = tf.float32,
    recompute: bool = False,
) -> tuple[tf.Tensor, list]:
    """The blocks and the final layer norm over embedded inputs h [batch, seq, n_embd], each
    block with its layer's cache (None: recomputed blocks, no cache); -> (h, presents)."""
    presents = []
    for i in range(hparams["n_layer"]):
        prefix = f"model/h{i}/"
        p = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
        if caches is None:
            names = sorted(p)
            f = recomputed_block(hparams["n_head"], names, dtype)
            h = f(h, *[tf.convert_to_tensor(p[k]) for k in names])
        else:
            h, present = block(h, cast_block(p, dtype), hparams["n_head"], caches[i])
            presents.append(present)
    return norm(h, params["model/ln_f/g"], params["model/ln_f/b"]), presents


def forward(
    params: Mapping[str, tf.Tensor],
    hparams: Mapping[str, int],
    tokens: tf.Tensor,
    past: tf.Tensor | None = None,
    *,
    dtype: tf.DType = tf.float32,
    recompute: bool = False,
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """tokens [batch, seq] int32 -> (logits [batch, seq, n_vocab], present).

    `past` holds keys/values of earlier positions, `[batch, n_layer, 2, n_head, past_len,
    head_dim]`; `present` holds those of `tokens` alone, so the next call's past is
    `concat([past, present], axis=-2)`. Positions continue from past_len.

    For training: `dtype` (bfloat16 or float16) is the compute dtype of the matmuls and the
    residual stream; logits are float32 whatever it is. `recompute` recomputes each block in
    the backward pass; it keeps no cache, so present is None and past must be None.
    """
    if recompute and past is not None:
        raise ValueError("recompute is for training: it takes no past and returns no present")
    past_len = 0 if past is None else tf.shape(past)[-2]
    t = tf.shape(tokens)[1]
    h = (
        tf.gather(params["model/wte"], tokens)
        + tf.gather(params["model/wpe"], tf.range(past_len, past_len + t))[None]
    )
    pasts = [None] * hparams["n_layer"] if past is None else tf.unstack(past, axis=1)
    caches = None if recompute else [past_cache(layer_past) for layer_past in pasts]
    h, presents = transformer(params, hparams, tf.cast(h, dtype), caches, dtype)
    # Output embedding is tied to the input embedding, as in the paper.
    h = tf.reshape(h, [-1, hparams["n_embd"]])
    if "model/wte_out" in params:  # generation's reduced-precision copy (precision.prepare)
        logits = matmul_t(h, params["model/wte_out"], params.get("model/wte_out_scale"))
    else:
        logits = tf.matmul(h, tf.cast(params["model/wte"], dtype), transpose_b=True)
    logits = tf.reshape(tf.cast(logits, tf.float32), [tf.shape(tokens)[0], t, hparams["n_vocab"]])
    return logits, tf.stack(presents, axis=1) if presents else None


def positions(pads: tf.Tensor, start: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
    """[batch, t] wpe indices of slots start..start+t-1 in rows left-padded by `pads`: a row's
    first real token is its position 0 (padding slots get 0 too; they are masked)."""
    return tf.maximum(start + tf.range(t)[None] - pads[:, None], 0)  # range(t): static in XLA


def next_logits(params: Mapping[str, tf.Tensor], wte_t: tf.Tensor | None, h: tf.Tensor):
    """Logits [batch, n_vocab] of the last positions h [batch, n_embd] for the sampler: h @
    wte_t (the embedding transposed once per call), or with prepared reduced-precision params
    (precision.prepare; wte_t None) their [out, in] copy `model/wte_out`."""
    if wte_t is None:
        return matmul_t(h, params["model/wte_out"], params.get("model/wte_out_scale"))
    return tf.matmul(h, wte_t)


def prefill(
    params: Mapping[str, tf.Tensor],
    hparams: Mapping[str, int],
    wte_t: tf.Tensor | None,
    tokens: tf.Tensor,
    pads: tf.Tensor,
    size: int | tf.Tensor,
) -> tuple[tf.Tensor, list]:
    """The sampler's prompt pass: left-padded prompts tokens [batch, seq] (`pads[b]` padding
    tokens first in row b) -> (last position's logits [batch, n_vocab], each layer's (keys,
    values) padded to `size` slots for `decode_step`). Each row's logits are its unpadded
    pass's: padding is masked out and positions start at each row's first real token."""
    t = tf.shape(tokens)[1]
    h = tf.gather(params["model/wte"], tokens) + tf.gather(
        params["model/wpe"], positions(pads, 0, t)
    )
    cache = padded_cache(pads, size)
    h, caches = transformer(params, hparams, h, [cache] * hparams["n_layer"])
    return next_logits(params, wte_t, h[:, -1]), caches


def decode_step(
    params: Mapping[str, tf.Tensor],
    hparams: Mapping[str, int],
    wte_t: tf.Tensor | None,
    token: tf.Tensor,
    slot: tf.Tensor,
    caches: list[tuple[tf.Tensor, tf.Tensor]],
    pads: tf.Tensor | None = None,
) -> tuple[tf.Tensor, list]:
    """`forward` for one new token per sample at cache slot `slot` (position slot - pads[b] in
    row b; pads default 0), over fixed-size flat caches (`flat_caches` of prefill's; see
    `slot_caches`): -> (logits [batch, n_vocab], the caches with its keys and values). Only
    under XLA.

    Made for the sampler, which compiles its whole decoding loop with XLA: the cache never
    grows and is written in place, and the ~30 small ops of a layer fuse into a few kernels.
    `wte_t` is the token embedding transposed, [n_embd, n_vocab]: for a few rows, h @ wte_t
    streams it 3-5x faster than h @ wte^T (transpose_b), and it is a third of the weights
    read per token (see `next_logits` for reduced precision).
    """
    pads = tf.zeros_like(token) if pads is None else pads
    # gather, not [pos]: XLA would take a slice start as a constant and compile per position.
    h = tf.gather(params["model/wte"], token[:, None]) + tf.gather(
        params["model/wpe"], positions(pads, slot, 1)
    )
    h, caches = transformer(params, hparams, h, slot_caches(caches, slot, pads))
    return next_logits(params, wte_t, h[:, 0]), caches


# --- the model object -------------------------------------------------------------------


class GPT2(tf.Module):
    """GPT-2 weights (tf.Variables under OpenAI's names), hyperparameters and BPE encoder."""

    def __init__(
        self, hparams: Mapping[str, Any], weights: Mapping[str, Any], encoder: Encoder | None = None
    ):
        super().__init__(name="gpt2")
        self.hparams = check_hparams(hparams)
        if encoder is not None and encoder.n_vocab > self.hparams["n_vocab"]:
            raise Gpt2tuneError(
                f"the encoder has {encoder.n_vocab} tokens but hparams n_vocab is "
                f"{self.hparams['n_vocab']}: use the encoder.json that belongs to this model"
            )
        self.encoder = encoder
        self.params: dict[str, tf.Variable] = {}
        for name, shape in variable_shapes(self.hparams).items():
            if name not in weights:
                raise Gpt2tuneError(f"weights: tensor {name} is missing")
            value = np.asarray(weights[name], dtype=np.float32)
            if value.shape != shape:
                raise Gpt2tuneError(
                    f"tensor {name} has shape {list(value.shape)} but hparams need {list(shape)}"
                )
            self.params[name] = tf.Variable(value, name=name)
        self.set_extra_tensors(None)

    def set_extra_tensors(self, extra: Callable[[], Mapping[str, tf.Tensor]] | None) -> None:
        """Tensors the forward pass reads besides the weights (`lora.attach`: the adapters),
        made by `extra()` inside each traced call; the compiled functions are rebuilt."""
        self._extra = extra
        self._sampler = None  # generation.sampler's compiled loop, built on first use
        self._samplers_at: dict = {}  # the same per reduced precision, with its weights
        self._logits_fn = tf.function(
            lambda tokens: forward(self.forward_params(), self.hparams, tokens)[0],
            input_signature=[tf.TensorSpec([None, None], tf.int32)],
        )

    def forward_params(self) -> Mapping[str, tf.Tensor]:
        """What the forward pass reads: the weights, plus any extra tensors (adapters)."""
        return self.params if self._extra is None else {**self.params, **self._extra()}

    def _tokens(self, tokens, past_len: int = 0) -> tf.Tensor:
        tokens = tf.convert_to_tensor(tokens)
        if not tokens.dtype.is_integer:
            raise Gpt2tuneError(f"tokens must be integer ids, got {tokens.dtype.name}")
        tokens = tf.cast(tokens, tf.int32)
        if tokens.shape.rank != 2:
            raise Gpt2tuneError(f"tokens must be [batch, seq], got shape {tokens.shape.as_list()}")
        if past_len + tokens.shape[1] > self.hparams["n_ctx"]:
            raise Gpt2tuneError(
                f"{past_len + tokens.shape[1]} positions exceed the model's context of "
                f"{self.hparams['n_ctx']} tokens"
            )
        return tokens

    def __call__(self, tokens) -> tf.Tensor:
        """int32 tokens [batch, seq] -> float32 logits [batch, seq, n_vocab] (compiled once)."""
        return self._logits_fn(self._tokens(tokens))

    def forward(self, tokens, past: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Like __call__ but with a key/value cache: returns (logits, present); see `forward`."""
        past_len = 0 if past is None else int(past.shape[-2])
        return forward(self.forward_params(), self.hparams, self._tokens(tokens, past_len), past)

    def weights_numpy(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.params.items()}


def init_model(hparams: Mapping[str, Any], encoder: Encoder | None = None, seed: int = 0) -> GPT2:
    """A randomly initialised GPT-2, initialised as in OpenAI's model.py.

    Dense weights and wte ~ N(0, 0.02), wpe ~ N(0, 0.01), biases 0, LayerNorm gains 1.
    `encoder` (`load_encoder(folder)`) is the model's tokenizer, which `save_model` needs.
    """
    hp = check_hparams(hparams)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in variable_shapes(hp).items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "g":
            weights[name] = np.ones(shape, np.float32)
        elif leaf == "b":
            weights[name] = np.zeros(shape, np.float32)
        else:
            std = 0.01 if name == "model/wpe" else 0.02
            weights[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
    return GPT2(hp, weights, encoder)
