"""Stopping and keeping: early stopping on the validation loss, the best checkpoint beside the
latest, and how many checkpoints a run folder keeps.

- Early stopping (`train.early_stopping_patience`, `train.early_stopping_min_delta`): a
  validation loss "improves" when it is below the last one that improved by at least
  min_delta (Keras' EarlyStopping, with the step-0 loss of the starting weights as the first);
  after `patience` validations without, training stops, checkpointed, like a finished run.
  The counters live in train_state.json, so a resumed run goes on counting where it was, and
  a rerun of a run that stopped early is complete: it trains no further.
- The best checkpoint: the weights of the lowest validation loss (step 0 included: if
  training never beat the starting weights, those are the best), in `<run>/best/model-<step>`
  with its own `checkpoint` pointer. Written when a validation finds a new lowest loss, by new
  name then pointer; the state names the step, and `best/` holds at most that one and a newer
  one not yet in the state (so a crash never leaves the state naming a deleted best).
- Retention (`train.keep_checkpoints`): the newest N `model-<step>` of the run, listed in the
  state; older ones go once a newer state is written, so the checkpoint a run resumes from is
  never the one deleted. `best/` is apart, never pruned by it.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from gpt2tune.config.params import TrainParams
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.model.checkpoint import checkpoint_prefix, write_checkpoint

BEST_DIR = "best"
STOPPED_TAG = "gpt2tune.stopped_early"  # MLflow tag: why and where a run stopped early
_STEP = re.compile(r"model-(\d+)\.")


@dataclass
class Watch:
    """What a run remembers of its validation losses."""

    best_step: int | None = None  # the lowest val_loss so far: the best checkpoint
    best_val_loss: float = math.inf
    ref_val_loss: float = math.inf  # the last val_loss that improved by min_delta
    since: int = 0  # validations since then

    def see(self, step: int, val_loss: float, min_delta: float) -> bool:
        """Count one validation; True if it is the lowest so far (a new best checkpoint)."""
        if val_loss < self.ref_val_loss and self.ref_val_loss - val_loss >= min_delta:
            self.ref_val_loss, self.since = val_loss, 0
        else:
            self.since += 1
        if val_loss < self.best_val_loss:
            self.best_step, self.best_val_loss = step, val_loss
            return True
        return False

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.since >= patience

    def state(self) -> dict:
        if self.best_step is None:  # no validation: nothing to remember (and no inf in JSON)
            return {}
        return {
            "best": {"step": self.best_step, "val_loss": self.best_val_loss},
            "early_stopping": {"val_loss": self.ref_val_loss, "since": self.since},
        }

    @classmethod
    def from_state(cls, state: Mapping) -> Watch:
        best, early = state.get("best"), state.get("early_stopping")
        if not best or not early:
            return cls()
        return cls(best["step"], best["val_loss"], early["val_loss"], early["since"])


def stop_reason(step: int, cfg: TrainParams) -> str:
    return (
        f"step {step}: no val_loss improvement >= {cfg.early_stopping_min_delta:g} in "
        f"{cfg.early_stopping_patience} validations"
    )


def finished_early(run_dir: Path, state: Mapping | None, fp: str, cfg: TrainParams) -> bool:
    """Whether the saved `state` is this run (same fingerprint), stopped early, and would stop
    again with today's patience: then it is complete. A raised patience (or 0) continues it."""
    return bool(
        state
        and state.get("fingerprint") == fp
        and state.get("stopped_early")
        and Watch.from_state(state).should_stop(cfg.early_stopping_patience)
        and Path(run_dir, f"model-{state['step']}.index").is_file()
    )


def kept_steps(previous: Iterable[int], step: int, keep: int) -> list[int]:
    """The newest `keep` checkpoints after saving `step`."""
    return sorted(set(previous) | {step})[-keep:]


