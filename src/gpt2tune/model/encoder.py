"""GPT-2's byte-level BPE tokenizer, read from OpenAI's ``encoder.json`` + ``vocab.bpe``.

    enc = load_encoder("models/124M")
    ids = enc.encode("Human reason, in one sphere of its cognition")
    assert enc.decode(ids) == "Human reason, in one sphere of its cognition"

The ids are those of OpenAI's reference ``encoder.py``: text is split with GPT-2's regex, each
piece's UTF-8 bytes are spelled in GPT-2's printable byte alphabet, and the lowest-ranked pair of
``vocab.bpe`` is merged until none applies. tiktoken does the work (8x faster than Python), but
it ranks the *merged bytes* instead of the *pair*, and it looks a whole piece up as one token
before merging. Both shortcuts agree with the reference when every merge's parts are made by
earlier lines and every token the reference can never produce from its own bytes is left out of
tiktoken's table; ``Encoder`` arranges exactly that and falls back to a pure-Python reference BPE
for files where tiktoken cannot be made to agree (merges that use a token made by a later line, or
two lines making the same token).

Not ``tiktoken.load.data_gym_to_mergeable_bpe_ranks``: it caches by path alone (an edited file
reads stale), meets files it cannot follow with an AssertionError, and has neither the filter
nor the fallback that tests/test_model_encoder.py needs; the table it builds is one line here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import regex
import tiktoken

from gpt2tune.errors import Gpt2tuneError

EOT = "<|endoftext|>"

# GPT-2's pre-tokenizer, verbatim from openai/gpt-2 src/encoder.py.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# sha256 of OpenAI's encoder.json and vocab.bpe. tests/test_model_encoder.py re-checks that every
# token of these files is reachable, so loading them skips that 0.6 s check.
_OFFICIAL_SHA256 = (
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (its spelling in encoder.json).

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) are shifted
    to 256+n so that no token contains whitespace or control characters.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@functools.cache
def _tiktoken_pattern() -> str:
    """GPT2_PATTERN with \\p{L}, \\p{N} and \\s spelled out as the `regex` module defines them.

    tiktoken's Rust regex has older Unicode tables than `regex` (~17k newer letters and digits
    differ), and the reference pre-tokenizes with `regex`; explicit code-point ranges make both
    split text identically, at the same speed.
    """

    # Every code point but the surrogates, in order, so that each run of matches is one range.
    chars = "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, 0x110000)))

    def ranges(prop: str) -> str:
        out = []
        for m in regex.finditer(prop + "+", chars):
            lo, hi = ord(chars[m.start()]), ord(chars[m.end() - 1])
            out.append(f"\\x{{{lo:X}}}-\\x{{{hi:X}}}")
        return "".join(out)

    L, N, S = ranges(r"\p{L}"), ranges(r"\p{N}"), ranges(r"\s")
    return rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"


def _name(source: str, file: str) -> str:
    return os.path.join(source, file) if source else file


def _parse_encoder_json(raw: bytes, name: str) -> dict[str, int]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in pairs:
            if k in d:
                raise Gpt2tuneError(f"{name} lists the key {k!r} twice; use an unmodified copy")
            d[k] = v
        return d

    try:
        encoder = json.loads(raw, object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Gpt2tuneError(
            f"{name} is not valid JSON ({e}); replace it with GPT-2's encoder.json"
        ) from None
    if not isinstance(encoder, dict) or not all(
        type(i) is int for i in encoder.values()
    ):  # bool is an int subclass, hence `type(i) is int`
        raise Gpt2tuneError(
            f'{name} must be a JSON object mapping each token to an integer id, like {{"!": 0}}'
        )
    if sorted(encoder.values()) != list(range(len(encoder))):
        raise Gpt2tuneError(
            f"{name}: ids must be 0..{len(encoder) - 1}, each used once (they index the model's "
            "embedding matrix); use the encoder.json that belongs to the model"
        )
    alphabet = set(bytes_to_unicode().values())
    for token in encoder:
        if not token or not set(token) <= alphabet:
            raise Gpt2tuneError(
                f"{name}: token {token!r} is not spelled in GPT-2's byte alphabet "
                "(bytes_to_unicode), so it cannot be decoded; is this a GPT-2 encoder.json?"
            )
    missing = sorted(alphabet - encoder.keys())
    if missing:
        raise Gpt2tuneError(
            f"{name} lacks {len(missing)} of the 256 single-byte tokens (e.g. {missing[0]!r}); "
            "every byte needs a token or some text cannot be encoded"
        )
    if EOT not in encoder:
        raise Gpt2tuneError(f"{name} has no {EOT} token; GPT-2 vocabularies end with it")
    return encoder


def _parse_vocab_bpe(raw: bytes, name: str, encoder: dict[str, int]) -> list[tuple[str, str]]:
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise Gpt2tuneError(
            f"{name} is not UTF-8 ({e}); replace it with GPT-2's vocab.bpe"
        ) from None
    if not lines[0].startswith("#version"):
        raise Gpt2tuneError(
            f"{name} line 1: expected the '#version: 0.2' header, got {lines[0][:40]!r}; "
            "is this GPT-2's vocab.bpe?"
        )
    merges: list[tuple[str, str]] = []
    line_of: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split()  # split() as in the reference, so "\r\n" line ends are fine
        if not parts:  # the reference keeps blank lines as never-matching merges: skip them
            continue
        if len(parts) != 2:
            raise Gpt2tuneError(
                f"{name} line {lineno}: expected two tokens separated by a space, got {line!r}"
            )
        pair = (parts[0], parts[1])
        for token in (*pair, pair[0] + pair[1]):
            if token not in encoder:
                raise Gpt2tuneError(
                    f"{name} line {lineno}: {token!r} is not in encoder.json; "
                    "encoder.json and vocab.bpe must come from the same model"
                )
        if pair in line_of:
            raise Gpt2tuneError(
                f"{name} line {lineno} repeats the merge of line {line_of[pair]}: {line!r}"
            )
        line_of[pair] = lineno
        merges.append(pair)
    _check_all_made(encoder, merges, name)
    return merges


def _check_all_made(encoder: dict[str, int], merges: list[tuple[str, str]], name: str) -> None:
    """Every token but the 256 bytes and <|endoftext|> must be made by a line of vocab.bpe, or
    it can never be produced: a vocab.bpe cut short would silently change every text's tokens."""
    made = {a + b for a, b in merges} | set(bytes_to_unicode().values()) | {EOT}
    if orphans := [t for t in encoder if t not in made]:
        raise Gpt2tuneError(
            f"{name} has {len(merges)} merges for {len(encoder)} tokens (GPT-2: 256 + merges + 1): "
            f"no line makes {len(orphans)} of them (e.g. {orphans[0]!r}); it is cut short or "
            "from another model: download or copy it again"
        )


