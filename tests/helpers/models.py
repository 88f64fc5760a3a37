"""Model folders for tests: TF1 checkpoints written the way OpenAI's release was (a subprocess
in graph mode), and tiny GPT-2s with random weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- TF1 checkpoints

# Runs in a subprocess because tf.compat.v1 graph mode must not leak into the eager tests.
# It builds the variables the way OpenAI's model.py does (tf.compat.v1.get_variable under
# variable scopes) and either saves given values with Saver.save (writing .index, .data,
# .meta and the `checkpoint` state file, as the official release has them), or restores with
# Saver.restore(sess, tf.train.latest_checkpoint(folder)) and dumps what it read.
TF1_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    tf.compat.v1.disable_eager_execution()
    mode, folder, npz = sys.argv[1:4]
    shapes = json.loads(sys.argv[4])
    variables = {}
    for name, shape in shapes.items():
        scope, leaf = name.rsplit("/", 1)
        with tf.compat.v1.variable_scope(scope, reuse=tf.compat.v1.AUTO_REUSE):
            variables[name] = tf.compat.v1.get_variable(leaf, shape, tf.float32)
    assert sorted(v.op.name for v in variables.values()) == sorted(shapes)
    saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session() as sess:
        if mode == "save":
            values = np.load(npz)
            for name, var in variables.items():
                var.load(values[name], sess)
            saver.save(sess, folder + "/model.ckpt")
        else:
            saver.restore(sess, tf.train.latest_checkpoint(folder))
            np.savez(npz, **{n: sess.run(v) for n, v in variables.items()})
    """
)


def run_tf1(mode: str, folder: Path, npz: Path, hp: dict) -> None:
    from gpt2tune.model.gpt2 import variable_shapes

    shapes = {k: list(v) for k, v in variable_shapes(hp).items()}
    proc = subprocess.run(
        [sys.executable, "-c", TF1_SCRIPT, mode, str(folder), str(npz), json.dumps(shapes)],
        capture_output=True,
        text=True,
        env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def write_official_style_model(folder: Path, hp: dict, vocab_dir: Path, seed: int = 0) -> dict:
    """A GPT-2 folder made the way OpenAI's release was: random weights (OpenAI's init)
    saved by a TF1 Saver, plus hparams.json, encoder.json and vocab.bpe. Returns the weights."""
    from gpt2tune.model.gpt2 import init_model

    folder.mkdir(parents=True, exist_ok=True)
    weights = init_model(hp, seed=seed).weights_numpy()
    npz = folder.parent / f".{folder.name}-weights.npz"
    np.savez(npz, **weights)
    run_tf1("save", folder, npz, hp)
    npz.unlink()
    (folder / "hparams.json").write_text(json.dumps(hp, indent=2))
    for f in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(vocab_dir / f, folder / f)
    return weights


# --------------------------------------------------------------------------- tiny models


def tiny_model(vocab_dir: Path, seed: int = 0, **hp: int):
    """A randomly initialised GPT-2 over the vocabulary in vocab_dir: one layer of width 16
    and 32 positions unless `hp` says otherwise."""
    from gpt2tune.model.encoder import load_encoder
    from gpt2tune.model.gpt2 import init_model

    shape = {"n_ctx": 32, "n_embd": 16, "n_head": 2, "n_layer": 1, **hp}
    return init_model(
        dict(shape, n_vocab=load_encoder(vocab_dir).n_vocab), load_encoder(vocab_dir), seed=seed
    )


# The tiny training run of test_train*.py: a 2-layer model learns a short repeating pattern
# within a few dozen steps.
