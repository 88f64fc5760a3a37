"""The traced graphs of training and generation, counted op by op: a refactor that should not
change speed must leave these counts as they were (compared before and after in
bench/NOTES.md). Timings on a shared 2-core machine swing by 2x with the load; the graph
TensorFlow runs does not.

    python bench/graphs.py [--n_layer 2 --n_embd 32 --n_head 2 --n_ctx 64 --n_vocab 512]

Prints one JSON object: for `Trainer.train_step` (adam, sgd, LoRA rank 4) and the sampler's
compiled loop, the total op count over the function and every function it calls, and the
count per op type.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter

from common import add_shape_args, hparams


def op_counts(concrete) -> dict:
    """Ops of a concrete function's graph and of every function in its library, by type."""
    graph_def = concrete.graph.as_graph_def()
    ops = Counter(n.op for n in graph_def.node)
    for fn in graph_def.library.function:
        ops.update(n.op for n in fn.node_def)
    return {"total": sum(ops.values()), "by_type": dict(sorted(ops.items()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap, n_layer=2, n_embd=32, n_head=2, n_ctx=64, n_vocab=512)
    args = ap.parse_args()

    import tensorflow as tf

    from gpt2tune.config.params import TrainParams
    from gpt2tune.generation.sampler import _build_sampler
    from gpt2tune.model.gpt2 import init_model
    from gpt2tune.train.trainer import Trainer

    hp = hparams(args)
    base = TrainParams(n_ctx=hp["n_ctx"], batch_size=2)
    configs = {
        "adam": base,
        "sgd": dataclasses.replace(base, optimizer="sgd"),
        "lora": dataclasses.replace(base, lora_rank=4),
    }
    out = {}
    for name, cfg in configs.items():
        trainer = Trainer(init_model(hp, seed=0), cfg, tf.distribute.get_strategy())
        out[f"train_step/{name}"] = op_counts(trainer.train_step.get_concrete_function())
    out["sampler"] = op_counts(_build_sampler(init_model(hp, seed=0)).get_concrete_function())
    print(json.dumps({k: v["total"] for k, v in out.items()}))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
