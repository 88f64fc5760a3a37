"""`python stages/sample.py --interactive`: prompts from stdin, Ctrl-D and Ctrl-C leave
cleanly; a bad params.yaml is one line on stderr. Each test runs the stage script in a
subprocess, in a folder holding its own params.yaml."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO

import gpt2tune
from gpt2tune.model import init_model

STAGE = REPO / "stages" / "sample.py"
PROMPT = "Model prompt >>> "
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def write_params(folder, **sample) -> None:
    """The repository's params.yaml with some `sample` keys changed."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sample"].update(sample)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_vocab_dir):
    n_vocab = gpt2tune.load_encoder(tiny_vocab_dir).n_vocab
    hp = {"n_vocab": n_vocab, "n_ctx": 32, "n_embd": 32, "n_head": 2, "n_layer": 2}
    folder = tmp_path_factory.mktemp("interactive") / "model"
    gpt2tune.save_model(init_model(hp, gpt2tune.load_encoder(tiny_vocab_dir), seed=0), folder)
    return folder


@pytest.fixture
def workdir(tmp_path):
    write_params(tmp_path, length=5, nsamples=1, top_k=0, temperature=1.0)
    return tmp_path


def stage(*args: str) -> list[str]:
    return [sys.executable, str(STAGE), *args]


def test_prompts_from_stdin_then_end_of_input(model_dir, workdir):
    proc = subprocess.run(
        stage("--interactive", "--model", str(model_dir)),
        input="Human reason\nThe mind\n", capture_output=True, text=True, cwd=workdir,
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
    proc = subprocess.Popen(
        stage("--interactive", "--model", str(model_dir)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
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
    write_params(tmp_path, top_p=1.5)
    proc = subprocess.run(
        stage("--interactive", "--model", str(model_dir)),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=tmp_path, env=ENV,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "error: params.yaml: sample.top_p = 1.5: must be a number in [0, 1] (0 = off)"
    ]
    assert proc.stdout == ""

    plain = subprocess.run(
        stage(), capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=60
    )  # the sample stage itself, not only --interactive
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert len(plain.stderr.splitlines()) == 1 and "sample.top_p" in plain.stderr
