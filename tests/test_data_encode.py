"""The encode stage (gpt2tune.data.encode, stages/encode.py): discovery, joining, the validation
split, chunked encoding, errors, atomic outputs, and the window helpers used by training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers.processes import run_stage
from helpers.projects import write_params

from gpt2tune.data.batches import eval_windows, random_windows, window_length
from gpt2tune.data.encode import encode_corpus, split_plan
from gpt2tune.data.encoded import load_tokens
from gpt2tune.data.text import chunks, find_documents
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.model.encoder import EOT, load_encoder

DOCS = [
    "Human reason, in one sphere of its cognition, is called upon to consider questions.\n",
    "The the the reason reasoning reasons.\n\nIt is in this way that reason plunges itself.",
    "  which it cannot decline\r\n\r\n\tas they are presented by its own nature\n\n\n",
]

# Whitespace runs before line breaks, paragraph breaks, <|endoftext|> after blank lines,
# no-break stretches, digits, contractions, non-ASCII: everything a bad cut would change.
TRICKY = (
    "Kant's Critique, 1781.\n\nHuman  reason \n  is called\n\n\n\tupon;  it'll\r\n"
    "consider\n<|endoftext|>\n\nquestions\n\n<|endoftext|>which  it cannot\u00a0decline —"
    " Vernunft für das 2nd ed.\n \n x\nnature\n\n"
)


@pytest.fixture(scope="module")
def tiny(tiny_vocab_dir):
    return load_encoder(tiny_vocab_dir)


@pytest.fixture(scope="module")
def official(official_vocab_dir):
    return load_encoder(official_vocab_dir)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def rel(paths, root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(Gpt2tuneError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def output_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# --------------------------------------------------------------------------- discovery


def test_find_single_file(tmp_path):
    f = write(tmp_path / "corpus.txt", "hello")
    assert find_documents(str(f)) == [f]


def test_find_folder_recursive_sorted_skipping_hidden(tmp_path):
    root = tmp_path / ".data"  # a hidden folder named outright is still read
    for name in ["b.txt", "a/z.txt", "a/b/c.md", "a-b.txt", "A.txt", ".hidden", "x/.secret.txt"]:
        write(root / name, "text")
    write(root / ".git" / "config", "not text")
    write(root / "sub" / ".cache" / "deep.txt", "not text")
    found = find_documents(str(root))
    assert rel(found, root) == ["A.txt", "a/b/c.md", "a/z.txt", "a-b.txt", "b.txt"]


def test_find_glob_sorted_files_only(tmp_path):
    for name in ["p/2.txt", "p/10.txt", "p/q/1.txt", "p/skip.md"]:
        write(tmp_path / name, "text")
    (tmp_path / "p" / "dir.txt").mkdir()
    assert rel(find_documents(str(tmp_path / "p" / "*.txt")), tmp_path) == ["p/10.txt", "p/2.txt"]
    assert rel(find_documents(str(tmp_path / "p" / "**" / "*.txt")), tmp_path) == [
        "p/10.txt",
        "p/2.txt",
        "p/q/1.txt",
    ]


def test_find_errors_say_how_the_path_was_taken(tmp_path):
    missing = str(tmp_path / "nope.txt")
    msg = error_of(find_documents, missing)
    assert "nope.txt" in msg and "file or folder" in msg and "does not exist" in msg

    msg = error_of(find_documents, str(tmp_path / "*.txt"))
    assert "glob" in msg and "matches nothing" in msg

    (tmp_path / "d.txt").mkdir()
    assert "only folders" in error_of(find_documents, str(tmp_path / "*.txt"))

    empty = tmp_path / "empty"
    write(empty / ".only-hidden", "x")
    msg = error_of(find_documents, str(empty))
    assert "folder" in msg and "no files" in msg and "hidden" in msg

    assert "empty" in error_of(find_documents, "  ")


# --------------------------------------------------------------------------- joining


def test_documents_joined_with_endoftext(tmp_path, tiny):
    for i, doc in enumerate(DOCS):
        write(tmp_path / "in" / f"{i}.txt", doc)
    out = tmp_path / "out"
    stats = encode_corpus(str(tmp_path / "in"), tiny, out, val_fraction=0)
    train = load_tokens(out, "train")
    assert tiny.decode(train) == EOT.join(DOCS)
    assert len(train) == sum(len(tiny.encode(d)) for d in DOCS) + len(DOCS) - 1
    assert list(np.flatnonzero(train == tiny.eot_token)) == [
        len(tiny.encode(DOCS[0])),
        len(tiny.encode(DOCS[0])) + 1 + len(tiny.encode(DOCS[1])),
    ]
    assert len(load_tokens(out, "val")) == 0
    assert stats["documents"] == 3 and stats["tokens"] == len(train)
    assert stats["characters"] == sum(map(len, DOCS))
    assert stats["bytes"] == sum(len(d.encode()) for d in DOCS)


def test_literal_endoftext_in_a_file_is_one_token(tmp_path, tiny):
    f = write(tmp_path / "seed.txt", f"first document{EOT}second document")
    encode_corpus(str(f), tiny, tmp_path / "out", val_fraction=0)
    train = load_tokens(tmp_path / "out", "train")
    assert list(train).count(tiny.eot_token) == 1
    assert list(train) == tiny.encode("first document") + [tiny.eot_token] + tiny.encode(
        "second document"
    )


def test_empty_files_add_no_document_and_bom_is_dropped(tmp_path, tiny):
    write(tmp_path / "in" / "1.txt", "\ufeffalpha")
    write(tmp_path / "in" / "2.txt", "")
    write(tmp_path / "in" / "3.txt", "beta")
    stats = encode_corpus(str(tmp_path / "in"), tiny, tmp_path / "out", val_fraction=0)
    assert tiny.decode(load_tokens(tmp_path / "out", "train")) == f"alpha{EOT}beta"
    assert stats["documents"] == 2 and len(stats["files"]) == 3


def test_empty_input_errors(tmp_path, tiny):
    f = write(tmp_path / "one" / "empty.txt", "")
    msg = error_of(encode_corpus, str(f), tiny, tmp_path / "out")
    assert "empty.txt" in msg and "is empty" in msg
    write(tmp_path / "two" / "a.txt", "")
    write(tmp_path / "two" / "b.txt", "")
    msg = error_of(encode_corpus, str(tmp_path / "two"), tiny, tmp_path / "out")
    assert "all 2 files are empty" in msg
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- outputs


def test_outputs_stats_and_dtype(tmp_path, tiny, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "data" / "raw" / "a.txt", DOCS[0] * 20)
    write(tmp_path / "data" / "raw" / "b.txt", DOCS[1] * 20)
    stats = encode_corpus("data/raw", tiny, "data/encoded", val_fraction=0.1)
    out = tmp_path / "data" / "encoded"
    assert sorted(os.listdir(out)) == ["stats.json", "train.npy", "val.npy"]  # no temp files
    assert json.loads((out / "stats.json").read_text()) == stats
    assert stats["files"] == ["data/raw/a.txt", "data/raw/b.txt"]
    assert stats["n_vocab"] == tiny.n_vocab and stats["dtype"] == "uint16"
    assert stats["train_tokens"] + stats["val_tokens"] == stats["tokens"]
    for split in ("train", "val"):
        arr = np.load(out / f"{split}.npy", mmap_mode="r")
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and arr.ndim == 1
        assert len(arr) == stats[f"{split}_tokens"]
        assert isinstance(load_tokens("data/encoded", split), np.memmap)


def test_big_vocabulary_is_stored_as_int32(tmp_path, tiny):
    class Wide:  # a vocabulary past uint16: ids shifted up beyond 65535
        n_vocab = 70_000
        eot_token = 69_999

        def encode(self, text, *, allow_endoftext=False):
            return [i + 65_000 for i in tiny.encode(text, allow_endoftext=allow_endoftext)]

    write(tmp_path / "in" / "a.txt", "reason")
    write(tmp_path / "in" / "b.txt", "nature")
    stats = encode_corpus(str(tmp_path / "in"), Wide(), tmp_path / "out", val_fraction=0)
    train = load_tokens(tmp_path / "out", "train")
    assert stats["dtype"] == "int32" and train.dtype == np.int32
    expected = [i + 65_000 for i in tiny.encode("reason")] + [69_999]
    assert list(train) == expected + [i + 65_000 for i in tiny.encode("nature")]


def test_encoding_is_deterministic(tmp_path, tiny):
    f = write(tmp_path / "c.txt", "".join(DOCS) * 50)
    encode_corpus(str(f), tiny, tmp_path / "a")
    encode_corpus(str(f), tiny, tmp_path / "b", chunk_chars=100)
    a, b = output_bytes(tmp_path / "a"), output_bytes(tmp_path / "b")
    assert a == b and len(np.load(tmp_path / "a" / "val.npy")) > 0


def test_load_tokens_errors(tmp_path):
    msg = error_of(load_tokens, tmp_path / "encoded", "train")
    assert "train.npy" in msg and "dvc repro encode" in msg
    write(tmp_path / "encoded" / "val.npy", b"not an npy file")
    assert "dvc repro encode" in error_of(load_tokens, tmp_path / "encoded", "val")
    with pytest.raises(ValueError):
        load_tokens(tmp_path / "encoded", "test")


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.2, 0.45])
def test_split_plan_ratio_and_nonempty(fraction):
    for n in [*range(2, 300), 1_000, 4_321, 99_999, 283_870, 10**7 + 3]:
        block, val = split_plan(n, fraction)
        n_blocks = -(-n // block)
        sizes = [min(n, (i + 1) * block) - i * block for i in val]
        n_val = sum(sizes)
        assert val == sorted(set(val)) and 0 <= val[0] and val[-1] < n_blocks
        assert 0 < n_val < n, (n, fraction)
        if n >= 4:  # blocks of >= 2 tokens: each split has an input-target pair
            assert n_val >= 2 and n - n_val >= 2
        if n >= 1_000:
            assert abs(n_val / n - fraction) <= 0.006 + block / n, (n, fraction)
    assert split_plan(500, 0) == (5, [])
    assert split_plan(1, 0.2)[1] == []
    with pytest.raises(ValueError):
        split_plan(10, 1.0)


def test_split_on_kant_is_spread_and_reassembles(tmp_path, official, kant_path):
    stats = encode_corpus(str(kant_path), official, tmp_path / "out", val_fraction=0.05)
    train, val = load_tokens(tmp_path / "out", "train"), load_tokens(tmp_path / "out", "val")
    assert 0.045 <= stats["val_tokens"] / stats["tokens"] <= 0.055
    block, val_blocks = split_plan(stats["tokens"], 0.05)
    assert stats["val_block_tokens"] == block and stats["val_blocks"] == len(val_blocks)
    n_blocks = -(-stats["tokens"] // block)
    # Evenly spread: none of the licence boilerplate at the end dominates val.
    assert val_blocks[0] < 0.05 * n_blocks and val_blocks[-1] > 0.9 * n_blocks
    assert max(np.diff(val_blocks)) - min(np.diff(val_blocks)) <= 1
    # Train and val interleaved back in block order are the whole stream.
    whole = official.encode(kant_path.read_text(encoding="utf-8"), allow_endoftext=True)
    parts, t = [], 0
    for i in range(n_blocks):
        size = min(len(whole), (i + 1) * block) - i * block
        if i in val_blocks:
            k = val_blocks.index(i)
            parts.append(val[k * block : k * block + size])
        else:
            parts.append(train[t : t + size])
            t += size
    assert np.array_equal(np.concatenate(parts), whole)


def test_two_token_corpus_splits_one_and_one(tmp_path, official):
    f = write(tmp_path / "two.txt", "Hello world")
    stats = encode_corpus(str(f), official, tmp_path / "out", val_fraction=0.05)
    assert (stats["train_tokens"], stats["val_tokens"]) == (1, 1)


# --------------------------------------------------------------------------- chunked encoding


# data.val_path: validation on a separate text instead of a held-out fraction.
TRAIN_TEXT = "Human reason, in one sphere of its cognition, is called upon to consider questions.\n"
VAL_TEXT = "It is in this way that reason plunges itself into darkness and contradictions.\n"


def test_val_path_is_the_validation_set_and_all_of_path_trains(tmp_path, tiny):
    train = str(write(tmp_path / "raw" / "train.txt", TRAIN_TEXT * 3))
    val = str(write(tmp_path / "raw-val" / "val.txt", VAL_TEXT))
    out = tmp_path / "encoded"
    stats = encode_corpus(train, tiny, out, val_fraction=0.3, val_path=val)  # fraction unused
    np.testing.assert_array_equal(load_tokens(out, "train"), tiny.encode(TRAIN_TEXT * 3))
    np.testing.assert_array_equal(load_tokens(out, "val"), tiny.encode(VAL_TEXT))
    assert stats["train_tokens"] == len(tiny.encode(TRAIN_TEXT * 3))
    assert stats["val_tokens"] == len(tiny.encode(VAL_TEXT))
    assert stats["val_files"] == [val] and stats["documents"] == 2
    assert json.loads((out / "stats.json").read_text()) == stats
    # Without it, the same text is split by val_fraction as before.
    plain = encode_corpus(train, tiny, out, val_fraction=0.3)
    assert 0 < plain["val_tokens"] < plain["tokens"] and "val_files" not in plain


def test_val_path_errors_name_the_key(tmp_path, tiny):
    train = str(write(tmp_path / "train.txt", TRAIN_TEXT))
    out = tmp_path / "encoded"
    with pytest.raises(Gpt2tuneError, match=r"^data\.val_path = '.*missing\.txt': .*not exist"):
        encode_corpus(train, tiny, out, val_path=str(tmp_path / "missing.txt"))
    empty = str(write(tmp_path / "empty.txt", ""))
    with pytest.raises(Gpt2tuneError, match=r"^data\.val_path = '.*empty\.txt': no text"):
        encode_corpus(train, tiny, out, val_path=empty)
    with pytest.raises(Gpt2tuneError, match=r"share .*train\.txt; validation text must not"):
        encode_corpus(str(tmp_path), tiny, out, val_path=train)
    assert not out.exists() or not any(out.glob("*.npy"))


def test_naive_cut_after_newline_would_change_tokens(official):
    # Why _safe_cut cuts *before* the "\n": "\n\n" at a piece's end is one token.
    text = "a\n\nb"
    assert official.encode("a\n\n") + official.encode("b") != official.encode(text)


def test_chunks_encode_like_the_whole_at_every_chunk_size(official, tiny):
    for enc in (official, tiny):
        whole = enc.encode(TRICKY, allow_endoftext=True)
        for size in range(1, len(TRICKY) + 2):
            pieces = list(chunks([TRICKY], size))
            assert "".join(pieces) == TRICKY
            ids = [i for p in pieces for i in enc.encode(p, allow_endoftext=True)]
            assert ids == whole, size
    # Pieces arriving one character at a time are cut too, not only the whole text at once.
    pieces = list(chunks(iter(TRICKY), 30))
    assert len(pieces) > 3 and "".join(pieces) == TRICKY


def test_text_without_line_breaks_is_still_cut(official):
    text = "word " * 10_000
    pieces = list(chunks([text], 1_000))
    assert len(pieces) > 10 and max(map(len, pieces)) < 2_000
    assert [i for p in pieces for i in official.encode(p)] == official.encode(text)


def test_chunked_equals_whole_on_kant(tmp_path, official, kant_path):
    whole = official.encode(kant_path.read_text(encoding="utf-8"), allow_endoftext=True)
    for chunk in (1 << 20, 5_000):
        out = tmp_path / str(chunk)
        encode_corpus(str(kant_path), official, out, val_fraction=0, chunk_chars=chunk)
        assert np.array_equal(load_tokens(out, "train"), whole)


def test_chunked_equals_whole_end_to_end(tmp_path, official):
    f = write(tmp_path / "t.txt", ("é" + TRICKY) * 3)  # 2-byte characters split between reads
    whole = official.encode(("é" + TRICKY) * 3, allow_endoftext=True)
    for chunk in (1, 7, 64):
        encode_corpus(str(f), official, tmp_path / "o", val_fraction=0, chunk_chars=chunk)
        assert list(load_tokens(tmp_path / "o", "train")) == whole


def test_parallel_workers_give_the_single_worker_outputs(tmp_path, official, tiny, kant_path):
    """Chunks encoded by 2 threads side by side come back in order: the three output files are
    byte-identical to one thread's, for the tiktoken engine on kant.txt plus tricky files, and
    for the tiny vocabulary."""
    src = tmp_path / "in"
    write(src / "a.txt", kant_path.read_bytes()[:200_000])
    write(src / "b.txt", "")  # no document
    write(src / "c.txt", ("é" + TRICKY) * 40)
    for enc in (official, tiny):
        outs = {}
        for workers in (1, 2):
            outs[workers] = tmp_path / f"{enc.n_vocab}-{workers}"
            stats = encode_corpus(str(src), enc, outs[workers], chunk_chars=997, workers=workers)
        assert stats["documents"] == 2 and stats["tokens"] > 1000
        assert output_bytes(outs[1]) == output_bytes(outs[2])
    with pytest.raises(ValueError, match="workers must be >= 1"):
        encode_corpus(str(src), tiny, tmp_path / "x", workers=0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_bad_utf8_names_file_offset_and_bytes(tmp_path, tiny, chunk):
    f = write(tmp_path / "in" / "b.txt", b"h\xc3\xa9llo\xffworld")
    write(tmp_path / "in" / "a.txt", "fine")
    msg = error_of(encode_corpus, str(tmp_path / "in"), tiny, tmp_path / "out", chunk_chars=chunk)
    assert "b.txt" in msg and "offset 6" in msg and r"b'\xff'" in msg
    assert "data.encoding" in msg and "convert" in msg
    write(f, b"hello\xc3")  # cut off in the middle of a character
    msg = error_of(encode_corpus, str(f), tiny, tmp_path / "out", chunk_chars=chunk)
    assert "offset 5" in msg and r"b'\xc3'" in msg


def test_other_encodings(tmp_path, tiny):
    f = write(tmp_path / "latin.txt", "raison, Vernunft für".encode("latin-1"))
    assert "offset 18" in error_of(encode_corpus, str(f), tiny, tmp_path / "out")
    encode_corpus(str(f), tiny, tmp_path / "out", encoding="latin-1", val_fraction=0)
    assert tiny.decode(load_tokens(tmp_path / "out", "train")) == "raison, Vernunft für"
    write(f, b"ab\x81")  # undefined in cp1252
    msg = error_of(encode_corpus, str(f), tiny, tmp_path / "out", encoding="cp1252")
    assert "cp1252" in msg and "offset 2" in msg and r"b'\x81'" in msg


def test_failure_leaves_previous_outputs_untouched(tmp_path, tiny):
    src, out = tmp_path / "in", tmp_path / "out"
    write(src / "a.txt", DOCS[0])
    encode_corpus(str(src), tiny, out)
    before = output_bytes(out)
    write(src / "b.txt", DOCS[1])
    write(src / "c.txt", b"ok until \xfe")  # the last file fails after the others are encoded
    assert "c.txt" in error_of(encode_corpus, str(src), tiny, out, chunk_chars=16)
    assert output_bytes(out) == before  # same files, same bytes, no temporaries left


def test_output_folder_inside_input_folder_is_refused(tmp_path, tiny):
    write(tmp_path / "data" / "dset.txt", "text")
    write(tmp_path / "data" / "encoded" / "stats.json", "{}")
    msg = error_of(encode_corpus, str(tmp_path / "data"), tiny, tmp_path / "data" / "encoded")
    assert "inside the output folder" in msg


# --------------------------------------------------------------------------- windows


def test_inputs_outside_the_project_are_named_and_links_out_refused(
    tmp_path, tiny, monkeypatch, capsys
):
    """The project is the working directory. A symlink inside it that leads out (data/ to
    /etc/shadow) is refused unless follow_symlinks_outside; any input outside the project,
    linked or named so, is printed with its resolved path."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    secret = write(elsewhere / "corpus.txt", DOCS[0])
    write(project / "data" / "raw" / "a.txt", DOCS[1])
    (project / "data" / "raw" / "b.txt").symlink_to(secret)
    (project / "data" / "inside.txt").symlink_to(project / "data" / "raw" / "a.txt")
    monkeypatch.chdir(project)
    msg = error_of(encode_corpus, "data/raw", tiny, "data/encoded")
    assert msg == (
        f"data.path = 'data/raw': data/raw/b.txt leads through a symlink to {secret}, outside "
        f"the project ({project}); copy the file into the project, or set "
        "data.follow_symlinks_outside: true in params.yaml to read it"
    )
    assert not (project / "data" / "encoded" / "train.npy").exists()
    capsys.readouterr()
    # A link that stays inside says nothing; the switch reads the outside file and names it.
    encode_corpus("data/inside.txt", tiny, "data/encoded")
    assert capsys.readouterr().err == ""
    stats = encode_corpus("data/raw", tiny, "data/encoded", follow_symlinks_outside=True)
    assert stats["documents"] == 2
    note = f"note: data.path = 'data/raw': reading 1 file(s) outside the project ({project}): "
    assert capsys.readouterr().err == f"{note}{secret}\n"
    # Named by its own path, an outside file is read and named (DVC does not track it).
    encode_corpus(str(elsewhere), tiny, "data/encoded", val_path="data/raw/a.txt")
    note = f"note: data.path = {str(elsewhere)!r}: reading 1 file(s) outside the project"
    assert capsys.readouterr().err == f"{note} ({project}): {secret}\n"


