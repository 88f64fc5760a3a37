"""New tokens/s of gpt2tune.generate_tokens (top_k 40), its share of the memory-bandwidth
bound, and (--peer) OpenAI's sampler's or ggml's.

    python bench/generate.py                       # 124M shapes, 64-token prompt, 128 new, batch 1
    python bench/generate.py --batch 8 --peer      # and OpenAI's sampler, same run
    python bench/generate.py --precision int8      # sample.precision (bfloat16, int8)
    python bench/generate.py --precision int8 --peer ggml --ggml-bin BIN --ggml-model Q8_0.bin
    python bench/generate.py --n_layer 2 --n_embd 64 --n_head 2 --length 16

Random weights. Each new token reads every weight once per batch (the output embedding too),
so at small batches generation is bound by memory bandwidth: the bound is
    batch x read bandwidth / weight bytes per token,
weight bytes per token = 4 x (all parameters but wpe, of which one row is read) in float32;
with --precision the matrices (and the output embedding) count 2 or 1 byte per weight, int8's
scales 4 bytes per row, the input embedding's row 4 bytes per value. The
read bandwidth is measured in this run (common.read_bandwidth: the best reduce_sum over
1 GiB, as one tensor or 16 side by side). `bound_fraction` = tokens/s over that bound.

The first call compiles the sampler and is reported apart. --ragged also times 8 prompts of 8
different lengths (prompt/8 .. prompt tokens) in one batch against one at a time; --stop-after
N a request whose rows all finish after N tokens (as when a stop string is found) against the
same request run to the end (`_generate_rows` with its `finished` test). With --peer the
measurement alternates, --rounds times: gpt2tune's calls, then the peer's, a fresh process each
round; per side the best call counts. `--peer openai` (the default of a bare --peer) is
OpenAI's sampler as gpt-2-simple packages it (bench/peer.py). `--peer ggml` runs ggml's own
GPT-2 example, built by you (docs/benchmarks.md gives the steps; no ggml code is in this
repository): `--ggml-bin` its gpt-2-batched program, `--ggml-model` a converted (and maybe
quantized) model of the same shapes; its tokens/s are the new tokens over its printed decode
and sample times (its prompt pass is not in them; gpt2tune's calls include theirs). The prompt
is "the the ..." (one token per word in GPT-2's vocabulary), checked against the token count
ggml prints. The last line is JSON.
"""

import argparse
import json
import re
import subprocess
import sys

import numpy as np
from common import add_shape_args, best_time, hparams, loadavg, read_bandwidth, run_peer


def weight_bytes_per_token(hp: dict, precision: str = "float32") -> int:
    from gpt2tune.model.gpt2 import variable_shapes
    from gpt2tune.model.precision import is_dense_weight, weight_bytes

    total = 4 * hp["n_embd"]  # the one row of wpe
    for name, shape in variable_shapes(hp).items():
        size = int(np.prod(shape))
        if name == "model/wpe":
            continue
        if precision == "float32" or not (is_dense_weight(name) or name == "model/wte"):
            total += 4 * size
            continue
        # A prepared [out, in] matrix, int8's scale per output row; the output embedding's
        # rows are its n_vocab tokens, and the input embedding reads one float32 row more.
        rows = shape[0] if name == "model/wte" else shape[-1]
        total += weight_bytes(precision) * size + (4 * rows if precision == "int8" else 0)
        if name == "model/wte":
            total += 4 * hp["n_embd"]
    return total


def run_ggml(binary: str, model: str, settings: dict, threads: int) -> dict:
    """One run of ggml's gpt-2-batched: its new tokens and decode + sample seconds."""
    prompt = "the" + " the" * (settings["prompt"] - 1)
    cmd = [binary, "-m", model, "-p", prompt, "-n", str(settings["length"] + 1), "-np",
           str(settings["batch"]), "-t", str(threads), "--ignore-eos", "-s", "0",
           "--top_k", str(settings["top_k"]), "--temp", str(settings["temperature"])]  # fmt: skip
    # Its samples of random weights are bytes that need not be UTF-8.
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    out = proc.stdout + proc.stderr

    def number(label: str) -> float:
        m = re.search(rf"{label}\s*=\s*([0-9.]+)", out)
        if proc.returncode or m is None:
            sys.exit(f"ggml's run failed or printed no {label!r} ({' '.join(cmd[:3])}):\n"
                     f"{out[-3000:]}")  # fmt: skip
        return float(m.group(1))

    if int(number("number of tokens in prompt")) != settings["prompt"]:
        sys.exit(f"ggml tokenized the prompt to {number('number of tokens in prompt')} tokens")
    seconds = (number("predict time") + number("sample time")) / 1000
    return {"new_tokens": int(number("n_decoded")), "seconds": seconds,
            "load_s": number("load time") / 1000}  # fmt: skip


