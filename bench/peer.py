"""The peer: OpenAI's original GPT-2 model and sampler as packaged in gpt-2-simple, timed.

    python bench/peer.py train '{"n_layer": 12, ..., "seq": 256, "batch": 2, "steps": 5}'
    python bench/peer.py generate '{"n_layer": 12, ..., "prompt": 64, "length": 128, ...}'

Run by bench/train.py and bench/generate.py with --peer, in its own process: importing
gpt_2_simple switches TensorFlow to graph mode (its module calls
tf.compat.v1.disable_eager_execution(), as every gpt-2-simple user runs it), which must not
leak into gpt2tune's measurement. What runs is the package's own code, unmodified:

- train: gpt_2_simple.src.model.model on a [batch, seq] int32 placeholder, the loss, Adam and
  `tf.gradients` exactly as gpt_2_simple.finetune builds them (accumulate_gradients=1, no
  memory-saving gradients), in a session from gpt_2_simple.start_tf_sess(); one timed
  `sess.run(opt_apply)` per step.
- generate: gpt_2_simple.src.sample.sample_sequence with a [batch, prompt] placeholder as
  context, top_k 40, as gpt_2_simple.generate calls it; one timed `sess.run` per sample batch.

Weights are OpenAI's random initialisation (global_variables_initializer). Prints JSON last.
"""

import json
import sys
import time

import numpy as np


def setup(cfg: dict):
    import gpt_2_simple as gpt2  # disables eager execution, as in every gpt-2-simple program
    import tensorflow as tf
    from gpt_2_simple.src import model

    hp = model.default_hparams()
    hp.override_from_dict({k: cfg[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")})
    return gpt2, tf, model, hp


def train(cfg: dict) -> dict:
    gpt2, tf, model, hp = setup(cfg)
    sess = gpt2.start_tf_sess()
    context = tf.compat.v1.placeholder(tf.int32, [cfg["batch"], None])
    output = model.model(hparams=hp, X=context)
    loss = tf.reduce_mean(
        input_tensor=tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=context[:, 1:], logits=output["logits"][:, :-1]
        )
    )
    train_vars = [v for v in tf.compat.v1.trainable_variables() if "model" in v.name]
    opt = tf.compat.v1.train.AdamOptimizer(learning_rate=2e-5)
    opt_grads = tf.gradients(ys=loss, xs=train_vars)
    opt_apply = opt.apply_gradients(list(zip(opt_grads, train_vars, strict=True)))
    sess.run(tf.compat.v1.global_variables_initializer())
    rng = np.random.default_rng(0)

    def step() -> float:
        w = rng.integers(0, cfg["n_vocab"] - 1, (cfg["batch"], cfg["seq"])).astype(np.int32)
        t0 = time.perf_counter()
        sess.run((opt_apply, loss), feed_dict={context: w})
        return time.perf_counter() - t0

    first = step()
    times = [step() for _ in range(cfg["steps"])]
    return {"first_step_s": first, "step_times": times}


def generate(cfg: dict) -> dict:
    gpt2, tf, model, hp = setup(cfg)
    from gpt_2_simple.src import sample

    sess = gpt2.start_tf_sess()
    context = tf.compat.v1.placeholder(tf.int32, [cfg["batch"], None])
    output = sample.sample_sequence(
        hparams=hp, length=cfg["length"], context=context, batch_size=cfg["batch"],
        temperature=cfg["temperature"], top_k=cfg["top_k"],
    )  # fmt: skip
    sess.run(tf.compat.v1.global_variables_initializer())
    prompt = np.random.default_rng(0).integers(0, cfg["n_vocab"] - 1, cfg["prompt"])
    feed = {context: np.tile(prompt.astype(np.int32), (cfg["batch"], 1))}
    t0 = time.perf_counter()
    out = sess.run(output, feed_dict=feed)
    first = time.perf_counter() - t0
    assert out.shape == (cfg["batch"], cfg["prompt"] + cfg["length"]), out.shape
    times = []
    for _ in range(cfg["repeat"]):
        t0 = time.perf_counter()
        sess.run(output, feed_dict=feed)
        times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "call_times": times}


if __name__ == "__main__":
    kind, cfg = sys.argv[1], json.loads(sys.argv[2])
    result = {"train": train, "generate": generate}[kind](cfg)
    print(json.dumps(result))
