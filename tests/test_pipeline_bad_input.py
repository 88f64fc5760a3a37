"""Bad input, refused by every stage the way a user sees it: each stage script runs as a
subprocess in a copy of a prepared project, and must answer with one line naming the
culprit, a non-zero exit and no traceback -- and leave every file of the project as it was
(all files hashed before and after). Most cases fail before TensorFlow loads; the four that
need a model to judge (a broken model folder, a prompt or a batch too big) load it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers.models import tiny_model
from helpers.processes import run_stage, run_stage_peak_rss
from helpers.projects import make_project, snapshot, update_params
from helpers.vocab import TINY_CORPUS

from gpt2tune import save_model

STAGES = ("fetch_model", "encode", "train", "assemble", "sample")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_vocab_dir) -> Path:
    """A project after a good encode: models/tiny and models/finetuned (a tiny GPT-2 in
    OpenAI's layout), data/dset.txt and its data/encoded outputs."""
    root = make_project(
        tmp_path_factory.mktemp("bad_input") / "project", TINY_CORPUS * 4,
        model=dict(name="tiny", base_url=str(tmp_path_factory.getbasetemp() / "nowhere")),
        sample=dict(nsamples=2, length=4, prompts=["Human reason"]),
    )  # fmt: skip
    model = tiny_model(tiny_vocab_dir, 0)
    save_model(model, root / "models" / "tiny")
    (root / "models" / "tiny" / "model.ckpt.meta").write_bytes(b"")  # the release has one
    save_model(model, root / "models" / "finetuned")
    save_model(tiny_model(tiny_vocab_dir, 0, n_embd=32), root / "models" / "wide")
    good = run_stage(root, "encode")
    assert good.returncode == 0, good.stderr
    return root


def set_param(section: str, key: str, value) -> Callable[[Path], None]:
    return lambda root: update_params(root, section, **{key: value})


def write(rel: str, data: bytes, *, point_data_path: bool = True) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        if point_data_path:
            set_param("data", "path", rel)(root)

    return edit


def edit_text(rel: str, old: str, new: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        text = (root / rel).read_text()
        assert old in text
        (root / rel).write_text(text.replace(old, new, 1))

    return edit


def all_of(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for e in edits:
            e(root)

    return edit


def delete(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).unlink()


def bad_token_id(root: Path) -> None:
    """data/encoded/train.npy with one id past the vocabulary, as a stale encode could leave."""
    path = root / "data" / "encoded" / "train.npy"
    tokens = np.load(path)
    tokens[3] = np.iinfo(tokens.dtype).max
    np.save(path, tokens)


def link_outside(root: Path) -> None:
    """data/raw/notes.txt: a symlink to a file outside the project (as /etc/shadow was)."""
    secret = root.parent / "secret.txt"
    secret.write_text("root:$6$not-training-text\n")
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "notes.txt").symlink_to(secret)
    set_param("data", "path", "data/raw")(root)


BROKEN_YAML = edit_text("params.yaml", "  name: tiny\n", "  name: tiny\n   base: [\n")
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))