def ragged(model, hp: dict, args) -> dict:
    """New tokens/s of 8 prompts of 8 lengths in one batch, and one prompt at a time."""
    from gpt2tune.config.params import Sampling
    from gpt2tune.generation.sampler import _generate_rows

    rng = np.random.default_rng(1)
    lengths = [max(1, args.prompt * (i + 1) // 8) for i in range(8)]
    prompts = [rng.integers(0, hp["n_vocab"] - 1, n).tolist() for n in lengths]
    s = Sampling(1, args.length, temperature=1.0, top_k=40, seed=0)
    together = lambda: _generate_rows(model, prompts, s, False)  # noqa: E731
    alone = lambda: [_generate_rows(model, [p], s, False) for p in prompts]  # noqa: E731
    together(), alone()  # compile
    t, a = best_time(together, args.repeat), best_time(alone, args.repeat)
    new = 8 * args.length
    return {"ragged_prompt_lengths": lengths, "ragged_batch_tokens_per_s": round(new / t, 2),
            "ragged_alone_tokens_per_s": round(new / a, 2),
            "ragged_speedup": round(a / t, 2)}  # fmt: skip


def stop_after(model, args) -> dict:
    """Seconds for `length` new tokens per row, and for rows that all finish after N."""
    from gpt2tune.config.params import Sampling
    from gpt2tune.generation.sampler import _generate_rows

    prompt = list(range(1, args.prompt + 1))
    s = Sampling(args.batch, args.length, temperature=1.0, top_k=40, seed=0)
    n = args.stop_after
    full = lambda: _generate_rows(model, [prompt], s, False)  # noqa: E731
    stopped = lambda: _generate_rows(model, [prompt], s, False, lambda r: len(r) >= n)  # noqa: E731
    full(), stopped()
    tfull, ts = best_time(full, args.repeat), best_time(stopped, args.repeat)
    return {"stop_after": n, "full_s": round(tfull, 3), "stopped_s": round(ts, 3),
            "stopped_tokens": int(stopped().shape[1]),
            "stop_saves": round(1 - ts / tfull, 3)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--prompt", type=int, default=64, help="prompt length in tokens")
    ap.add_argument("--length", type=int, default=128, help="new tokens per sample")
    ap.add_argument("--batch", type=int, default=1, help="samples generated together")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of ours then peer (--peer)")
    ap.add_argument("--bandwidth-mb", type=int, default=1024, help="buffer for the bandwidth")
    ap.add_argument("--precision", default="float32", help="sample.precision")
    ap.add_argument("--peer", nargs="?", const="openai", choices=("openai", "ggml"),
                    help="also time OpenAI's sampler (a bare --peer) or ggml's")  # fmt: skip
    ap.add_argument("--ggml-bin", help="--peer ggml: ggml's examples/gpt-2 gpt-2-batched")
    ap.add_argument("--ggml-model", help="--peer ggml: its converted model of these shapes")
    ap.add_argument("--ggml-threads", type=int, default=2, help="--peer ggml: its -t")
    ap.add_argument("--ragged", action="store_true", help="8 prompt lengths: batch vs alone")
    ap.add_argument("--stop-after", type=int, default=0, help="rows finish after N tokens")
    args = ap.parse_args()
    if args.peer == "ggml" and not (args.ggml_bin and args.ggml_model):
        ap.error("--peer ggml needs --ggml-bin and --ggml-model")
    hp = hparams(args)

    import time

    from gpt2tune.config.params import Sampling
    from gpt2tune.generation.sampler import generate_tokens
    from gpt2tune.model.gpt2 import init_model

    model = init_model(hp, seed=0)
    prompt = np.random.default_rng(0).integers(0, hp["n_vocab"] - 1, args.prompt).tolist()
    kw = dict(sampling=Sampling(args.batch, args.length, temperature=1.0, top_k=40, seed=0,
                                precision=args.precision))  # fmt: skip

    t0 = time.perf_counter()
    out = generate_tokens(model, prompt, **kw)
    first = time.perf_counter() - t0
    assert out.shape == (args.batch, args.length), out.shape
    ours, peer, peer_first = [], [], None
    settings = {**hp, "prompt": args.prompt, "length": args.length, "batch": args.batch,
                "temperature": 1.0, "top_k": 40, "repeat": args.repeat}  # fmt: skip
    for _ in range(args.rounds if args.peer else 1):
        ours.append(best_time(lambda: generate_tokens(model, prompt, **kw), args.repeat))
        if args.peer == "ggml":
            r = run_ggml(args.ggml_bin, args.ggml_model, settings, args.ggml_threads)
            # its time per new token, for this run's new tokens: both sides divide alike
            peer.append(r["seconds"] * args.length * args.batch / r["new_tokens"])
            peer_first = r["load_s"]
        elif args.peer:
            r = run_peer("generate", settings)
            peer.append(min(r["call_times"]))
            peer_first = r["first_call_s"]
    bw = read_bandwidth(args.bandwidth_mb)
    new = args.length * args.batch
    s = min(ours)
    from gpt2tune.generation.sampler import decoding_precision

    used = decoding_precision(args.precision, args.batch)  # float32 for batches on a CPU
    wb = weight_bytes_per_token(hp, used)
    bound = args.batch * bw / wb
    result = {**hp, "prompt": args.prompt, "length": args.length, "batch": args.batch,
              "top_k": 40, "precision": args.precision, "decoded_at": used,
              "first_call_s": round(first, 2),
              "tokens_per_s": round(new / s, 2),
              "weight_bytes_per_token": wb, "read_gb_s": round(bw / 1e9, 2),
              "bound_tokens_per_s": round(bound, 2), "bound_fraction": round(new / s / bound, 3),
              "rounds_tokens_per_s": [round(new / t, 2) for t in ours]}  # fmt: skip
    if peer:
        p = min(peer)
        result.update({"peer": args.peer, "peer_first_call_s": round(peer_first, 2),
                       "peer_tokens_per_s": round(new / p, 2),
                       "peer_rounds_tokens_per_s": [round(new / t, 2) for t in peer],
                       "speedup_vs_peer": round(p / s, 2)})  # fmt: skip
    if args.ragged:
        result.update(ragged(model, hp, args))
    if args.stop_after:
        result.update(stop_after(model, args))
    result["loadavg"] = loadavg()
    r = result
    print(f"gpt2tune: {r['tokens_per_s']} new tokens/s = {r['bound_fraction']:.0%} of the "
          f"bandwidth bound {r['bound_tokens_per_s']}" + (f"; {r['peer']}: "
          f"{r['peer_tokens_per_s']};"
          f" speedup {r['speedup_vs_peer']}x" if peer else ""))  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
