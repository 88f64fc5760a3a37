"""Single-thread encode speed of gpt2tune's Encoder vs tiktoken built from the same files.

    python bench/encode.py [--file kant.txt] [--vocab gpt2-vocab/] [--runs 5] [--reference]

Defaults come from $GPT2TUNE_SHARED_DATA or ../shared/data beside the repository. Prints a table
and, as its last line, a JSON object {"ours_mb_s", "tiktoken_mb_s", "ratio", ...}.
--reference also times a pure-Python port of OpenAI's encoder.py (slow: one run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file", type=Path, default=SHARED / "kant.txt", help="text to encode")
    ap.add_argument("--vocab", type=Path, default=SHARED / "gpt2-vocab", help="encoder.json dir")
    ap.add_argument("--runs", type=int, default=5, help="best of this many runs")
    ap.add_argument("--reference", action="store_true", help="also time OpenAI's pure Python")
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
