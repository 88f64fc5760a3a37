"""The run folder: the latest weights, the optimizer's slots and the run's state, written so a
crash loses nothing, and read back to continue a run (resume) rather than restart it.

`checkpoint/run1` holds the weights under OpenAI's names plus the optimizer's slots
(`<name>/Adam`, `<name>/Adam_1`, `global_step`, like TF1), `train_state.json` and the loss
history. A rerun with the same settings (same `fingerprint`) continues from it; a rerun with
different settings moves it aside to `checkpoint/kept/` and starts from the base model, and a
later rerun with the first settings brings it back and continues it (`settle`). Also here:
what the loss history becomes for DVC (the metrics summary and the plot files), and the lock
that keeps one training per run folder (see "One training per run folder" below).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from gpt2tune.config.params import TrainParams
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import LockBusy, display_path, exclusive_lock, write_text_atomic
from gpt2tune.model.checkpoint import read_weights, weights_digest, write_checkpoint
from gpt2tune.paths import LOSS_PLOTS, kept_runs
from gpt2tune.train.keeping import finished_early, prune

if TYPE_CHECKING:
    from gpt2tune.model.gpt2 import GPT2
    from gpt2tune.train.trainer import Trainer

STATE_FILE = "train_state.json"
HISTORY_FILE = "history.json"  # older run folders: one history, any step
HISTORY_SUFFIX = ".history.json"  # model-<step>.history.json: the history up to <step>


# Settings that change when or how a run is observed, or how fast it goes, but not the
# weights it computes: changing them continues a saved run instead of restarting it.
NOT_FINGERPRINTED = (
    "steps", "sample_every", "sample_length", "save_every", "val_every", "val_batch_count",
    "max_minutes", "memory_saving_gradients", "xla", "strategy",
    "early_stopping_patience", "early_stopping_min_delta", "keep_checkpoints",
)  # fmt: skip


LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets")


def fingerprint(cfg: TrainParams, base: str, data_stats: dict) -> str:
    """What must be equal for a saved run to be continued rather than restarted.

    Step counts and logging intervals are left out, so raising `train.steps` continues a
    finished run; but a cosine schedule depends on `steps`, so there it counts.
    """
    train = {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    if not cfg.lora_rank:  # full fine-tuning: the other LoRA keys change nothing, and a run
        for k in LORA_KEYS:  # saved before they existed keeps its fingerprint
            del train[k]
    else:
        train["lora_targets"] = sorted(cfg.lora_targets)  # a list or tuple, in any order
    if cfg.lr_schedule == "cosine":
        train["steps"] = cfg.steps
    blob = json.dumps({"train": train, "base": base, "data": data_stats}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_tensors(trainer: Trainer) -> dict[str, tf.Variable]:
    """Everything a resumed run needs: the weights (with LoRA only the adapters: the base is
    models/<name>), the optimizer's slots and its step, and float16's loss scale."""
    tensors = {**trainer.saved(), **trainer.opt.slots()}
    if trainer.loss_scale is not None:
        tensors["loss_scale"] = trainer.loss_scale.scale
        tensors["loss_scale_good_steps"] = trainer.loss_scale.good_steps
    return tensors


def save_state(
    run_dir: Path,
    trainer: Trainer,
    step: int,
    history: dict,
    extra: dict,
    keep_steps: Iterable[int] = (),
) -> None:
    """Write weights + slots as `model-{step}` (and point `checkpoint` at it), then the loss
    history beside it, and last the state, which is what makes the new step count. Then
    delete the checkpoints other than this one and `keep_steps` (train.keep_checkpoints,
    keeping.py), each with its history.

    The history belongs to its checkpoint (`model-{step}.history.json`, removed with it): a
    save that fails part-way, even one of a different run, leaves the state, the checkpoint
    and the history it names as they were.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = run_tensors(trainer)
    prefix = f"model-{step}"
    write_checkpoint(run_dir, prefix, tensors)
    write_text_atomic(run_dir / f"{prefix}{HISTORY_SUFFIX}", json.dumps(history))
    write_text_atomic(run_dir / STATE_FILE, json.dumps({"step": step, **extra}, indent=2))
    prune(run_dir, {step, *keep_steps})
    (run_dir / HISTORY_FILE).unlink(missing_ok=True)  # the one history of older run folders


