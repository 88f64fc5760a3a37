"""Peak memory of training steps with and without train.memory_saving_gradients.

    python bench/memory.py                      # 12 layers, 256 wide, 512-token windows, batch 4
    python bench/memory.py --n_embd 768 --n_ctx 1024 --batch 1
    python bench/memory.py --table              # the README's computed GPU-memory table

Each setting runs in its own process (peak RSS only ever grows), builds the model and the
train step, notes its peak RSS, runs a few steps, and notes it again: the difference is what
the steps themselves needed (activations, gradients, temporaries). On a CPU this is host
memory; on a GPU the device memory would differ, so read the CPU figures as a ratio.
The last line is JSON.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from gpt2tune.memory import n_params, step_bytes


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> dict:

    from gpt2tune.distribute import make_strategy
    from gpt2tune.model import init_model
    from gpt2tune.params import TrainParams
    from gpt2tune.trainer import Trainer

    hp = {"n_vocab": 50257, "n_ctx": args.n_ctx, "n_embd": args.n_embd,
          "n_head": args.n_head, "n_layer": args.n_layer}  # fmt: skip
    cfg = TrainParams(steps=args.steps, batch_size=args.batch, n_ctx=args.n_ctx,
                      memory_saving_gradients=args.recompute, precision=args.precision)  # fmt: skip
    strategy = make_strategy("one")
    model = init_model(hp, seed=0)
    trainer = Trainer(model, cfg, strategy)
    rng = np.random.default_rng(0)
    shape = (1, args.batch, args.n_ctx + 1)
    before = peak_mb()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.step(rng.integers(0, 50256, shape))
        times.append(time.perf_counter() - t0)
    after = peak_mb()
    computed = step_bytes(hp, args.batch * args.n_ctx, args.n_ctx, bool(args.recompute), 4)
    return {"recompute": args.recompute, "peak_mb": round(after), "before_steps_mb": round(before),
            "steps_mb": round(after - before), "computed_steps_mb": round(computed / 2**20),
            "s_per_step": round(float(np.median(times[1:] or times)), 2)}  # fmt: skip


# --- the computed table ---------------------------------------------------------------------

SIZES = {"124M": (768, 12, 12), "355M": (1024, 16, 24), "774M": (1280, 20, 36),
         "1558M": (1600, 25, 48)}  # n_embd, n_head, n_layer  # fmt: skip
GPUS_GIB = (16, 24, 40, 80)
OVERHEAD_GIB = 1.0  # CUDA context, cuDNN/cuBLAS workspaces, allocator slack (a guess)


def hparams_of(size: str) -> dict:
    e, a, n = SIZES[size]
    return {"n_vocab": 50257, "n_ctx": 1024, "n_embd": e, "n_head": a, "n_layer": n}


def total_gib(size: str, batch: int, recompute: bool, mixed: bool) -> float:
    """Weights, gradients, Adam m and v in float32 (16 bytes/param; mixed precision adds a
    2-byte low-precision copy of the weights), activations, logits, overhead."""
    hp = hparams_of(size)
    states = n_params(hp) * (18 if mixed else 16)
    acts = step_bytes(hp, batch * 1024, 1024, recompute, 2 if mixed else 4)
    return (states + acts) / 2**30 + OVERHEAD_GIB


def max_batch(size: str, gib: float, recompute: bool, mixed: bool) -> int:
    b = 0
    while b < 64 and total_gib(size, b + 1, recompute, mixed) <= gib:
        b += 1
    return b


def table() -> str:
    """Markdown: the largest batch of 1024-token windows that fits, per model, GPU and options."""
    options = [("float32", False, False), ("float32 + recompute", True, False),
               ("mixed + recompute", True, True)]  # fmt: skip
    head = "| model | weights + grads + Adam | options | batch 1 needs | "
    head += " | ".join(f"{g} GB" for g in GPUS_GIB) + " |"
    rows = [head, "|" + "---|" * (4 + len(GPUS_GIB))]
    for size in SIZES:
        p = n_params(hparams_of(size))
        for name, recompute, mixed in options:
            cells = [max_batch(size, g, recompute, mixed) for g in GPUS_GIB]
            need = total_gib(size, 1, recompute, mixed)
            rows.append(
                f"| {size} | {16 * p / 2**30:.1f} GiB | {name} | {need:.1f} GiB | "
                + " | ".join(f"{c}{'+' if c == 64 else ''}" if c else "no" for c in cells)
                + " |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_layer", type=int, default=12)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--n_head", type=int, default=4)
    ap.add_argument("--n_ctx", type=int, default=512, help="tokens per training window")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps per setting (first compiles)")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--table", action="store_true", help="print the computed GPU table")
    ap.add_argument("--recompute", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(table())
        return
    if args.recompute is not None:  # the child process
        print(json.dumps(child(args)))
        return
    rows = []
    for recompute in (0, 1):
        argv = [a for a in sys.argv[1:]] + ["--recompute", str(recompute)]
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    plain, saving = rows
    print(f"steps needed {plain['steps_mb']} MB without recompute, {saving['steps_mb']} MB with "
          f"({1 - saving['steps_mb'] / plain['steps_mb']:.0%} less); whole process "
          f"{plain['peak_mb']} -> {saving['peak_mb']} MB")  # fmt: skip
    print(json.dumps({**vars(args), "runs": rows}))


if __name__ == "__main__":
    main()
