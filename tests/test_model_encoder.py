"""gpt2tune.model.encoder against two independent implementations built in helpers from the
same files:
tiktoken set up the way tiktoken loads GPT-2, and a port of OpenAI's reference encoder.py
(gpt2tune uses tiktoken as its engine, so the reference port is the comparison that counts)."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from helpers.vocab import EOT, TINY_CORPUS, bytes_to_unicode, tiktoken_from_files
from helpers.vocab import ReferenceEncoder as Reference

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.model.encoder import Encoder, load_encoder

TRICKY = [
    "",
    " ",
    "a",
    "Hello, world!",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n\r\nCRLF\r\n",
    "   \t\n\n  ",
    "x  \n  y\n\n\n z",
    "\x00",
    "nul\x00in\x00the middle",
    "controls \x1c\x1d\x1e\x1f\x0b\x0c\x85 and spaces \xa0\u1680\u2000\u2028\u2029\u202f\u3000.",
    "I'm, you're, he'll, she'd, we've, it's, don't, 'S 'LL ''''s",
    "emoji \U0001f600\U0001f44d\U0001f3fd",
    "family \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "rainbow flag \U0001f3f3\ufe0f\u200d\U0001f308 and a man\u200d",
    "flags \U0001f1e9\U0001f1ea\U0001f1ef\U0001f1f5\U0001f1fa\U0001f1f8",
    "日本語のテキスト、中文字符。한국어",
    "combining e\u0301 n\u0303 a\u0308\u0301\u0323 Z\u0324\u0354\u0367\u0311\u0313",
    "mixed Ελληνικά русский עברית العربية हिन्दी ไทย",
    "numbers 123 4567890 ١٢٣ ½ Ⅻ 1.5e-3",
    "\ufeffBOM and \u200bzero\u200cwidth",
    "x" * 300,
    " " * 50 + "y",
    "!!!???... $$$ 100% #tag @user https://example.com/a?b=c&d=e",
    "a<|endoftext|>b",
    "<|endoftext|><|endoftext|> <|endoftext",
]

# Letters (U+10940, U+107BB) and digits (U+11DE0) newer than the Unicode tables of tiktoken's
# Rust regex but known to the `regex` module that OpenAI's code splits text with: stock tiktoken
# splits "x\U00010940y" in three, the reference keeps it whole. (Not compared with tiktoken.)
NEW_UNICODE = [
    "x\U00010940y \U00010941\U000107bbz 12\U00011de034 \U00011de1\U00011de1!",
    "\U00010940'll \U00011de0.5 a\U000107bb\u0301",
]


def random_text(rng: random.Random, n: int) -> str:
    """Text mixing what the pre-tokenizer treats differently, plus any code point at all."""
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789",
        " \t\n\r",
        "'s't're've'm'll'd'",
        ".,;:!?-_()[]{}\"'/\\@#$%^&*+=<>|~`",
        "\x00\x0b\x0c\x1c\x1f\x85\xa0\u2028\u3000\u200d\ufe0f",
        "éñüßçøÅ\u0301\u0308ΩЖשع्ไ日本語中文한",
        "\U0001f600\U0001f44d\U0001f3fd\U0001f1e9\U0001f1ea\U0001f468\U0001f308",
        "\U00010940\U000107bb\U00011de0",  # see NEW_UNICODE
    ]
    out = []
    for _ in range(n):
        k = rng.randrange(len(pools) + 1)
        if k == len(pools):  # any code point but a lone surrogate (not valid text)
            c = rng.randrange(0x10F800)
            out.append(chr(c + 0x800 if c >= 0xD800 else c))
        else:
            out.append(rng.choice(pools[k]))
    return "".join(out)


def write_vocab(folder: Path, merges: list[tuple[str, str]], seed: int | None = None) -> Path:
    """encoder.json + vocab.bpe with the given merges: bytes, merge results, then EOT.
    With `seed`, ids are shuffled (so they differ from merge order)."""
    b2u = bytes_to_unicode()
    tokens = list(dict.fromkeys([b2u[b] for b in range(256)] + [a + b for a, b in merges] + [EOT]))
    ids = list(range(len(tokens)))
    if seed is not None:
        random.Random(seed).shuffle(ids)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoder.json").write_text(
        json.dumps(dict(zip(tokens, ids, strict=True))), encoding="utf-8"
    )
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def official(official_vocab_dir):
    return load_encoder(official_vocab_dir), Reference(official_vocab_dir)


@pytest.fixture(scope="module")
def tiny(tiny_vocab_dir):
    return load_encoder(tiny_vocab_dir), Reference(tiny_vocab_dir)


# ---------------------------------------------------------------- same ids as the references


def test_official_vocab_matches_tiktoken_on_all_of_kant(official, official_vocab_dir, kant_path):
    enc, _ = official
    text = kant_path.read_text(encoding="utf-8")
    ids = enc.encode(text)
    assert ids == tiktoken_from_files(official_vocab_dir).encode_ordinary(text)
    assert enc.decode(ids) == text
    assert (enc.n_vocab, enc.eot_token) == (50257, 50256)
    assert enc.engine == "tiktoken"


def test_official_vocab_matches_reference(official, kant_path):
    enc, ref = official
    text = kant_path.read_text(encoding="utf-8")
    samples = [text[i : i + 2000] for i in (0, len(text) // 2, len(text) - 2000)]
    for s in samples + TRICKY + NEW_UNICODE:
        assert enc.encode(s) == ref.encode(s), s
    assert enc.encode("Hello world") == [15496, 995]  # the well-known GPT-2 ids


def test_tiny_vocab_matches_tiktoken_and_reference(tiny, tiny_vocab_dir, kant_path):
    enc, ref = tiny
    tk = tiktoken_from_files(tiny_vocab_dir)
    kant = kant_path.read_text(encoding="utf-8")[5000:15000]
    for s in [TINY_CORPUS, kant] + TRICKY:
        assert enc.encode(s) == tk.encode_ordinary(s) == ref.encode(s), s
    for s in NEW_UNICODE:
        assert enc.encode(s) == ref.encode(s)
    # the tiny vocab really merges: fewer tokens than bytes
    assert len(enc.encode(TINY_CORPUS)) < len(TINY_CORPUS) / 2


@pytest.mark.parametrize("vocab", ["official", "tiny"])
def test_random_unicode_matches_reference_and_round_trips(vocab, request):
    enc, ref = request.getfixturevalue(vocab)
    rng = random.Random(1234)
    for _ in range(150):
        s = random_text(rng, rng.randrange(1, 60))
        ids = enc.encode(s)
        assert ids == ref.encode(s), repr(s)
        assert enc.decode(ids) == s


def test_every_official_token_is_reachable(official):
    """load_encoder trusts the official files (by sha256) to need no token left out of
    tiktoken's table; check that claim the slow way."""
    enc, _ = official
    checked = Encoder(enc._encoder, list(enc._ranks), enc.files, verified=False)
    assert checked._tiktoken._mergeable_ranks == enc._tiktoken._mergeable_ranks
    assert len(checked._tiktoken._mergeable_ranks) == 50256


