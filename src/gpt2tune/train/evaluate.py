"""The loss and perplexity of any model folder on any text (`gpt2tune evaluate`).

The number is the one training's validation reports: the text is tokenized by the encode
step (data.format, data.encoding, data.field; here all of it kept, none held out), cut into
the same evenly spaced windows (``batches.eval_windows`` with train.n_ctx and
train.val_batch_count) and scored by the Trainer's compiled eval step (train.batch_size
windows at a time, train.precision). So a fine-tuned model's val_loss can be compared with,
say, the base model's on the same validation text. ``--data val`` (VALIDATION_DATA) takes the
encode stage's validation tokens (data/encoded/val.npy) instead of a text: the very windows
training validates on, so the base model's loss there is training's ``base_val_loss`` (with
prompt -> completion records, data.prompt_field, over the completions only, as there; a text
given by path is scored on every token).
"""

from __future__ import annotations

import math
import tempfile

import numpy as np
from tqdm import tqdm

from gpt2tune.config.params import Params
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.paths import ENCODED, VALIDATION_DATA


def text_tokens(path_spec: str, model_dir: str, p: Params, what: str = "--data") -> np.ndarray:
    """All tokens of `path_spec`, encoded exactly as the encode stage would (one stream,
    documents separated by <|endoftext|>), with the tokenizer of `model_dir`; VALIDATION_DATA:
    data/encoded/val.npy as it is. Errors call path_spec `what` (the option it came from)."""
    from gpt2tune.data.encode import encode_corpus
    from gpt2tune.data.encoded import load_tokens
    from gpt2tune.model.encoder import load_encoder

    enc = load_encoder(model_dir)
    if path_spec == VALIDATION_DATA:
        tokens = np.array(load_tokens(ENCODED, "val", enc.n_vocab))
        if len(tokens) < 2:
            raise Gpt2tuneError(
                f"{what} {VALIDATION_DATA}: {ENCODED}/val.npy holds {len(tokens)} token(s); set "
                "data.val_fraction above 0 (or data.val_path) and run `dvc repro encode`"
            )
        return tokens
    with tempfile.TemporaryDirectory(prefix="gpt2tune-evaluate-") as tmp:
        encode_corpus(path_spec, enc, tmp, encoding=p.data.encoding, data_format=p.data.format,
                      field=p.data.field, val_fraction=0.0, what=what,
                      max_line_mb=p.data.max_line_mb,
                      follow_symlinks_outside=p.data.follow_symlinks_outside)  # fmt: skip
        return np.array(load_tokens(tmp, "train", enc.n_vocab))


def evaluate_loss(
    model,
    tokens: np.ndarray,
    p: Params,
    progress: bool | None = None,
    precision: str = "float32",
    mask: np.ndarray | None = None,
) -> dict:
    """{"loss", "perplexity", "windows", "tokens"} of `model` on `tokens`, with training's
    validation windows and eval step; a bar per batch of windows on a terminal. `mask`: the
    tokens' loss mask (data.prompt_field's, `val_mask`): the loss of the targets it marks
    only, as training's validation with records. `precision` (sample.precision's values):
    the loss with the weights generation reads at it."""
    import dataclasses

    import tensorflow as tf

    from gpt2tune.data.batches import eval_windows
    from gpt2tune.train.trainer import Trainer

    n_ctx = min(p.train.n_ctx, model.hparams["n_ctx"])
    windows = eval_windows(tokens, n_ctx, p.train.val_batch_count)
    if not len(windows):
        raise Gpt2tuneError(f"the text is only {len(tokens)} token(s): nothing to evaluate")
    cfg = dataclasses.replace(p.train, n_ctx=n_ctx)
    if precision == "float32":
        trainer = Trainer(model, cfg, tf.distribute.get_strategy())
        mean_of, masked_sum_of = trainer.eval_step, trainer.eval_step_masked
    else:  # the same losses, over the weights as gpt2tune.model.precision prepares them
        from gpt2tune.model.precision import prepare
        from gpt2tune.train.trainer import lm_loss

        params = prepare(model.forward_params(), precision)
        mean_of = tf.function(lambda w: lm_loss(params, model.hparams, w))

        @tf.function
        def masked_sum_of(w, m):
            targets = tf.cast(m[:, 1:], tf.float32)
            return lm_loss(params, model.hparams, w, weights=targets), tf.reduce_sum(targets)

    b, total = cfg.batch_size, 0.0
    quiet = None if progress is None else not progress  # tqdm: None = only on a terminal
    masks = None if mask is None else eval_windows(mask, n_ctx, p.train.val_batch_count)
    count = 0.0
    for i in tqdm(range(0, len(windows), b), desc="evaluate", unit="batch", disable=quiet):
        w = windows[i : i + b]
        if masks is None:
            total, count = total + float(mean_of(tf.constant(w))) * len(w), count + len(w)
        else:  # the mean over the marked targets of all windows, not per batch
            t, n = masked_sum_of(tf.constant(w), tf.constant(masks[i : i + b]))
            total, count = total + float(t), count + float(n)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(loss), "windows": len(windows),
            "tokens": int(windows.shape[0] * (windows.shape[1] - 1))}  # fmt: skip