class Encoder:
    """Text <-> GPT-2 token ids; build with load_encoder() or Encoder.from_files()."""

    n_vocab: int  # len(encoder.json)
    eot_token: int  # id of <|endoftext|>
    files: dict[str, bytes]  # the two files exactly as read, to save them back byte-identical

    def __init__(
        self,
        encoder: dict[str, int],
        merges: list[tuple[str, str]],
        files: dict[str, bytes],
        *,
        verified: bool = False,
    ) -> None:
        """Prefer from_files(); `verified` skips the reachability check (known-good files)."""
        self.files = files
        self.n_vocab = len(encoder)
        self.eot_token = encoder[EOT]
        self._encoder = encoder
        self._ranks = {pair: i for i, pair in enumerate(merges)}
        self._cache: dict[str, tuple[str, ...]] = {}  # a dict, not lru_cache: stays picklable
        self._regex = regex.compile(GPT2_PATTERN)

        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._id_to_bytes = [b""] * self.n_vocab
        for token, i in encoder.items():
            self._id_to_bytes[i] = bytes(byte_decoder[c] for c in token)

        self._tiktoken, self._rank_to_id = self._build_tiktoken(merges, verified)
        self._cache.clear()  # the check above filled it; tiktoken does the work from now on

    def _build_tiktoken(
        self, merges: list[tuple[str, str]], verified: bool
    ) -> tuple[tiktoken.Encoding | None, list[int] | None]:
        """tiktoken set up to give the reference's ids, or (None, None) where it cannot."""
        made = set(bytes_to_unicode().values())
        for a, b in merges:
            if a not in made or b not in made or a + b in made:
                # A merge of a token that a later line makes (GPT-2 merges every occurrence of
                # the best pair at once, tiktoken one at a time, so new pairs can win between),
                # or a second way to make a token (tiktoken has one rank per token).
                return None, None
            made.add(a + b)
        # A token whose own bytes the reference never merges into it can still be produced by
        # tiktoken (whole-piece lookup, or merging a different split of it), so leave it out. With
        # the rest, tiktoken's first merge that differs from the reference would make a token
        # whose own bytes reach the same split under the reference: impossible once all are
        # reachable.
        merged = [a + b for a, b in merges]
        if not verified:
            merged = [t for t in merged if self._bpe(t) == (t,)]
        tokens = list(bytes_to_unicode().values()) + merged  # bytes first, in GPT-2's order
        ids = [self._encoder[t] for t in tokens]
        if all(x < y for x, y in zip(ids[256:], ids[257:], strict=False)):
            # Merge ids rise with the line number (true of OpenAI's files): the ids can serve
            # as tiktoken's ranks, and encode() needs no mapping.
            ranks, eot_rank, rank_to_id = ids, self.eot_token, None
        else:
            ranks, eot_rank = list(range(len(tokens))), len(tokens)
            rank_to_id = ids + [self.eot_token]
        mergeable = {self._id_to_bytes[i]: r for i, r in zip(ids, ranks, strict=True)}
        enc = tiktoken.Encoding(
            "gpt2tune", pat_str=_tiktoken_pattern(), mergeable_ranks=mergeable,
            special_tokens={EOT: eot_rank},
        )  # fmt: skip
        return enc, rank_to_id

    @classmethod
    def from_files(cls, encoder_json: bytes, vocab_bpe: bytes, source: str = "") -> Encoder:
        """Build from the two files' raw bytes; `source` (their folder) names them in errors."""
        encoder = _parse_encoder_json(encoder_json, _name(source, "encoder.json"))
        merges = _parse_vocab_bpe(vocab_bpe, _name(source, "vocab.bpe"), encoder)
        sha = tuple(hashlib.sha256(b).hexdigest() for b in (encoder_json, vocab_bpe))
        files = {"encoder.json": encoder_json, "vocab.bpe": vocab_bpe}
        return cls(encoder, merges, files, verified=sha == _OFFICIAL_SHA256)

    def merge_out_of_order(self) -> tuple[int, str, int, int] | None:
        """The first merge whose token's id is lower than an earlier merge's, as (its number
        among the merges, the token, its id, the earlier id); None if the ids rise with the
        merges. Byte-level BPE trainers (OpenAI's, Hugging Face's) number merged tokens in the
        order they learned the merges, so ids that fall mean the merges were reordered and
        would tokenize unlike the model's training."""
        highest = -1
        for rank, (a, b) in enumerate(sorted(self._ranks, key=self._ranks.__getitem__)):
            token_id = self._encoder[a + b]
            if token_id <= highest:
                return rank + 1, a + b, token_id, highest
            highest = token_id
        return None

    @property
    def engine(self) -> str:
        """'tiktoken' (fast) or 'python' (reference BPE, for files tiktoken cannot follow)."""
        return "python" if self._tiktoken is None else "tiktoken"

    def encode(self, text: str, *, allow_endoftext: bool = False) -> list[int]:
        """Token ids of `text`. A literal "<|endoftext|>" becomes eot_token only when
        allow_endoftext=True; otherwise it is ordinary text (7 tokens), so untrusted text can
        never end a document early."""
        if self._tiktoken is not None:
            if allow_endoftext:
                ranks = self._tiktoken.encode(text, allowed_special={EOT})
            else:
                ranks = self._tiktoken.encode_ordinary(text)
            if self._rank_to_id is None:
                return ranks
            to_id = self._rank_to_id
            return [to_id[r] for r in ranks]
        if not allow_endoftext:
            return self._encode_python(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(EOT)):  # same split as tiktoken's special tokens
            if i:
                ids.append(self.eot_token)
            ids += self._encode_python(part)
        return ids

    def _encode_python(self, text: str) -> list[int]:
        """OpenAI's Encoder.encode."""
        # tiktoken replaces lone surrogates (not encodable as UTF-8) with U+FFFD; so do we.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        b2u = bytes_to_unicode()
        ids = []
        for piece in self._regex.findall(text):
            ids += [self._encoder[t] for t in self._bpe("".join(b2u[b] for b in piece.encode()))]
        return ids

    def _bpe(self, token: str) -> tuple[str, ...]:
        """OpenAI's Encoder.bpe: merge the best-ranked adjacent pair everywhere, repeat."""
        if token in self._cache:
            return self._cache[token]
        word = tuple(token)
        while len(word) > 1:
            pairs = zip(word, word[1:], strict=False)
            pair = min(pairs, key=lambda p: self._ranks.get(p, float("inf")))
            if pair not in self._ranks:
                break
            new: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        self._cache[token] = word
        return word

    def decode_bytes(self, ids: Any) -> bytes:
        """The bytes that `ids` (list, numpy array or tf tensor of ints) stand for."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return b""
        if arr.ndim > 1 or arr.dtype.kind not in "iu":
            raise Gpt2tuneError(
                f"decode needs a 1-D sequence of integer token ids, got {arr.dtype} of shape "
                f"{arr.shape}"
            )
        arr = arr.reshape(-1)
        bad = (arr < 0) | (arr >= self.n_vocab)
        if bad.any():
            raise Gpt2tuneError(
                f"token id {arr[bad][0]} is out of range: this vocabulary has "
                f"n_vocab={self.n_vocab} (ids 0..{self.n_vocab - 1}); were the ids made with "
                "another model's encoder?"
            )
        table = self._id_to_bytes
        return b"".join([table[i] for i in arr.tolist()])

    def decode(self, ids: Any) -> str:
        """Text of `ids`; byte sequences that are not UTF-8 (a cut-off character) become U+FFFD,
        as in OpenAI's decoder."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def load_encoder(folder: str | os.PathLike) -> Encoder:
    """The Encoder of folder/encoder.json + folder/vocab.bpe (as shipped with GPT-2's models)."""
    raw = []
    for file in ("encoder.json", "vocab.bpe"):
        path = Path(folder) / file
        try:
            raw.append(path.read_bytes())
        except FileNotFoundError:
            raise Gpt2tuneError(
                f"{path} not found: {folder} must hold GPT-2's encoder.json and vocab.bpe "
                "(they come with the model download)"
            ) from None
        except OSError as e:
            raise Gpt2tuneError(f"cannot read {path}: {e.strerror or e}") from None
    return Encoder.from_files(raw[0], raw[1], source=str(folder))
