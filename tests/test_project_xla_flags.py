"""The XLA flags gpt2tune sets on import (gpt2tune/__init__.py): 512-bit vector code on a CPU
with AVX-512, which generation's dots read the weights faster with (bench/NOTES.md entry 28),
unless the user's XLA_FLAGS chose a width; and the flag is one this TensorFlow's XLA knows
(XLA aborts the process on a flag it does not know)."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO
from helpers.processes import run_in, stage_env

from gpt2tune import _cpu_flags, _xla_flags

WIDE = "--xla_cpu_prefer_vector_width=512"


def test_the_width_is_added_on_avx512_only_and_never_over_the_users():
    assert _xla_flags("", {"avx2", "avx512f"}) == WIDE
    assert _xla_flags("--xla_dump_to=/tmp/d", {"avx512f"}) == f"--xla_dump_to=/tmp/d {WIDE}"
    mine = "--xla_cpu_prefer_vector_width=256"
    assert _xla_flags(mine, {"avx512f"}) == mine
    assert _xla_flags("", {"avx2", "fma"}) == ""
    assert _xla_flags("--xla_dump_to=/tmp/d", set()) == "--xla_dump_to=/tmp/d"


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in stage_env().items() if k != "XLA_FLAGS"}
    return run_in(REPO, sys.executable, "-c", code, env={**base, **env})


def test_importing_gpt2tune_sets_them_and_xla_compiles_with_them():
    # This machine's flags decide; a user's own width is kept as it is.
    code = ("import os, gpt2tune, tensorflow as tf\n"
            "print(os.environ.get('XLA_FLAGS', ''))\n"
            "f = tf.function(lambda x: tf.matmul(x, x, transpose_b=True), jit_compile=True)\n"
            "print(float(f(tf.ones([2, 64]))[0, 0]))\n")  # fmt: skip
    out = run(code)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = WIDE if "avx512f" in _cpu_flags() else ""
    assert out.stdout.splitlines() == [expected, "64.0"]
    mine = "--xla_cpu_prefer_vector_width=256"
    out = run(code, XLA_FLAGS=mine)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [mine, "64.0"]
