"""Optimizers: a registry of what each one is, and (below it) how each one steps.

The registry is plain data, importable without TensorFlow, so that the params rules
(`train.optimizer`'s choices, which decay it accepts) and the memory estimate (how many
float32 slots per weight) read it: a new optimizer is one entry here plus its update rule.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerSpec:
    slots: tuple[str, ...]  # per-weight slot variables, named `<weight>/<slot>` as TF1 names them
    weight_decay: str  # "none" (a non-zero train.weight_decay is refused), "decoupled" or "l2"
    help: str  # one line for params.yaml, the README and --help


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adam": OptimizerSpec(("Adam", "Adam_1"), "none", "TF1's AdamOptimizer, as nshepperd's"),
    "adamw": OptimizerSpec(("Adam", "Adam_1"), "decoupled", "Adam with decoupled weight decay"),
    "sgd": OptimizerSpec((), "l2", "plain gradient descent, weight decay as an L2 term"),
}