def test_window_length():
    assert window_length(10_000, 1024) == 1025
    assert window_length(50, 1024) == 50
    assert window_length(2, 1) == 2
    assert "at least 2" in error_of(window_length, 1, 1024)
    with pytest.raises(ValueError):
        window_length(100, 0)


def test_random_windows_are_contiguous_and_seeded():
    tokens = np.arange(1000, dtype=np.uint16)
    w = random_windows(tokens, 16, 8, np.random.default_rng(3))
    assert w.shape == (8, 17) and w.dtype == np.int32
    assert (np.diff(w, axis=1) == 1).all()  # each row is a slice of the stream
    again = random_windows(tokens, 16, 8, np.random.default_rng(3))
    assert np.array_equal(w, again)
    assert not np.array_equal(w, random_windows(tokens, 16, 8, np.random.default_rng(4)))


def test_windows_of_a_corpus_shorter_than_n_ctx(tmp_path, tiny):
    f = write(tmp_path / "short.txt", "Human reason")
    encode_corpus(str(f), tiny, tmp_path / "out", val_fraction=0)
    tokens = load_tokens(tmp_path / "out", "train")
    w = random_windows(tokens, 1024, 4, np.random.default_rng(0))
    assert w.shape == (4, len(tokens)) and (w == np.asarray(tokens)).all()
    e = eval_windows(tokens, 1024, 8)
    assert e.shape == (1, len(tokens)) and (e[0] == tokens).all()
    assert "at least 2" in error_of(random_windows, tokens[:1], 1024, 1, np.random.default_rng())


