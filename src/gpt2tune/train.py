"""Fine-tuning: Adam on random windows of the encoded corpus, with checkpoints you can resume.

The loop follows N. Shepperd's `train.py` that the notebooks used: by default a constant
learning rate, Adam (beta1 0.9, beta2 0.999, eps 1e-8, as TF1's AdamOptimizer), random
contiguous windows, samples and a validation loss every few steps; his options (noise,
only_train_transformer_layers, accumulate_gradients, restore_from, ...) are `train.*` keys.
Differences, and why:

- One `tf.distribute` code path (`train.strategy`): the default strategy on a CPU or one
  GPU, MirroredStrategy over all local GPUs, MultiWorkerMirroredStrategy over machines;
  gradients are averaged across replicas.
- Speed and memory knobs nshepperd's script did not have: mixed precision (bfloat16, or
  float16 with dynamic loss scaling), an XLA-compiled train step, and recomputing each block
  in the backward pass (his `memory_saving_gradients`, here `tf.recompute_grad`).
- A run folder (`checkpoint/run1`) holds the latest weights under OpenAI's names plus Adam's
  slots (`<name>/Adam`, `<name>/Adam_1`, like TF1), `train_state.json` and the loss history.
  A rerun with the same settings continues from it (e.g. after Ctrl-C, or with more steps);
  a rerun with different settings starts from the base model again.
- The windows of step s (and their noise) are drawn from a generator seeded with (seed, s),
  so a resumed run sees exactly the batches an uninterrupted one would have.
- Ctrl-C, SIGTERM and `max_minutes` stop after the step in flight and save it; a kill -9
  loses only the steps since the last save (`save_every`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from gpt2tune.batches import eval_windows, random_windows, window_length
from gpt2tune.checkpoint import write_checkpoint
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import write_text_atomic
from gpt2tune.model import GPT2, forward
from gpt2tune.params import TrainParams

STATE_FILE = "train_state.json"
HISTORY_FILE = "history.json"


# train.precision -> the dtype the forward pass computes in (variables stay float32).
COMPUTE_DTYPES = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The tf.distribute strategy `train.strategy` names.

    one: the default strategy (one device). mirrored: MirroredStrategy over all local GPUs,
    or over the logical CPUs when there is no GPU (so it can be tested on a CPU).
    multi_worker: MultiWorkerMirroredStrategy, configured by the TF_CONFIG environment
    variable. auto: mirrored when more than one GPU is visible, else one.
    """
    if name == "multi_worker":
        # First: it must configure TF's collective ops before anything (even listing the
        # devices) starts the runtime.
        check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "one"
    if name == "one":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    raise Gpt2tuneError(f"train.strategy = {name!r}: must be auto, one, mirrored or multi_worker")


