"""Shared fixtures: where the official GPT-2 data lives, and tiny vocabularies and models
built from scratch in OpenAI's on-disk formats so tests never need a download."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The official BPE files and kant.txt live beside the checkout in ../shared/data (CI has them too).
SHARED_DATA = Path(os.environ.get("GPT2TUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
# .ci/run sets this so that missing shared data fails the run instead of skipping tests.
REQUIRE_SHARED = os.environ.get("GPT2TUNE_REQUIRE_SHARED_DATA") == "1"


def _need(path: Path) -> Path:
    if not path.exists():
        msg = f"{path} is absent (set GPT2TUNE_SHARED_DATA to the folder holding the shared data)"
        if REQUIRE_SHARED:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def official_vocab_dir() -> Path:
    """Folder holding the official GPT-2 encoder.json and vocab.bpe."""
    d = SHARED_DATA / "gpt2-vocab"
    _need(d / "encoder.json")
    _need(d / "vocab.bpe")
    return d


@pytest.fixture(scope="session")
def kant_path() -> Path:
    return _need(SHARED_DATA / "kant.txt")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode table, written independently of the library."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


TINY_CORPUS = (
    "Human reason, in one sphere of its cognition, is called upon to consider questions, "
    "which it cannot decline, as they are presented by its own nature, but which it cannot "
    "answer, as they transcend every faculty of the mind. The the the reason reasoning "
    "reasons. It is in this way that reason plunges itself into darkness and contradictions. "
)


def build_tiny_vocab(folder: Path, n_merges: int = 120, corpus: str = TINY_CORPUS) -> int:
    """Train a small byte-level BPE the way GPT-2's was made and write encoder.json + vocab.bpe.

    Tokens 0..255 are the bytes, then one token per merge in merge order, then <|endoftext|>,
    matching the official files' conventions. Returns n_vocab.
    """
    import regex

    b2u = bytes_to_unicode()
    pat = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    )
    words = collections.Counter(
        tuple(b2u[b] for b in w.encode("utf-8")) for w in pat.findall(corpus)
    )
    vocab = [b2u[b] for b in range(256)]
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w[:-1], w[1:], strict=True):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merged = best[0] + best[1]
        if merged in vocab:  # keep one merge per resulting token, like the official vocab
            words = _apply_merge(words, best)
            continue
        merges.append(best)
        vocab.append(merged)
        words = _apply_merge(words, best)
    vocab.append("<|endoftext|>")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoder.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


def _apply_merge(words: collections.Counter, pair: tuple[str, str]) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for w, c in words.items():
        new, i = [], 0
        while i < len(w):
            if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                new.append(w[i] + w[i + 1])
                i += 2
            else:
                new.append(w[i])
                i += 1
        out[tuple(new)] += c
    return out


@pytest.fixture(scope="session")
def tiny_vocab_dir(tmp_path_factory) -> Path:
    """encoder.json + vocab.bpe of a ~377-token byte-level BPE trained on a paragraph of Kant."""
    d = tmp_path_factory.mktemp("tiny_vocab")
    build_tiny_vocab(d)
    return d


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
    from gpt2tune.model import variable_shapes

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
    import numpy as np

    from gpt2tune.model import init_model

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
