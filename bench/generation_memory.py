"""Peak memory of generation against gpt2tune.model.memory.generation_memory's estimate.

    python bench/generation_memory.py                 # the default cases, up to 124M's width
    python bench/generation_memory.py --case 768,12,12,8,256,64   # n_embd,n_head,n_layer,
                                                      # nsamples,context,length (repeatable)
    python bench/generation_memory.py --precision int8 --case 768,12,12,1,64,32

Each case runs in its own process: it builds a randomly initialised model with GPT-2's
50257-token vocabulary, notes its resident size, resets the peak (Linux's clear_refs), calls
`generate_tokens` once (top_k 40, the sample stage's default) and reads the peak. The
difference is what that one call needed on top of the weights: the compiled loop, the
prompt's pass, the key/value caches, the sampling buffers, and at --precision bfloat16 or
int8 the prepared weights (made by that first call; from 2 rows a CPU decodes at float32).
The estimate must not be below it (it refuses requests that would not fit before any work).
The last line is JSON.
"""

import argparse
import json
import subprocess
import sys

from common import REPO  # noqa: F401  (puts the checkout's src/ first)

CASES = (  # n_embd, n_head, n_layer, nsamples, context, length
    (64, 2, 2, 1, 8, 8),
    (64, 2, 2, 64, 8, 8),
    (64, 2, 2, 64, 256, 8),
    (256, 4, 4, 16, 64, 200),
    (768, 12, 12, 1, 64, 32),
    (768, 12, 12, 8, 512, 32),
)


def status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process, in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Start VmHWM again from the resident size (Linux: 5 > /proc/self/clear_refs), so the
    peak measured is the call's, not the model initialisation's before it."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def child(case: tuple[int, ...], precision: str) -> dict:
    from gpt2tune.stage import import_tensorflow_quietly

    import_tensorflow_quietly()
    from gpt2tune.generation.sampler import copies_to_make, generate_tokens
    from gpt2tune.model.gpt2 import init_model
    from gpt2tune.model.memory import generation_memory

    e, h, layers, n, ctx, length = case
    hp = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": e, "n_head": h, "n_layer": layers}
    model = init_model(hp, seed=0)
    copies = copies_to_make(model, precision, n)
    reset_peak()
    before = status_mb("VmRSS")
    generate_tokens(model, list(range(1, ctx + 1)), length, nsamples=n, top_k=40, seed=0,
                    precision=precision)  # fmt: skip
    grew = status_mb("VmHWM") - before
    estimate = generation_memory(hp, n, ctx, length, copies) / 2**20
    return {"case": dict(n_embd=e, n_head=h, n_layer=layers, nsamples=n, context=ctx,
                         length=length, precision=precision, copies=copies),
            "grew_mb": round(grew), "estimate_mb": round(estimate),
            "ratio": round(estimate / grew, 2)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", help="n_embd,n_head,n_layer,nsamples,context,length")
    ap.add_argument("--precision", default="float32", help="sample.precision")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(tuple(map(int, args.child.split(","))), args.precision)))
        return
    cases = [tuple(map(int, c.split(","))) for c in args.case] if args.case else CASES
    results = []
    for case in cases:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", ",".join(map(str, case)), "--precision",
             args.precision],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    load = open("/proc/loadavg").read().split()[:3]
    print(json.dumps({"cases": results, "min_ratio": min(r["ratio"] for r in results),
                      "loadavg": load}))  # fmt: skip


if __name__ == "__main__":
    main()
