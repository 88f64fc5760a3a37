"""The memorization index: a planted span of the corpus is found exactly, random text shares
only the short runs random text has, and the index is built once per encoding."""

import json

import numpy as np
import pytest

from gpt2tune.data import index as ix

V = 50257  # GPT-2's vocabulary: uint16 tokens, as train.npy holds them


def write_encoded(folder, tokens, files=()):
    """train.npy, val.npy and stats.json as the encode stage writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "train.npy", tokens.astype("<u2"))
    np.save(folder / "val.npy", np.zeros(0, "<u2"))
    stats = {"n_vocab": V, "train_tokens": len(tokens), "val_tokens": 0, "format": "text",
             "files": list(files)}  # fmt: skip
    (folder / "stats.json").write_text(json.dumps(stats))


def brute_lengths(corpus: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """For each sample position, the longest run it starts that occurs in the corpus, by
    dynamic programming over all (sample, corpus) position pairs."""
    run = np.zeros(len(corpus) + 1, np.int64)  # common run of sample[i:] and corpus[j:]
    out = np.zeros(len(sample), np.int64)
    for i in range(len(sample) - 1, -1, -1):
        run = np.append(np.where(corpus == sample[i], run[1:] + 1, 0), 0)
        out[i] = run.max()
    return out


def test_a_planted_span_is_reported_exactly(tmp_path):
    rng = np.random.default_rng(0)
    corpus = rng.integers(0, V - 1, 30_000)
    eot = V - 1
    corpus[[5_000, 20_000]] = eot  # three documents, one per file
    write_encoded(tmp_path / "enc", corpus, ["a.txt", "b.txt", "c.txt"])
    index = ix.corpus_index(tmp_path / "enc", eot, tmp_path / "cache")
    sample = rng.integers(0, V - 1, 200)
    at = 12_345
    sample[70:120] = corpus[at : at + 50]
    # The tokens around the span differ from the corpus's, so the run is exactly 50 long.
    sample[69], sample[120] = (corpus[at - 1] + 1) % eot, (corpus[at + 50] + 1) % eot
    r = ix.report(index, sample, lambda ids: " ".join(map(str, ids)), 32)
    assert r["copied_tokens"] == 50 and r["copied_offset"] == at
    assert r["copied_document"] == "b.txt"
    assert r["copied_snippet"] == " ".join(map(str, corpus[at : at + 40])) + "…"
    assert r["copied_fraction"] == 50 / 200
    lengths, offsets = ix.matches(index, sample)
    assert np.array_equal(lengths[70:120], 50 - np.arange(50))  # every suffix of the span
    assert np.array_equal(offsets[70:120], at + np.arange(50))


def test_random_text_shares_only_short_runs(tmp_path):
    rng = np.random.default_rng(1)
    # A small alphabet gives runs of many tokens by chance (longer than the search's first
    # look, PEEK): each is checked against brute force. A run of k tokens at one (sample,
    # corpus) pair has probability 4^-k, so over 200 x 20,000 pairs the longest is about
    # log_4(4e6) ~ 11 tokens.
    corpus, sample = rng.integers(0, 4, 20_000), rng.integers(0, 4, 200)
    write_encoded(tmp_path / "small", corpus)
    index = ix.corpus_index(tmp_path / "small", 3, tmp_path / "cache")
    lengths, offsets = ix.matches(index, sample)
    assert np.array_equal(lengths, brute_lengths(corpus, sample))
    for i, (n, o) in enumerate(zip(lengths, offsets, strict=True)):
        assert np.array_equal(corpus[o : o + n], sample[i : i + n])
    assert ix.PEEK < lengths.max() <= 24  # P(a run of 25) <= 4e6 * 4^-25 ~ 4e-9
    # GPT-2's vocabulary: a run of 3 has probability <= 4e6 / 50257^3 ~ 3e-8.
    corpus, sample = rng.integers(0, V, 20_000), rng.integers(0, V, 200)
    write_encoded(tmp_path / "big", corpus)
    index = ix.corpus_index(tmp_path / "big", V - 1, tmp_path / "cache")
    r = ix.report(index, sample, str, 32)
    assert 1 <= r["copied_tokens"] <= 2 and r["copied_fraction"] == 0.0
    assert r["copied_document"] == "document 1 of train.npy"  # no files named: numbered


def test_the_index_is_built_once_per_encoding(tmp_path):
    rng = np.random.default_rng(2)
    cache = tmp_path / "cache"
    write_encoded(tmp_path / "enc", rng.integers(0, V, 1000))
    first = ix.corpus_index(tmp_path / "enc", V - 1, cache)
    [folder] = list(cache.iterdir())
    built = (folder / "sa.npy").stat().st_mtime_ns
    again = ix.corpus_index(tmp_path / "enc", V - 1, cache)
    assert (folder / "sa.npy").stat().st_mtime_ns == built  # reused, not rebuilt
    assert np.array_equal(first.sa, again.sa)
    sa = np.asarray(again.sa)
    suffixes = [tuple(again.tokens[i : i + 8]) for i in sa]  # sorted (8 tokens decide here)
    assert suffixes == sorted(suffixes) and sorted(sa) == list(range(1000))
    # New encodings get folders of their own; beyond KEEP the oldest of ours go.
    (cache / "mine").mkdir()  # not ours: kept
    for seed in range(3, 3 + ix.KEEP + 1):
        write_encoded(tmp_path / "enc", np.random.default_rng(seed).integers(0, V, 1000))
        ix.corpus_index(tmp_path / "enc", V - 1, cache)
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == ix.KEEP + 1 and "mine" in names and folder.name not in names


@pytest.mark.parametrize("width", [1, 2])
def test_suffix_array_of_byte_and_wide_tokens(width):
    tokens = np.array([3, 1, 2, 3, 1, 2, 0]) * (1 if width == 1 else 300)
    assert ix.suffix_array(tokens).tolist() == [6, 4, 1, 5, 2, 3, 0]
