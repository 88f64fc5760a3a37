"""The memorization index (gpt2tune.data.index): build time and peak memory of the suffix
array over N tokens, and the time of one query (a sample of --sample tokens).

    python bench/memorization.py --tokens 100000000      # the issue's target: 100 M tokens

The corpus is random-ish: Zipf-distributed ids below GPT-2's 50257 (like text, a few ids
are most of it), with a 50-token span planted in the sample so that a query finds a long run.
Times are wall (build_s) and CPU seconds of this process (build_cpu_s, and the queries'):
on the shared machine the wall time is mostly waiting for a core. The build runs in this
process: peak_rss_mb is the process's high-water mark after it (the
tokens, 2 bytes each, and Python's own ~100 MB included: train.npy is memory-mapped by the
stages, so its pages are in memory while the index is built), build_extra_mb the part above
the resident size before the build. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
from common import loadavg

from gpt2tune.data import index as ix


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000_000)
    ap.add_argument("--sample", type=int, default=200, help="tokens per queried sample")
    ap.add_argument("--queries", type=int, default=20)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    tokens = np.minimum(rng.zipf(1.2, args.tokens) - 1, 50256).astype(np.uint16)
    before = rss_mb()
    t0, cpu0 = time.perf_counter(), time.process_time()
    sa = ix.suffix_array(tokens)
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    index = ix.CorpusIndex(tokens, sa, np.flatnonzero(tokens == 50256), [])

    times, found = [], []
    for _ in range(args.queries):
        sample = rng.integers(0, 50256, args.sample)
        at = int(rng.integers(0, args.tokens - 50))
        sample[args.sample // 3 : args.sample // 3 + 50] = tokens[at : at + 50]
        t0 = time.process_time()  # CPU time: on a loaded machine wall time is mostly waiting
        r = ix.report(index, sample, lambda ids: "", 32)
        times.append(time.process_time() - t0)
        found.append(r["copied_tokens"] >= 50)
    query_ms = 1000 * float(np.median(times))
    print(json.dumps({
        "tokens": args.tokens, "build_s": round(build_s, 2),
        "build_cpu_s": round(build_cpu_s, 2), "peak_rss_mb": round(peak_mb),
        "build_extra_mb": round(peak_mb - before),
        "sa_mb": round(sa.nbytes / 2**20), "query_ms": round(query_ms, 2),
        "query_ms_max": round(1000 * max(times), 2), "sample_tokens": args.sample,
        "planted_found": all(found),
        "tokens_per_s": round(args.tokens / build_s), "loadavg": loadavg(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