def load_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def resumable_state(
    run_dir: Path, run_fingerprint: str, steps: int, base: Mapping | None = None
) -> dict | None:
    """The saved state if it is this run's (see `_own_state`) and stopped short of `steps`."""
    state = _own_state(run_dir, run_fingerprint, base)
    return state if state and state["step"] < steps else None


def complete_state(
    run_dir: Path, run_fingerprint: str, cfg: TrainParams, base: Mapping | None = None
) -> dict | None:
    """The saved state if it is this run's and complete: it has exactly `cfg.steps` steps, or
    it stopped early and would stop again (keeping.finished_early). Its metrics can be written
    again without recomputing a step."""
    state = _own_state(run_dir, run_fingerprint, base)
    if not state:
        return None
    done = state["step"] == cfg.steps or finished_early(run_dir, state, run_fingerprint, cfg)
    return state if done else None


def _own_state(run_dir: Path, run_fingerprint: str, base: Mapping | None = None) -> dict | None:
    """The saved state if it has this run's settings (`run_fingerprint`) and started from the
    same weights (`base`, see `starting_weights`; a state from before bases were recorded
    passes), else None."""
    state = load_state(Path(run_dir))
    if state and state.get("fingerprint") == run_fingerprint and isinstance(state["step"], int):
        if not same_base(state, base):
            return None
        # Only if its checkpoint is really there (someone may have deleted model-N.*).
        if Path(run_dir, f"model-{state['step']}.index").is_file():
            return state
    return None


def restore(run_dir: Path, trainer: Trainer, step: int) -> dict:
    """Load the weights and Adam slots `save_state` wrote at `step` (the state file's step);
    returns the loss history up to that step. A LoRA run folder holds only the adapters: the
    frozen weights under them are train.restore_from's again when it names a folder (the
    caller has already loaded models/<name> into the model), so a resumed run continues on
    the weights it started on.

    `save_state` writes train_state.json last and deletes older checkpoints after it, so a
    crash (or a second Ctrl-C) part-way through a save leaves the state at the previous step,
    whose checkpoint is still there, while `checkpoint` and history.json may already speak of
    the newer one: both are read as of the state's step, not trusted on their own.
    """
    if trainer.adapters is not None and restore_from_path(trainer.cfg):
        load_weights(trainer.model, trainer.cfg.restore_from)
    reader = tf.train.load_checkpoint(str(Path(run_dir) / f"model-{step}"))
    for name, var in run_tensors(trainer).items():
        var.assign(reader.get_tensor(name))
    return load_history(run_dir, step)


def load_history(run_dir: Path, step: int) -> dict:
    """The loss history saved with checkpoint `step` (a run folder from before per-checkpoint
    histories: its history.json, up to `step`)."""
    own = Path(run_dir) / f"model-{step}{HISTORY_SUFFIX}"
    path = own if own.is_file() else Path(run_dir) / HISTORY_FILE
    try:
        return history_upto(json.loads(path.read_text()), step)
    except (OSError, ValueError) as e:
        raise Gpt2tuneError(
            f"{path}: the loss history of step {step} is unreadable ({e}); delete {run_dir} "
            "to train from the start"
        ) from None


def start_point(
    run_dir: Path,
    trainer: Trainer,
    cfg: TrainParams,
    run_fingerprint: str,
    base: Mapping | None = None,
) -> tuple[int, dict]:
    """Where `fit` starts, as `cfg.restore_from` says: (the step, the loss history up to it).

    "latest" continues `run_dir` when it holds a run with the same `run_fingerprint` that
    stopped before `cfg.steps` and started from the same weights (`base`) (`settle` has put it
    there if it was kept aside); otherwise (and always with "fresh") training starts from the
    model's weights, or from the weights at `restore_from` when it is a path. Says which.
    """
    resumed = None
    if cfg.restore_from != "fresh":
        resumed = resumable_state(run_dir, run_fingerprint, cfg.steps, base)
    if resumed:
        start = resumed["step"]
        history = restore(run_dir, trainer, start)
        print(f"resuming from step {start} in {run_dir}")
        return start, history
    if load_state(run_dir) and cfg.restore_from == "fresh":
        print(f"training from the start (train.restore_from: fresh); replacing {run_dir}")
    if restore_from_path(cfg):
        load_weights(trainer.model, cfg.restore_from)
        print(f"training from the weights in {cfg.restore_from}")
    return 0, {"loss": [], "val_loss": []}


