"""`python stages/sample.py --interactive`: prompts from stdin, Ctrl-D and Ctrl-C leave
cleanly; a bad params.yaml is one line on stderr. Each test runs the stage script in a
subprocess, in a folder holding its own params.yaml (helpers.write_params)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

import pytest
from helpers.models import tiny_model
from helpers.processes import run_stage, stage_env, start_stage
from helpers.projects import write_params

import gpt2tune
from gpt2tune import Sampling, save_model

PROMPT = "Model prompt >>> "
ENV = stage_env(PYTHONUNBUFFERED="1")
INTERACTIVE = ("--interactive", "--model")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_vocab_dir):
    folder = tmp_path_factory.mktemp("interactive") / "model"
    save_model(tiny_model(tiny_vocab_dir, 0, n_embd=32, n_layer=2), folder)
    return folder


@pytest.fixture
def workdir(tmp_path):
    write_params(tmp_path, sample=dict(length=5, nsamples=1, top_k=0, temperature=1.0))
    return tmp_path


def test_prompts_from_stdin_then_end_of_input(model_dir, workdir):
    proc = run_stage(
        workdir, "sample", *INTERACTIVE, str(model_dir), input="Human reason\nThe mind\n",
        env=ENV, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout.count(PROMPT) == 3  # two prompts answered, then end of input
    assert proc.stdout.count(" SAMPLE 1 ") == 2
    assert " SAMPLE 2 " not in proc.stdout  # nsamples 1
    assert proc.stdout.endswith(PROMPT + "\n")  # Ctrl-D ends the line it interrupted


def read_until(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Everything proc wrote to stdout up to `text` (which need not end a line)."""
    out = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while text.encode() not in out:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"no {text!r} in {out[-2000:]!r} (exit {proc.poll()})")
        if select.select([fd], [], [], min(left, 1.0))[0]:
            out += os.read(fd, 4096)
    return out.decode()


def test_ctrl_c_at_the_prompt_exits_cleanly(model_dir, workdir):
    proc = start_stage(
        workdir, "sample", *INTERACTIVE, str(model_dir), stdin=subprocess.PIPE, text=False,
        env=ENV,
    )  # fmt: skip
    try:
        read_until(proc, PROMPT, timeout=60)
        proc.stdin.write(b"Human reason\n")
        proc.stdin.flush()
        shown = read_until(proc, PROMPT, timeout=60)  # waiting again after one completion
        assert " SAMPLE 1 " in shown
        proc.send_signal(signal.SIGINT)  # stdin stays open: only Ctrl-C can end it
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    assert b"Traceback" not in err + out
    assert b"interrupted" not in err  # left by interactive(), not turned into exit 130


def test_bad_params_is_one_line_on_stderr(model_dir, tmp_path):
    """(The sample stage without --interactive: test_pipeline_bad_input.py, "top_p out of
    range".)"""
    write_params(tmp_path, sample=dict(top_p=1.5))
    proc = run_stage(
        tmp_path, "sample", *INTERACTIVE, str(model_dir), stdin=subprocess.DEVNULL, env=ENV,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "error: params.yaml: sample.top_p = 1.5: must be a number in [0, 1] (0 = off)"
    ]
    assert proc.stdout == ""


def test_repetition_penalty_and_stop_from_params_reach_the_completions(model_dir, tmp_path):
    settings = dict(length=30, nsamples=2, top_k=0, temperature=1.0, seed=5)
    controls = dict(repetition_penalty=1.5, stop=["e"])
    write_params(tmp_path, sample=settings | controls)
    proc = run_stage(
        tmp_path, "sample", *INTERACTIVE, str(model_dir), input="Human reason\n", env=ENV,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = gpt2tune.load_model(model_dir)
    texts = gpt2tune.generate(model, "Human reason", sampling=Sampling(**settings, **controls))
    shown = "".join(f"{'=' * 40} SAMPLE {i} {'=' * 40}\n{t}\n" for i, t in enumerate(texts, 1))
    assert shown + "=" * 90 + "\n" in proc.stdout
    assert not any("e" in t for t in texts)
    # Ignoring either key would show other texts: without stop they hold an "e", and the
    # penalty alone changes them.
    plain = gpt2tune.generate(model, "Human reason", sampling=Sampling(**settings))
    assert any("e" in t for t in plain)
    penalised = Sampling(**settings, repetition_penalty=1.5)
    assert gpt2tune.generate(model, "Human reason", sampling=penalised) != plain


def test_bytes_the_locale_cannot_decode_are_one_line_and_the_loop_goes_on(model_dir, workdir):
    # A strict UTF-8 locale (PYTHONIOENCODING=utf-8:strict): stdin's decoder raises on \xff.
    env = stage_env(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8:strict")
    proc = run_stage(
        workdir, "sample", *INTERACTIVE, str(model_dir),
        input=b"\xff\xfe broken\nHuman reason\n", env=env, timeout=120, text=False,
    )  # fmt: skip
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err
    assert "error: that line is not valid utf-8 text" in out
    assert out.count(" SAMPLE 1 ") == 1  # the next, valid line is still answered
