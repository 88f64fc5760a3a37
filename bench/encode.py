"""Encoding speed: gpt2tune's Encoder vs tiktoken (one thread), and the encode stage at scale.

    python bench/encode.py [--file kant.txt] [--vocab gpt2-vocab/] [--runs 5] [--reference]
                           [--stage-mb 100]

Defaults come from $GPT2TUNE_SHARED_DATA or ../shared/data beside the repository.
1. Single-thread MB/s of Encoder.encode and of tiktoken built from the same files on --file.
   --reference also times a pure-Python port of OpenAI's encoder.py (slow: one run).
2. The encode stage itself (`python stages/encode.py` in a temporary project whose data.path
   is --file repeated to --stage-mb MB): wall time, CPU time over wall time (cores in use),
   and peak resident memory of the stage (all its processes, summed, sampled every 20 ms);
   then the same for one copy of --file, to show what of the peak the corpus size adds.
   --stage-mb 0 skips both.
Prints a table and, as its last line, a JSON object with tokens_per_s (Encoder.encode).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing
# The reference BPE (OpenAI's encoder.py; tiktoken from the files), the test-project params and
# the stage runner are the tests' own, written independently of gpt2tune.
sys.path.insert(0, str(REPO / "tests"))

from helpers import SHARED_DATA  # noqa: E402
from helpers.processes import start_stage  # noqa: E402
from helpers.projects import write_params  # noqa: E402
from helpers.vocab import ReferenceEncoder, tiktoken_from_files  # noqa: E402

from gpt2tune.model.encoder import load_encoder  # noqa: E402


def best_seconds(fn, text: str, runs: int) -> tuple[float, list[int]]:
    best, ids = float("inf"), []
    for _ in range(runs):
        t = time.perf_counter()
        ids = fn(text)
        best = min(best, time.perf_counter() - t)
    return best, ids


def run_stage(text_file: Path, vocab: Path, mb: float) -> dict:
    """Time `python stages/encode.py` on text_file repeated to `mb` MB; see the docstring."""
    import psutil

    with tempfile.TemporaryDirectory(prefix="gpt2tune-bench-") as tmp:
        root = Path(tmp)
        raw = text_file.read_bytes()
        corpus = root / "data" / "corpus.txt"
        corpus.parent.mkdir()
        with open(corpus, "wb") as fh:
            for _ in range(max(1, round(mb * 1e6 / len(raw)))):
                fh.write(raw)
        params = write_params(root, data={"path": "data/corpus.txt"})
        model = root / "models" / params["model"]["name"]
        model.mkdir(parents=True)
        for f in ("encoder.json", "vocab.bpe"):
            shutil.copyfile(vocab / f, model / f)
        t0 = time.perf_counter()
        proc = start_stage(root, "encode", stderr=subprocess.STDOUT, text=False)
        peak, tree = 0, psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [tree, *tree.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:  # a process ended between listing and reading
                pass
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        out = proc.stdout.read().decode(errors="replace")
        if proc.returncode:
            raise SystemExit(f"the encode stage failed:\n{out}")
        # The stage has reaped its workers, so its children's times include theirs.
        cpu = psutil.Process().cpu_times()
        stats = json.loads((root / "data" / "encoded" / "stats.json").read_text())
    return {"stage_mb": round(stats["bytes"] / 1e6, 1), "stage_s": round(wall, 2),
            "stage_cores_used": round((cpu.children_user + cpu.children_system) / wall, 2),
            "stage_peak_rss_mb": round(peak / 1e6, 1), "stage_tokens": stats["tokens"],
            "stage_tokens_per_s": round(stats["tokens"] / wall)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file", type=Path, default=SHARED_DATA / "kant.txt", help="text to encode")
    ap.add_argument(
        "--vocab", type=Path, default=SHARED_DATA / "gpt2-vocab", help="encoder.json dir"
    )
    ap.add_argument("--runs", type=int, default=5, help="best of this many runs")
    ap.add_argument("--reference", action="store_true", help="also time OpenAI's pure Python")
    ap.add_argument("--stage-mb", type=float, default=100, help="corpus size for the stage run")
    args = ap.parse_args()

    text = args.file.read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    t = time.perf_counter()
    ours = load_encoder(args.vocab)
    load_s = time.perf_counter() - t
    tk = tiktoken_from_files(args.vocab)

    rows = []
    ours_s, ours_ids = best_seconds(ours.encode, text, args.runs)
    rows.append((f"gpt2tune Encoder.encode ({ours.engine})", ours_s))
    tk_s, tk_ids = best_seconds(tk.encode_ordinary, text, args.runs)
    rows.append(("tiktoken from the same files", tk_s))
    same = ours_ids == tk_ids
    result = {"ours_mb_s": round(mb / ours_s, 2), "tiktoken_mb_s": round(mb / tk_s, 2)}
    result["tokens_per_s"] = round(len(ours_ids) / ours_s)
    result["ratio"] = round(tk_s / ours_s, 3)
    if args.reference:
        ref_s, ref_ids = best_seconds(ReferenceEncoder(args.vocab).encode, text, 1)
        rows.append(("OpenAI reference (pure Python)", ref_s))
        same = same and ref_ids == ours_ids
        result["reference_mb_s"] = round(mb / ref_s, 2)

    print(f"{args.file}: {mb:.2f} MB, {len(ours_ids)} tokens; encoder loaded in {load_s:.2f} s")
    print(f"{'encoder':42} {'best s':>8} {'MB/s':>8}")
    for name, s in rows:
        print(f"{name:42} {s:8.3f} {mb / s:8.2f}")
    print(f"identical ids: {'yes' if same else 'NO'}")
    result["identical_ids"] = same
    if args.stage_mb > 0:
        result.update(run_stage(args.file, args.vocab, args.stage_mb))
        # The same stage on one copy of the file: what the peak costs without the corpus.
        one = run_stage(args.file, args.vocab, 0)
        result["stage_one_copy_peak_rss_mb"] = one["stage_peak_rss_mb"]
        r = result
        print(f"encode stage on {r['stage_mb']} MB: {r['stage_s']} s, "
              f"{r['stage_cores_used']} cores busy, peak {r['stage_peak_rss_mb']} MB")  # fmt: skip
    result["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
