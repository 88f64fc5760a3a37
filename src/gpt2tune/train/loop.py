"""Fine-tuning: the loop. Adam on random windows of the encoded corpus, with checkpoints you
can resume.

The loop follows N. Shepperd's `train.py` that the notebooks used: by default a constant
learning rate, Adam (beta1 0.9, beta2 0.999, eps 1e-8, as TF1's AdamOptimizer), random
contiguous windows, samples and a validation loss every few steps; his options (noise,
only_train_transformer_layers, accumulate_gradients, restore_from, ...) are `train.*` keys.
Differences, and why:

- One `tf.distribute` code path (`train.strategy`, distribute.py).
- Speed and memory knobs he did not have: mixed precision, XLA, recomputation (trainer.py).
- A run folder (`checkpoint/run1`, runstate.py) that a rerun with the same settings
  continues from (e.g. after Ctrl-C, or with more steps).
- The windows of step s (and their noise) are drawn from a generator seeded with (seed, s),
  so a resumed run sees exactly the batches an uninterrupted one would have.
- Ctrl-C, SIGTERM (signals.py) and `max_minutes` stop after the step in flight and save it;
  a kill -9 loses only the steps since the last save (`save_every`).

Below `fit`, the building blocks: optim.py (optimizers), trainer.py (the compiled step),
distribute.py (strategies), runstate.py (save, resume, DVC metrics and plots).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from gpt2tune.config.params import Sampling, TrainParams
from gpt2tune.data.batches import eval_windows, random_starts, take_windows, window_length
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.model.gpt2 import GPT2
from gpt2tune.stage import say
from gpt2tune.train.keeping import STOPPED_TAG, Keeper, stop_reason
from gpt2tune.train.optim import learning_rate_at
from gpt2tune.train.runstate import (
    TIMING_KEYS,
    complete_state,
    load_state,
    restore,
    save_state,
    settle,
    start_point,
    starting_weights,
    summary,
)
from gpt2tune.train.signals import Stopped, stop_on_signals
from gpt2tune.train.trainer import Trainer


def fit(
    model: GPT2,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    cfg: TrainParams,
    run_dir: str | os.PathLike,
    *,
    strategy: tf.distribute.Strategy | None = None,
    run_fingerprint: str = "",
    log_metrics: Callable[[dict, int], None] = lambda metrics, step: None,
    log_sample: Callable[[str, int], None] = lambda text, step: None,
    log_tag: Callable[[str, str], None] = lambda key, value: None,
    state_extra: dict | None = None,
    base: dict | None = None,
    progress: bool | None = None,
    train_mask: np.ndarray | None = None,
    val_mask: np.ndarray | None = None,
) -> tuple[dict, dict]:
    """Train `model` in place for `cfg.steps` steps; returns (summary metrics, loss history).

    Where training starts (`cfg.restore_from`): "latest" continues `run_dir` when it holds a
    run with the same `run_fingerprint` that stopped before `cfg.steps`, else starts from
    `model`'s weights; "fresh" always starts from them; a path starts from the weights there.
    `log_metrics({"loss": ...}, step)` is called every step and with `val_loss` every
    `cfg.val_every` steps; `log_sample(text, step)` every `cfg.sample_every`. Ctrl-C and
    SIGTERM stop after the current step, save it, and raise `Stopped`; reaching
    `cfg.max_minutes` saves and returns early (the summary's `steps` says where it ended), and
    so does early stopping (keeping.py), which also calls `log_tag(STOPPED_TAG, why)`. A
    complete run in `run_dir` (all `cfg.steps` steps, or stopped early and would stop again)
    is reused: its weights are loaded into `model`, its figures returned (without timings),
    and nothing is trained. Neither is continued nor reused if it started from other weights
    than this one: `base` (runstate.starting_weights, computed here when None) is recorded in
    the run's state and compared. `train_mask`, `val_mask` (data.prompt_field's loss masks,
    one per token, data/encoded/*_mask.npy): the loss, training's and validation's, counts
    only the targets whose mask is 1 (trainer.py); None: every target.
    """
    started_at = time.monotonic()
    strategy = strategy or tf.distribute.get_strategy()
    length = check_fits(model, train_tokens, cfg, strategy.num_replicas_in_sync)
    if cfg.early_stopping_patience and len(val_tokens) < 2:
        raise Gpt2tuneError(
            f"params.yaml: train.early_stopping_patience = {cfg.early_stopping_patience}: "
            "needs a validation loss, but there are no validation tokens; set "
            "data.val_fraction > 0 or data.val_path, or set it to 0"
        )
    base = base or starting_weights(cfg, model)  # before the adapters are attached
    trainer = Trainer(model, cfg, strategy)
    settle(run_dir, run_fingerprint, cfg, base)  # another run moves aside, kept
    run = _Run(trainer, Path(run_dir), val_tokens, (log_metrics, log_sample, log_tag),
               dict(state_extra or {}, fingerprint=run_fingerprint, base=base),
               (train_mask, val_mask))  # fmt: skip
    fresh = cfg.restore_from == "fresh"
    complete = not fresh and complete_state(run.run_dir, run_fingerprint, cfg, base)
    if complete:  # e.g. killed after its last checkpoint, or stopped early: nothing to train
        return run.reuse(complete, tokens_seen(cfg, length, complete["step"]))
    start, run.history = start_point(run.run_dir, trainer, cfg, run_fingerprint, base)
    if start == 0:
        run.validate(0)
    else:  # start_point resumed the run on disk
        run.resume()
    deadline = started_at + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    end = run.loop(train_tokens, length, start, deadline, progress)
    run.validate(end)
    run.save(end)
    metrics = summary(run.history, end, run.tokens_per_s(), tokens_seen(cfg, length, end))
    metrics["train_seconds"] = round(time.monotonic() - started_at, 3)
    return metrics, run.history


def tokens_seen(cfg: TrainParams, length: int, steps: int) -> int:
    """Tokens predicted in `steps` optimizer steps on windows of `length` tokens."""
    return steps * cfg.batch_size * cfg.accumulate_gradients * (length - 1)


def training_sampling(cfg: TrainParams, step: int) -> Sampling:
    """The settings of the training sample at `step` (every train.sample_every steps):
    Shepperd's temperature 1 and top_k 40, one sample from <|endoftext|>, seed + step. The
    samples table records them beside the text (gpt2tune.tracking.sampletable)."""
    return Sampling(nsamples=1, length=cfg.sample_length, temperature=1.0, top_k=40, top_p=0.0,
                    seed=cfg.seed + step)  # fmt: skip


class _Run:
    """One `fit`'s loop and what it keeps between steps: the loss history, the timing that
    becomes tokens/s, and where the run saves, logs and samples."""

    def __init__(
        self,
        trainer: Trainer,
        run_dir: Path,
        val_tokens: np.ndarray,
        loggers: tuple[Callable, Callable, Callable],  # log_metrics, log_sample, log_tag
        extra: dict,
        masks: tuple[np.ndarray | None, np.ndarray | None] = (None, None),  # train, val
    ):
        self.trainer, self.cfg, self.model = trainer, trainer.cfg, trainer.model
        self.train_mask, val_mask = masks
        self.run_dir, self.extra = run_dir, extra
        self.log_metrics, self.log_sample, self.log_tag = loggers
        self.on_disk = load_state(run_dir)  # before this run writes: another run's, or resumed
        self.keeper = Keeper(run_dir, self.cfg, self.on_disk)
        n = self.cfg.val_batch_count
        self.val = eval_windows(val_tokens, self.cfg.n_ctx, n) if len(val_tokens) >= 2 else None
        # The mask's windows start where the tokens' do (eval_windows: only the length counts).
        self.val_mask = None
        if self.val is not None and val_mask is not None:
            self.val_mask = eval_windows(val_mask, self.cfg.n_ctx, n)
        self.history: dict[str, list] = {"loss": [], "val_loss": []}
        self.timed_tokens, self.timed_seconds = 0, 0.0
        self.logged: dict = {}  # the last step's metrics, for the progress bar

    def loop(
        self, tokens: np.ndarray, length: int, start: int, deadline: float, progress: bool | None
    ) -> int:
        """Steps start + 1 .. cfg.steps; returns the last one taken (earlier at the deadline)."""
        cfg = self.cfg
        quiet = None if progress is None else not progress  # tqdm: None = only on a terminal
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=quiet)
        with bar, stop_on_signals() as stop:
            for step in range(start + 1, cfg.steps + 1):
                loss = self.train_step(tokens, length, step, timed=step > start + 1)
                bar.update(1)  # tqdm shows the time left; the rest is the step's own
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.logged['learning_rate']:.2e}",
                                tok_s=f"{self.logged['tokens_per_s']:,.0f}")  # fmt: skip
                if cfg.val_every and step % cfg.val_every == 0 and step != cfg.steps:
                    self.validate(step)
                if cfg.sample_every and step % cfg.sample_every == 0:
                    self.sample(step)
                if step == cfg.steps:
                    break
                # Checked after the logging, so a stopped run's history matches an
                # uninterrupted one.
                if self.keeper.stop_due(step):
                    self.stop_early(step)
                    bar.close()
                    return step
                if stop.signal:
                    self.save(step)
                    bar.close()
                    print(f"\nstopped by {stop.signal}: step {step} saved in {self.run_dir}; "
                          "run again to continue")  # fmt: skip
                    raise Stopped(stop.signal)
                if time.monotonic() >= deadline:
                    bar.close()
                    print(f"\ntrain.max_minutes = {cfg.max_minutes} reached after step "
                          f"{step}; raise it and run `dvc repro -f train` to continue")  # fmt: skip
                    return step
                if cfg.save_every and step % cfg.save_every == 0:
                    self.save(step)
        return cfg.steps

    def train_step(self, tokens: np.ndarray, length: int, step: int, timed: bool) -> float:
        """Optimizer step `step` on its windows; logs and returns its loss. `timed`: counts
        towards tokens/s (the first step of a run includes tracing and compilation)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step])
        windows_per_step = cfg.batch_size * cfg.accumulate_gradients
        starts = random_starts(len(tokens), cfg.n_ctx, windows_per_step, rng)
        windows = take_windows(tokens, starts, length)
        inputs = add_noise(windows[:, :-1], cfg.noise, self.model.hparams["n_vocab"], rng)
        shape = (cfg.accumulate_gradients, cfg.batch_size, -1)
        masks = None
        if self.train_mask is not None:
            masks = take_windows(self.train_mask, starts, length).reshape(shape)
        t0 = time.perf_counter()
        try:
            loss = self.trainer.step(windows.reshape(shape), inputs.reshape(shape), masks)
        except tf.errors.ResourceExhaustedError:
            raise Gpt2tuneError(
                f"out of memory in training step {step} (train.batch_size = "
                f"{cfg.batch_size}, train.n_ctx = {cfg.n_ctx}); {_LESS_MEMORY}"
            ) from None
        dt = time.perf_counter() - t0
        tokens_per_step = windows_per_step * (length - 1)
        if timed:
            self.timed_tokens += tokens_per_step
            self.timed_seconds += dt
        if not math.isfinite(loss):
            raise Gpt2tuneError(
                f"loss became {loss} at step {step}; the last good checkpoint in {self.run_dir} "
                f"is kept; lower train.learning_rate (now {cfg.learning_rate}) or set "
                "train.grad_clip"
            )
        self.history["loss"].append([step, loss])
        logged = {"loss": loss, "learning_rate": float(learning_rate_at(cfg, step)),
                  "tokens_per_s": tokens_per_step / dt}  # fmt: skip
        if self.trainer.loss_scale is not None:  # float16: a scale stuck low = skipped steps
            logged["loss_scale"] = float(self.trainer.loss_scale.scale.numpy())
        self.log_metrics(logged, step)
        self.logged = logged  # for the progress bar
        return loss

    def validate(self, step: int) -> None:
        done = self.history["val_loss"] and self.history["val_loss"][-1][0] == step
        if self.val is not None and not done:  # done: the loop stopped after validating
            if step == 0:  # minutes at 124M on a CPU, before the bar starts
                say(f"validating the base model ({len(self.val)} windows)...")
            v = self.trainer.eval_loss(self.val, self.val_mask)
            self.history["val_loss"].append([step, v])
            # Before step 1, the starting weights' loss: the line training has to beat.
            self.log_metrics({"val_loss": v, **({"base_val_loss": v} if step == 0 else {})}, step)
            self.keeper.validated(step, v, self.trainer.saved())  # with LoRA: the adapters

    def stop_early(self, step: int) -> None:
        why = stop_reason(step, self.cfg)
        self.extra["stopped_early"] = why  # fit saves it: a rerun knows the run is complete
        self.log_tag(STOPPED_TAG, why)
        print(f"\nstopped early at {why}; the best checkpoint is step "
              f"{self.keeper.watch.best_step}")  # fmt: skip

    def resume(self) -> None:
        self.keeper.resume(self.on_disk)
        if self.on_disk.get("stopped_early"):  # continued with a raised patience
            self.log_tag(STOPPED_TAG, f"{self.on_disk['stopped_early']} (then continued)")

    def reuse(self, state: dict, seen: int) -> tuple[dict, dict]:
        """`fit` of a complete run (`complete_state`): its weights and figures, nothing trained
        and no step timed."""
        step = state["step"]
        self.history = restore(self.run_dir, self.trainer, step)
        if state.get("stopped_early"):
            print(f"the run in {self.run_dir} stopped early ({state['stopped_early']}) and is "
                  "complete; nothing to train (raise train.early_stopping_patience, or set it "
                  "to 0, to continue it)")  # fmt: skip
            self.log_tag(STOPPED_TAG, state["stopped_early"])
        else:
            print(f"{self.run_dir} already holds this run's {step} steps: reporting them, "
                  "nothing retrained")  # fmt: skip
        metrics = summary(self.history, step, 0.0, seen)
        return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}, self.history

    def sample(self, step: int) -> None:
        from gpt2tune.generation.sampler import generate

        text = generate(self.model, None, sampling=training_sampling(self.cfg, step))[0]
        self.log_sample(text, step)

    def save(self, step: int) -> None:
        kept = self.keeper.saving(step)
        extra = dict(self.extra, **kept)
        save_state(self.run_dir, self.trainer, step, self.history, extra, kept["checkpoints"])
        self.keeper.saved()

    def tokens_per_s(self) -> float:
        return self.timed_tokens / self.timed_seconds if self.timed_seconds else 0.0


def check_fits(model: GPT2, train_tokens: np.ndarray, cfg: TrainParams, replicas: int) -> int:
    """Refuse, before anything is built, a window longer than the model's context or (see
    `check_memory`) a batch that would not fit; returns the window length."""
    if cfg.n_ctx > model.hparams["n_ctx"]:
        raise Gpt2tuneError(
            f"params.yaml: train.n_ctx = {cfg.n_ctx}: must be <= the model's n_ctx "
            f"({model.hparams['n_ctx']})"
        )
    length = window_length(len(train_tokens), cfg.n_ctx)  # fails clearly on < 2 tokens
    check_memory(model, cfg, replicas)
    return length


def add_noise(windows: np.ndarray, fraction: float, n_vocab: int, rng) -> np.ndarray:
    """nshepperd's `--noise`: each token replaced by a uniformly random one with probability
    `fraction`. Applied to the model's inputs only; the targets stay the real text."""
    if not fraction:
        return windows
    swap = rng.random(windows.shape) < fraction
    return np.where(swap, rng.integers(0, n_vocab, windows.shape), windows).astype(windows.dtype)


_LESS_MEMORY = (
    "lower train.batch_size (train.accumulate_gradients keeps the effective batch) or "
    "train.n_ctx, or set train.memory_saving_gradients: true"
)


def check_memory(model: GPT2, cfg: TrainParams, replicas: int = 1) -> None:
    """On a CPU, refuse before the first step a batch whose training would not fit in RAM.

    A GPU's free memory is not known before TensorFlow allocates it; there an out-of-memory
    error in a step becomes the same kind of one-line error instead.
    """
    from gpt2tune.model.memory import available_memory, n_params, training_bytes

    if tf.config.list_logical_devices("GPU"):
        return
    free = available_memory()
    weights = 4 * n_params(model.hparams)  # already loaded, so already out of `free`
    need = training_bytes(model.hparams, cfg, replicas) - weights
    if free is not None and need > free:
        raise Gpt2tuneError(
            f"params.yaml: train.batch_size = {cfg.batch_size} at train.n_ctx = {cfg.n_ctx} "
            f"needs about {need / 2**30:.1f} GiB of memory to train, but "
            f"{free / 2**30:.1f} GiB is free; {_LESS_MEMORY}"
        )