# ----------------------------------------------- vocabularies where plain tiktoken goes wrong


def test_token_unreachable_from_its_own_bytes(tmp_path):
    # "b c" merges first, so the reference never sees "ab" next to "c": "abc" stays [a, bc].
    # Plain tiktoken looks the whole piece "abc" up and returns the token anyway.
    folder = write_vocab(tmp_path, [("b", "c"), ("a", "b"), ("ab", "c")])
    enc, ref = load_encoder(folder), Reference(folder)
    assert enc.engine == "tiktoken"
    assert tiktoken_from_files(folder).encode_ordinary("abc") != ref.encode("abc")
    for s in ["abc", "ab", "abcabc", "xabc abc ab c", *TRICKY]:
        assert enc.encode(s) == ref.encode(s), s
    assert enc.encode("abc") == [ord("a"), enc._encoder["bc"]]


def test_merge_of_a_token_made_later_falls_back_to_python(tmp_path):
    # The reference merges every "a b" at once, then finds no "ab a"; tiktoken would make "aba".
    folder = write_vocab(tmp_path, [("ab", "a"), ("a", "b")])
    enc, ref = load_encoder(folder), Reference(folder)
    assert enc.engine == "python"
    assert tiktoken_from_files(folder).encode_ordinary("abab") != ref.encode("abab")
    for s in ["abab", "aba", "ababab b<|endoftext|>a", *TRICKY]:
        assert enc.encode(s) == ref.encode(s), s
        assert enc.decode(enc.encode(s)) == s
    assert enc.encode("a<|endoftext|>b", allow_endoftext=True) == [
        ord("a"), enc.eot_token, ord("b"),
    ]  # fmt: skip


