"""Every shell block of the README, docs/experiments.md and docs/serving.md, run in order in a
throwaway git repository, as a user pastes them.

The blocks come from the pages themselves (their ```bash fences), so this test follows the
pages: a command that stops working, a wrong flag or a missing step fails it. A block that
cannot run here carries a mark in the page's source, an HTML comment on the line before its
fence, and is only listed:

- ``<!-- not-run: REASON -->``: installs from the internet, needs cloud storage, a web UI that
  never returns, ...; NOT_RUN below is the expected list, reason by reason;
- ``<!-- run: on another machine -->``: run in an empty folder beside the project, where
  ``<repo>`` stands for the project.

The project is a copy of this one (helpers.projects) set up the README's way for offline use
("Offline, and a tiny trial run"): in params.yaml, ``model.base_url`` is a local folder holding
a one-layer GPT-2 as ``124M/``, ``data.path`` 30 KB of Kant, and the training settings tiny.
A few placeholders of the pages are filled in (SUBSTITUTIONS); `mlflow models serve` runs in
the background until its block ends; after a block that starts `dvc queue start`, the test
waits for the queue to run dry.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO
from helpers.mlflowserver import free_ports
from helpers.models import write_official_style_model
from helpers.processes import drain_queue, run_in, stage_env
from helpers.projects import commit_project, make_project

from gpt2tune.model.encoder import load_encoder

PAGES = ("README.md", "docs/experiments.md", "docs/serving.md")  # the order a user reads them

# Every block not run, by page and first line, with its mark's reason.
NOT_RUN = {
    ("README.md", "python3 -m venv .venv && . .venv/bin/activate && pip install -e ."):
        "installs from PyPI",
    ("README.md", "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"):
        "downloads torch from the internet",
    ("README.md", "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && dvc repro"):
        "installs from PyPI, then downloads GPT-2 124M and trains it 1000 steps",
    ("README.md", "mlflow ui --backend-store-uri sqlite:///mlflow.db   # http://127.0.0.1:5000: runs, loss curves,"):  # noqa: E501
        "a web UI that runs until stopped",
    ("README.md", "mlflow models build-docker -m models:/gpt2tune@candidate -n gpt2tune-serve"):
        "needs Docker and network",
    ("README.md", "python3 -m venv .venv && .venv/bin/pip install -c requirements/lock.txt torch==2.13.0 && .venv/bin/pip install -c requirements/lock.txt -e '.[dev,hf]' && .venv/bin/python -m pytest -q"):  # noqa: E501
        "installs from PyPI and runs the whole test suite",
    ("docs/experiments.md", "dvc remote add -d storage s3://bucket/path       # pip install 'dvc[s3]'"):  # noqa: E501
        "needs cloud storage, its credentials and a DVC extra",
    ("docs/serving.md", ".venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"):  # noqa: E501
        "downloads torch from the internet",
    ("docs/serving.md", 'docker run -p 8501:8501 -v "$PWD/models/finetuned-savedmodel:/models/gpt2/1" \\'):  # noqa: E501
        "needs Docker and the tensorflow/serving image",
}  # fmt: skip

ELSEWHERE = "run: on another machine"
MARK = re.compile(r"<!--\s*(not-run:\s*(?P<reason>.+?)|(?P<run>run:\s*.+?))\s*-->")

# The test project: a one-layer GPT-2 (128 positions: the smoke run's train.n_ctx) over the
# tiny vocabulary, 30 KB of Kant, and training settings that make every training a few steps.
HP = {"n_ctx": 128, "n_embd": 16, "n_head": 2, "n_layer": 1}
TRAIN = dict(steps=4, n_ctx=32, sample_every=0, val_every=2, val_batch_count=2)  # the README's
SAMPLE = dict(length=8, prompts=["Human reason"])  # and a short prompt


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    text: str
    not_run: str | None  # the reason, for a block marked not-run
    elsewhere: bool  # marked to run on another machine

    @property
    def first(self) -> str:
        return self.text.splitlines()[0]

    def __str__(self) -> str:
        return f"{self.page}:{self.line} `{self.first}`"


def page_blocks(page: str) -> list[Block]:
    """The ```bash blocks of a page (also indented ones, inside a list), with their marks."""
    lines = (REPO / page).read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = lines[i].lstrip()
        if fence.startswith("```bash"):
            indent = len(lines[i]) - len(fence)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            body = "\n".join(line[indent:] for line in lines[i + 1 : end])
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            mark = MARK.search(prev)
            run = mark and mark["run"] and mark["run"].strip()
            assert run in (None, ELSEWHERE), f"{page}:{i}: an unknown mark {prev}"
            blocks.append(Block(page, i + 1, body, mark and mark["reason"], run == ELSEWHERE))
            i = end
        i += 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in page_blocks(page)]


def test_blocks_not_run_are_the_expected_ones():
    blocks = all_blocks()
    skipped = {(b.page, b.first): b.not_run for b in blocks if b.not_run}
    print("\nblocks not run:", *(f"{b} -- {b.not_run}" for b in blocks if b.not_run), sep="\n  ")
    assert skipped == NOT_RUN
    assert sum(not b.not_run for b in blocks) >= 10, [str(b) for b in blocks]


def commands(block: str) -> list[str]:
    """The block's top-level commands: lines joined until bash parses them whole (a quoted
    string over several lines, a line ending in a backslash)."""
    found, pending = [], ""
    for line in block.splitlines():
        pending += line + "\n"
        if line.endswith("\\"):
            continue
        if subprocess.run(["bash", "-n", "-c", pending], capture_output=True).returncode == 0:
            if pending.strip() and not pending.lstrip().startswith("#"):
                found.append(pending.rstrip("\n"))
            pending = ""
    assert not pending.strip(), f"an unfinished command: {pending}"
    return found


