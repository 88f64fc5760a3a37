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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import regex
import tiktoken

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

from gpt2tune.encoder import EOT, load_encoder  # noqa: E402
from gpt2tune.encoder import GPT2_PATTERN as PAT  # noqa: E402
from gpt2tune.encoder import bytes_to_unicode as byte_encoder  # noqa: E402

SHARED = Path(os.environ.get("GPT2TUNE_SHARED_DATA", REPO.parent / "shared" / "data"))


def tiktoken_from_files(folder: Path) -> tiktoken.Encoding:
    """The way tiktoken loads GPT-2: encoder.json's ids as ranks (they rise with merge order)."""
    decoder = {c: b for b, c in byte_encoder().items()}
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    ranks = {bytes(decoder[c] for c in t): i for t, i in encoder.items() if t != EOT}
    return tiktoken.Encoding(
        "bench", pat_str=PAT, mergeable_ranks=ranks, special_tokens={EOT: encoder[EOT]}
    )


def reference_encoder(folder: Path):
    """OpenAI's gpt-2 src/encoder.py Encoder.encode, condensed."""
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
    b2u, pat, cache = byte_encoder(), regex.compile(PAT), {}

    def bpe(token: str) -> list[str]:
        if token in cache:
            return cache[token]
        word = list(token)
        while len(word) > 1:
            pairs = zip(word, word[1:], strict=False)
            pair = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = new
        cache[token] = word
        return word

    def encode(text: str) -> list[int]:
        ids = []
        for piece in pat.findall(text):
            ids += [encoder[t] for t in bpe("".join(b2u[b] for b in piece.encode()))]
        return ids

    return encode


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
    import yaml

    with tempfile.TemporaryDirectory(prefix="gpt2tune-bench-") as tmp:
        root = Path(tmp)
        raw = text_file.read_bytes()
        corpus = root / "data" / "corpus.txt"
        corpus.parent.mkdir()
        with open(corpus, "wb") as fh:
            for _ in range(max(1, round(mb * 1e6 / len(raw)))):
                fh.write(raw)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["data"]["path"] = "data/corpus.txt"
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        model = root / "models" / params["model"]["name"]
        model.mkdir(parents=True)
        for f in ("encoder.json", "vocab.bpe"):
            shutil.copyfile(vocab / f, model / f)
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        t0 = time.perf_counter()
        stage = [sys.executable, str(REPO / "stages" / "encode.py")]
        proc = subprocess.Popen(
            stage, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
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
    ap.add_argument("--file", type=Path, default=SHARED / "kant.txt", help="text to encode")
    ap.add_argument("--vocab", type=Path, default=SHARED / "gpt2-vocab", help="encoder.json dir")
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
        ref_s, ref_ids = best_seconds(reference_encoder(args.vocab), text, 1)
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
