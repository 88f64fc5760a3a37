"""A run folder holds one run, and a training with other settings never overwrites it: the
saved run is moved aside whole, to checkpoint/kept/<fingerprint>-step<N>/, with one line
saying so, and a later training with its settings brings it back and continues it. Real
TensorFlow on the tiny model of helpers.training, in process."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.training import TOKENS, VAL, cfg

from gpt2tune.model.checkpoint import load_model
from gpt2tune.train.loop import fit

FIRST, OTHER = "1f1f1f1f1f1f1f1f", "2e2e2e2e2e2e2e2e"  # two settings' fingerprints


def train(base_dir: Path, run_dir: Path, fp: str, steps: int, **changes) -> dict:
    """fit the tiny model for `steps` with fingerprint `fp` in `run_dir`; the loss history."""
    c = cfg(steps=steps, save_every=2, **changes)
    return fit(load_model(base_dir), TOKENS, VAL, c, run_dir, run_fingerprint=fp,
               progress=False)[1]  # fmt: skip


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "train_state.json").read_text())


def test_a_run_of_other_settings_is_kept_aside_then_continued(base_dir, tmp_path, capsys):
    run_dir = tmp_path / "checkpoint" / "run1"
    kept = tmp_path / "checkpoint" / "kept"
    train(base_dir, run_dir, FIRST, 3)  # a long run stopped at step 3 (as Ctrl-C leaves it)
    before = files(run_dir)
    capsys.readouterr()

    train(base_dir, run_dir, OTHER, 2)  # a quick run with other settings
    out = capsys.readouterr().out
    first = kept / f"{FIRST[:12]}-step3"
    line = [x for x in out.splitlines() if x.startswith("kept ")]
    assert line == [
        f"kept the run that was in {run_dir} (3 steps, of other settings or data) in {first}: "
        f"training with its settings again continues it; `rm -r {first}` deletes it"
    ], out
    assert files(first) == before  # untouched, whole
    assert state(run_dir) == {**state(run_dir), "step": 2, "fingerprint": OTHER}

    # The first settings again, with the run's full length: it comes back and continues,
    # and the quick run is kept aside in its turn.
    history = train(base_dir, run_dir, FIRST, 6)
    out = capsys.readouterr().out
    assert f"continuing the run kept in {first} (3 steps): it is {run_dir} again" in out, out
    assert "resuming from step 3" in out
    assert [s for s, _ in history["loss"]] == list(range(1, 7))
    assert state(run_dir)["step"] == 6 and not first.exists()
    assert sorted(p.name for p in kept.iterdir()) == [f"{OTHER[:12]}-step2"]


def test_a_longer_run_of_the_same_settings_is_kept_not_cut_short(base_dir, tmp_path, capsys):
    run_dir = tmp_path / "run1"
    train(base_dir, run_dir, FIRST, 4)
    train(base_dir, run_dir, FIRST, 2)  # fewer steps than the saved run has: a new run
    out = capsys.readouterr().out
    assert "(4 steps, more than train.steps = 2)" in out, out
    assert state(tmp_path / "kept" / f"{FIRST[:12]}-step4")["step"] == 4
    assert state(run_dir)["step"] == 2

    # A second kept run of the same name does not replace the first.
    train(base_dir, run_dir, FIRST, 4, restore_from="fresh")
    train(base_dir, run_dir, OTHER, 2)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [
        f"{FIRST[:12]}-step4", f"{FIRST[:12]}-step4-2",
    ]  # fmt: skip
    capsys.readouterr()
    train(base_dir, run_dir, FIRST, 4)  # complete and kept: brought back, reported, not trained
    out = capsys.readouterr().out
    assert "continuing the run kept in" in out and "already holds this run's 4 steps" in out


def test_restore_from_fresh_still_starts_over_in_place(base_dir, tmp_path, capsys):
    run_dir = tmp_path / "run1"
    train(base_dir, run_dir, FIRST, 2)
    train(base_dir, run_dir, OTHER, 2, restore_from="fresh")
    assert "replacing" in capsys.readouterr().out
    assert not (tmp_path / "kept").exists() and state(run_dir)["fingerprint"] == OTHER
