"""The samples table (gpt2tune.tracking.sampletable): a row's sampling settings make its text
again."""

from __future__ import annotations

import dataclasses
import json

from helpers.training import TOKENS, VAL, cfg

from gpt2tune import load_model
from gpt2tune.config.params import SampleParams, Sampling
from gpt2tune.generation.sampler import generate
from gpt2tune.generation.samples import sample_records
from gpt2tune.tracking.sampletable import rows, sample_stage_rows, training_rows
from gpt2tune.train.loop import fit

SETTINGS = [f.name for f in dataclasses.fields(Sampling)]


def settings_of(table: dict, i: int) -> Sampling:
    return Sampling(**{k: table[k][i] for k in SETTINGS})


def test_training_row_settings_give_its_text_again(base_dir, tmp_path):
    model = load_model(base_dir)
    samples = []
    c = cfg(steps=4, sample_every=4, sample_length=6, seed=3)
    fit(model, TOKENS, VAL, c, tmp_path / "run", progress=False,
        log_sample=lambda text, step: samples.append((step, text)))  # fmt: skip
    [(step, text)] = samples  # taken after the last step: the weights `model` ends with
    table = training_rows(text, step, c)
    assert list(table) == ["step", "text", "prompt", "index", *SETTINGS]
    assert (table["step"], table["prompt"], table["text"]) == ([4], [""], [text])
    assert (table["seed"], table["length"], table["temperature"]) == ([7], [6], [1.0])
    assert generate(model, None, sampling=settings_of(table, 0)) == [text]
    # Another seed gives another text, so the comparison above says something.
    other = dataclasses.replace(settings_of(table, 0), seed=8)
    assert generate(model, None, sampling=other) != [text]


def test_sample_stage_rows(base_dir, tmp_path, monkeypatch):
    model = load_model(base_dir)
    p = SampleParams(nsamples=2, length=5, temperature=0.7, top_k=5, seed=1, prompts=("ab",))
    records = sample_records(model, p)
    monkeypatch.chdir(tmp_path)
    table = sample_stage_rows(records, p, steps=9)  # no metrics/train.json: train.steps
    assert table["step"] == [9] * 4
    assert table["prompt"] == ["", "", "ab", "ab"] and table["index"] == [0, 1, 0, 1]
    assert table["text"] == [r["text"] for r in records]
    for i, r in enumerate(records):
        assert settings_of(table, i) == Sampling(**{k: getattr(p, k) for k in SETTINGS})
        texts = generate(model, r["prompt"], sampling=settings_of(table, i),
                         stop_at_endoftext=not r["prompt"])  # fmt: skip
        assert texts[r["index"]] == r["text"]
    # Where training ended (a time budget may stop it early) wins over train.steps.
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "train.json").write_text(json.dumps({"steps": 6}))
    assert sample_stage_rows(records, p, steps=9)["step"] == [6] * 4
    assert rows(3, [], p) == {k: [] for k in ["step", "text", "prompt", "index", *SETTINGS]}


def test_memorization_columns_follow_the_settings():
    memo = {"copied_tokens": 5, "copied_offset": 17, "copied_document": "a.txt",
            "copied_snippet": "Human reason"}  # fmt: skip
    table = training_rows("text", 4, cfg(), memo)
    assert list(table) == ["step", "text", "prompt", "index", *SETTINGS, *memo]
    assert [table[k][0] for k in memo] == list(memo.values())
    records = [{"prompt": None, "index": i, "text": "t", **memo, "copied_fraction": f}
               for i, f in enumerate((0.0, 0.5))]  # fmt: skip
    stage = rows(9, records, Sampling())
    assert list(stage)[-5:] == [*memo, "copied_fraction"] and stage["copied_fraction"] == [0, 0.5]
