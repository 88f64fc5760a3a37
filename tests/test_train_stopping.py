"""Stopping and keeping (gpt2tune.train.keeping): early stopping, the best checkpoint beside the
latest, and train.keep_checkpoints. Each test would fail if its key were ignored.

Real TensorFlow on the tiny training run of helpers.training. Where the validation loss must rise
at the end, a run is trained on the validation text's pattern, then resumed on another
pattern: the validation loss falls, then rises, whatever the machine's rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
from helpers.training import TOKENS, VAL, assert_weights_close, cfg

from gpt2tune import Gpt2tuneError
from gpt2tune.config.params import TrainParams, default_raw, validate_params
from gpt2tune.model.checkpoint import assemble, load_model
from gpt2tune.train.keeping import BEST_DIR, STOPPED_TAG, assembled_checkpoint
from gpt2tune.train.loop import fit
from gpt2tune.train.runstate import load_state

# Another repeating pattern: training on it makes the model worse on VAL (TOKENS' pattern).
OTHER = np.tile(np.array([11, 250, 3, 77, 140], np.int32), 80)


def train(base_dir, run_dir, c: TrainParams, tokens=TOKENS, tags: list | None = None):
    model = load_model(base_dir)
    metrics, history = fit(
        model, tokens, VAL, c, run_dir, run_fingerprint="fp", progress=False,
        log_tag=lambda k, v: (tags if tags is not None else []).append((k, v)),
    )  # fmt: skip
    return model, metrics, history


def steps_of(history: dict, key: str = "loss") -> list[int]:
    return [s for s, _ in history[key]]


# Stops at some step well before 30: improvements shrink below 0.2 within a few validations.
STOPPING = cfg(steps=30, val_every=1, early_stopping_patience=2, early_stopping_min_delta=0.2)


def test_early_stopping_stops_tags_saves_and_a_rerun_trains_no_further(base_dir, tmp_path, capsys):
    run, tags = tmp_path / "run", []
    model, metrics, history = train(base_dir, run, STOPPING, tags=tags)
    end = metrics["steps"]
    assert 2 <= end < 30, history["val_loss"]
    assert steps_of(history) == list(range(1, end + 1))
    assert steps_of(history, "val_loss") == list(range(0, end + 1))  # the last one once
    why = f"step {end}: no val_loss improvement >= 0.2 in 2 validations"
    assert tags == [(STOPPED_TAG, why)]
    assert f"stopped early at {why}" in capsys.readouterr().out
    # The reason for stopping: the last two validations did not beat the one before by 0.2.
    val = [v for _, v in history["val_loss"]]
    assert all(val[-3] - v < 0.2 for v in val[-2:])
    state = load_state(run)
    assert state["step"] == end and state["stopped_early"] == why
    assert (run / f"model-{end}.index").is_file()

    # A rerun, even with more steps, trains nothing: same weights, same history.
    tags = []
    again, metrics2, history2 = train(
        base_dir, run, dataclasses.replace(STOPPING, steps=50), tags=tags
    )
    assert "is complete; nothing to train" in capsys.readouterr().out
    assert history2 == history and metrics2["steps"] == end
    assert_weights_close(again.weights_numpy(), model.weights_numpy(), atol=0)
    assert load_state(run)["step"] == end and tags == [(STOPPED_TAG, why)]

    # Without early stopping the same run goes on to `steps`: the key is what stopped it.
    _, metrics3, _ = train(base_dir, run, cfg(steps=end + 2, val_every=1))
    assert metrics3["steps"] == end + 2


def test_a_resumed_run_keeps_counting_towards_its_stop(base_dir, tmp_path):
    _, metrics, _ = train(base_dir, tmp_path / "straight", STOPPING)
    stop = metrics["steps"]
    # The same run cut one step short of its stop (by steps), then resumed with more steps.
    run = tmp_path / "run"
    train(base_dir, run, dataclasses.replace(STOPPING, steps=stop - 1))
    assert load_state(run)["early_stopping"]["since"] == 1
    _, metrics, history = train(base_dir, run, STOPPING)
    assert metrics["steps"] == stop  # a fresh count would have gone on past it
    assert steps_of(history) == list(range(1, stop + 1))


def test_early_stopping_without_validation_data_names_the_key(base_dir, tmp_path):
    model = load_model(base_dir)
    with pytest.raises(Gpt2tuneError, match=r"train\.early_stopping_patience = 2: needs a "):
        fit(model, TOKENS, VAL[:0], STOPPING, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def falls_then_rises(base_dir, run, end: int = 12, **changes):
    """Steps 1..4 on VAL's pattern (val_loss falls), then to `end` on another at a 10 times
    higher rate (it goes on falling for a few steps, Adam's momentum, then rises far)."""
    first = cfg(steps=4, val_every=1, **changes)
    train(base_dir, run, first)
    then = dataclasses.replace(first, steps=end, learning_rate=10 * first.learning_rate)
    return train(base_dir, run, then, tokens=OTHER)


def test_the_best_checkpoint_is_kept_and_assembled_as_asked(base_dir, tmp_path):
    run = tmp_path / "run"
    latest, _, history = falls_then_rises(base_dir, run)
    val = dict((s, v) for s, v in history["val_loss"])
    best_step = min(val, key=val.get)
    assert 1 <= best_step < 12 and val[12] > val[best_step] + 1, val
    state = load_state(run)
    assert state["best"] == {"step": best_step, "val_loss": val[best_step]}
    assert sorted(p.name for p in (run / BEST_DIR).glob("*.index")) == [f"model-{best_step}.index"]
    assert sorted(p.name for p in run.glob("*.index")) == ["model-12.index"]  # keep 1

    # The weights of the best step, from the same run stopped there.
    at_best, _, _ = falls_then_rises(base_dir, tmp_path / "to_best", end=best_step)
    for which, expected, step in (("best", at_best, best_step), ("latest", latest, 12)):
        prefix, got_step, words = assembled_checkpoint(run, state, which)
        assert got_step == step and f"step {step}" in words
        out = tmp_path / which
        assemble(base_dir, run, out, prefix)
        assert_weights_close(load_model(out).weights_numpy(), expected.weights_numpy())
    assert not np.allclose(at_best.params["model/wte"], latest.params["model/wte"])


def test_best_falls_back_to_latest_without_validation(base_dir, tmp_path):
    run = tmp_path / "run"
    train(base_dir, run, cfg(steps=4, val_every=1))  # a best from validation ...
    assert (run / BEST_DIR).is_dir()
    model = load_model(base_dir)  # ... then the run replaced by one without validation
    fit(model, TOKENS, VAL[:0], cfg(steps=3, restore_from="fresh"), run, progress=False)
    state = load_state(run)
    assert "best" not in state and not (run / BEST_DIR).exists()
    prefix, step, words = assembled_checkpoint(run, state, "best")
    assert (prefix.name, step) == ("model-3", 3)
    assert "assemble.checkpoint: best, but the run had no validation loss" in words


def test_keep_checkpoints_keeps_the_newest_and_the_best(base_dir, tmp_path):
    run = tmp_path / "run"
    _, _, history = falls_then_rises(base_dir, run, save_every=1, keep_checkpoints=3)
    val = dict((s, v) for s, v in history["val_loss"])
    best_step = min(val, key=val.get)
    assert best_step < 10, val  # so the best is not among the newest three
    assert sorted(p.name for p in run.glob("model-*.index")) == [
        "model-10.index", "model-11.index", "model-12.index",
    ]  # fmt: skip
    assert [p.name for p in (run / BEST_DIR).glob("*.index")] == [f"model-{best_step}.index"]
    assert load_state(run)["checkpoints"] == [10, 11, 12]
    # Each kept checkpoint is whole: a run resumed from model-10 (state pointed back) works.
    state = load_state(run)
    (run / "train_state.json").write_text(json.dumps(dict(state, step=10, checkpoints=[10])))
    _, metrics, _ = train(base_dir, run, cfg(steps=12, val_every=1, save_every=1), tokens=OTHER)
    assert metrics["steps"] == 12 and load_state(run)["checkpoints"] == [12]


BAD = {
    ("train", "early_stopping_patience", -1): "train.early_stopping_patience = -1: must be an "
    "integer >= 0 (0 = off; needs a validation loss and train.val_every > 0)",
    ("train", "early_stopping_min_delta", -0.5): "train.early_stopping_min_delta = -0.5: must "
    "be a number >= 0",
    ("train", "keep_checkpoints", 0): "train.keep_checkpoints = 0: must be an integer >= 1",
    ("assemble", "checkpoint", "worst"): 'assemble.checkpoint = "worst": must be one of best, '
    "latest",
}


@pytest.mark.parametrize("where", list(BAD), ids=lambda w: f"{w[0]}.{w[1]}")
def test_a_bad_value_is_refused_in_one_line_naming_the_key(where):
    section, name, value = where
    raw = copy.deepcopy(default_raw())
    raw[section][name] = value
    with pytest.raises(Gpt2tuneError) as info:
        validate_params(raw)
    assert str(info.value) == f"params.yaml: {BAD[where]}"


def test_early_stopping_needs_periodic_validation():
    raw = copy.deepcopy(default_raw())
    raw["train"].update(early_stopping_patience=3, val_every=0)
    with pytest.raises(Gpt2tuneError, match=r"^params.yaml: train.early_stopping_patience = 3: "
                       r"needs train.val_every > 0 [^\n]*$"):  # fmt: skip
        validate_params(raw)
