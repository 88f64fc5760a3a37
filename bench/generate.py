"""New tokens per second of gpt2tune.generate_tokens, GPT-2 124M shapes with random weights.

    python bench/generate.py                      # 124M: 12 layers, 768 wide, 12 heads
    python bench/generate.py --n_layer 2 --n_embd 64 --n_head 2 --length 64

The first call compiles the sampler and is timed separately; the last line is JSON.
"""

import argparse
import json
import time

import numpy as np

from gpt2tune.model import init_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_layer", type=int, default=12)
    ap.add_argument("--n_embd", type=int, default=768)
    ap.add_argument("--n_head", type=int, default=12)
    ap.add_argument("--n_ctx", type=int, default=1024)
    ap.add_argument("--n_vocab", type=int, default=50257)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    ap.add_argument("--length", type=int, default=128, help="new tokens per sample")
    ap.add_argument("--batch", type=int, default=1, help="samples generated together")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from gpt2tune.sample import generate_tokens

    hp = {k: getattr(args, k) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}
    model = init_model(hp, seed=0)
    prompt = np.random.default_rng(0).integers(0, args.n_vocab - 1, args.prompt).tolist()
    kw = dict(length=args.length, nsamples=args.batch, temperature=0.8, top_k=40, seed=0)

    t0 = time.perf_counter()
    generate_tokens(model, prompt, **kw)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        generate_tokens(model, prompt, **kw)
        times.append(time.perf_counter() - t0)
    best = min(times)
    tps = args.length * args.batch / best
    print(f"first call (with compile): {first:.2f} s; best of {args.repeat}: {best:.3f} s")
    print(
        json.dumps(
            {
                **hp,
                "prompt": args.prompt,
                "length": args.length,
                "batch": args.batch,
                "first_call_s": round(first, 3),
                "tokens_per_s": round(tps, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
