"""Reduced-precision weights for generation: bfloat16, or int8 with a scale per output row.

At small batches every new token reads every weight once, so decoding is bound by memory
bandwidth and halving (bfloat16) or quartering (int8) the bytes read raises the bound. What
XLA:CPU streams fast, measured (bench/NOTES.md): each matrix stored [out, in] (a row per
output unit, read contiguously by the dot) with the dot written bfloat16 x bfloat16, or the
int8 matrix converted inside the fused loop and the per-row scale applied to the dot's output.
The [in, out] layout, or `x @ tf.cast(w, float32)` with w bfloat16, are several times slower.
XLA:CPU has no bfloat16 or int8 dot: it converts the matrix to float32, and the sampler keeps
that convert inside each decoding step (`generation.sampler._in_step`) so that it fuses into
the dot and the step reads 2 or 1 bytes a weight. One row then decodes 1.5-1.8x float32's
speed on a quiet 2-core AVX-512 CPU; from 2 rows the fused convert-dot is slower than
float32's dot, so the sampler decodes batches at float32 on a CPU
(`generation.sampler.decoding_precision`; docs/benchmarks.md).

`prepare(params, precision)` turns a model's float32 weights (OpenAI's layout, unchanged:
the files on disk and `GPT2.params` stay float32) into the weights generation reads:

- every dense layer's `.../w` [1, in, out] becomes `.../w_t` [out, in] in bfloat16, or in
  int8 with `.../w_t_scale` [out] float32 (w ~= w_t * scale[:, None], symmetric, so each
  weight is off by at most scale / 2);
- the output embedding (tied to wte, [n_vocab, n_embd], already [out, in]) gets a copy as
  `model/wte_out` (+ `model/wte_out_scale`); `model/wte` itself stays float32 for the
  input embedding, of which one row per token is read.

Biases, layer norms and wpe stay float32, and so do activations, the residual stream, the
attention and the logits: only the weight matrices are rounded. `gpt2.conv1d` and the logits
matmuls call `matmul_t` when they find the prepared names; "float32" prepares nothing and
leaves the float32 path exactly as it was (training never sees prepared weights).
"""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from gpt2tune.config.params import PRECISIONS

# Names `prepare` adds; gpt2.cast_block leaves them as they are (they are not compute-dtype
# weights to cast, and casting them to float32 would undo the point).
PREPARED_SUFFIXES = ("/w_t", "/w_t_scale", "/wte_out", "/wte_out_scale")


def is_dense_weight(name: str) -> bool:
    """A transformer block's dense matrix (`model/h3/mlp/c_fc/w`, ...)."""
    return name.startswith("model/h") and name.endswith("/w")


def quantize_rows(w: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """w [out, in] float32 -> (int8 [out, in], float32 scale [out]) with w ~= q * scale[:, None].

    Symmetric per row: scale = max|row| / 127, q = round(w / scale) in -127..127, so each
    weight is off by at most scale / 2. An all-zero row gets scale 1 (and q 0): exact."""
    peak = tf.reduce_max(tf.abs(w), axis=1)
    scale = tf.where(peak > 0, peak / 127.0, tf.ones_like(peak))
    q = tf.clip_by_value(tf.round(w / scale[:, None]), -127.0, 127.0)
    return tf.cast(q, tf.int8), scale


def _rows(w_t: tf.Tensor, precision: str) -> dict[str, tf.Tensor]:
    # One [out, in] float32 matrix in `precision`: {"": matrix, "_scale": scale (int8 only)}.
    if precision == "bfloat16":
        return {"": tf.cast(w_t, tf.bfloat16)}
    q, scale = quantize_rows(w_t)
    return {"": q, "_scale": scale}


def prepare(params: Mapping[str, tf.Tensor], precision: str) -> dict[str, tf.Tensor]:
    """Generation's weights in `precision` (see the module docstring); float32: `params` as
    they are (the same variables, no copy). Other entries (adapters, biases) pass through."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: must be one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return dict(params)
    out: dict[str, tf.Tensor] = {}
    for name, v in params.items():
        if is_dense_weight(name):
            # [1, in, out] -> [out, in]: a dense layer's rows, one per output unit.
            for suffix, t in _rows(tf.transpose(v[0]), precision).items():
                out[name + "_t" + suffix] = t
        else:
            out[name] = v
    for suffix, t in _rows(tf.convert_to_tensor(params["model/wte"]), precision).items():
        out["model/wte_out" + suffix] = t
    return out


def matmul_t(x: tf.Tensor, w_t: tf.Tensor, scale: tf.Tensor | None = None) -> tf.Tensor:
    """x [rows, in] float32 times a prepared w_t [out, in] (transposed) -> float32 [rows, out].

    bfloat16: x is rounded to bfloat16 too, the dot is bfloat16 x bfloat16 (XLA:CPU widens
    to float32 inside it), the result comes back float32. int8: the matrix is converted to
    float32 inside the dot's fused loop (under XLA; eagerly it is materialized once per call)
    and each output column multiplied by its row's scale."""
    if w_t.dtype == tf.bfloat16:
        y = tf.matmul(tf.cast(x, tf.bfloat16), w_t, transpose_b=True)
        return tf.cast(y, tf.float32)
    y = tf.matmul(x, tf.cast(w_t, x.dtype), transpose_b=True)
    return y * scale


def weight_bytes(precision: str) -> int:
    """Bytes per weight of a prepared matrix (int8's scales are one float per row: ignored)."""
    return {"float32": 4, "bfloat16": 2, "int8": 1}[precision]
