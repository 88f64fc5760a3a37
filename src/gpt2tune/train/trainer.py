"""The train step: compiled forward, backward and optimizer step of one model under a
tf.distribute strategy, and the evaluation loss.

Speed and memory knobs nshepperd's script did not have: mixed precision (bfloat16, or float16
with dynamic loss scaling, here), an XLA-compiled train step, and recomputing each block in
the backward pass (his `memory_saving_gradients`, here `tf.recompute_grad`). Gradients are
averaged across replicas and over `accumulate_gradients` micro-batches.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gpt2tune.config.params import TrainParams
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.model import lora
from gpt2tune.model.gpt2 import GPT2, forward
from gpt2tune.train.optim import Optimizer

# train.precision -> the dtype the forward pass computes in (variables stay float32).
COMPUTE_DTYPES = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


def is_transformer_layer(name: str) -> bool:
    """`model/h3/...`: what only_train_transformer_layers trains (nshepperd's `'/h' in name`);
    the embeddings wte, wpe and the final layer norm ln_f stay frozen."""
    return name.startswith("model/h")


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
    weights: tf.Tensor | None = None,
) -> tf.Tensor:
    """Mean next-token cross-entropy over windows [batch, len], in float32 whatever the
    compute dtype: the model reads `inputs` (default windows[:, :-1]; a noised copy in
    training) and predicts windows[:, 1:]. See `forward` for `dtype` and `recompute`.
    `weights` [batch, len - 1] (a loss mask, data.prompt_field): the sum of each target's
    loss times its weight instead; a weight 0 target adds exactly 0, gradient included."""
    inputs = windows[:, :-1] if inputs is None else inputs
    logits, _ = forward(params, hparams, inputs, dtype=dtype, recompute=recompute)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=windows[:, 1:], logits=logits)
    if weights is None:
        return tf.reduce_mean(losses)
    # where, not a product: a masked target's loss (even inf) then adds 0, not nan.
    return tf.reduce_sum(tf.where(weights > 0, losses * weights, 0.0))


def target_weights(masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(weights of the targets masks[..., 1:], their count): each target whose mask is 1
    weighs 1 / the count of such targets in all of `masks`, so summing the weighted losses of
    every micro-batch and replica gives their mean over the whole step."""
    targets = tf.cast(masks[..., 1:], tf.float32)
    count = tf.reduce_sum(targets)
    return targets / tf.maximum(count, 1.0), count


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
        self.dtype = COMPUTE_DTYPES[cfg.precision]
        with strategy.scope():
            self.trained = self._trained_variables(model, cfg)
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
        # With a loss mask (data.prompt_field): the same steps over the masked targets only.
        self.train_step_masked = tf.function(
            self._train_step_masked, input_signature=[spec, spec, spec],
            jit_compile=cfg.xla and whole,
        )  # fmt: skip
        pair = tf.TensorSpec([None, None], tf.int32)
        self.eval_step_masked = tf.function(self._eval_step_masked, input_signature=[pair, pair])

    def _trained_variables(self, model: GPT2, cfg: TrainParams) -> dict[str, tf.Variable]:
        """What the optimizer updates: with train.lora_rank, only new LoRA adapters (the model's
        weights stay frozen and get no gradients or slots; lora.py); else the model's weights,
        or only its blocks' with only_train_transformer_layers."""
        self.adapters = None
        if cfg.lora_rank:
            self.adapters = lora.Adapters(
                model.hparams, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed
            )
            lora.attach(model, self.adapters)  # evaluation and samples see them too
            return self.adapters.variables
        return {
            n: v
            for n, v in model.params.items()
            if is_transformer_layer(n) or not cfg.only_train_transformer_layers
        }

    def saved(self) -> dict[str, tf.Variable]:
        """The trained state a run folder keeps besides the optimizer's: the model's weights,
        or with LoRA only the adapters (the base model stays in models/<name>)."""
        return self.model.params if self.adapters is None else self.adapters.saved()

    def _shard(self, windows: tf.Tensor):
        n = self.replicas
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: windows[ctx.replica_id_in_sync_group :: n]
        )

    def _replica_grads(self, windows, inputs, weights=None):
        # The variables are read here, outside XLA: a jit-compiled function that reads a
        # MirroredVariable's copy on another device fails ("Trying to access resource ...
        # located in device CPU:1 from device CPU:0", an XLA known issue); tensors are fine.
        variables = {**self.model.params, **self.trained}  # the model's, unless LoRA's
        values = {n: tf.convert_to_tensor(v) for n, v in variables.items()}
        scale = tf.constant(1.0) if self.loss_scale is None else tf.identity(self.loss_scale.scale)
        return self._grads_fn(values, windows, inputs, scale, weights)

    def _loss_and_grads(self, values: dict[str, tf.Tensor], windows, inputs, scale, weights=None):
        """Loss and gradients (of the trained tensors) of one replica's windows; float16
        scales the loss up before the backward pass (so small gradients do not underflow)
        and the gradients down after."""
        trained = [values[n] for n in self.trained]
        with tf.GradientTape() as tape:
            tape.watch(trained)
            if self.adapters is not None:  # B times alpha / rank, inside the tape
                values = lora.scaled(values, self.adapters.scale)
            loss = lm_loss(
                values, self.model.hparams, windows, inputs,
                dtype=self.dtype, recompute=self.cfg.memory_saving_gradients, weights=weights,
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

    def _train_step_masked(self, windows: tf.Tensor, inputs: tf.Tensor, masks: tf.Tensor):
        """_train_step with loss masks [accumulate, batch, len] beside the windows: the loss
        is the mean over the targets whose mask is 1 in the whole step, every micro-batch and
        replica together (a window with none adds nothing; each replica's loss is its share of
        that mean, so they are summed, not averaged). A step without any such target changes
        nothing."""
        add = tf.distribute.ReduceOp.SUM
        names = list(self.trained)
        weights, count = target_weights(masks)
        total_loss, total = 0.0, [tf.zeros_like(v) for v in self.trained.values()]
        for a in range(self.cfg.accumulate_gradients):
            shards = (self._shard(windows[a]), self._shard(inputs[a]), self._shard(weights[a]))
            loss, grads = self.strategy.run(self._replica_grads, args=shards)
            total_loss += self.strategy.reduce(add, loss, axis=None)
            total = [
                t + self.strategy.reduce(add, g, axis=None)
                for t, g in zip(total, grads, strict=True)
            ]
        finite = True if self.loss_scale is None else self.loss_scale.update(total)
        if tf.logical_and(finite, count > 0):
            self.opt.apply(dict(zip(names, total, strict=True)))
        return total_loss

    def step(
        self, windows: np.ndarray, inputs: np.ndarray | None = None, masks: np.ndarray | None = None
    ) -> float:
        """One optimizer step on windows [accumulate, batch, len] (inputs: the model's view of
        windows[..., :-1], e.g. noised; default the clean tokens; masks: the loss masks of
        the windows, data.prompt_field's, or None: every target counts); returns the loss."""
        inputs = windows[..., :-1] if inputs is None else inputs
        args = tf.constant(windows, tf.int32), tf.constant(inputs, tf.int32)
        if masks is None:
            return float(self.train_step(*args))
        return float(self.train_step_masked(*args, tf.constant(masks, tf.int32)))

    def _eval_step(self, windows: tf.Tensor) -> tf.Tensor:
        params = self.model.forward_params()  # with LoRA's adapters when there are
        return lm_loss(params, self.model.hparams, windows, dtype=self.dtype)

    def _eval_step_masked(self, windows: tf.Tensor, masks: tf.Tensor):
        """(sum of the losses of the targets whose mask is 1, their count)."""
        params = self.model.forward_params()
        targets = tf.cast(masks[:, 1:], tf.float32)
        total = lm_loss(params, self.model.hparams, windows, dtype=self.dtype, weights=targets)
        return total, tf.reduce_sum(targets)

    def eval_loss(self, windows: np.ndarray, masks: np.ndarray | None = None) -> float:
        """Mean loss over windows [k, len], evaluated batch_size at a time; with loss `masks`
        [k, len], the mean over the targets whose mask is 1 only."""
        b = self.cfg.batch_size
        if masks is not None:
            pairs = [(windows[i : i + b], masks[i : i + b]) for i in range(0, len(windows), b)]
            sums = [self.eval_step_masked(tf.constant(w), tf.constant(m)) for w, m in pairs]
            count = sum(float(n) for _, n in sums)
            return sum(float(t) for t, _ in sums) / max(count, 1.0)
        losses = [
            float(self.eval_step(tf.constant(windows[i : i + b]))) * len(windows[i : i + b])
            for i in range(0, len(windows), b)
        ]
        return sum(losses) / len(windows)