def test_eval_windows_even_and_deterministic():
    tokens = np.arange(10_000, dtype=np.uint16)
    e = eval_windows(tokens, 99, 8)  # 100-token windows, 8 of them
    assert e.shape == (8, 100) and e.dtype == np.int32
    starts = e[:, 0]
    assert starts[0] == 0 and starts[-1] == 10_000 - 100
    assert (np.diff(starts) >= 100).all() and np.ptp(np.diff(starts)) <= 1
    assert np.array_equal(e, eval_windows(tokens, 99, 8))
    few = eval_windows(tokens[:250], 99, 8)  # only 2 fit without overlapping
    assert few.shape == (2, 100) and list(few[:, 0]) == [0, 150]
    assert eval_windows(np.zeros(0, np.uint16), 99, 8).shape == (0, 0)
    assert eval_windows(np.zeros(1, np.uint16), 99, 8).shape[0] == 0


# --------------------------------------------------------------------------- the stage


def test_stage_script(tmp_path, tiny_vocab_dir):
    """(A bad file among data.path's: test_pipeline_bad_input.py, "non-UTF-8 file in a data
    folder".)"""
    params = write_params(tmp_path, data={"path": "data/raw"})
    vocab = tmp_path / "models" / params["model"]["name"]
    for name in ("encoder.json", "vocab.bpe"):
        write(vocab / name, (tiny_vocab_dir / name).read_bytes())
    write(tmp_path / "data" / "raw" / "a.txt", DOCS[0] * 10)
    ok = run_stage(tmp_path, "encode", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("encoded 1 document(s)") and ok.stdout.count("\n") == 1
    stats = json.loads((tmp_path / "data" / "encoded" / "stats.json").read_text())
    assert stats["files"] == ["data/raw/a.txt"] and stats["val_tokens"] > 0
