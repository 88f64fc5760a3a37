"""Security properties: no unpickling or eval of anything a user or server hands us, and a
tokenizer that survives any text (property-based, with hypothesis).

Credentials in tracking URIs are covered in test_tracking.py and test_config_params.py; names
and paths from params that could escape the project in test_config_params.py and
test_pipeline_bad_input.py.
"""

from __future__ import annotations

import ast
import time

import pytest
from helpers import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2tune.model.encoder import load_encoder

SOURCES = sorted([*(REPO / "src").rglob("*.py"), *(REPO / "stages").glob("*.py")])


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and hasattr(f.value, "id") else ""
            yield owner, name, node


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_unpickling_or_eval(path):
    tree = ast.parse(path.read_text(), str(path))
    for owner, name, node in calls(tree):
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        assert name not in ("eval", "exec", "compile") or owner not in ("", "builtins"), where
        assert not (owner in ("pickle", "dill", "cloudpickle", "joblib") and "load" in name), where
        if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
            loader = [ast.unparse(kw.value) for kw in node.keywords if kw.arg == "Loader"]
            assert name == "load" and loader in (["_Loader"], ["yaml.SafeLoader"]), where
        if owner == "np" and name == "load":
            allow = [kw for kw in node.keywords if kw.arg == "allow_pickle"]
            assert allow and ast.unparse(allow[0].value) == "False", where


@pytest.fixture(scope="module")
def official(official_vocab_dir):
    return load_encoder(official_vocab_dir)


QUICK = settings(
    max_examples=300,
    deadline=2000,
    database=None,  # no .hypothesis folder in the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@QUICK
@given(text=st.text(max_size=300))
def test_encoder_round_trips_any_text(official, text):
    assert official.decode(official.encode(text)) == text
    # <|endoftext|> handling on: still lossless, and the ids stay inside the vocabulary.
    ids = official.encode(text, allow_endoftext=True)
    assert official.decode(ids) == text
    assert all(0 <= i < official.n_vocab for i in ids)


@QUICK
@given(
    text=st.text(st.characters(codec=None), max_size=200),  # lone surrogates included
    repeat=st.integers(1, 200),
)
def test_encoder_never_crashes_or_hangs(official, text, repeat):
    """Long runs of one pattern are where a regex tokenizer could go quadratic."""
    s = text * repeat
    began = time.monotonic()
    ids = official.encode(s)
    assert time.monotonic() - began < 2.0
    # Lone surrogates cannot be UTF-8: they come back as U+FFFD, like tiktoken's.
    expected = s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert official.decode(ids) == expected
