"""Seconds per training step (and tokens/s) for GPT-2 124M shapes with random weights.

    python bench/train.py                       # 124M, batch 1, 1024-token windows
    python bench/train.py --n_ctx 128 --steps 5
    python bench/train.py --precision mixed_bfloat16 --xla --recompute   # the train.* knobs

The first step compiles and is reported separately; the last line is JSON.
"""

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_layer", type=int, default=12)
    ap.add_argument("--n_embd", type=int, default=768)
    ap.add_argument("--n_head", type=int, default=12)
    ap.add_argument("--n_ctx", type=int, default=1024, help="tokens per training window")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    ap.add_argument("--precision", default="float32", help="train.precision")
    ap.add_argument("--xla", action="store_true", help="train.xla")
    ap.add_argument("--recompute", action="store_true", help="train.memory_saving_gradients")
    ap.add_argument("--strategy", default="auto", help="train.strategy")
    args = ap.parse_args()

    import tensorflow as tf

    from gpt2tune.model import init_model
    from gpt2tune.params import TrainParams
    from gpt2tune.train import Trainer, make_strategy

    hp = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": args.n_embd, "n_head": args.n_head,
          "n_layer": args.n_layer}  # fmt: skip
    cfg = TrainParams(steps=args.steps + 1, batch_size=args.batch, learning_rate=2e-5, seed=0,
                      n_ctx=args.n_ctx, sample_every=0, sample_length=1, save_every=0,
                      val_every=0, val_batch_count=1, accumulate_gradients=1,
                      precision=args.precision, xla=args.xla,
                      memory_saving_gradients=args.recompute, strategy=args.strategy)  # fmt: skip
    strategy = make_strategy(args.strategy)
    with strategy.scope():
        model = init_model(hp, seed=0)
    trainer = Trainer(model, cfg, strategy)
    rng = np.random.default_rng(0)

    def step() -> float:
        w = rng.integers(0, 50256, (1, args.batch, args.n_ctx + 1)).astype(np.int32)
        t0 = time.perf_counter()
        trainer.step(w)
        return time.perf_counter() - t0

    first = step()
    times = [step() for _ in range(args.steps)]
    s = float(np.median(times))
    print(f"first step (with compile): {first:.1f} s; median of {args.steps}: {s:.2f} s/step")
    print(json.dumps({**hp, "train_n_ctx": args.n_ctx, "batch": args.batch,
                      "precision": args.precision, "xla": args.xla, "recompute": args.recompute,
                      "devices": [d.name for d in tf.config.list_logical_devices()],
                      "s_per_step": round(s, 3),
                      "tokens_per_s": round(args.batch * args.n_ctx / s, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
