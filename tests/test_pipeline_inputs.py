"""Reliability, round two: inputs that used to cost a traceback, minutes and gigabytes, or a
silently damaged model, each reproduced here the way it reached a user.

Stages run as subprocesses in a small project (the stage scripts, params.yaml written from
the declared defaults, a tiny tokenizer as models/tiny); downloads come from a real HTTP
server on 127.0.0.1 (helpers.httpserver).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO
from helpers.httpserver import FolderServer
from helpers.vocab import TINY_CORPUS

from gpt2tune.config.params import default_raw, validate_params
from gpt2tune.config.schema import read_yaml
from gpt2tune.data.encode import encode_corpus
from gpt2tune.data.encoded import load_tokens, read_stats
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.fetch.download import fetch_model
from gpt2tune.fetch.manifest import MANIFEST
from gpt2tune.files import RELEASE_FILES
from gpt2tune.model.encoder import load_encoder

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TF_CPP_MIN_LOG_LEVEL": "2"}
FAST = {"backoff": 0.01, "progress": False}

# A minimal copy of test_bad_input's stage runner (tests never import one another); the lead
# may fold both into a shared helper.


def run_stage(root: Path, stage: str, *, fsize_limit: int | None = None) -> list[str]:
    """Run stages/<stage>.py in root; expect exit status 1 and return its output lines."""
    argv = [sys.executable, f"stages/{stage}.py"]
    if fsize_limit is not None:  # a full disk: writes past the limit fail with EFBIG
        argv = [sys.executable, "-c", (
            "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize_limit}, resource.RLIM_INFINITY)); "
            f"sys.argv = ['stages/{stage}.py']; runpy.run_path(sys.argv[0], run_name='__main__')"
        )]  # fmt: skip
    proc = subprocess.run(argv, cwd=root, env=ENV, capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines


def write_params(root: Path, **changes: object) -> None:
    """params.yaml: the declared defaults, model tiny, plus `changes` ("section.key": value)."""
    raw = default_raw()
    raw["model"]["name"] = "tiny"
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


@pytest.fixture
def project(tmp_path, tiny_vocab_dir) -> Path:
    root = tmp_path / "project"
    shutil.copytree(REPO / "stages", root / "stages")
    shutil.copytree(tiny_vocab_dir, root / "models" / "tiny")
    (root / "data").mkdir()
    (root / "data" / "dset.txt").write_text(TINY_CORPUS * 4, encoding="utf-8")
    write_params(root)
    return root


# --------------------------------------------------------------------------- 5: YAML alias bomb


def alias_bomb() -> str:
    """~400 bytes of nested aliases that stand for 9**9 (387 million) strings."""
    lines = ['  - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"  - &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_at_once(project):
    text = (project / "params.yaml").read_text()
    head, tail = text.split("  prompts:", 1)
    bomb = alias_bomb()
    assert len(bomb) < 450
    tail = tail.split("\n", 1)[1]
    (project / "params.yaml").write_text(f"{head}  prompts:\n{bomb}{tail}")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.monotonic()
    with pytest.raises(Gpt2tuneError, match=r"params.yaml:\d+:\d+: invalid YAML: alias \*a"):
        read_yaml(project / "params.yaml")
    assert time.monotonic() - began < 0.5  # was 120 s
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB; was 6 GB
    for stage in ("encode", "sample"):
        (line,) = run_stage(project, stage)
        assert "aliases are not allowed" in line, line


def test_anchors_without_aliases_still_read(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("a: &x 1\nb: 2\n")
    assert read_yaml(path) == {"a": 1, "b": 2}


# --------------------------------------------------------------------------- 8: upper bounds


@pytest.mark.parametrize(
    ("dotted", "value", "words"),
    [
        ("sample.top_k", 2**31, "0..2147483647"),
        ("sample.length", 10**6 + 1, "1..1000000"),
        ("sample.nsamples", 2**31, "1..2147483647"),
        ("train.accumulate_gradients", 100_000_000, "1..100000"),
        ("train.batch_size", 10**5 + 1, "1..100000"),
        ("train.val_batch_count", 10**5 + 1, "1..100000"),
        ("train.sample_length", 10**6 + 1, "1..1000000"),
    ],
)
def test_counts_that_size_allocations_have_upper_bounds(dotted, value, words):
    raw = default_raw()
    section, key = dotted.split(".")
    raw[section][key] = value
    with pytest.raises(Gpt2tuneError) as err:
        validate_params(raw)
    assert str(err.value).startswith(
        f"params.yaml: {dotted} = {value}: must be an integer in {words}"
    )
    raw[section][key] = int(words.split("..")[1])  # the bound itself is fine
    # (sample's values are the served model's defaults: its caps must allow them too)
    raw["serve"].update(max_length=10**6, max_samples=2**31 - 1)
    validate_params(raw)


def test_windows_per_step_are_bounded_together():
    raw = default_raw()
    raw["train"].update(batch_size=1000, accumulate_gradients=1000)
    with pytest.raises(Gpt2tuneError, match="1000 x 1000: at most 100000 windows per step"):
        validate_params(raw)


@pytest.mark.parametrize(
    ("stage", "dotted", "value"),
    [("sample", "sample.top_k", 2**31), ("train", "train.accumulate_gradients", 100_000_000)],
)
def test_stage_refuses_huge_counts_before_loading_anything(project, stage, dotted, value):
    write_params(project, **{dotted: value})
    (line,) = run_stage(project, stage)
    assert f"{dotted} = {value}: must be an integer in" in line


# --------------------------------------------------------------------------- 8, 9: text encodings


def test_utf16_file_read_as_utf8_says_utf16(project):
    (project / "data" / "dset.txt").write_bytes(TINY_CORPUS.encode("utf-16-le"))
    (line,) = run_stage(project, "encode")
    assert "data/dset.txt: looks like UTF-16 text" in line and "data.encoding" in line, line
    assert "binary" not in line


def test_utf16_without_bom_is_one_line(project):
    (project / "data" / "dset.txt").write_bytes(TINY_CORPUS.encode("utf-16-le"))
    write_params(project, **{"data.encoding": "utf-16"})
    (line,) = run_stage(project, "encode")
    assert "data/dset.txt: not valid utf-16" in line and "utf-16-le" in line, line
    write_params(project, **{"data.encoding": "utf-16-le"})  # the fix the line names
    ok = subprocess.run([sys.executable, "stages/encode.py"], cwd=project, env=ENV,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr


# --------------------------------------------------------------------------- 8: data/encoded


@pytest.fixture
def encoded(tmp_path, tiny_vocab_dir) -> Path:
    (tmp_path / "t.txt").write_text(TINY_CORPUS * 4, encoding="utf-8")
    out = tmp_path / "encoded"
    encode_corpus(str(tmp_path / "t.txt"), load_encoder(tiny_vocab_dir), out, val_fraction=0.1)
    return out


def test_token_ids_out_of_range_name_the_file(encoded, tiny_vocab_dir):
    n_vocab = load_encoder(tiny_vocab_dir).n_vocab
    train = np.load(encoded / "train.npy")
    train[7] = n_vocab + 5
    np.save(encoded / "train.npy", train)
    with pytest.raises(Gpt2tuneError) as err:
        load_tokens(encoded, "train")
    msg = str(err.value)
    assert "train.npy: token id" in msg and f"{n_vocab + 5} at position 7" in msg, msg
    assert len(load_tokens(encoded, "val")) == read_stats(encoded)["val_tokens"]
    with pytest.raises(Gpt2tuneError, match="out of range for a vocabulary of 100"):
        load_tokens(encoded, "val", n_vocab=100)  # a model with a smaller vocabulary


def test_train_stage_refuses_out_of_range_ids(project, tiny_vocab_dir):
    out = project / "data" / "encoded"
    encode_corpus(str(project / "data" / "dset.txt"), load_encoder(tiny_vocab_dir), out)
    train = np.load(out / "train.npy")
    train[0] = np.iinfo(train.dtype).max
    np.save(out / "train.npy", train)
    (line,) = run_stage(project, "train")
    assert "data/encoded/train.npy: token id 65535 at position 0 is out of range" in line, line


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "stats.json not found"),
        (b"{not json", "stats.json is not readable JSON"),
        (b'{"n_vocab": "many"}', "must be a JSON object with the counts"),
        (b"[]", "must be a JSON object with the counts"),
    ],
)
def test_missing_or_invalid_stats_json(encoded, content, words):
    stats = encoded / "stats.json"
    if content is None:
        stats.unlink()
    else:
        stats.write_bytes(content)
    for call in (lambda: read_stats(encoded), lambda: load_tokens(encoded, "train")):
        with pytest.raises(Gpt2tuneError, match=words) as err:
            call()
        assert "dvc repro encode" in str(err.value)


def test_stats_json_disagreeing_with_the_array(encoded):
    stats = json.loads((encoded / "stats.json").read_text())
    stats["train_tokens"] += 3
    (encoded / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(Gpt2tuneError, match="different runs or cut short"):
        load_tokens(encoded, "train")


def test_encode_into_a_full_disk(project):
    (project / "data" / "dset.txt").write_text(TINY_CORPUS * 40, encoding="utf-8")  # ~10 KB
    (line,) = run_stage(project, "encode", fsize_limit=4096)
    assert line.startswith("error: could not write data/encoded"), line
    assert "File too large" in line and "previous outputs are unchanged" in line, line
    assert list((project / "data" / "encoded").iterdir()) == []  # no temporary file left


# --------------------------------------------------------------------------- 10: leftovers


def test_encode_removes_temp_files_of_killed_runs(encoded, tiny_vocab_dir, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = [encoded / f".tokens.{dead}.tmp", encoded / f".train.npy.{dead}.tmp"]
    live = encoded / f".tokens.{os.getppid()}.tmp"  # a running process may be encoding now
    for f in [*stale, live]:
        f.write_bytes(b"\0" * 64)
    encode_corpus(str(tmp_path / "t.txt"), load_encoder(tiny_vocab_dir), encoded)
    assert not any(f.exists() for f in stale) and live.exists()


def test_404_leaves_no_empty_model_folder(tmp_path):
    (tmp_path / "srv").mkdir()
    dest = tmp_path / "models"
    (dest / "124M").mkdir(parents=True)  # what an earlier version left after a 404
    with FolderServer(tmp_path / "srv") as server:
        for _ in range(2):
            with pytest.raises(Gpt2tuneError, match="not found"):
                fetch_model("124M", server.url, dest, **FAST)
            assert list(dest.iterdir()) == []


# --------------------------------------------------------------------------- 7: damaged base model


@pytest.fixture
def served(tmp_path, tiny_vocab_dir) -> tuple[Path, dict[str, bytes]]:
    contents = {name: f"{name} of a test model\n".encode() for name in RELEASE_FILES}
    contents["model.ckpt.data-00000-of-00001"] = os.urandom(200_000)
    for name in ("encoder.json", "vocab.bpe"):
        contents[name] = (tiny_vocab_dir / name).read_bytes()
    root = tmp_path / "srv"
    (root / "124M").mkdir(parents=True)
    for name, data in contents.items():
        (root / "124M" / name).write_bytes(data)
    return root, contents


def test_damaged_files_are_fetched_again(served, tmp_path):
    root, contents = served
    dest = tmp_path / "models" / "124M"
    with FolderServer(root) as server:
        fetch_model("124M", server.url, dest.parent, **FAST)
        assert (dest / MANIFEST).is_file()
        vocab = dest / "vocab.bpe"
        vocab.write_bytes(vocab.read_bytes()[: len(contents["vocab.bpe"]) // 2])  # cut in half
        data = dest / "model.ckpt.data-00000-of-00001"
        flipped = bytearray(data.read_bytes())
        flipped[1000] ^= 0xFF  # same size, other bytes
        data.write_bytes(bytes(flipped))
        server.requests.clear()
        fetch_model("124M", server.url, dest.parent, **FAST)
        fetched = {r.path.rsplit("/", 1)[1] for r in server.requests}
        assert fetched == {"vocab.bpe", "model.ckpt.data-00000-of-00001"}
        server.requests.clear()
        fetch_model("124M", server.url, dest.parent, **FAST)  # whole again: nothing to do
        assert server.requests == []
    for name, data in contents.items():
        assert (dest / name).read_bytes() == data, name


def test_official_tokenizer_checked_without_a_manifest(tmp_path, official_vocab_dir):
    # A folder from before manifests, fetched from a local mirror of the official files, its
    # vocab.bpe since damaged in one byte: without a manifest, the official SHA-256 tells.
    srv, dest = tmp_path / "srv" / "124M", tmp_path / "models" / "124M"
    for folder in (srv, dest):
        folder.mkdir(parents=True)
        for name in RELEASE_FILES:
            (folder / name).write_bytes(f"{name}\n".encode())
        shutil.copyfile(official_vocab_dir / "vocab.bpe", folder / "vocab.bpe")
    (dest / "vocab.bpe").write_bytes((srv / "vocab.bpe").read_bytes()[:-2] + b"?\n")
    fetch_model("124M", str(srv.parent), dest.parent, **FAST)
    assert (dest / "vocab.bpe").read_bytes() == (official_vocab_dir / "vocab.bpe").read_bytes()
    assert json.loads((dest / MANIFEST).read_text())["files"].keys() == set(RELEASE_FILES)


def test_cut_vocab_bpe_is_refused_by_load_encoder(tmp_path, tiny_vocab_dir):
    shutil.copytree(tiny_vocab_dir, tmp_path / "v")
    lines = (tmp_path / "v" / "vocab.bpe").read_text(encoding="utf-8").splitlines(True)
    (tmp_path / "v" / "vocab.bpe").write_text("".join(lines[: len(lines) // 2]), encoding="utf-8")
    with pytest.raises(Gpt2tuneError, match=r"vocab.bpe has \d+ merges for \d+ tokens") as err:
        load_encoder(tmp_path / "v")
    assert "cut short" in str(err.value)


def test_load_model_refuses_fewer_layers_than_the_checkpoint(tmp_path, tiny_vocab_dir):
    from gpt2tune import init_model, load_model, save_model

    hp = {"n_vocab": load_encoder(tiny_vocab_dir).n_vocab, "n_ctx": 16, "n_embd": 8,
          "n_head": 2, "n_layer": 2}  # fmt: skip
    save_model(init_model(hp, load_encoder(tiny_vocab_dir), seed=0), tmp_path / "m")
    hparams = tmp_path / "m" / "hparams.json"
    hparams.write_text(json.dumps(dict(hp, n_layer=1)))
    with pytest.raises(Gpt2tuneError, match="has 2 layers but .*n_layer 1; set n_layer to 2"):
        load_model(tmp_path / "m")
    hparams.write_text(json.dumps(hp))
    assert load_model(tmp_path / "m").hparams["n_layer"] == 2
