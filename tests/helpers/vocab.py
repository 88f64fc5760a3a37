"""A reference byte-level BPE written independently of gpt2tune (OpenAI's encoder.py, tiktoken
set up from the same files, and a BPE trainer for tiny vocabularies), so that comparing the
library with it still checks the library."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import regex
import tiktoken

TINY_CORPUS = (
    "Human reason, in one sphere of its cognition, is called upon to consider questions, "
    "which it cannot decline, as they are presented by its own nature, but which it cannot "
    "answer, as they transcend every faculty of the mind. The the the reason reasoning "
    "reasons. It is in this way that reason plunges itself into darkness and contradictions. "
)

# --------------------------------------------------------------------------- reference BPE

EOT = "<|endoftext|>"
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode table, written independently of the library:
    printable Latin-1 bytes stand for themselves, the other 68 for chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Every occurrence of `pair` in `word` merged, left to right (OpenAI's encoder.py loop)."""
    first, second = pair
    new_word: list[str] = []
    i = 0
    while i < len(word):
        try:
            j = word.index(first, i)
        except ValueError:
            new_word.extend(word[i:])
            break
        new_word.extend(word[i:j])
        i = j
        if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
            new_word.append(first + second)
            i += 2
        else:
            new_word.append(word[i])
            i += 1
    return tuple(new_word)


class ReferenceEncoder:
    """OpenAI's gpt-2 src/encoder.py, kept close to the original (the merge loop is
    merge_pair, shared with the trainer below)."""

    def __init__(self, folder: Path):
        self.encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
        self.decoder = {v: k for k, v in self.encoder.items()}
        bpe_data = (folder / "vocab.bpe").read_text(encoding="utf-8")
        bpe_merges = [tuple(s.split()) for s in bpe_data.split("\n")[1:-1]]
        self.bpe_ranks = dict(zip(bpe_merges, range(len(bpe_merges)), strict=True))
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.cache: dict[str, str] = {}
        self.pat = regex.compile(GPT2_PAT)

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = set(zip(word, word[1:], strict=False))
        if not pairs:
            return token
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            word = merge_pair(word, bigram)
            if len(word) == 1:
                break
            pairs = set(zip(word, word[1:], strict=False))
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text: str) -> list[int]:
        bpe_tokens = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            bpe_tokens.extend(self.encoder[bpe_token] for bpe_token in self.bpe(token).split(" "))
        return bpe_tokens

    def decode(self, tokens: list[int]) -> str:
        text = "".join([self.decoder[token] for token in tokens])
        return bytearray([self.byte_decoder[c] for c in text]).decode("utf-8", errors="replace")


def tiktoken_from_files(folder: Path) -> tiktoken.Encoding:
    """tiktoken the way it loads GPT-2 (tiktoken.load.data_gym_to_mergeable_bpe_ranks)."""
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        return bytes(byte_decoder[c] for c in token)

    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    ranks = {to_bytes(t): i for t, i in encoder.items() if t != EOT}
    merges = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    merge_ids = [encoder["".join(line.split())] for line in merges]
    assert merge_ids == sorted(merge_ids)  # tiktoken relies on ids rising with merge priority
    return tiktoken.Encoding(
        name=f"files:{folder}", pat_str=GPT2_PAT, mergeable_ranks=ranks,
        special_tokens={EOT: encoder[EOT]},
    )  # fmt: skip


def build_tiny_vocab(folder: Path, n_merges: int = 120, corpus: str = TINY_CORPUS) -> int:
    """Train a small byte-level BPE the way GPT-2's was made and write encoder.json + vocab.bpe.

    Tokens 0..255 are the bytes, then one token per merge in merge order, then <|endoftext|>,
    matching the official files' conventions. Returns n_vocab.
    """
    b2u = bytes_to_unicode()
    pat = regex.compile(GPT2_PAT)
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
        if merged not in vocab:  # keep one merge per resulting token, like the official vocab
            merges.append(best)
            vocab.append(merged)
        applied: collections.Counter = collections.Counter()
        for w, c in words.items():
            applied[merge_pair(w, best)] += c
        words = applied
    vocab.append(EOT)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoder.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)
