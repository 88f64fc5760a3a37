"""data.val_path: validation on a separate text instead of a held-out fraction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2tune.dataset import encode_corpus, load_tokens
from gpt2tune.encoder import load_encoder
from gpt2tune.errors import Gpt2tuneError

TRAIN = "Human reason, in one sphere of its cognition, is called upon to consider questions.\n"
VAL = "It is in this way that reason plunges itself into darkness and contradictions.\n"


@pytest.fixture(scope="module")
def tiny(tiny_vocab_dir):
    return load_encoder(tiny_vocab_dir)


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_val_path_is_the_validation_set_and_all_of_path_trains(tmp_path, tiny):
    train = write(tmp_path / "raw" / "train.txt", TRAIN * 3)
    val = write(tmp_path / "raw-val" / "val.txt", VAL)
    out = tmp_path / "encoded"
    stats = encode_corpus(train, tiny, out, val_fraction=0.3, val_path=val)  # fraction unused
    np.testing.assert_array_equal(load_tokens(out, "train"), tiny.encode(TRAIN * 3))
    np.testing.assert_array_equal(load_tokens(out, "val"), tiny.encode(VAL))
    assert stats["train_tokens"] == len(tiny.encode(TRAIN * 3))
    assert stats["val_tokens"] == len(tiny.encode(VAL))
    assert stats["val_files"] == [val] and stats["documents"] == 2
    assert json.loads((out / "stats.json").read_text()) == stats
    # Without it, the same text is split by val_fraction as before.
    plain = encode_corpus(train, tiny, out, val_fraction=0.3)
    assert 0 < plain["val_tokens"] < plain["tokens"] and "val_files" not in plain


def test_val_path_errors_name_the_key(tmp_path, tiny):
    train = write(tmp_path / "train.txt", TRAIN)
    out = tmp_path / "encoded"
    with pytest.raises(Gpt2tuneError, match=r"^data\.val_path = '.*missing\.txt': .*not exist"):
        encode_corpus(train, tiny, out, val_path=str(tmp_path / "missing.txt"))
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(Gpt2tuneError, match=r"^data\.val_path = '.*empty\.txt': no text"):
        encode_corpus(train, tiny, out, val_path=empty)
    with pytest.raises(Gpt2tuneError, match=r"share .*train\.txt; validation text must not"):
        encode_corpus(str(tmp_path), tiny, out, val_path=train)
    assert not out.exists() or not any(out.glob("*.npy"))
