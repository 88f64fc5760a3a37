"""The memorization report's index: a suffix array over ``data/encoded/train.npy``, and the
longest runs of tokens a sample shares verbatim with the training tokens.

The suffix array is built by libdivsufsort (the ``pydivsufsort`` wheel) over the tokens
spelled as big-endian bytes: sorting the byte suffixes sorts the token suffixes, which are
the ones at even (uint16) byte offsets. It is built once per encoding and kept in
``.gpt2tune/index/<sha256 of train.npy>/`` (``sa.npy``, memory-mapped when read, and
``eot.npy``, where each <|endoftext|> is), so every later sample, the training's and the
sample stage's, reuses it; a new encoding gets a new folder, and the older ones this module
made are removed (KEEP are kept).

A query (:func:`matches`) finds, for every position i of a sample, the longest prefix of
sample[i:] that occurs in the corpus, by one binary search over the suffix array per
position, all positions searched together in numpy: ~27 steps for 100 M tokens, each
comparing at most WIDTH tokens. A run longer than WIDTH is followed on from the one
occurrence the search found (another occurrence could go on further: the reported run is
then a lower bound). From those lengths, :func:`report` gives the longest run, where it is in
the corpus (token offset, document, a snippet) and the share of sample tokens inside a run of
at least N tokens (``copied_fraction``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import fsync_file
from gpt2tune.paths import INDEX_CACHE

KEEP = 2  # index folders kept: the current encoding's and the one before (an experiment's)
WIDTH = 1024  # tokens compared per step of the search
ROWS = 256  # sample positions searched together (memory: ROWS x WIDTH int64 per array)
PEEK = 8  # tokens read first at each step of the search (a suffix rarely ties a query on 8)
SNIPPET_TOKENS = 40  # tokens of a run shown as its snippet
_MARK = "index.json"  # what makes a folder one of ours (only those are ever removed)


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """The suffix array of a 1-D array of non-negative token ids (int32 below 2^31 bytes,
    else int64): sa[k] is the offset of the k-th smallest suffix."""
    from pydivsufsort import divsufsort

    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if not len(tokens):
        return np.zeros(0, np.int32)
    width = 1 if int(tokens.max()) < 1 << 8 else 2 if int(tokens.max()) < 1 << 16 else 4
    spelled = tokens.astype(f">u{width}")  # big-endian: byte order is token order
    sa = divsufsort(spelled.view(np.uint8))
    del spelled
    if width == 1:
        return sa
    keep = sa[sa % width == 0]  # token suffixes start at whole tokens
    del sa
    keep //= width
    return keep


@dataclass
class CorpusIndex:
    """train.npy's tokens, their suffix array, where each <|endoftext|> is, and what the
    documents are (stats.json's files, when there is one document per file)."""

    tokens: np.ndarray
    sa: np.ndarray
    eot: np.ndarray  # sorted offsets of the <|endoftext|> tokens
    files: list[str]  # the document names, or [] (documents are then numbered)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def corpus_index(
    encoded: str | os.PathLike, eot_token: int, cache: Path = INDEX_CACHE
) -> CorpusIndex:
    """The index of `encoded`/train.npy: read from the cache, or built (and kept) there."""
    from gpt2tune.data.encoded import load_tokens, read_stats

    encoded = Path(encoded)
    tokens = load_tokens(encoded, "train")
    stats = read_stats(encoded)
    folder = cache / file_digest(encoded / "train.npy")
    if not (folder / _MARK).is_file():
        _build(tokens, eot_token, folder)
        _remove_old(cache, keep=folder)
    os.utime(folder / _MARK)  # most recently used: the last removed
    sa = np.load(folder / "sa.npy", mmap_mode="r", allow_pickle=False)
    eot = np.load(folder / "eot.npy", allow_pickle=False)
    if len(sa) != len(tokens):
        raise Gpt2tuneError(f"{folder}/sa.npy does not match train.npy: delete {folder}")
    # Documents are files when the text format made one per file and none was split off.
    files = stats.get("files") or []
    one_per_file = stats.get("format") == "text" and len(files) == len(eot) + 1
    return CorpusIndex(tokens, sa, eot, files if one_per_file else [])


def _build(tokens: np.ndarray, eot_token: int, folder: Path) -> None:
    """sa.npy and eot.npy into a temporary folder beside `folder`, renamed into place."""
    from gpt2tune.stage import say

    say(f"indexing {len(tokens):,} training tokens for the memorization report...")
    temp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        eot = np.flatnonzero(np.asarray(tokens) == eot_token)
        for name, array in (("sa.npy", suffix_array(tokens)), ("eot.npy", eot)):
            np.save(temp / name, array)
            fsync_file(temp / name)
        (temp / _MARK).write_text(json.dumps({"tokens": len(tokens)}) + "\n")
        if folder.exists():  # another process built it meanwhile
            shutil.rmtree(temp)
        else:
            os.replace(temp, folder)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _remove_old(cache: Path, keep: Path) -> None:
    """Index folders of older encodings beyond KEEP (only those holding our marker)."""
    ours = [d for d in cache.iterdir() if (d / _MARK).is_file() and d != keep]
    ours.sort(key=lambda d: (d / _MARK).stat().st_mtime, reverse=True)
    for d in ours[KEEP - 1 :]:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- queries