def check_tf_config(text: str | None) -> dict:
    """TF_CONFIG parsed, or an error saying what multi_worker needs."""
    example = (
        'e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
        '"task": {"type": "worker", "index": 0}}\''
    )
    if not text:
        raise Gpt2tuneError(
            f"train.strategy = multi_worker needs the TF_CONFIG variable, {example}"
        )
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        task = config["task"]
        ok = (
            isinstance(workers, list)
            and workers
            and task["type"] in ("worker", "chief")
            and 0 <= int(task["index"]) < len(workers) + (task["type"] == "chief")
        )
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise Gpt2tuneError(f"TF_CONFIG = {text!r} is not a valid worker cluster, {example}")
    return config


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process keeps checkpoints, metrics and MLflow: always, except on the
    non-chief workers of a multi-worker run (TF's pattern: they write to a temp folder)."""
    return bool(strategy.extended.should_checkpoint)


def worker_run_dir(run_dir: Path, tmp: str | os.PathLike) -> Path:
    """Where a non-chief worker keeps its checkpoints: a copy, under `tmp`, of the chief's
    run folder as it is now, so that when the chief resumes from it (it must be visible to
    every worker, e.g. on a shared filesystem) the worker resumes from the same step."""
    copy = Path(tmp) / Path(run_dir).name
    if Path(run_dir).is_dir():
        shutil.copytree(run_dir, copy)
    return copy


def learning_rate_at(cfg: TrainParams, step) -> tf.Tensor:
    """The learning rate of optimizer step `step` (1-based): a linear warm-up over
    `warmup_steps`, then constant, or a cosine decay that starts at the peak and would reach 0
    one step after `steps` (so no step is wasted at rate 0)."""
    step = tf.cast(step, tf.float32)
    rate = tf.constant(cfg.learning_rate, tf.float32)
    if cfg.warmup_steps:
        rate *= tf.minimum(1.0, step / cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = tf.clip_by_value((step - cfg.warmup_steps - 1) / span, 0.0, 1.0)
        rate *= 0.5 * (1.0 + tf.cos(math.pi * progress))
    return rate


def is_transformer_layer(name: str) -> bool:
    """`model/h3/...`: what only_train_transformer_layers trains (nshepperd's `'/h' in name`);
    the embeddings wte, wpe and the final layer norm ln_f stay frozen."""
    return name.startswith("model/h")


class Optimizer:
    """One optimizer step for `params` (the trained variables): gradients clipped to
    `grad_clip` global norm, then

    - adam: TF1's AdamOptimizer update, slots named as TF1 names them (`<name>/Adam`, `_1`);
    - adamw: the same plus decoupled weight decay (Loshchilov & Hutter) of weight matrices;
    - sgd: plain gradient descent, weight decay as an L2 term on the weight matrices.

    Biases and layer-norm gains (rank-1 tensors) are never decayed, as in GPT-2 practice.
    """

    def __init__(
        self,
        params: dict[str, tf.Variable],
        cfg: TrainParams,
        strategy: tf.distribute.Strategy | None = None,
    ):
        self.cfg, self.params = cfg, params
        self.strategy = strategy or tf.distribute.get_strategy()
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
        self.m: dict[str, tf.Variable] = {}
        self.v: dict[str, tf.Variable] = {}
        if cfg.optimizer in ("adam", "adamw"):
            for n, var in params.items():
                zeros = np.zeros(var.shape, np.float32)
                self.m[n] = tf.Variable(zeros, trainable=False, name=f"{n}/Adam")
                self.v[n] = tf.Variable(zeros, trainable=False, name=f"{n}/Adam_1")
        self.t = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")

    def apply(self, grads: dict[str, tf.Tensor]) -> None:
        cfg = self.cfg
        names = list(self.params)
        if cfg.grad_clip:
            clipped, _ = tf.clip_by_global_norm([grads[n] for n in names], cfg.grad_clip)
            grads = dict(zip(names, clipped, strict=True))
        step = self.t.assign_add(1)
        lr = learning_rate_at(cfg, step)
        t = tf.cast(step, tf.float32)
        beta1_power, beta2_power = self.beta1**t, self.beta2**t

        def adam(var, m, v, g):
            # TF1's fused kernel, what AdamOptimizer runs: m, v and the weight in one pass
            # over memory instead of eight elementwise ops (the step is memory-bound here).
            return tf.raw_ops.ResourceApplyAdam(
                var=var.handle, m=m.handle, v=v.handle, beta1_power=beta1_power,
                beta2_power=beta2_power, lr=lr, beta1=self.beta1, beta2=self.beta2,
                epsilon=self.eps, grad=g,
            )  # fmt: skip

        for n, var in self.params.items():
            g = grads[n]
            decay = cfg.weight_decay if len(var.shape) >= 2 else 0.0
            if cfg.optimizer == "sgd":
                var.assign_sub(lr * (g + decay * var) if decay else lr * g)
                continue
            if cfg.optimizer == "adamw" and decay:  # decoupled: from the weight before the step
                var.assign_sub(lr * decay * var)
            # Per device copy under MirroredStrategy; a plain call on one device.
            self.strategy.extended.update(var, adam, args=(self.m[n], self.v[n], g), group=True)

    def slots(self) -> dict[str, tf.Variable]:
        out = {f"{n}/Adam": s for n, s in self.m.items()}
        out.update({f"{n}/Adam_1": s for n, s in self.v.items()})
        out["global_step"] = self.t
        return out


def add_noise(windows: np.ndarray, fraction: float, n_vocab: int, rng) -> np.ndarray:
    """nshepperd's `--noise`: each token replaced by a uniformly random one with probability
    `fraction`. Applied to the model's inputs only; the targets stay the real text."""
    if not fraction:
        return windows
    swap = rng.random(windows.shape) < fraction
    return np.where(swap, rng.integers(0, n_vocab, windows.shape), windows).astype(windows.dtype)


class DynamicLossScale:
    """float16 loss scaling: the loss is multiplied by `scale` before the backward pass so
    small gradients do not underflow float16, and the gradients divided by it after.

    A step whose gradients are not finite is skipped and the scale halved; after
    `growth_interval` finite steps in a row it is doubled (Keras' LossScaleOptimizer rule).
    """

    def __init__(self, initial: float = 2.0**15, growth_interval: int = 2000):
        self.growth_interval = growth_interval
        self.scale = tf.Variable(initial, dtype=tf.float32, trainable=False, name="loss_scale")
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")

    def update(self, grads: list[tf.Tensor]) -> tf.Tensor:
        """Adjust the scale to these (unscaled) gradients; returns whether to apply them."""
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        good = tf.where(finite, self.good_steps + 1, 0)
        grow = good >= self.growth_interval
        self.scale.assign(tf.where(finite, tf.where(grow, 2.0, 1.0), 0.5) * self.scale)
        self.good_steps.assign(tf.where(grow, tf.zeros_like(good), good))
        return finite


def lm_loss(
    params,
    hparams,
    windows: tf.Tensor,
    inputs: tf.Tensor | None = None,
    *,
    dtype: tf.DType = tf.float32,
    recompute: bool = False,
) -> tf.Tensor:
    """Mean next-token cross-entropy over windows [batch, len], in float32 whatever the
    compute dtype: the model reads `inputs` (default windows[:, :-1]; a noised copy in
    training) and predicts windows[:, 1:]. See `forward` for `dtype` and `recompute`."""
    inputs = windows[:, :-1] if inputs is None else inputs
    logits, _ = forward(params, hparams, inputs, dtype=dtype, recompute=recompute)
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=windows[:, 1:], logits=logits)
    )