# Shell functions ahead of each block. `mlflow models serve` never returns: it starts in the
# background, in a session of its own (the test stops it with its whole process group once the
# block has run), and the block goes on once the server answers /ping.
PRELUDE = r"""
set -o pipefail
mlflow() {
  if [ "${1-}" = models ] && [ "${2-}" = serve ]; then
    local port=5000 prev= arg
    for arg in "$@"; do
      case "$prev" in --port|-p) port=$arg;; esac
      prev=$arg
    done
    setsid mlflow "$@" >>"$DOCS_LOGS/serve.log" 2>&1 </dev/null &
    echo $! >>"$DOCS_LOGS/servers"
    curl -sf --retry 180 --retry-delay 1 --retry-connrefused -o /dev/null \
      "http://127.0.0.1:$port/ping" || { echo "mlflow models serve did not start" >&2; return 1; }
  else
    command mlflow "$@"
  fi
}
"""

CHECK = """__rc=$?; if [ $__rc -ne 0 ]; then echo "<<failed ($__rc): {n}>>"; exit $__rc; fi"""


def script(block: Block, substitutions: dict[str, str]) -> tuple[str, list[str]]:
    """The bash script that runs the block, stopping at the first command that fails."""
    text = block.text
    for placeholder, value in substitutions.items():
        text = text.replace(placeholder, value)
    cmds = commands(text)
    steps = [f"{cmd}\n{CHECK.format(n=n)}" for n, cmd in enumerate(cmds)]
    return "\n".join([PRELUDE, *steps]), cmds


def stop_servers(logs: Path) -> None:
    pids = logs / "servers"
    if not pids.exists():
        return
    for pid in pids.read_text().split():
        try:
            os.killpg(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    pids.unlink()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_vocab_dir, kant_path) -> Path:
    """The README's offline setup: a local model folder (`model.base_url`) holding a tiny
    GPT-2 as 124M/, a local text (`data.path`), tiny training settings."""
    tmp = tmp_path_factory.mktemp("docs")
    models = tmp / "gpt2-models"
    n_vocab = load_encoder(tiny_vocab_dir).n_vocab
    write_official_style_model(models / "124M", dict(HP, n_vocab=n_vocab), tiny_vocab_dir)
    text = kant_path.read_text(encoding="utf-8")[:30_000]
    root = make_project(
        tmp / "project", text,
        model=dict(name="124M", base_url=str(models)),
        data=dict(path="data/kant.txt"),
        train=TRAIN, sample=SAMPLE,
    )  # fmt: skip
    (root / "data" / "dset.txt").rename(root / "data" / "kant.txt")  # make_project's name
    commit_project(root)
    return root


@pytest.mark.slow  # every documented command: ~40 TensorFlow processes, two queued sweeps
def test_every_documented_command_runs(project):
    timings = run_blocks(project, [b for b in all_blocks() if not b.not_run])
    print("\ndocumented blocks run (s):", *timings, sep="\n  ")
    # The tiny model of the local folder was used, never a download.
    assert json.loads((project / "models" / "124M" / "hparams.json").read_text())["n_layer"] == 1


def run_blocks(root: Path, blocks: list[Block]) -> list[tuple[str, float]]:
    """Run the blocks one after another, each in a fresh bash in the project (or, marked so, in
    a new folder beside it); fail on the first command that fails. Returns (block, seconds)."""
    logs = root.parent / "logs"
    logs.mkdir(exist_ok=True)
    (port,) = free_ports(1)
    substitutions = {
        "<repo>": str(root),
        "/mnt/shared/gpt2tune": str(root.parent / "dvc-remote"),
        "5001": str(port),
        # an experiment the sweep above made, as `dvc exp ls` names it
        "<experiment>": '"$(dvc exp ls -A --name-only | tail -n 1)"',
    }
    env = stage_env(DOCS_LOGS=str(logs))
    stdin = logs / "stdin.txt"
    stdin.write_text("Human reason\n")  # what a user types into `gpt2tune chat`
    timings = []
    try:
        for block in blocks:
            timings.append(run_block(root, block, logs, substitutions, env, stdin))
    finally:
        stop_servers(logs)
        run_in(root, "dvc", "queue", "stop", "--kill")  # a sweep left by a failed block
    return timings


def run_block(root: Path, block: Block, logs: Path, substitutions: dict[str, str],
              env: dict[str, str], stdin: Path) -> tuple[str, float]:  # fmt: skip
    """Run one block in a fresh bash; fail on its first command that fails."""
    text, cmds = script(block, substitutions)
    cwd = root.parent / f"elsewhere-{block.line}" if block.elsewhere else root
    cwd.mkdir(exist_ok=True)
    log = logs / f"{block.page.replace('/', '-')}-{block.line}.log"
    t0 = time.monotonic()
    # Output to a file, not a pipe: `dvc queue start` leaves a worker holding it.
    with open(log, "w") as out, open(stdin) as typed:
        proc = run_in(cwd, "bash", "-c", text, env=env, capture_output=False, stdin=typed,
                      stdout=out, stderr=subprocess.STDOUT, timeout=1200)  # fmt: skip
    stop_servers(logs)
    output = log.read_text(errors="replace")
    failed = re.search(r"<<failed \((\d+)\): (\d+)>>", output)
    where = cmds[int(failed[2])] if failed else "(the block)"
    assert proc.returncode == 0, f"{block}: `{where}` failed:\n{output[-6000:]}"
    if "dvc queue start" in block.text:
        drain_queue(root, log, timeout=1800)
    return str(block), round(time.monotonic() - t0, 1)
