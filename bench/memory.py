"""Peak memory of training steps with and without train.memory_saving_gradients.

    python bench/memory.py                      # 12 layers, 256 wide, 512-token windows, batch 4
    python bench/memory.py --n_embd 768 --n_ctx 1024 --batch 1
    python bench/memory.py --table              # docs/distributed.md's computed GPU-memory table
    python bench/memory.py --lora_rank 8        # full fine-tuning vs LoRA instead

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
from common import add_shape_args

from gpt2tune.config.params import TrainParams
from gpt2tune.model.memory import n_params, step_bytes, training_bytes


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> dict:

    from gpt2tune.model.gpt2 import init_model
    from gpt2tune.train.distribute import make_strategy
    from gpt2tune.train.trainer import Trainer

    hp = {"n_vocab": 50257, "n_ctx": args.n_ctx, "n_embd": args.n_embd,
          "n_head": args.n_head, "n_layer": args.n_layer}  # fmt: skip
    cfg = TrainParams(steps=args.steps, batch_size=args.batch, n_ctx=args.n_ctx,
                      memory_saving_gradients=bool(args.recompute), precision=args.precision,
                      lora_rank=args.lora)  # fmt: skip
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
    tokens = args.batch * args.n_ctx
    computed = step_bytes(hp, tokens, args.n_ctx, bool(args.recompute), 4)
    computed += tokens * args.n_layer * args.lora * len(cfg.lora_targets) * 4  # LoRA's x A
    return {"recompute": args.recompute, "lora_rank": args.lora, "peak_mb": round(after),
            "before_steps_mb": round(before), "steps_mb": round(after - before),
            "computed_steps_mb": round(computed / 2**20),
            "formula_mb": round(training_bytes(hp, cfg) / 2**20),
            "s_per_step": round(float(np.median(times[1:] or times)), 2)}  # fmt: skip


# --- the computed table ---------------------------------------------------------------------

SIZES = {"124M": (768, 12, 12), "355M": (1024, 16, 24), "774M": (1280, 20, 36),
         "1558M": (1600, 25, 48)}  # n_embd, n_head, n_layer  # fmt: skip
GPUS_GIB = (16, 24, 40, 80)
OVERHEAD_GIB = 1.0  # CUDA context, cuDNN/cuBLAS workspaces, allocator slack (a guess)


def hparams_of(size: str) -> dict:
    e, a, n = SIZES[size]
    return {"n_vocab": 50257, "n_ctx": 1024, "n_embd": e, "n_head": a, "n_layer": n}


LORA_RANK = 8  # the LoRA column: rank 8 on all four dense layers of every block
LORA_GPUS_GIB = (16, 24)


def train_cfg(batch: int, recompute: bool, mixed: bool, lora: bool) -> TrainParams:
    return TrainParams(batch_size=batch, n_ctx=1024, memory_saving_gradients=recompute,
                       precision="mixed_bfloat16" if mixed else "float32",
                       lora_rank=LORA_RANK if lora else 0)  # fmt: skip


def total_gib(size: str, batch: int, recompute: bool, mixed: bool, lora: bool = False) -> float:
    """gpt2tune.model.memory.training_bytes (weights, gradients, Adam m and v in float32 for what
    trains, frozen weights alone with LoRA, activations, logits) + overhead."""
    cfg = train_cfg(batch, recompute, mixed, lora)
    return training_bytes(hparams_of(size), cfg) / 2**30 + OVERHEAD_GIB


def max_batch(size: str, gib: float, recompute: bool, mixed: bool, lora: bool = False) -> int:
    b = 0
    while b < 64 and total_gib(size, b + 1, recompute, mixed, lora) <= gib:
        b += 1
    return b


def table() -> str:
    """Markdown: the largest batch of 1024-token windows that fits, per model, GPU and options;
    the last column: LoRA (rank 8, all four layers) with the same options, on 16 and 24 GB."""
    options = [("float32", False, False), ("float32 + recompute", True, False),
               ("mixed + recompute", True, True)]  # fmt: skip
    head = "| model | weights + grads + Adam | options | batch 1 needs | "
    head += " | ".join(f"{g} GB" for g in GPUS_GIB) + " | LoRA r8: batch 1 needs; 16 / 24 GB |"
    rows = [head, "|" + "---|" * (5 + len(GPUS_GIB))]
    for size in SIZES:
        p = n_params(hparams_of(size))
        for name, recompute, mixed in options:
            cells = [max_batch(size, g, recompute, mixed) for g in GPUS_GIB]
            need = total_gib(size, 1, recompute, mixed)
            lora = [_cell(max_batch(size, g, recompute, mixed, True)) for g in LORA_GPUS_GIB]
            lora_need = total_gib(size, 1, recompute, mixed, True)
            rows.append(
                f"| {size} | {16 * p / 2**30:.1f} GiB | {name} | {need:.1f} GiB | "
                + " | ".join(_cell(c) for c in cells)
                + f" | {lora_need:.1f} GiB; {' / '.join(lora)} |"
            )
    return "\n".join(rows)


def _cell(c: int) -> str:
    return f"{c}{'+' if c == 64 else ''}" if c else "no"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The vocabulary is GPT-2's; n_ctx is also the training window.
    add_shape_args(ap, vocab=False, n_layer=12, n_embd=256, n_head=4, n_ctx=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps per setting (first compiles)")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--table", action="store_true", help="print the computed GPU table")
    ap.add_argument("--lora_rank", type=int, default=0, help="compare full with LoRA of rank")
    ap.add_argument("--recompute", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    ap.add_argument("--lora", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(table())
        return
    if args.recompute is not None:  # the child process
        print(json.dumps(child(args)))
        return
    # (recompute, LoRA rank) of the two runs: recompute off and on, or full and LoRA.
    settings = [(0, 0), (0, args.lora_rank)] if args.lora_rank else [(0, 0), (1, 0)]
    rows = []
    for recompute, rank in settings:
        argv = [*sys.argv[1:], "--recompute", str(recompute), "--lora", str(rank)]
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    plain, other = rows
    what = f"LoRA rank {args.lora_rank}" if args.lora_rank else "recompute"
    print(f"steps needed {plain['steps_mb']} MB without {what}, {other['steps_mb']} MB with "
          f"({1 - other['steps_mb'] / plain['steps_mb']:.0%} less); whole process "
          f"{plain['peak_mb']} -> {other['peak_mb']} MB; formula {plain['formula_mb']} -> "
          f"{other['formula_mb']} MB")  # fmt: skip
    print(json.dumps({**vars(args), "runs": rows}))


if __name__ == "__main__":
    main()