def test_two_merges_making_the_same_token_fall_back_to_python(tmp_path):
    folder = write_vocab(tmp_path, [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")])
    enc, ref = load_encoder(folder), Reference(folder)
    assert enc.engine == "python"
    for s in ["abc", "bcabc", "aabcc", *TRICKY]:
        assert enc.encode(s) == ref.encode(s), s


def test_new_unicode_letters_split_like_the_regex_module(tmp_path):
    # Merges across the letter/digit boundary show where the pre-tokenizer splits: "ð" is how
    # GPT-2 spells byte 0xF0, the first byte of U+10940 and of U+11DE0.
    folder = write_vocab(tmp_path, [("x", "ð"), ("2", "ð")])
    enc, ref = load_encoder(folder), Reference(folder)
    assert enc.encode("x\U00010940")[0] == enc.encode("2\U00011de0")[0] - 1 == 256
    for s in NEW_UNICODE + TRICKY:
        assert enc.encode(s) == ref.encode(s), s


def test_ids_in_another_order_than_the_merges(tiny_vocab_dir, tmp_path):
    merges = [
        tuple(line.split())
        for line in (tiny_vocab_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    ]
    folder = write_vocab(tmp_path, merges, seed=7)
    enc, ref = load_encoder(folder), Reference(folder)
    assert enc.engine == "tiktoken" and enc._rank_to_id is not None
    assert enc.eot_token == json.loads((folder / "encoder.json").read_text())[EOT]
    for s in [TINY_CORPUS, *TRICKY]:
        ids = enc.encode(s)
        assert ids == ref.encode(s), s
        assert enc.decode(ids) == s
    assert enc.encode("a<|endoftext|>", allow_endoftext=True)[-1] == enc.eot_token


# ---------------------------------------------------------------- round trip, endoftext, decode


@pytest.mark.parametrize("vocab", ["official", "tiny"])
def test_round_trip(vocab, request):
    enc, ref = request.getfixturevalue(vocab)
    for s in TRICKY + NEW_UNICODE:
        assert enc.decode(enc.encode(s)) == s
        assert enc.decode(enc.encode(s, allow_endoftext=True)) == s
        assert enc.decode_bytes(enc.encode(s)) == s.encode("utf-8")
        assert ref.decode(enc.encode(s)) == s


def test_endoftext_only_where_asked(official):
    enc, ref = official
    text = "a<|endoftext|>b"
    plain = enc.encode(text)
    assert enc.eot_token not in plain
    assert plain == ref.encode(text)  # the reference knows no special tokens
    special = enc.encode(text, allow_endoftext=True)
    assert special.count(enc.eot_token) == 1
    assert special == enc.encode("a") + [enc.eot_token] + enc.encode("b")
    assert enc.decode(special) == enc.decode(plain) == text
    assert enc.encode(EOT + EOT, allow_endoftext=True) == [enc.eot_token] * 2
    assert enc.encode("<|endoftext", allow_endoftext=True) == enc.encode("<|endoftext")


def test_decode_accepts_arrays_and_replaces_broken_utf8(official):
    enc, _ = official
    ids = enc.encode("café ☕")
    assert enc.decode(np.array(ids, dtype=np.int32)) == "café ☕"
    assert enc.decode(np.array(ids, dtype=np.uint16)) == "café ☕"
    assert enc.decode([]) == "" and enc.decode_bytes(np.array([], dtype=np.int64)) == b""
    cut = enc.decode_bytes(ids)[:-1]  # "☕" loses its last byte
    cut_ids = enc.encode("café ") + [enc._encoder[bytes_to_unicode()[b]] for b in cut[-2:]]
    assert enc.decode_bytes(cut_ids) == cut
    assert enc.decode(cut_ids) == "café \ufffd"


def test_decode_accepts_tf_tensors(official):
    tf = pytest.importorskip("tensorflow")
    enc, _ = official
    ids = enc.encode("Critique of Pure Reason")
    assert enc.decode(tf.constant(ids, dtype=tf.int32)) == "Critique of Pure Reason"


def test_lone_surrogates_become_replacement_chars(official, tmp_path):
    fallback = load_encoder(write_vocab(tmp_path, [("ab", "a"), ("a", "b")]))
    for enc in (official[0], fallback):
        assert enc.encode("a\ud800b") == enc.encode("a\ufffdb")


def test_files_are_kept_byte_identical(official, official_vocab_dir):
    enc, _ = official
    for name in ("encoder.json", "vocab.bpe"):
        assert enc.files[name] == (official_vocab_dir / name).read_bytes()
    again = Encoder.from_files(enc.files["encoder.json"], enc.files["vocab.bpe"])
    assert again.encode("Hello world") == [15496, 995]


def test_encoder_pickles_for_worker_processes(official, tmp_path):
    fallback = load_encoder(write_vocab(tmp_path, [("ab", "a"), ("a", "b")]))
    for enc in (official[0], fallback):
        fallback.encode("abab")  # fill the BPE cache
        copy = pickle.loads(pickle.dumps(enc))
        assert copy.encode("abab Hello") == enc.encode("abab Hello")
        assert copy.files == enc.files


# ---------------------------------------------------------------- errors


def test_missing_files(tmp_path, tiny_vocab_dir):
    with pytest.raises(Gpt2tuneError, match=r"encoder\.json not found"):
        load_encoder(tmp_path)
    (tmp_path / "encoder.json").write_bytes((tiny_vocab_dir / "encoder.json").read_bytes())
    with pytest.raises(Gpt2tuneError, match="vocab.bpe not found") as e:
        load_encoder(tmp_path)
    assert str(tmp_path / "vocab.bpe") in str(e.value)


def _tiny_files(tiny_vocab_dir: Path) -> tuple[dict, str]:
    encoder = json.loads((tiny_vocab_dir / "encoder.json").read_text(encoding="utf-8"))
    return encoder, (tiny_vocab_dir / "vocab.bpe").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda e, v: ("{not json", v), r"encoder\.json is not valid JSON"),
        (lambda e, v: (b"\xff\xfe\x00garbage", v), r"encoder\.json is not valid JSON"),
        (lambda e, v: ("[1, 2]", v), r"encoder\.json must be a JSON object"),
        (lambda e, v: ({**e, "a": "1"}, v), r"encoder\.json must be a JSON object"),
        (lambda e, v: ('{"a": 0, "a": 1}', v), r"encoder\.json lists the key 'a' twice"),
        (lambda e, v: ({**e, "qqq": 0}, v), r"encoder\.json: ids must be 0\.\.377"),
        (lambda e, v: ({**e, "<|pad|>": 9999}, v), r"encoder\.json: ids must be 0\.\.377"),
        (lambda e, v: ({**e, "a b": len(e)}, v), r"'a b' is not spelled in GPT-2's byte alphabet"),
        (lambda e, v: ({k: i for k, i in e.items() if k != EOT}, v), r"has no <\|endoftext\|>"),
        (lambda e, v: (e, v.replace("#version: 0.2\n", "")), r"vocab\.bpe line 1: expected"),
        (lambda e, v: (e, v.replace("\n", "\nx y z\n", 1)), r"vocab\.bpe line 2: expected two"),
        (lambda e, v: (e, v + "Ġ ~\n"), r"vocab\.bpe line 122: 'Ġ~' is not in encoder\.json"),
        (lambda e, v: (e, v + "qq r\n"), r"vocab\.bpe line 122: 'qq' is not in encoder\.json"),
        (lambda e, v: (e, v + v.split("\n")[5] + "\n"), r"line 122 repeats the merge of line 6"),
        (lambda e, v: (e, v.encode("utf-8") + b"\xff"), r"vocab\.bpe is not UTF-8"),
    ],
)
def test_bad_files(tiny_vocab_dir, tmp_path, edit, match):
    encoder_json, vocab_bpe = edit(*_tiny_files(tiny_vocab_dir))
    for name, content in (("encoder.json", encoder_json), ("vocab.bpe", vocab_bpe)):
        if isinstance(content, dict):
            content = json.dumps(content)
        if isinstance(content, str):
            content = content.encode("utf-8")
        (tmp_path / name).write_bytes(content)
    with pytest.raises(Gpt2tuneError, match=match) as e:
        load_encoder(tmp_path)
    assert str(tmp_path) in str(e.value)  # names the file


def test_missing_byte_token(tiny_vocab_dir):
    encoder, vocab = _tiny_files(tiny_vocab_dir)
    # drop the token of byte "!" and renumber so that only the missing byte is wrong
    tokens = [t for t in sorted(encoder, key=encoder.get) if t != "!"]
    raw = json.dumps({t: i for i, t in enumerate(tokens)}).encode()
    with pytest.raises(Gpt2tuneError, match="lacks 1 of the 256 single-byte tokens"):
        Encoder.from_files(raw, vocab.encode(), source="somewhere")


def test_decode_errors(official):
    enc, _ = official
    with pytest.raises(Gpt2tuneError, match=r"token id 50257 is out of range.*n_vocab=50257"):
        enc.decode([1, 50257])
    with pytest.raises(Gpt2tuneError, match=r"token id -1 is out of range"):
        enc.decode(np.array([-1]))
    with pytest.raises(Gpt2tuneError, match="integer token ids"):
        enc.decode([1.5])
    with pytest.raises(Gpt2tuneError, match="1-D sequence"):
        enc.decode([[1, 2], [3, 4]])
