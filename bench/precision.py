"""The quality cost of sample.precision: logits' relative error, top-k agreement, greedy
agreement and the validation loss, per precision against float32.

    python bench/precision.py                          # random 124M shapes
    python bench/precision.py --train-steps 300 --n_layer 2 --n_embd 64 --n_head 2
        # a tiny model fine-tuned here on kant.txt (GPT-2's vocabulary): its val loss too

On positions of a 64-token window (random tokens for a random model; the held-out text for a
trained one) each precision's full-pass logits are compared with float32's:
`rel_error` = ||logits - float32's|| / ||float32's|| over all positions, `top_k_agree` the
mean share of float32's top-k tokens (k 40) that are in the precision's top k, `argmax_agree`
the share of positions with the same likeliest token, `val_loss` the validation loss of
gpt2tune.train.evaluate (as `gpt2tune evaluate --precision` prints it). The last line is JSON.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
from common import add_shape_args, hparams, loadavg

K = 40


def compare(want: np.ndarray, got: np.ndarray) -> dict:
    top_w = np.argsort(want, -1)[:, -K:]
    top_g = np.argsort(got, -1)[:, -K:]
    agree = [len(set(a) & set(b)) / K for a, b in zip(top_w, top_g, strict=True)]
    return {"rel_error": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
            "top_k_agree": float(np.mean(agree)),
            "argmax_agree": float(np.mean(want.argmax(-1) == got.argmax(-1)))}  # fmt: skip


def train(model, tokens: np.ndarray, steps: int, seq: int = 64, batch: int = 8) -> float:
    """Plain Adam (lr 1e-3) on random windows of `tokens`: a model with something learnt."""
    import tensorflow as tf

    from gpt2tune.train.trainer import lm_loss

    variables = list(model.params.values())
    m = [tf.Variable(tf.zeros_like(v)) for v in variables]
    s = [tf.Variable(tf.zeros_like(v)) for v in variables]
    rng = np.random.default_rng(0)

    @tf.function
    def step(w, t):
        with tf.GradientTape() as tape:
            loss = lm_loss(model.params, model.hparams, w)
        grads = tape.gradient(loss, variables)
        for v, g, m_, s_ in zip(variables, grads, m, s, strict=True):
            g = tf.convert_to_tensor(g)  # wte's is sparse (a gather)
            m_.assign(0.9 * m_ + 0.1 * g)
            s_.assign(0.999 * s_ + 0.001 * g * g)
            v.assign_sub(1e-3 * (m_ / (1 - 0.9**t)) / (tf.sqrt(s_ / (1 - 0.999**t)) + 1e-8))
        return loss

    loss = float("nan")
    for t in range(1, steps + 1):
        at = rng.integers(0, len(tokens) - seq - 1, batch)
        w = np.stack([tokens[a : a + seq + 1] for a in at]).astype(np.int32)
        loss = float(step(tf.constant(w), tf.constant(float(t))))
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--train-steps", type=int, default=0, help="fine-tune on kant.txt first")
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()
    hp = hparams(args)

    import tensorflow as tf

    from gpt2tune.config.params import PRECISIONS, Params
    from gpt2tune.model.gpt2 import forward, init_model
    from gpt2tune.model.precision import prepare

    result = {**hp, "train_steps": args.train_steps, "window": args.window}
    if args.train_steps:
        from gpt2tune.model.encoder import load_encoder

        data = Path(os.environ.get("GPT2TUNE_SHARED_DATA", "../shared/data"))
        enc = load_encoder(data / "gpt2-vocab")
        tokens = np.array(enc.encode((data / "kant.txt").read_text(encoding="utf-8")))
        cut = int(0.9 * len(tokens))
        model = init_model({**hp, "n_vocab": enc.n_vocab}, enc, seed=0)
        result["train_loss"] = round(train(model, tokens[:cut], args.train_steps), 4)
        val = tokens[cut:]
        window = val[: args.window][None]
    else:
        model = init_model(hp, seed=0)
        window = np.random.default_rng(0).integers(0, hp["n_vocab"] - 1, (1, args.window))
    window = tf.constant(window, tf.int32)
    want = forward(model.params, model.hparams, window)[0].numpy()[0]
    for precision in PRECISIONS:
        got = forward(prepare(model.params, precision), model.hparams, window)[0].numpy()[0]
        r = compare(want, got)
        if args.train_steps:
            from gpt2tune.config.params import TrainParams
            from gpt2tune.train.evaluate import evaluate_loss

            p = Params(train=TrainParams(n_ctx=args.window, batch_size=8, val_batch_count=32))
            r["val_loss"] = evaluate_loss(model, val, p, False, precision)["loss"]
        result[precision] = {k: round(v, 5) for k, v in r.items()}
        print(precision, result[precision], flush=True)
    result["loadavg"] = loadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
