"""Smoke tests of bench/: each script runs on tiny shapes and ends with one JSON line holding
tokens_per_s and its other figures. (The measurements are not tests; see docs/benchmarks.md.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--n_ctx", "64", "--n_vocab", "300"]


def run_bench(script: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and len(result["loadavg"]) == 3
    return result


def test_train_bench():
    r = run_bench("train.py", *TINY, "--seq", "16", "--batch", "2", "--steps", "2")
    # 6 * (12 * 1 * 32^2 + 300 * 32) + 12 * 1 * 16 * 32
    assert r["flops_per_token"] == 137472
    assert r["matmul_gflops"] > 0 and 0 < r["mfu"] < 1.5 and r["peak_rss_mb"] > 0


def test_generate_bench():
    r = run_bench("generate.py", *TINY, "--prompt", "4", "--length", "8", "--batch", "2",
                  "--repeat", "1", "--bandwidth-mb", "32")  # fmt: skip
    assert r["read_gb_s"] > 0 and 0 < r["bound_fraction"]
    assert r["weight_bytes_per_token"] == 4 * (300 * 32 + 32 + 12 * 32 * 32 + 13 * 32 + 2 * 32)


def test_encode_bench(kant_path, official_vocab_dir):
    r = run_bench("encode.py", "--file", str(kant_path), "--vocab", str(official_vocab_dir),
                  "--runs", "1", "--stage-mb", "2")  # fmt: skip
    assert r["identical_ids"] and r["ratio"] > 0
    assert r["stage_mb"] > 1 and r["stage_tokens"] > 2 * 280_000 and r["stage_peak_rss_mb"] > 0


def test_memorization_bench():
    r = run_bench("memorization.py", "--tokens", "100000", "--queries", "2")
    assert r["planted_found"] and r["tokens"] == 100_000 and r["query_ms"] > 0 and r["build_s"] > 0


def test_tracking_bench():
    r = run_bench("tracking.py", "--steps", "2", "--rounds", "1", "--wait", "1")
    for store in ("accept", "backlog"):  # one timeout at the start, at most one at the end
        assert 1 <= r[store]["start"] < 2 and r[store]["end"] < 2, r
        assert r[store]["fit_ratio"] > 0 and r[store]["total_ratio"] > 0
    assert r["sqlite"]["fit"] > 0 and r["wait_s"] == 1 and r["steps"] == 2


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gpt_2_simple") is None
    and not (REPO / ".venv-bench" / "bin" / "python").exists()
    and not os.environ.get("GPT2TUNE_PEER_PYTHON"),
    reason="needs the bench extra (gpt-2-simple), here, in .venv-bench or $GPT2TUNE_PEER_PYTHON",
)
def test_peer_runs_openai_code():
    runs = {
        "train.py": ["--seq", "16", "--steps", "1"],
        "generate.py": ["--prompt", "4", "--length", "4", "--repeat", "1"],
    }
    for script, extra in runs.items():
        r = run_bench(script, *TINY, *extra, "--peer", "--rounds", "1")
        assert r["peer_tokens_per_s"] > 0 and r["speedup_vs_peer"] > 0


def test_graphs_bench():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "graphs.py"), *TINY],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    totals, full = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert set(totals) == {"train_step/adam", "train_step/sgd", "train_step/lora", "sampler"}
    for name, counts in full.items():
        assert counts["total"] == totals[name] == sum(counts["by_type"].values()) > 100
    # The fused Adam kernel in adam's step only; sgd's and LoRA's (fewer weights) are smaller.
    assert "ResourceApplyAdam" in full["train_step/adam"]["by_type"]
    assert "ResourceApplyAdam" not in full["train_step/sgd"]["by_type"]
    assert totals["train_step/sgd"] < totals["train_step/adam"] > totals["train_step/lora"]


@pytest.mark.parametrize(
    ("shape", "precision", "copies"), [("32,2,1,2,8,8", "float32", "float32"),
                                      ("32,2,1,1,8,8", "int8", "int8")],
)  # fmt: skip
def test_generation_memory_bench(shape, precision, copies):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "generation_memory.py"), "--case", shape,
         "--precision", precision],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (case,) = result["cases"]
    assert case["case"]["precision"] == precision and case["case"]["copies"] == copies
    assert case["grew_mb"] > 0 and case["estimate_mb"] > 0
    assert result["min_ratio"] == case["ratio"]
    # The ratio is of the unrounded MB: each printed MB is off by up to 0.5 and the ratio by
    # up to 0.005, which bounds its distance from the printed MB's ratio.
    e, g = case["estimate_mb"], case["grew_mb"]
    assert abs(case["ratio"] - e / g) <= 0.005 + 0.5 / (g - 0.5) + 0.5 * (e + 0.5) / (g - 0.5) ** 2


@pytest.mark.slow
def test_generate_bench_at_reduced_precision():
    r = run_bench("generate.py", *TINY, "--prompt", "4", "--length", "4", "--repeat", "1",
                  "--bandwidth-mb", "32", "--precision", "int8")  # fmt: skip
    # int8 matrices and output embedding, a float32 scale per output row (3e + e + 4e + e
    # per layer, n_vocab for wte), float32 biases and layer norms, wte's and wpe's row.
    e, v = 32, 300
    assert r["precision"] == "int8" and r["weight_bytes_per_token"] == (
        12 * e * e + 9 * e * 4 + v * e + 4 * v + 4 * (13 * e + 2 * e) + 4 * e + 4 * e
    )


@pytest.mark.slow
def test_precision_bench():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "precision.py"), *TINY, "--window", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["float32"] == {"rel_error": 0.0, "top_k_agree": 1.0, "argmax_agree": 1.0}
    for p in ("bfloat16", "int8"):
        assert 0 < r[p]["rel_error"] < 0.1 and 0.5 < r[p]["top_k_agree"] <= 1, r