def restore_from_path(cfg: TrainParams) -> str | None:
    """train.restore_from when it names weights to start from (not "latest" or "fresh")."""
    return None if cfg.restore_from in ("latest", "fresh") else cfg.restore_from


def starting_weights(cfg: TrainParams, model: GPT2) -> dict[str, str]:
    """What a run records (train_state.json's "base") of the weights it starts from:
    {"digest"} of `model`'s (models/<name>), or {"path", "digest"} of `restore_from`'s when it
    names a folder or checkpoint, which this reads, so a path without weights for this model
    is refused before the training makes its first change on disk.

    Resume and reuse compare it (`same_base`); assemble merges LoRA adapters into the path's
    weights and checks the digest (checkpoint.assemble)."""
    path = restore_from_path(cfg)
    if path is None:
        return {"digest": weights_digest(model.weights_numpy())}
    return {"path": path, "digest": weights_digest(_read_restore_from(path, model.hparams))}


def same_base(state: Mapping, base: Mapping | None) -> bool:
    """Whether the saved `state` started from the weights `base` describes (either unknown:
    yes, as in run folders from before bases were recorded)."""
    saved = state.get("base")
    return not (base and isinstance(saved, Mapping)) or saved.get("digest") == base["digest"]


# Never losing another run
# ------------------------
# One run folder holds one run. A training with other settings (or data) used to start in it
# from the base model and overwrite the saved run: Ctrl-C'd at step 11 of 1000, then a quick
# smoke run, and the 11 steps were gone. `settle` moves such a run aside, whole, to
# checkpoint/kept/<fingerprint>-step<N>/ (one rename), and brings it back when a training with
# its settings comes again, so continuing it takes nothing but its settings. Only
# `restore_from: fresh` (asked for by name) still starts over in the run folder itself.


def settle(
    run_dir: str | os.PathLike, run_fingerprint: str, cfg: TrainParams, base: Mapping | None = None
) -> dict | None:
    """Make `run_dir` hold this run if one is saved, and nothing of another run; returns the
    state of this run (resumable or complete), or None when training starts from the start.

    A saved run of other settings, of other starting weights than `base`, or of these with
    more steps than `cfg.steps`, is moved to
    `kept_runs(run_dir)`; a run kept there with this fingerprint that this training can
    continue or report (the most steps) is moved back. Each move says so in one line. With
    `restore_from: fresh` nothing moves."""
    if cfg.restore_from == "fresh":
        return None
    run_dir = Path(run_dir)
    own = _usable_state(run_dir, run_fingerprint, cfg, base)
    if own:
        return own
    saved = load_state(run_dir)
    if saved:
        _keep_aside(run_dir, saved, run_fingerprint, cfg.steps, base)
    kept = [(s, d) for d in _kept_folders(run_dir)
            if (s := _usable_state(d, run_fingerprint, cfg, base))]  # fmt: skip
    if not kept:
        return None
    state, folder = max(kept, key=lambda found: found[0]["step"])
    os.rename(folder, run_dir)
    print(f"continuing the run kept in {display_path(folder)} ({_steps(state['step'])}): "
          f"it is {display_path(run_dir)} again")  # fmt: skip
    return state


def _usable_state(
    run_dir: Path, run_fingerprint: str, cfg: TrainParams, base: Mapping | None
) -> dict | None:
    return complete_state(run_dir, run_fingerprint, cfg, base) or resumable_state(
        run_dir, run_fingerprint, cfg.steps, base
    )


def _kept_folders(run_dir: Path) -> list[Path]:
    kept = kept_runs(run_dir)
    return sorted(p for p in kept.iterdir() if p.is_dir()) if kept.is_dir() else []


def _steps(n: object) -> str:
    return f"{n} step{'' if n == 1 else 's'}"


def _keep_aside(
    run_dir: Path, saved: dict, run_fingerprint: str, steps: int, base: Mapping | None
) -> Path:
    """Move the run in `run_dir` (state `saved`) to a new folder of kept_runs(run_dir), named
    by its fingerprint and step; say what was kept, where, and how to continue or remove it."""
    fp, step = str(saved.get("fingerprint") or "unknown"), saved.get("step")
    name = f"{fp[:12]}-step{step}"
    kept = kept_runs(run_dir)
    kept.mkdir(parents=True, exist_ok=True)
    dest, n = kept / name, 1
    while dest.exists():  # never over another kept run
        n += 1
        dest = kept / f"{name}-{n}"
    os.rename(run_dir, dest)
    if fp == run_fingerprint and not same_base(saved, base):
        why = "started from other weights: the base model or train.restore_from changed"
        back = "from those weights again continues it"
    elif fp == run_fingerprint:
        why, back = f"more than train.steps = {steps}", f"with train.steps >= {step} uses it"
    else:
        why, back = "of other settings or data", "with its settings again continues it"
    where = display_path(dest)
    print(f"kept the run that was in {display_path(run_dir)} ({_steps(step)}, {why}) in "
          f"{where}: training {back}; `rm -r {where}` deletes it")  # fmt: skip
    return dest


