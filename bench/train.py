"""Training tokens/s of gpt2tune's train step, its FLOPs and MFU, and (--peer) OpenAI's.

    python bench/train.py                          # 124M shapes, sequence 256, batch 2
    python bench/train.py --peer                   # and OpenAI's graph, same run, same machine
    python bench/train.py --n_layer 2 --n_embd 64 --n_head 2 --seq 32 --steps 2
    python bench/train.py --precision mixed_bfloat16 --xla --recompute   # the train.* knobs

The step is gpt2tune.train.trainer.Trainer.train_step, the one the train stage runs (Adam, float32),
on random windows of seq + 1 tokens (seq inputs, seq targets) with random weights.

FLOPs per token (attention included; matmuls only, forward + backward = 3 x forward):
    6 * (12 * n_layer * n_embd**2 + n_vocab * n_embd) + 12 * n_layer * seq * n_embd
The first term is 2 FLOPs per multiply-add of every weight matrix (q/k/v, projection, MLP,
and the tied output embedding) times 3; the second is QK^T and AV over all seq keys (the
causal mask is applied to a full seq x seq product, so all of it is computed). MFU is
tokens/s x FLOPs per token over the best float32 tf.matmul rate measured in this run.

With --peer the measurement alternates, --rounds times: gpt2tune's steps, then OpenAI's
(bench/peer.py, a fresh process), so both see the same machine load. Per side the median
step time of each round, and the best round, count. The last line is JSON.
"""

import argparse
import json
import resource
import statistics
import time

import numpy as np
from common import add_shape_args, hparams, loadavg, matmul_rate, run_peer


def flops_per_token(hp: dict, seq: int) -> int:
    L, E, V = hp["n_layer"], hp["n_embd"], hp["n_vocab"]
    return 6 * (12 * L * E * E + V * E) + 12 * L * seq * E


def gpt2tune_stepper(hp: dict, seq: int, batch: int, knobs: dict):
    """A function running one train step on fresh random windows, returning its seconds.
    `knobs`: train.* settings (precision, xla, memory_saving_gradients, strategy)."""
    from gpt2tune.config.params import TrainParams
    from gpt2tune.model.gpt2 import init_model
    from gpt2tune.train.distribute import make_strategy
    from gpt2tune.train.trainer import Trainer

    cfg = TrainParams(batch_size=batch, n_ctx=seq, learning_rate=2e-5, steps=10**6,
                      sample_every=0, save_every=0, val_every=0, val_batch_count=1,
                      **knobs)  # fmt: skip
    strategy = make_strategy(cfg.strategy)
    with strategy.scope():
        model = init_model(hp, seed=0)
    trainer = Trainer(model, cfg, strategy)
    rng = np.random.default_rng(0)

    def step() -> float:
        w = rng.integers(0, hp["n_vocab"] - 1, (1, batch, seq + 1)).astype(np.int32)
        t0 = time.perf_counter()
        trainer.step(w)
        return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--seq", type=int, default=256, help="tokens per training window")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of ours then peer (--peer)")
    ap.add_argument("--peer", action="store_true", help="also time OpenAI's code (gpt-2-simple)")
    ap.add_argument("--precision", default="float32", help="train.precision")
    ap.add_argument("--xla", action="store_true", help="train.xla")
    ap.add_argument("--recompute", action="store_true", help="train.memory_saving_gradients")
    ap.add_argument("--strategy", default="auto", help="train.strategy")
    args = ap.parse_args()
    hp = hparams(args)
    tokens = args.batch * args.seq

    knobs = dict(precision=args.precision, xla=args.xla,
                 memory_saving_gradients=args.recompute, strategy=args.strategy)  # fmt: skip
    step = gpt2tune_stepper(hp, args.seq, args.batch, knobs)
    first = step()
    ours, peer, peer_first = [], [], None
    for _ in range(args.rounds if args.peer else 1):
        ours.append(statistics.median(step() for _ in range(args.steps)))
        if args.peer:
            cfg = {**hp, "seq": args.seq, "batch": args.batch, "steps": args.steps}
            r = run_peer("train", cfg)
            peer.append(statistics.median(r["step_times"]))
            peer_first = r["first_step_s"]
    rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # before matmuls
    # The model's own MLP and output-embedding matmuls, and a large square one.
    E = hp["n_embd"]
    rate, rates = matmul_rate([(tokens, E, 4 * E), (tokens, E, hp["n_vocab"]), (2048, 2048, 2048)])
    s = min(ours)
    fpt = flops_per_token(hp, args.seq)
    result = {**hp, "seq": args.seq, "batch": args.batch, **knobs,
              "first_step_s": round(first, 2),
              "s_per_step": round(s, 3), "tokens_per_s": round(tokens / s, 1),
              "flops_per_token": fpt,
              "flops_formula": "6*(12*L*E^2 + V*E) + 12*L*seq*E",
              "matmul_gflops": round(rate / 1e9, 1), "matmul_shapes_gflops": rates,
              "mfu": round(tokens / s * fpt / rate, 3),
              "peak_rss_mb": rss_mb,
              "rounds_s_per_step": [round(t, 3) for t in ours]}  # fmt: skip
    if peer:
        p = min(peer)
        result.update({"peer_first_step_s": round(peer_first, 2), "peer_s_per_step": round(p, 3),
                       "peer_tokens_per_s": round(tokens / p, 1),
                       "peer_rounds_s_per_step": [round(t, 3) for t in peer],
                       "speedup_vs_peer": round(p / s, 2)})  # fmt: skip
    result["loadavg"] = loadavg()
    print(f"gpt2tune: {result['tokens_per_s']} tokens/s, MFU {result['mfu']:.0%} of "
          f"{result['matmul_gflops']} GFLOP/s" + (f"; OpenAI: {result['peer_tokens_per_s']} "
          f"tokens/s; speedup {result['speedup_vs_peer']}x" if peer else ""))  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
