"""data.format (gpt2tune.data.formats): documents from lines, CSV rows, JSON Lines objects and
gpt-2-simple's .npz token archives, joined and split like plain text; bad rows refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO

from gpt2tune.config.params import DataParams, Params, default_raw, validate_params
from gpt2tune.config.schema import rule_of
from gpt2tune.data import formats
from gpt2tune.data.encode import encode_corpus, split_plan
from gpt2tune.data.encoded import load_tokens
from gpt2tune.data.formats import DATA_FORMATS
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.model.encoder import EOT, load_encoder

DOCS = [
    "Human reason, in one sphere of its cognition, is called upon to consider questions.",
    "  which it cannot decline,\tas they are presented — by its own nature ",
    "The the the reason reasoning reasons. It'll answer 1781 questions",
]


@pytest.fixture(scope="module")
def tiny(tiny_vocab_dir):
    return load_encoder(tiny_vocab_dir)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def by_hand(encoder, docs: list[str]) -> list[int]:
    """The documents encoded one by one and joined with the endoftext id."""
    out: list[int] = []
    for i, doc in enumerate(docs):
        out += ([encoder.eot_token] if i else []) + encoder.encode(doc, allow_endoftext=True)
    return out


def train_of(path: Path | str, encoder, out: Path, **kwargs) -> list[int]:
    encode_corpus(str(path), encoder, out, val_fraction=0, **kwargs)
    return load_tokens(out, "train").tolist()


def error_of(fn, *args, **kwargs) -> str:
    """The one-line Gpt2tuneError message of fn(*args, **kwargs)."""
    with pytest.raises(Gpt2tuneError, match=r"\A[^\n]+\Z") as e:
        fn(*args, **kwargs)
    return str(e.value)


# --------------------------------------------------------------------------- the keys


def test_keys_are_validated_and_logged():
    # Every declared format has its reader (text and npz are read whole, the others by line).
    assert set(rule_of(DataParams, "format").choices) == set(DATA_FORMATS)
    assert set(DATA_FORMATS) == {"text", "npz", *formats._READERS}
    flat = Params().flat()
    assert flat["data.format"] == "text" and flat["data.field"] == "text"
    raw = default_raw()
    raw["data"].update(format="jsonl", field="body")
    assert validate_params(raw).data == DataParams(format="jsonl", field="body")
    raw["data"]["format"] = "json"
    assert "data.format" in error_of(validate_params, raw) and "jsonl" in error_of(
        validate_params, raw
    )
    raw["data"].update(format="csv", field=" ")
    assert "data.field" in error_of(validate_params, raw)


def test_library_callers_get_the_same_checks(tmp_path, tiny):
    f = write(tmp_path / "a.txt", "text")
    assert "data.format = 'xml'" in error_of(encode_corpus, str(f), tiny, tmp_path / "o",
                                             data_format="xml")  # fmt: skip
    assert "data.field is empty" in error_of(encode_corpus, str(f), tiny, tmp_path / "o",
                                             data_format="csv", field="")  # fmt: skip
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- lines


def test_lines_one_document_per_line(tmp_path, official_vocab_dir):
    enc = load_encoder(official_vocab_dir)
    f = write(tmp_path / "a.txt", f"{DOCS[0]}\r\n\n{DOCS[1]}\n{DOCS[2]}")  # no final break
    tokens = train_of(f, enc, tmp_path / "out", data_format="lines")
    assert tokens == by_hand(enc, DOCS)
    assert [i for i, t in enumerate(tokens) if t == 50256] == [
        len(enc.encode(DOCS[0])),
        len(enc.encode(DOCS[0])) + 1 + len(enc.encode(DOCS[1])),
    ]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["documents"] == 3 and stats["format"] == "lines"
    assert stats["characters"] == sum(map(len, DOCS))
    # The same file as one text document keeps its line breaks and has no separator.
    assert 50256 not in train_of(f, enc, tmp_path / "text")


def test_lines_stream_in_small_reads(tmp_path, tiny):
    long = " ".join(DOCS * 20)  # one line far longer than a read
    f = write(tmp_path / "a.txt", "\n".join([long, *DOCS, long]) + "\n")
    whole = train_of(f, tiny, tmp_path / "whole", data_format="lines")
    assert whole == by_hand(tiny, [long, *DOCS, long])
    assert train_of(f, tiny, tmp_path / "small", data_format="lines", chunk_chars=7) == whole
    # Words one per line: the joined documents have no cut point but the separators.
    words = " ".join(DOCS).split()
    f = write(tmp_path / "words.txt", "\n".join(words))
    assert train_of(f, tiny, tmp_path / "w", data_format="lines", chunk_chars=16) == by_hand(
        tiny, words
    )


# --------------------------------------------------------------------------- jsonl


def test_jsonl_one_document_per_object(tmp_path, tiny):
    rows = [{"id": 1, "text": DOCS[0]}, {"text": DOCS[1] + "\nsecond line", "x": None}]
    write(tmp_path / "in" / "1.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    write(tmp_path / "in" / "2.jsonl", json.dumps({"text": DOCS[2]}, ensure_ascii=False))
    docs = [DOCS[0], DOCS[1] + "\nsecond line", DOCS[2]]
    out = tmp_path / "out"
    tokens = train_of(tmp_path / "in", tiny, out, data_format="jsonl", chunk_chars=9)
    assert tokens == by_hand(tiny, docs)
    assert json.loads((out / "stats.json").read_text())["documents"] == 3


def test_jsonl_custom_field_and_literal_endoftext(tmp_path, tiny):
    f = write(tmp_path / "a.jsonl", json.dumps({"text": "not this", "body": f"a{EOT}b"}) + "\n")
    assert train_of(f, tiny, tmp_path / "o", data_format="jsonl", field="body") == (
        tiny.encode("a") + [tiny.eot_token] + tiny.encode("b")
    )


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"body": "x"}', "a.jsonl:3: no key 'text' (data.field); this object's keys: 'body'"),
        ('{"text": 5}', "a.jsonl:3: key 'text' (data.field) holds a number, not a string"),
        ('{"text": null}', "a.jsonl:3: key 'text' (data.field) holds null, not a string"),
        ('["text"]', "a.jsonl:3: a list, not a JSON object"),
        ('{"text": "x"', "a.jsonl:3: not valid JSON (Expecting ',' delimiter, column 13)"),
        # Each of these used to be a traceback (RecursionError, ValueError) or, for the
        # repeated key, the last value silently.
        ('{"text": "x", "t": ' + "[" * 2000 + "]" * 2000 + "}", "a.jsonl:3: JSON nested too"),
        ('{"text": "x", "t": ' + "[" * 100_000 + "]" * 100_000 + "}", "a.jsonl:3: JSON nested"),
        ('{"id": ' + "7" * 5000 + ', "text": "x"}', "a.jsonl:3: a number of more than 4300"),
        ('{"text": "a", "text": "b"}', "a.jsonl:3: key 'text' appears twice in one object"),
        ('{"text": "a", "m": {"k": 1, "k": 2}}', "a.jsonl:3: key 'k' appears twice"),
    ],
    ids=["no key", "number", "null", "list", "bad JSON", "2,000 deep", "100,000 deep",
         "5,000 digits", "repeated key", "repeated nested key"],
)  # fmt: skip
def test_jsonl_bad_row_names_file_line_and_field(tmp_path, tiny, line, problem):
    f = write(tmp_path / "a.jsonl", '{"text": "first"}\n{"text": "second"}\n')
    out = tmp_path / "out"
    encode_corpus(str(f), tiny, out, data_format="jsonl")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write(f, f'{{"text": "first"}}\n\n{line}\n{{"text": "last"}}\n')
    message = error_of(encode_corpus, str(f), tiny, out, data_format="jsonl")
    assert message.startswith(f"{f.parent.as_posix()}/{problem}")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing half-written


# --------------------------------------------------------------------------- long lines


@pytest.mark.parametrize(
    "data_format, content, line",
    [
        ("lines", "short\n" + "x" * 1_000_001 + "\nshort\n", 2),
        ("lines", "short\n" + "x" * 3_000_000, 2),  # the last line, without a break
        ("jsonl", '{"text": "a"}\n{"text": "' + "x" * 1_000_000 + '"}\n', 2),
        ("csv", "text\nshort\n" + "y" * 1_000_001 + "\n", 3),
        ("csv", 'text\nshort\n"' + "many\nlines\n" * 100_000 + '"\n', 3),  # one cell
    ],
    ids=["lines", "last line", "jsonl", "csv line", "csv cell over many lines"],
)
def test_a_line_over_max_line_mb_is_refused_naming_it(tmp_path, tiny, data_format, content, line):
    f = write(tmp_path / f"a.{data_format}", content)
    message = error_of(
        encode_corpus, str(f), tiny, tmp_path / "o", data_format=data_format, max_line_mb=1,
        chunk_chars=1000,
    )  # fmt: skip
    assert message.startswith(f"{f.as_posix()}:{line}: "), message
    assert "longer than 1 million characters (data.max_line_mb)" in message
    assert not (tmp_path / "o" / "train.npy").exists()


def test_lines_up_to_max_line_mb_are_read(tmp_path, tiny):
    doc = "reason " * 142_857  # 999,999 characters
    f = write(tmp_path / "a.jsonl", f'{{"text": "{doc}"}}\n')
    assert len(f.read_text()) > 10**6  # the line is longer than the document, and is fine
    message = error_of(encode_corpus, str(f), tiny, tmp_path / "o", data_format="jsonl",
                       max_line_mb=1)  # fmt: skip
    assert "data.max_line_mb" in message  # the limit is on the line, JSON and all
    assert train_of(f, tiny, tmp_path / "o", data_format="jsonl", max_line_mb=2) == (
        tiny.encode(doc)
    )


# --------------------------------------------------------------------------- csv


def test_csv_default_field_column(tmp_path, tiny):
    f = write(tmp_path / "a.csv", f"id,text,n\n1,{DOCS[2]},3\n\n2,,4\n3,plain,5\n")
    assert train_of(f, tiny, tmp_path / "o", data_format="csv") == by_hand(
        tiny, [DOCS[2], "plain"]
    )  # the blank line and the empty cell add no document


def test_csv_custom_field_with_quoted_multiline_cells(tmp_path, tiny):
    docs = ['She said "no",\nthen left.\r\n\nThe end.', "one, two", "x" * 200_000]
    body = "".join(f'{i},"{d.replace(chr(34), 2 * chr(34))}",note {i}\r\n' for i, d in
                   enumerate(docs))  # fmt: skip
    f = write(tmp_path / "a.csv", "id,body,text\r\n" + body)
    tokens = train_of(f, tiny, tmp_path / "o", data_format="csv", field="body", chunk_chars=64)
    assert tokens == by_hand(tiny, docs)


def test_csv_missing_column_is_one_line(tmp_path, tiny):
    f = write(tmp_path / "a.csv", "id,body\n1,hello\n")
    message = error_of(encode_corpus, str(f), tiny, tmp_path / "o", data_format="csv")
    assert message.startswith(f"{f.as_posix()}:1: no column 'text' (data.field) in the header")
    assert "'id', 'body'" in message and not (tmp_path / "o" / "train.npy").exists()


def test_csv_short_row_and_bad_quoting_name_the_row_start(tmp_path, tiny):
    f = write(tmp_path / "a.csv", 'id,text\n1,"two\nlines"\n2\n')
    message = error_of(encode_corpus, str(f), tiny, tmp_path / "o", data_format="csv")
    assert f"{f.as_posix()}:4: row has 1 cell(s), none in column 'text'" in message
    write(f, 'id,text\n1,ok\n2,"never closed\n3,more\n')
    message = error_of(encode_corpus, str(f), tiny, tmp_path / "o", data_format="csv")
    assert f"{f.as_posix()}:3: not valid CSV (unexpected end of data" in message


# --------------------------------------------------------------------------- npz


def nshepperd_npz(path: Path, encoder, texts: list[str]) -> list[np.ndarray]:
    """An out.npz as nshepperd's encode.py writes it: np.stack of each chunk's ids (int64),
    saved with np.savez_compressed(out, *chunks)."""
    chunks = [np.stack(encoder.encode(t)) for t in texts]
    np.savez_compressed(path, *chunks)
    return chunks


def test_npz_tokens_used_as_is(tmp_path, tiny):
    texts = [f"{d} {i}" for i, d in enumerate(DOCS * 4)]  # 12 arrays: arr_10 after arr_9
    chunks = nshepperd_npz(tmp_path / "out.npz", tiny, texts)
    out = tmp_path / "enc"
    tokens = train_of(tmp_path / "out.npz", tiny, out, data_format="npz")
    assert tokens == np.concatenate(chunks).tolist()  # nothing inserted between arrays
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"] == 12 and stats["tokens"] == len(tokens)


def test_npz_split_like_text(tmp_path, tiny):
    chunks = nshepperd_npz(tmp_path / "out.npz", tiny, [" ".join(DOCS * 30)] * 3)
    stream = np.concatenate(chunks)
    out = tmp_path / "enc"
    encode_corpus(str(tmp_path / "out.npz"), tiny, out, data_format="npz", val_fraction=0.1)
    block, val_blocks = split_plan(len(stream), 0.1)
    in_val = np.zeros(len(stream), bool)
    for i in val_blocks:
        in_val[i * block : (i + 1) * block] = True
    assert load_tokens(out, "val").tolist() == stream[in_val].tolist()
    assert load_tokens(out, "train").tolist() == stream[~in_val].tolist()

    val = nshepperd_npz(tmp_path / "val.npz", tiny, ["held out"])
    encode_corpus(str(tmp_path / "out.npz"), tiny, out, data_format="npz",
                  val_path=str(tmp_path / "val.npz"))  # fmt: skip
    assert load_tokens(out, "train").tolist() == stream.tolist()
    assert load_tokens(out, "val").tolist() == val[0].tolist()


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ([[1, 2], [3, 377]], "array arr_1: token id 377 at position 1 is outside the model's "
         "vocabulary (0..376)"),
        ([[-1, 2]], "array arr_0: token id -1 at position 0 is outside"),
        ([[1.0, 2.0]], "array arr_0: a float64 array of shape (2,), not 1-D integer token ids"),
    ],
)  # fmt: skip
def test_npz_bad_arrays_refused(tmp_path, tiny, arrays, problem):
    assert tiny.n_vocab == 377
    np.savez_compressed(tmp_path / "out.npz", *map(np.array, arrays))
    message = error_of(encode_corpus, str(tmp_path / "out.npz"), tiny, tmp_path / "o",
                       data_format="npz")  # fmt: skip
    assert message.startswith(f"{(tmp_path / 'out.npz').as_posix()}: {problem}")
    assert not (tmp_path / "o" / "train.npy").exists()


def test_npz_not_an_archive(tmp_path, tiny):
    write(tmp_path / "a.npz", "plain text")
    assert "not a readable .npz archive" in error_of(
        encode_corpus, str(tmp_path / "a.npz"), tiny, tmp_path / "o", data_format="npz"
    )
    np.save(tmp_path / "b.npy", np.arange(5))
    assert "a single .npy array, not a .npz archive" in error_of(
        encode_corpus, str(tmp_path / "b.npy"), tiny, tmp_path / "o", data_format="npz"
    )


# --------------------------------------------------------------------------- the stage


def test_stage_reads_jsonl(tmp_path, tiny_vocab_dir):
    params = default_raw()
    params["data"].update(path="data/raw", format="jsonl", field="body", val_fraction=0.0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name in ("encoder.json", "vocab.bpe"):
        write(tmp_path / "models" / params["model"]["name"] / name,
              (tiny_vocab_dir / name).read_bytes())  # fmt: skip
    rows = [json.dumps({"body": d}) for d in DOCS]
    write(tmp_path / "data" / "raw" / "a.jsonl", "\n".join(rows) + "\n")

    def run():
        return subprocess.run(
            [sys.executable, str(REPO / "stages" / "encode.py")], cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip

    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("encoded 3 document(s)")
    out = tmp_path / "data" / "encoded"
    assert load_tokens(out, "train").tolist() == by_hand(load_encoder(tiny_vocab_dir), DOCS)
    assert json.loads((out / "stats.json").read_text())["format"] == "jsonl"

    write(tmp_path / "data" / "raw" / "b.jsonl", '{"body": "fine"}\n{"text": "wrong key"}\n')
    bad = run()
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr == (
        "error: data/raw/b.jsonl:2: no key 'body' (data.field); this object's keys: 'text'; "
        "set data.field to the key holding the text\n"
    )