def prune(folder: Path, keep: Iterable[int | None]) -> None:
    """Delete folder's `model-<step>.*` files whose step is not in `keep`."""
    keep = set(keep)
    for f in folder.glob("model-*"):
        m = _STEP.match(f.name)
        if m and int(m[1]) not in keep:
            f.unlink(missing_ok=True)


class Keeper:
    """One run's early-stopping counters, best checkpoint and list of kept checkpoints.

    `on_disk`: the state the run folder held when the run began (another run's, or the one
    this run resumes: then `resume` takes it over). Its best stays until this run's first
    state replaces it.
    """

    def __init__(self, run_dir: Path, cfg: TrainParams, on_disk: Mapping | None) -> None:
        self.run_dir, self.cfg = run_dir, cfg
        self.watch = Watch()
        self.kept: list[int] = []
        self.saved_best = ((on_disk or {}).get("best") or {}).get("step")
        self.last_validated: int | None = None

    def resume(self, state: Mapping) -> None:
        """Carry on the counters and the kept checkpoints of the resumed `state`."""
        self.watch = Watch.from_state(state)
        step = state["step"]
        listed = state.get("checkpoints") or [step]
        self.kept = [s for s in listed if s <= step and self._has(s)]

    def _has(self, step: int) -> bool:
        return (self.run_dir / f"model-{step}.index").is_file()

    def validated(self, step: int, val_loss: float, params: Mapping[str, tf.Variable]) -> None:
        self.last_validated = step
        if self.watch.see(step, val_loss, self.cfg.early_stopping_min_delta):
            folder = self.run_dir / BEST_DIR
            folder.mkdir(parents=True, exist_ok=True)
            write_checkpoint(folder, f"model-{step}", params)
            prune(folder, {step, self.saved_best})

    def stop_due(self, step: int) -> bool:
        """True right after a validation at `step` that used up the patience."""
        return self.last_validated == step and self.watch.should_stop(
            self.cfg.early_stopping_patience
        )

    def saving(self, step: int) -> dict:
        """What the state saved at `step` records; call `saved` once it is written."""
        self.kept = kept_steps(self.kept, step, self.cfg.keep_checkpoints)
        return {"checkpoints": self.kept, **self.watch.state()}

    def saved(self) -> None:
        best = self.run_dir / BEST_DIR
        if self.watch.best_step is None:  # no validation this run: an older best is stale
            shutil.rmtree(best, ignore_errors=True)
        elif best.is_dir():
            prune(best, {self.watch.best_step})
        self.saved_best = self.watch.best_step


def assembled_checkpoint(run_dir: Path, state: Mapping | None, which: str) -> tuple[Path, int, str]:
    """(checkpoint prefix, its step, in words) for assemble: `which` is "best" or "latest";
    best falls back to latest when the run had no validation loss."""
    if not state:  # a bare checkpoint (copied in, or from before train_state.json): its latest
        if not (run_dir / "checkpoint").is_file():
            raise Gpt2tuneError(f"{run_dir} holds no training state: run `dvc repro train` first")
        prefix = checkpoint_prefix(run_dir)
        step = int(m[1]) if (m := _STEP.match(prefix.name + ".")) else 0
        return prefix, step, f"the latest checkpoint ({prefix.name}; the run has no state file)"
    best = state.get("best")
    if which == "best" and best:
        prefix = run_dir / BEST_DIR / f"model-{best['step']}"
        if not Path(f"{prefix}.index").is_file():
            raise Gpt2tuneError(
                f"{prefix}.index is missing (the best checkpoint the run's state names); "
                "rerun training with `dvc repro -f train`, or set assemble.checkpoint: latest"
            )
        words = f"the best checkpoint (step {best['step']}, val_loss {best['val_loss']:.4f})"
        return prefix, best["step"], words
    step = state["step"]
    words = f"the latest checkpoint (step {step})"
    if which == "best":
        words += "; assemble.checkpoint: best, but the run had no validation loss"
    return run_dir / f"model-{step}", step, words