class Trainer:
    """Compiled train and eval steps for one model, optimizer and distribution strategy."""

    def __init__(self, model: GPT2, cfg: TrainParams, strategy: tf.distribute.Strategy):
        self.model, self.cfg, self.strategy = model, cfg, strategy
        self.replicas = strategy.num_replicas_in_sync
        if cfg.batch_size % self.replicas:
            raise Gpt2tuneError(
                f"params.yaml: train.batch_size = {cfg.batch_size}: must be a multiple of the "
                f"{self.replicas} replicas (GPUs) in use"
            )
        self.trained = {
            n: v
            for n, v in model.params.items()
            if is_transformer_layer(n) or not cfg.only_train_transformer_layers
        }
        self.dtype = COMPUTE_DTYPES[cfg.precision]
        with strategy.scope():
            self.opt = Optimizer(self.trained, cfg, strategy)
            float16 = cfg.precision == "mixed_float16"
            self.loss_scale = DynamicLossScale() if float16 else None
        # XLA compiles the whole step (forward, backward, optimizer) on one device; with several
        # replicas only each replica's forward and backward, since an XLA cluster cannot
        # reach the other devices' copies of the variables (MirroredStrategy's all-reduce).
        whole = self.replicas == 1
        self._grads_fn = (
            tf.function(self._loss_and_grads, jit_compile=True)
            if cfg.xla and not whole
            else self._loss_and_grads
        )
        spec = tf.TensorSpec([None, None, None], tf.int32)
        self.train_step = tf.function(
            self._train_step, input_signature=[spec, spec], jit_compile=cfg.xla and whole
        )
        self.eval_step = tf.function(
            self._eval_step, input_signature=[tf.TensorSpec([None, None], tf.int32)]
        )

    def _shard(self, windows: tf.Tensor):
        n = self.replicas
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: windows[ctx.replica_id_in_sync_group :: n]
        )

    def _replica_grads(self, windows, inputs):
        # The variables are read here, outside XLA: a jit-compiled function that reads a
        # MirroredVariable's copy on another device fails ("Trying to access resource ...
        # located in device CPU:1 from device CPU:0", an XLA known issue); tensors are fine.
        values = {n: tf.convert_to_tensor(v) for n, v in self.model.params.items()}
        scale = tf.constant(1.0) if self.loss_scale is None else tf.identity(self.loss_scale.scale)
        return self._grads_fn(values, windows, inputs, scale)

    def _loss_and_grads(self, values: dict[str, tf.Tensor], windows, inputs, scale):
        """Loss and gradients (of the trained tensors) of one replica's windows; float16
        scales the loss up before the backward pass (so small gradients do not underflow)
        and the gradients down after."""
        trained = [values[n] for n in self.trained]
        with tf.GradientTape() as tape:
            tape.watch(trained)
            loss = lm_loss(
                values, self.model.hparams, windows, inputs,
                dtype=self.dtype, recompute=self.cfg.memory_saving_gradients,
            )  # fmt: skip
            scaled = loss * scale
        grads = tape.gradient(scaled, trained)
        return loss, [tf.convert_to_tensor(g) / scale for g in grads]

    def _train_step(self, windows: tf.Tensor, inputs: tf.Tensor) -> tf.Tensor:
        """windows [accumulate, batch, len] and the model's (maybe noised) inputs
        [accumulate, batch, len - 1]: one optimizer step; returns the mean loss."""
        mean = tf.distribute.ReduceOp.MEAN
        names = list(self.trained)
        total_loss, total = 0.0, [tf.zeros_like(v) for v in self.trained.values()]
        for a in range(self.cfg.accumulate_gradients):
            shards = (self._shard(windows[a]), self._shard(inputs[a]))
            loss, grads = self.strategy.run(self._replica_grads, args=shards)
            total_loss += self.strategy.reduce(mean, loss, axis=None)
            total = [
                t + self.strategy.reduce(mean, g, axis=None)
                for t, g in zip(total, grads, strict=True)
            ]
        k = float(self.cfg.accumulate_gradients)
        # float16: a step whose gradients overflowed is skipped (the loss scale is lowered).
        finite = True if self.loss_scale is None else self.loss_scale.update(total)
        if finite:
            self.opt.apply({n: g / k for n, g in zip(names, total, strict=True)})
        return total_loss / k

    def step(self, windows: np.ndarray, inputs: np.ndarray | None = None) -> float:
        """One optimizer step on windows [accumulate, batch, len] (inputs: the model's view of
        windows[..., :-1], e.g. noised; default the clean tokens); returns the mean loss."""
        inputs = windows[..., :-1] if inputs is None else inputs
        return float(self.train_step(tf.constant(windows, tf.int32), tf.constant(inputs, tf.int32)))

    def _eval_step(self, windows: tf.Tensor) -> tf.Tensor:
        return lm_loss(self.model.params, self.model.hparams, windows, dtype=self.dtype)

    def eval_loss(self, windows: np.ndarray) -> float:
        """Mean loss over windows [k, len], evaluated batch_size at a time."""
        b = self.cfg.batch_size
        losses = [
            float(self.eval_step(tf.constant(windows[i : i + b]))) * len(windows[i : i + b])
            for i in range(0, len(windows), b)
        ]
        return sum(losses) / len(windows)