def _rows(tokens: np.ndarray, starts: np.ndarray, width: int, pad: int) -> np.ndarray:
    """tokens[s : s + width] for each start s, as int64 rows, `pad` past the end."""
    idx = starts[:, None] + np.arange(width)
    inside = idx < len(tokens)
    return np.where(inside, np.asarray(tokens[np.minimum(idx, len(tokens) - 1)], np.int64), pad)


def _below(q: np.ndarray, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Whether each row of q sorts before the corpus suffix at the same row's offset (on q's
    width). The first PEEK tokens decide almost every row; only ties read the whole width."""
    w = q.shape[1]
    below = np.zeros(len(q), bool)
    undecided = np.arange(len(q))
    for width in dict.fromkeys((min(PEEK, w), w)):
        c = _rows(tokens, offsets[undecided], width, -2)
        qq = q[undecided, :width]
        differ = qq != c
        first = differ.argmax(axis=1)
        rows = np.arange(len(undecided))
        decided = differ.any(axis=1)
        below[undecided] = decided & (qq[rows, first] < c[rows, first])
        undecided = undecided[~decided]
        if not len(undecided):
            break
    return below  # rows equal on the whole width: not below (the search moves right)


def _common(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Leading tokens each row of q shares with the same row of c (q's padding matches none)."""
    eq = (q == c) & (q >= 0)
    return np.where(eq.all(axis=1), eq.shape[1], eq.argmin(axis=1))


def matches(index: CorpusIndex, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position i of `sample`: (the length of the longest prefix of sample[i:] found
    in the training tokens, an offset where it is)."""
    q_all = np.asarray(sample, np.int64)
    m, n = len(q_all), len(index.sa)
    lengths, offsets = np.zeros(m, np.int64), np.zeros(m, np.int64)
    if not m or not n:
        return lengths, offsets
    for r0 in range(0, m, ROWS):
        starts = np.arange(r0, min(m, r0 + ROWS))
        w = min(WIDTH, m - r0)
        q = _rows(q_all, starts, w, -1)  # -1 after the sample's end: before any token
        lo, hi = np.zeros(len(starts), np.int64), np.full(len(starts), n, np.int64)
        while (active := lo < hi).any():  # lo: the first suffix not below the query
            mid = (lo + hi) // 2
            below = _below(q, index.tokens, np.asarray(index.sa[np.minimum(mid, n - 1)], np.int64))
            hi = np.where(active & below, mid, hi)
            lo = np.where(active & ~below, mid + 1, lo)
        best, where = np.zeros(len(starts), np.int64), np.zeros(len(starts), np.int64)
        for k in (lo - 1, lo):  # the longest match is a neighbour of the insertion point
            ok = (k >= 0) & (k < n)
            off = np.asarray(index.sa[np.clip(k, 0, n - 1)], np.int64)
            length = np.where(ok, _common(q, _rows(index.tokens, off, w, -2)), 0)
            better = length > best
            best, where = np.where(better, length, best), np.where(better, off, where)
        for j in np.flatnonzero((best == w) & (starts + w < m)):  # follow a run past WIDTH
            rest = q_all[starts[j] + w :]
            more = np.asarray(index.tokens[where[j] + w : where[j] + w + len(rest)], np.int64)
            same = rest[: len(more)] == more
            best[j] += len(same) if same.all() else int(same.argmin())
        lengths[starts], offsets[starts] = best, where
    return lengths, offsets


def copied_mask(lengths: np.ndarray, min_tokens: int) -> np.ndarray:
    """Which sample tokens lie inside a copied run of at least `min_tokens` tokens."""
    cover = np.zeros(len(lengths) + 1, np.int64)
    runs = np.flatnonzero(lengths >= min_tokens)
    np.add.at(cover, runs, 1)
    np.add.at(cover, runs + lengths[runs], -1)
    return np.cumsum(cover[:-1]) > 0


def document(index: CorpusIndex, offset: int) -> str:
    """The document holding corpus token `offset`: its file, or its number in train.npy."""
    k = int(np.searchsorted(index.eot, offset, side="right"))  # <|endoftext|>s before it
    return index.files[k] if index.files else f"document {k + 1} of train.npy"


def report(index: CorpusIndex, sample: np.ndarray, decode, min_tokens: int | None = None) -> dict:
    """The memorization columns of one sample: copied_tokens (the longest run it shares with
    the training tokens), copied_offset (its token offset in train.npy, -1 if none),
    copied_document, copied_snippet (the run's first SNIPPET_TOKENS tokens, decoded by
    `decode`, ids -> text) and, given `min_tokens`, copied_fraction (the share of its tokens
    inside runs of >= min_tokens)."""
    lengths, offsets = matches(index, sample)
    out = {"copied_tokens": 0, "copied_offset": -1, "copied_document": "", "copied_snippet": ""}
    if len(lengths) and lengths.max() > 0:
        i = int(lengths.argmax())
        length, offset = int(lengths[i]), int(offsets[i])
        shown = [int(t) for t in index.tokens[offset : offset + min(length, SNIPPET_TOKENS)]]
        more = "…" if length > SNIPPET_TOKENS else ""
        out = {"copied_tokens": length, "copied_offset": offset,
               "copied_document": document(index, offset),
               "copied_snippet": decode(shown) + more}  # fmt: skip
    if min_tokens is not None:
        out["copied_fraction"] = (
            float(copied_mask(lengths, min_tokens).mean()) if len(lengths) else 0.0
        )
    return out
