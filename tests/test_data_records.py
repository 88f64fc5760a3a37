"""Prompt -> completion records (data.prompt_field, gpt2tune.data.records): the tokens and loss
mask encode writes, the split by record, the truncation count, the validation records' texts,
and the one-line errors of a bad record or setting."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from gpt2tune.config.params import SampleParams, default_raw, validate_params
from gpt2tune.data.encode import encode_corpus
from gpt2tune.data.encoded import load_mask, load_tokens
from gpt2tune.data.records import fit_record, read_val_records
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.generation.samples import val_prompts
from gpt2tune.model.encoder import load_encoder


@pytest.fixture(scope="module")
def enc(official_vocab_dir):
    return load_encoder(official_vocab_dir)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(Gpt2tuneError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


QA = [{"q": f"Q: {i} + 1 =", "a": f" {i + 1}"} for i in range(40)]


def test_records_are_prompt_then_completion_then_endoftext_and_the_mask_marks_completions(
    enc, tmp_path
):
    src = jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "enc"
    stats = encode_corpus(str(src), enc, out, data_format="jsonl", field="a", prompt_field="q",
                          val_fraction=0.1, window=64)  # fmt: skip
    train, val = load_tokens(out, "train"), load_tokens(out, "val")
    masks = load_mask(out, "train"), load_mask(out, "val")
    kept = read_val_records(out / "val_records.jsonl")
    assert stats["records"] == 40 and stats["val_records"] == len(kept) == 4
    # The split is by record: the validation records' tokens, in order, are val.npy.
    expect: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    for r in QA:
        p, c = enc.encode(r["q"]), enc.encode(r["a"]) + [enc.eot_token]
        split = "val" if {"prompt": r["q"], "completion": r["a"]} in kept else "train"
        expect[split][0].extend(p + c)
        expect[split][1].extend([0] * len(p) + [1] * len(c))
    assert train.tolist() == expect["train"][0] and masks[0].tolist() == expect["train"][1]
    assert val.tolist() == expect["val"][0] and masks[1].tolist() == expect["val"][1]
    assert stats["train_target_tokens"] == int(masks[0].sum())
    assert stats["val_target_tokens"] == int(masks[1].sum())
    assert stats["truncated_prompts"] == stats["truncated_completions"] == 0
    # Evenly spaced through the records, not the last ones.
    assert [r["prompt"] for r in kept] != [r["q"] for r in QA[-4:]]


def test_a_record_longer_than_a_window_loses_the_start_of_its_prompt_and_is_counted(enc, tmp_path):
    rows = [*QA[:5], {"q": "long " * 30 + "question?", "a": " yes"}, {"q": "x", "a": " no" * 40}]
    src = jsonl(tmp_path / "qa.jsonl", rows)
    stats = encode_corpus(str(src), enc, tmp_path / "enc", data_format="jsonl", field="a",
                          prompt_field="q", val_fraction=0.0, window=16)  # fmt: skip
    assert (stats["truncated_prompts"], stats["truncated_completions"]) == (1, 1)
    tokens, mask = load_tokens(tmp_path / "enc", "train"), load_mask(tmp_path / "enc", "train")
    ends = np.flatnonzero(tokens == enc.eot_token) + 1
    assert ends[-1] == len(tokens)  # every record ends with <|endoftext|>, a cut one too
    records = np.split(tokens, ends[:-1])
    assert len(records) == 7 and all(len(r) <= 16 for r in records)
    long_prompt = enc.decode(records[5])
    assert long_prompt.endswith("long question? yes<|endoftext|>") and len(records[5]) == 16
    assert not long_prompt.startswith("long long")  # the start went
    # The long completion keeps one prompt token, its own first 14 and <|endoftext|>.
    assert np.split(mask, ends[:-1])[6].tolist() == [0] + [1] * 15


def test_fit_record_keeps_the_end_of_the_prompt_and_the_start_of_the_completion():
    assert fit_record([1, 2, 3], [4, 5], 5) == ([1, 2, 3], [4, 5], "")
    assert fit_record([1, 2, 3], [4, 5], 4) == ([2, 3], [4, 5], "prompt")
    # The completion's last token is its <|endoftext|>: kept, the tokens before it cut.
    assert fit_record([1, 2, 3], [4, 5, 6, 7], 3) == ([3], [4, 7], "completion")
    assert fit_record([], [4, 5, 6], 2) == ([], [4, 6], "completion")


def test_csv_records_and_a_separate_validation_file(enc, tmp_path):
    def write_csv(path: Path, rows: list[dict]) -> Path:
        buf = io.StringIO()
        w = csv.DictWriter(buf, ["id", "q", "a"])
        w.writeheader()
        w.writerows({"id": i, **r} for i, r in enumerate(rows))
        path.write_text(buf.getvalue(), encoding="utf-8")
        return path

    src, val = write_csv(tmp_path / "t.csv", QA[:30]), write_csv(tmp_path / "v.csv", QA[30:])
    stats = encode_corpus(str(src), enc, tmp_path / "enc", data_format="csv", field="a",
                          prompt_field="q", val_path=str(val), window=64)  # fmt: skip
    assert (stats["records"], stats["val_records"]) == (40, 10)
    kept = read_val_records(tmp_path / "enc" / "val_records.jsonl")
    assert kept == [{"prompt": r["q"], "completion": r["a"]} for r in QA[30:]]


def test_a_record_without_the_prompt_key_names_the_file_line_and_param(enc, tmp_path):
    src = jsonl(tmp_path / "qa.jsonl", [*QA[:3], {"question": "?", "a": "!"}])
    msg = error_of(encode_corpus, str(src), enc, tmp_path / "enc", data_format="jsonl",
                   field="a", prompt_field="q")  # fmt: skip
    assert msg.startswith(f"{src.as_posix()}:4: no key 'q' (data.prompt_field)"), msg
    assert not (tmp_path / "enc" / "train.npy").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("q,answer\nhello,world\n")
    msg = error_of(encode_corpus, str(bad), enc, tmp_path / "enc", data_format="csv",
                   field="a", prompt_field="q")  # fmt: skip
    assert "bad.csv:1: no column 'a' (data.field)" in msg


def test_plain_encode_after_records_leaves_no_stale_mask(enc, tmp_path):
    src = jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "enc"
    encode_corpus(str(src), enc, out, data_format="jsonl", field="a", prompt_field="q")
    assert load_mask(out, "train") is not None
    encode_corpus(str(src), enc, out, data_format="jsonl", field="a")
    assert load_mask(out, "train") is None
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "train.npy", "val.npy"]


def test_params_refuse_prompt_field_with_other_formats_and_val_prompts_without_it():
    raw = default_raw()
    raw["data"] |= {"prompt_field": "q"}
    msg = error_of(validate_params, raw)
    assert "data.prompt_field = 'q': needs data.format jsonl or csv" in msg
    raw["data"] |= {"format": "jsonl", "field": "q"}
    assert "the same as data.field" in error_of(validate_params, raw)
    raw["data"] |= {"field": "a"}
    assert validate_params(raw).data.prompt_field == "q"
    raw["data"]["prompt_field"] = ""
    raw["sample"]["prompts_from"] = "val"
    assert "sample.prompts_from = val: needs data.prompt_field" in error_of(validate_params, raw)


def test_val_prompts_take_the_first_validation_records():
    records = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(12)]
    cfg, refs = val_prompts(SampleParams(), records, "val_records.jsonl")
    assert cfg.prompts == tuple(f"Q{i}" for i in range(8)) and refs == [f"A{i}" for i in range(8)]
    assert "holds no validation records" in error_of(val_prompts, SampleParams(), [], "v")