# id: (stages, how to break the project, what the one line must contain)
CASES: dict[str, tuple[tuple[str, ...], Callable[[Path], None], tuple[str, ...]]] = {
    "invalid YAML": (STAGES, BROKEN_YAML, ("params.yaml:3:", "invalid YAML")),
    # DVC (YAML 1.2) reads 10 and records it in dvc.lock; YAML 1.1 reads 8.
    "octal-looking steps": (
        STAGES,
        edit_text("params.yaml", "  steps: 2\n", "  steps: 010\n"),
        ("params.yaml:", "steps: 010 is the octal number 8 in YAML 1.1", "write 10"),
    ),
    "params nested 100,000 deep": (
        ("encode",),
        edit_text("params.yaml", "  steps: 2\n", "  steps: " + "[" * 100_000 + "\n"),
        ("params.yaml:", "nested more than 100 levels deep"),
    ),
    "unknown key": (("train",), set_param("train", "stepz", 5), ("train.stepz", "unknown key")),
    "wrong type": (
        ("sample",),
        set_param("sample", "nsamples", "two"),
        ("sample.nsamples", "integer"),
    ),
    "out of range": (
        ("encode",),
        set_param("data", "val_fraction", 0.7),
        ("data.val_fraction", "0.5"),
    ),
    "model name with ..": (("fetch_model",), set_param("model", "name", ".."), ("model.name",)),
    "model name with /": (("assemble",), set_param("model", "name", "a/b"), ("model.name",)),
    "base_url of another scheme": (
        ("fetch_model",),
        set_param("model", "base_url", "ftp://h/m"),
        ("model.base_url",),
    ),
    "missing data": (
        ("encode",),
        set_param("data", "path", "data/nope.txt"),
        ("data/nope.txt", "not exist"),
    ),
    "empty data": (("encode",), write("data/empty.txt", b""), ("data/empty.txt", "empty")),
    "binary data": (
        ("encode",),
        write("data/img.txt", PNG),
        ("data/img.txt", "binary", "offset 8"),
    ),
    "binary data that decodes": (
        ("encode",),
        write("data/zeros.txt", b"text\0\0\0"),
        ("data/zeros.txt", "offset 4"),
    ),
    "non-UTF-8 data": (
        ("encode",),
        write("data/l1.txt", "café".encode("latin-1")),
        ("data/l1.txt", "offset 3"),
    ),
    "non-UTF-8 file in a data folder": (  # the line starts with the culprit's name
        ("encode",),
        all_of(
            write("data/raw/a.txt", TINY_CORPUS.encode(), point_data_path=False),
            write("data/raw/b.txt", b"caf\xe9", point_data_path=False),
            set_param("data", "path", "data/raw"),
        ),
        ("error: data/raw/b.txt", "offset 3"),
    ),
    "JSONL nested 100,000 deep": (
        ("encode",),
        all_of(
            write(
                "data/deep.jsonl", b'{"text": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
            ),
            set_param("data", "format", "jsonl"),
        ),
        ("error: data/deep.jsonl:1: JSON nested too deeply",),
    ),
    "JSONL key given twice": (
        ("encode",),
        all_of(
            write("data/twice.jsonl", b'{"text": "a"}\n{"text": "b", "text": "c"}\n'),
            set_param("data", "format", "jsonl"),
        ),
        ("error: data/twice.jsonl:2: key 'text' appears twice",),
    ),
    "symlink out of the project": (
        ("encode",),
        link_outside,
        (
            "data.path = 'data/raw': data/raw/notes.txt leads through a symlink to /",
            "secret.txt, outside the project",
            "data.follow_symlinks_outside: true",
        ),
    ),
    "glob matching nothing": (
        ("encode",),
        set_param("data", "path", "data/*.md"),
        ("data/*.md", "matches nothing"),
    ),
    "corpus under two tokens": (("encode",), write("data/one.txt", b"a"), ("1 token(s)",)),
    "model folder missing a file": (
        ("sample",),
        delete("models/finetuned/model.ckpt.index"),
        ("model.ckpt.index",),
    ),
    "hparams disagreeing with the tensors": (
        ("sample",),
        edit_text("models/finetuned/hparams.json", '"n_embd": 16', '"n_embd": 32'),
        ("models/finetuned/model.ckpt", "shape"),
    ),
    "top_p out of range": (
        ("sample",),
        set_param("sample", "top_p", 1.5),
        ("params.yaml: sample.top_p = 1.5: must be a number in [0, 1] (0 = off)",),
    ),
    "prompt longer than the context": (
        ("sample",),
        set_param("sample", "prompts", ["reason " * 40]),
        ("sample.prompts[0]",),
    ),
    # The train stage checks these before it opens an MLflow run or writes anything: a run
    # refused late used to leave a FAILED MLflow run and a new metrics/mlflow_run.json (a DVC
    # output, so reverting the typo reran train, assemble and sample).
    "train.n_ctx beyond the model": (
        ("train",),
        set_param("train", "n_ctx", 64),
        ("params.yaml: train.n_ctx = 64", "(32)"),
    ),
    "restore_from without a model": (
        ("train",),
        set_param("train", "restore_from", "models/nowhere"),
        ("params.yaml: train.restore_from = 'models/nowhere'",),
    ),
    "restore_from a model of another shape": (
        ("train",),
        set_param("train", "restore_from", "models/wide"),
        ("train.restore_from = 'models/wide'", "shape"),
    ),
    "token id past the vocabulary": (
        ("train",),
        bad_token_id,
        ("data/encoded/train.npy: token id", "at position 3 is out of range"),
    ),
    "nsamples too big for memory": (
        ("sample",),
        # serve.max_samples raised too: the memory check, not the served model's cap, refuses
        lambda root: (
            set_param("serve", "max_samples", 10**9)(root),
            set_param("sample", "nsamples", 10**9)(root),
        ),
        ("sample.nsamples", "GiB"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_cleanly(prepared, tmp_path, case):
    stages, breakage, expected = CASES[case]
    root = tmp_path / "project"
    shutil.copytree(prepared, root, symlinks=True)
    breakage(root)
    before = snapshot(root)
    for stage in stages:
        proc = run_stage(root, stage, timeout=180)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        assert proc.returncode == 1, (stage, proc.stdout, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (stage, lines)
        assert all(word in lines[0] for word in expected), (stage, lines[0])
        assert snapshot(root) == before, stage


def test_train_batch_too_big_for_memory_is_refused_cleanly(prepared, tiny_vocab_dir, tmp_path):
    """The memory estimate refuses before anything is written. The model is wider than the
    others here, so that the largest batch allowed needs ~400 GiB: more than any machine
    this suite runs on has free, whatever else is running."""
    from gpt2tune.config.params import TrainParams
    from gpt2tune.model.memory import available_memory, training_bytes

    shape = {"n_ctx": 64, "n_embd": 128, "n_head": 2, "n_layer": 4}
    big = TrainParams(batch_size=10**5, n_ctx=64)
    free = available_memory()
    if free is None or training_bytes({**shape, "n_vocab": 377}, big) <= free:
        pytest.skip("free RAM unknown here, or enough to train the largest batch allowed")
    root = tmp_path / "project"
    shutil.copytree(prepared, root, symlinks=True)
    save_model(tiny_model(tiny_vocab_dir, 0, **shape), root / "models" / "big")
    update_params(root, "model", name="big")
    update_params(root, "train", batch_size=10**5, n_ctx=64)
    before = snapshot(root)
    proc = run_stage(root, "train", timeout=180)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert "train.batch_size = 100000" in lines[0] and "GiB" in lines[0], lines[0]
    assert snapshot(root) == before


LONG_LINES = {  # a 30-million-character document on line 3, in each format of many per file
    "lines": lambda doc: f"first\nsecond\n{doc}\nlast\n",
    "jsonl": lambda doc: f'{{"text": "first"}}\n\n{{"text": "{doc}"}}\n',
    "csv": lambda doc: f"text\nfirst\n{doc}\n",
}


@pytest.mark.parametrize("data_format", list(LONG_LINES))
def test_a_long_line_is_refused_in_bounded_memory(prepared, tmp_path, data_format):
    """A line is held whole to be parsed: one of 1 GB took 3,988 MB (lines), a 200 MB JSONL
    line 993 MB. Past data.max_line_mb it is refused as soon as that much is read: the
    stage's peak memory stays that of a small corpus plus about the limit."""
    root = tmp_path / "project"
    shutil.copytree(prepared, root, symlinks=True)
    small, base = run_stage_peak_rss(root, "encode")
    assert small.returncode == 0, small.stderr
    doc = ("reason " * 5_000_000)[:30_000_000]
    write(f"data/long.{data_format}", LONG_LINES[data_format](doc).encode())(root)
    update_params(root, "data", format=data_format, max_line_mb=4)
    before = snapshot(root)
    proc, peak = run_stage_peak_rss(root, "encode")
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: data/long.{data_format}:3: line longer than 4 million")
    assert "data.max_line_mb" in lines[0]
    print(f"peak RSS {data_format}: {peak:.0f} MiB, small corpus {base:.0f} MiB")
    assert peak - base < 30, (peak, base)  # MiB; the line alone is 30 MB
    assert snapshot(root) == before