def _read_restore_from(path: str, hparams: dict) -> dict:
    try:
        return read_weights(path, hparams)
    except Gpt2tuneError as e:
        raise Gpt2tuneError(f"params.yaml: train.restore_from = {path!r}: {e}") from None


def load_weights(model: GPT2, path: str) -> None:
    """restore_from: <path>: start from the weights of a model folder, run folder or checkpoint
    prefix (only the weights: the optimizer starts afresh, as in nshepperd's train.py)."""
    weights = _read_restore_from(path, model.hparams)
    for name, var in model.params.items():
        var.assign(weights[name])


def history_upto(history: dict, step: int) -> dict:
    return {k: [e for e in v if e[0] <= step] for k, v in history.items()}


def summary(history: dict, steps: int, tokens_per_s: float, tokens_seen: int = 0) -> dict:
    """The run's results: what two identical runs reproduce, plus `tokens_per_s` (a timing;
    the train stage keeps it out of the DVC metrics, see `TIMING_KEYS`).

    `loss_last10` is the mean training loss of the last 10 steps (one step's loss is noisy);
    `base_val_loss` the validation loss of the starting weights, before step 1.
    """
    last = [loss for _, loss in history["loss"][-10:]]
    out = {"steps": steps, "tokens_seen": tokens_seen}
    out["loss_last10"] = float(np.mean(last)) if last else None
    val = history["val_loss"]
    if val and val[0][0] == 0:
        out["base_val_loss"] = val[0][1]
    if val:
        v = val[-1][1]
        out.update(val_loss=v, val_perplexity=math.exp(min(v, 700)))
    out["tokens_per_s"] = tokens_per_s
    return out


TIMING_KEYS = ("tokens_per_s", "train_seconds")  # in `summary` but not reproducible


def write_plots(history: dict, folder: str | os.PathLike | None = None) -> None:
    """Per-step train and validation loss as TSV files for `dvc plots` (metrics/loss.tsv and
    val_loss.tsv, or the same names in `folder`)."""
    for key, path in LOSS_PLOTS.items():
        path = path if folder is None else Path(folder) / path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [f"step\t{key}"] + [f"{s}\t{v:.6f}" for s, v in history[key]]
        write_text_atomic(path, "\n".join(rows) + "\n")


# One training per run folder
# ---------------------------
# Two trainings writing `checkpoint/run1` at once would overwrite each other's checkpoints and
# state (the second used to die half-way with "check free disk space"). `hold(run_dir)` takes
# an exclusive `flock` on `<run_dir>.lock`, beside the run folder (so that the folder DVC
# hashes holds only the run), and refuses at once, in one line, when another process has it
# (gpt2tune.files.exclusive_lock: released by the kernel even after kill -9).
#
# A save killed part-way (or failing on a full disk) can leave temporary files in the run
# folder: TensorFlow's `*.tempstate*` data files and `.<name>.tmp` of `write_text_atomic`.
# `clean_leftovers` removes them; the train stage calls it once it holds the lock, so no other
# training is writing them at that moment.


def lock_path(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + ".lock")


@contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold `run_dir`'s lock for the `with` block; Gpt2tuneError if another process holds it."""
    with ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(lock_path(run_dir)))
        except LockBusy as e:
            raise Gpt2tuneError(
                f"another training (process {e.holder}) is using {display_path(run_dir)}; "
                "wait for it to finish (or stop it) and run again"
            ) from None
        yield


def clean_leftovers(run_dir: str | os.PathLike) -> list[str]:
    """Remove the temporary files an interrupted save left in `run_dir`; returns their names."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if _is_temporary(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an interrupted save from {run_dir}")
    return sorted(p.name for p in stale)


def _is_temporary(name: str) -> bool:
    return ".tempstate" in name or (name.startswith(".") and name.endswith(".tmp"))
