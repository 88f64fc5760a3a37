"""Optimizers: a registry of what each one is, and (below it) how each one steps.

The registry is plain data, importable without TensorFlow, so that the params rules
(`train.optimizer`'s choices, which decay it accepts) and the memory estimate (how many
float32 slots per weight) read it: a new optimizer is one entry here plus its update rule.
TensorFlow is imported inside the functions that step, for the same reason.

Every optimizer shares what `Optimizer.apply` does around the rule: gradients clipped to
`train.grad_clip` global norm, the learning rate of `learning_rate_at`, and weight decay as
the spec's kind says, of weight matrices only (biases and layer-norm gains, rank-1 tensors,
are never decayed, as in GPT-2 practice).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

    from gpt2tune.config.params import TrainParams

# One variable's update: (weight, its slots in the spec's order, gradient) -> None.
Update = Callable[..., None]


@dataclass(frozen=True)
class OptimizerSpec:
    slots: tuple[str, ...]  # per-weight slot variables, named `<weight>/<slot>` as TF1 names them
    weight_decay: str  # "none" (a non-zero train.weight_decay is refused), "decoupled" or "l2"
    help: str  # one line for params.yaml, docs/parameters.md and --help
    # (strategy, learning rate, step) -> the per-variable Update of this step: what is the same
    # for every variable (the rate, Adam's bias corrections) is computed once per step.
    rule: Callable[..., Update]


# Adam's constants, TF1's AdamOptimizer defaults (what nshepperd's train.py used).
BETA1, BETA2, EPSILON = 0.9, 0.999, 1e-8


def adam_rule(strategy: tf.distribute.Strategy, lr: tf.Tensor, step: tf.Tensor) -> Update:
    """TF1's AdamOptimizer update through its fused kernel: m, v and the weight in one pass
    over memory instead of eight elementwise ops (the step is memory-bound here)."""
    import tensorflow as tf

    t = tf.cast(step, tf.float32)
    beta1_power, beta2_power = BETA1**t, BETA2**t

    def kernel(var, m, v, g):
        return tf.raw_ops.ResourceApplyAdam(
            var=var.handle, m=m.handle, v=v.handle, beta1_power=beta1_power,
            beta2_power=beta2_power, lr=lr, beta1=BETA1, beta2=BETA2, epsilon=EPSILON, grad=g,
        )  # fmt: skip

    def update(var, slots, g):
        # Per device copy under MirroredStrategy; a plain call on one device.
        strategy.extended.update(var, kernel, args=(*slots, g), group=True)

    return update


def sgd_rule(strategy: tf.distribute.Strategy, lr: tf.Tensor, step: tf.Tensor) -> Update:
    """Plain gradient descent: w -= lr * g."""

    def update(var, slots, g):
        var.assign_sub(lr * g)

    return update


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adam": OptimizerSpec(
        ("Adam", "Adam_1"), "none", "TF1's AdamOptimizer, as nshepperd's", adam_rule
    ),
    "adamw": OptimizerSpec(
        ("Adam", "Adam_1"), "decoupled", "Adam with decoupled weight decay", adam_rule
    ),
    "sgd": OptimizerSpec((), "l2", "plain gradient descent, weight decay as an L2 term", sgd_rule),
}


def learning_rate_at(cfg: TrainParams, step) -> tf.Tensor:
    """The learning rate of optimizer step `step` (1-based): a linear warm-up over
    `warmup_steps`, then constant, or a cosine decay that starts at the peak and would reach 0
    one step after `steps` (so no step is wasted at rate 0)."""
    import tensorflow as tf

    step = tf.cast(step, tf.float32)
    rate = tf.constant(cfg.learning_rate, tf.float32)
    if cfg.warmup_steps:
        rate *= tf.minimum(1.0, step / cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = tf.clip_by_value((step - cfg.warmup_steps - 1) / span, 0.0, 1.0)
        rate *= 0.5 * (1.0 + tf.cos(math.pi * progress))
    return rate


class Optimizer:
    """One optimizer step of `cfg.optimizer` (an OPTIMIZERS entry) for `params`, the trained
    variables: clip, decay as the spec says, then the spec's update rule.

    Slots are variables named `<weight>/<slot>` (Adam's: `/Adam` and `/Adam_1`, as TF1 names
    them) and the step count `global_step`: the names the run folder's checkpoints use.
    """

    def __init__(
        self,
        params: dict[str, tf.Variable],
        cfg: TrainParams,
        strategy: tf.distribute.Strategy | None = None,
    ):
        import tensorflow as tf

        self.cfg, self.params = cfg, params
        self.spec = OPTIMIZERS[cfg.optimizer]
        self.strategy = strategy or tf.distribute.get_strategy()
        # slot name -> weight name -> variable
        self.slot_vars: dict[str, dict[str, tf.Variable]] = {
            slot: {
                n: tf.Variable(np.zeros(var.shape, np.float32), trainable=False, name=f"{n}/{slot}")
                for n, var in params.items()
            }
            for slot in self.spec.slots
        }
        self.t = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")

    @property
    def m(self) -> dict[str, tf.Variable]:
        """Adam's first moments (empty for an optimizer without slots)."""
        return self.slot_vars[self.spec.slots[0]] if self.spec.slots else {}

    @property
    def v(self) -> dict[str, tf.Variable]:
        """Adam's second moments (empty for an optimizer with fewer than two slots)."""
        return self.slot_vars[self.spec.slots[1]] if len(self.spec.slots) > 1 else {}

    def apply(self, grads: dict[str, tf.Tensor]) -> None:
        import tensorflow as tf

        cfg, kind = self.cfg, self.spec.weight_decay
        names = list(self.params)
        if cfg.grad_clip:
            clipped, _ = tf.clip_by_global_norm([grads[n] for n in names], cfg.grad_clip)
            grads = dict(zip(names, clipped, strict=True))
        step = self.t.assign_add(1)
        lr = learning_rate_at(cfg, step)
        update = self.spec.rule(self.strategy, lr, step)
        for n, var in self.params.items():
            g = grads[n]
            decay = cfg.weight_decay if len(var.shape) >= 2 and kind != "none" else 0.0
            if decay and kind == "l2":  # a term of the loss: its gradient joins g's
                g = g + decay * var
            if decay and kind == "decoupled":  # from the weight before the step
                var.assign_sub(lr * decay * var)
            update(var, [self.slot_vars[s][n] for s in self.spec.slots], g)

    def slots(self) -> dict[str, tf.Variable]:
        """The optimizer's state under its checkpoint names."""
        out = {f"{n}/{s}": var for s in self.spec.slots for n, var in self.slot_vars[s].items()}
        out["global_step"] = self.t
        return out
