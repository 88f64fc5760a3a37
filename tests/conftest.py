"""Shared fixtures: where the official GPT-2 data lives, and tiny vocabularies and models
built from scratch in OpenAI's on-disk formats so tests never need a download. What the
fixtures are built from lives in the helpers package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import SHARED_DATA
from helpers.training import TRAIN_SHAPE
from helpers.vocab import build_tiny_vocab

from gpt2tune import load_encoder, save_model

# .ci/run sets this so that missing shared data fails the run instead of skipping tests.
REQUIRE_SHARED = os.environ.get("GPT2TUNE_REQUIRE_SHARED_DATA") == "1"


def _need(path: Path) -> Path:
    if not path.exists():
        msg = f"{path} is absent (set GPT2TUNE_SHARED_DATA to the folder holding the shared data)"
        if REQUIRE_SHARED:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def official_vocab_dir() -> Path:
    """Folder holding the official GPT-2 encoder.json and vocab.bpe."""
    d = SHARED_DATA / "gpt2-vocab"
    _need(d / "encoder.json")
    _need(d / "vocab.bpe")
    return d


@pytest.fixture(scope="session")
def kant_path() -> Path:
    return _need(SHARED_DATA / "kant.txt")


@pytest.fixture(scope="session")
def tiny_vocab_dir(tmp_path_factory) -> Path:
    """encoder.json + vocab.bpe of a ~377-token byte-level BPE trained on a paragraph of Kant."""
    d = tmp_path_factory.mktemp("tiny_vocab")
    build_tiny_vocab(d)
    return d


@pytest.fixture(scope="module")
def hp(tiny_vocab_dir) -> dict:
    """The tiny GPT-2 of the training tests (test_train*.py): 2 layers of width 32, N_CTX."""
    from gpt2tune.model.encoder import load_encoder

    return dict(TRAIN_SHAPE, n_vocab=load_encoder(tiny_vocab_dir).n_vocab)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, hp, tiny_vocab_dir) -> Path:
    """The base model folder a training test starts from (OpenAI's layout, random init)."""
    from gpt2tune.model.gpt2 import init_model

    folder = tmp_path_factory.mktemp("base") / "model"
    save_model(init_model(hp, load_encoder(tiny_vocab_dir), seed=0), folder)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on loopback, one per test module; tests may kill it and leave
    it running when they end."""
    from helpers.mlflowserver import MlflowServer

    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as srv:
        srv.wait_ready()
        yield srv


# The files that take longest (end-to-end DVC, MLflow and training stages; about 20 s to 3 min
# each on 2 cores), in that order. Run first, so that pytest-xdist's two workers share them
# out and the short files fill the gaps at the end, instead of one worker finishing a long
# file alone. Any file not listed runs after them, in the usual order.
LONGEST_FIRST = (
    "test_pipeline_docs.py", "test_pipeline.py", "test_tracking_stalls.py",
    "test_train_reliability.py", "test_pipeline_faults.py", "test_train.py",
    "test_train_stage.py", "test_servable.py",
    "test_cli.py", "test_pipeline_bad_input.py", "test_train_options.py",
    "test_model_lora.py", "test_generation_interactive.py", "test_train_speed.py",
    "test_train_stopping.py", "test_tracking.py", "test_pipeline_export.py",
    "test_pipeline_hf_source.py", "test_train_kept_runs.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