# --- the run folder: latest weights + Adam slots + state, written so a crash loses nothing --


# Settings that change when or how a run is observed, or how fast it goes, but not the
# weights it computes: changing them continues a saved run instead of restarting it.
NOT_FINGERPRINTED = (
    "steps", "sample_every", "sample_length", "save_every", "val_every", "val_batch_count",
    "max_minutes", "memory_saving_gradients", "xla", "strategy",
)  # fmt: skip


def fingerprint(cfg: TrainParams, base: str, data_stats: dict) -> str:
    """What must be equal for a saved run to be continued rather than restarted.

    Step counts and logging intervals are left out, so raising `train.steps` continues a
    finished run; but a cosine schedule depends on `steps`, so there it counts.
    """
    train = {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    if cfg.lr_schedule == "cosine":
        train["steps"] = cfg.steps
    blob = json.dumps({"train": train, "base": base, "data": data_stats}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tensors(trainer: Trainer) -> dict[str, tf.Variable]:
    """Everything a resumed run needs: the weights, the optimizer's slots and its step, and
    float16's loss scale."""
    tensors = {**trainer.model.params, **trainer.opt.slots()}
    if trainer.loss_scale is not None:
        tensors["loss_scale"] = trainer.loss_scale.scale
        tensors["loss_scale_good_steps"] = trainer.loss_scale.good_steps
    return tensors


def save_state(run_dir: Path, trainer: Trainer, step: int, history: dict, extra: dict) -> None:
    """Write the history, weights + slots as `model-{step}` (and point `checkpoint` at it),
    and last the state, which is what makes the new step count."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(trainer)
    prefix = f"model-{step}"
    write_text_atomic(run_dir / HISTORY_FILE, json.dumps(history))
    write_checkpoint(run_dir, prefix, tensors)
    write_text_atomic(run_dir / STATE_FILE, json.dumps({"step": step, **extra}, indent=2))
    for old in run_dir.glob("model-*"):  # only the newest checkpoint is kept
        if not old.name.startswith(prefix + "."):
            old.unlink()


def load_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def resumable_state(run_dir: Path, run_fingerprint: str, steps: int) -> dict | None:
    """The saved state if it is this run's and stopped short of `steps`, else None."""
    state = load_state(Path(run_dir))
    if state and state.get("fingerprint") == run_fingerprint and state["step"] < steps:
        # Only if its checkpoint is really there (someone may have deleted model-N.*).
        if Path(run_dir, f"model-{state['step']}.index").is_file():
            return state
    return None


def restore(run_dir: Path, trainer: Trainer, step: int) -> dict:
    """Load the weights and Adam slots `save_state` wrote at `step` (the state file's step);
    returns the loss history up to that step.

    `save_state` writes train_state.json last and deletes older checkpoints after it, so a
    crash (or a second Ctrl-C) part-way through a save leaves the state at the previous step,
    whose checkpoint is still there, while `checkpoint` and history.json may already speak of
    the newer one: both are read as of the state's step, not trusted on their own.
    """
    reader = tf.train.load_checkpoint(str(Path(run_dir) / f"model-{step}"))
    for name, var in _tensors(trainer).items():
        var.assign(reader.get_tensor(name))
    return history_upto(json.loads((Path(run_dir) / HISTORY_FILE).read_text()), step)


# --- the loop -------------------------------------------------------------------------------


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
    state_extra: dict | None = None,
    progress: bool | None = None,
) -> tuple[dict, dict]:
    """Train `model` in place for `cfg.steps` steps; returns (summary metrics, loss history).

    Where training starts (`cfg.restore_from`): "latest" continues `run_dir` when it holds a
    run with the same `run_fingerprint` that stopped before `cfg.steps`, else starts from
    `model`'s weights; "fresh" always starts from them; a path starts from the weights there.
    `log_metrics({"loss": ...}, step)` is called every step and with `val_loss` every
    `cfg.val_every` steps; `log_sample(text, step)` every `cfg.sample_every`. Ctrl-C and
    SIGTERM stop after the current step, save it, and raise `Stopped`; reaching
    `cfg.max_minutes` saves and returns early (the summary's `steps` says where it ended).
    """
    started_at = time.monotonic()
    run_dir = Path(run_dir)
    strategy = strategy or tf.distribute.get_strategy()
    n_ctx = cfg.n_ctx
    if n_ctx > model.hparams["n_ctx"]:
        raise Gpt2tuneError(
            f"params.yaml: train.n_ctx = {n_ctx}: must be <= the model's n_ctx "
            f"({model.hparams['n_ctx']})"
        )
    length = window_length(len(train_tokens), n_ctx)  # fails clearly on < 2 tokens
    check_memory(model, cfg, strategy.num_replicas_in_sync)
    trainer = Trainer(model, cfg, strategy)
    val = eval_windows(val_tokens, n_ctx, cfg.val_batch_count) if len(val_tokens) >= 2 else None

    history: dict[str, list] = {"loss": [], "val_loss": []}
    start = 0
    resumed = None
    if cfg.restore_from != "fresh":
        resumed = resumable_state(run_dir, run_fingerprint, cfg.steps)
    if resumed:
        start = resumed["step"]
        history = restore(run_dir, trainer, start)
        print(f"resuming from step {start} in {run_dir}")
    else:
        saved = load_state(run_dir)
        if saved and cfg.restore_from == "fresh":
            print(f"training from the start (train.restore_from: fresh); replacing {run_dir}")
        elif saved:
            why = (
                f"it already has {saved['step']} steps"
                if saved.get("fingerprint") == run_fingerprint
                else "its settings or data differ"
            )
            print(f"training from the base model: the run in {run_dir} is not continued ({why})")
        if cfg.restore_from not in ("latest", "fresh"):
            load_weights(model, cfg.restore_from)
            print(f"training from the weights in {cfg.restore_from}")
    extra = dict(state_extra or {}, fingerprint=run_fingerprint)

    def validate(step: int) -> None:
        if val is not None:
            v = trainer.eval_loss(val)
            history["val_loss"].append([step, v])
            log_metrics({"val_loss": v}, step)

    def sample(step: int) -> None:
        # Shepperd's training samples: temperature 1, top_k 40, from <|endoftext|>.
        from gpt2tune.sample import generate

        text = generate(model, None, cfg.sample_length, top_k=40, seed=cfg.seed + step)[0]
        log_sample(text, step)

    def save(step: int) -> None:
        save_state(run_dir, trainer, step, history, extra)

    if start == 0:
        validate(0)
    windows_per_step = cfg.batch_size * cfg.accumulate_gradients
    tokens_per_step = windows_per_step * (length - 1)
    timed_tokens, timed_seconds = 0, 0.0
    deadline = started_at + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=_quiet(progress))
    end = cfg.steps
    with _stop_on_signals() as stop:
        for step in range(start + 1, cfg.steps + 1):
            rng = np.random.default_rng([cfg.seed, step])
            windows = random_windows(train_tokens, n_ctx, windows_per_step, rng)
            inputs = add_noise(windows[:, :-1], cfg.noise, model.hparams["n_vocab"], rng)
            shape = (cfg.accumulate_gradients, cfg.batch_size, -1)
            t0 = time.perf_counter()
            try:
                loss = trainer.step(windows.reshape(shape), inputs.reshape(shape))
            except tf.errors.ResourceExhaustedError:
                raise Gpt2tuneError(
                    f"out of memory in training step {step} (train.batch_size = "
                    f"{cfg.batch_size}, train.n_ctx = {n_ctx}); {_LESS_MEMORY}"
                ) from None
            dt = time.perf_counter() - t0
            if step > start + 1:  # the first step includes tracing and compilation
                timed_tokens += tokens_per_step
                timed_seconds += dt
            if not math.isfinite(loss):
                raise Gpt2tuneError(
                    f"loss became {loss} at step {step}; the last good checkpoint in {run_dir} "
                    f"is kept; lower train.learning_rate (now {cfg.learning_rate}) or set "
                    "train.grad_clip"
                )
            history["loss"].append([step, loss])
            logged = {"loss": loss, "learning_rate": float(learning_rate_at(cfg, step)),
                      "tokens_per_s": tokens_per_step / dt}  # fmt: skip
            if trainer.loss_scale is not None:  # float16: a scale stuck low means skipped steps
                logged["loss_scale"] = float(trainer.loss_scale.scale.numpy())
            log_metrics(logged, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if cfg.val_every and step % cfg.val_every == 0 and step != cfg.steps:
                validate(step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                sample(step)
            if step == cfg.steps:
                break
            # Checked after the logging, so a stopped run's history matches an uninterrupted one.
            if stop.signal:
                save(step)
                bar.close()
                print(f"\nstopped by {stop.signal}: step {step} saved in {run_dir}; "
                      "run again to continue")  # fmt: skip
                raise Stopped(stop.signal)
            if time.monotonic() >= deadline:
                end = step
                bar.close()
                print(f"\ntrain.max_minutes = {cfg.max_minutes} reached after step {step}; "
                      "raise it and run `dvc repro -f train` to continue")  # fmt: skip
                break
            if cfg.save_every and step % cfg.save_every == 0:
                save(step)
    bar.close()
    validate(end)
    save(end)
    tokens_per_s = timed_tokens / timed_seconds if timed_seconds else 0.0
    return summary(history, end, tokens_per_s), history


_LESS_MEMORY = (
    "lower train.batch_size (train.accumulate_gradients keeps the effective batch) or "
    "train.n_ctx, or set train.memory_saving_gradients: true"
)


def check_memory(model: GPT2, cfg: TrainParams, replicas: int = 1) -> None:
    """On a CPU, refuse before the first step a batch whose training would not fit in RAM.

    A GPU's free memory is not known before TensorFlow allocates it; there an out-of-memory
    error in a step becomes the same kind of one-line error instead.
    """
    from gpt2tune.memory import available_memory, n_params, training_bytes

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


def load_weights(model: GPT2, path: str) -> None:
    """restore_from: <path>: start from the weights of a model folder, run folder or checkpoint
    prefix (only the weights: the optimizer starts afresh, as in nshepperd's train.py)."""
    from gpt2tune.checkpoint import read_weights

    try:
        weights = read_weights(path, model.hparams)
    except Gpt2tuneError as e:
        raise Gpt2tuneError(f"params.yaml: train.restore_from = {path!r}: {e}") from None
    for name, var in model.params.items():
        var.assign(weights[name])


def _quiet(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # tqdm: None = only on a terminal


class Stopped(KeyboardInterrupt):
    """Training stopped on a signal after saving its last step. A KeyboardInterrupt, so that
    callers treat it as an interruption (MLflow marks the run killed, not failed)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + int(getattr(signal, self.signal_name))


class _stop_on_signals:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM (what preemptible machines and `kill` send)
    into a request to stop after the current step, so that step is finished and saved, not
    lost; a second signal interrupts at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __enter__(self):
        import signal
        import threading

        self.signal: str | None = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                self._previous[name] = signal.signal(getattr(signal, name), self._handler)
        return self

    def _handler(self, signum, frame):
        import signal

        self.signal = signal.Signals(signum).name
        self._restore()

    def _restore(self):
        import signal

        for name, previous in self._previous.items():
            signal.signal(getattr(signal, name), previous)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()
        return False


def history_upto(history: dict, step: int) -> dict:
    return {k: [e for e in v if e[0] <= step] for k, v in history.items()}


def summary(history: dict, steps: int, tokens_per_s: float) -> dict:
    """DVC metrics: final train loss (mean of the last 10 steps), validation loss, perplexity."""
    last = [loss for _, loss in history["loss"][-10:]]
    out = {"steps": steps, "loss": float(np.mean(last)) if last else None}
    out["tokens_per_s"] = tokens_per_s
    if history["val_loss"]:
        v = history["val_loss"][-1][1]
        out.update(val_loss=v, val_perplexity=math.exp(min(v, 700)))
    return out


def write_plots(history: dict, folder: str | os.PathLike) -> None:
    """Per-step train and validation loss as TSV files for `dvc plots`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("loss", "val_loss"):
        rows = [f"step\t{key}"] + [f"{s}\t{v:.6f}" for s, v in history[key]]
        write_text_atomic(folder / f"{key}.tsv", "\n".join(rows) + "\n")
