"""The export journeys, as a user runs them (`gpt2tune export`, `python stages/export.py`,
`dvc repro`): an export writes into a new or empty folder, or over an earlier export of
gpt2tune's own (its .gpt2tune-export.json lists the files it wrote), and nothing else; a
command the user types always exports, `export.hf` governs only the DVC stage; a full disk is
one line, and the earlier export stays as it was.

Needs no torch: the export goes through safetensors.numpy (tests/test_model_hf.py checks
what transformers makes of it).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.models import tiny_model
from helpers.processes import run_in, run_stage
from helpers.projects import commit_project, make_project, snapshot
from helpers.vocab import TINY_CORPUS

from gpt2tune import save_model
from gpt2tune.model.hf import EXPORT_MARKER, export_hf
from gpt2tune.paths import FINETUNED, FINETUNED_HF

HF_FILES = sorted(
    [
        EXPORT_MARKER,
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "tokenizer_config.json",
        "vocab.json",
    ]
)
NOTE_FILES = sorted([EXPORT_MARKER, "README.txt"])


@pytest.fixture
def project(tmp_path, tiny_vocab_dir) -> Path:
    """A git-committed project with a base model, a fine-tuned one, a checkpoint, mlflow.db."""
    root = make_project(tmp_path / "project", TINY_CORPUS)
    save_model(tiny_model(tiny_vocab_dir, 0), root / "models" / "tiny")
    save_model(tiny_model(tiny_vocab_dir, 1), root / "models" / "finetuned")
    (root / "checkpoint" / "run1").mkdir(parents=True)
    (root / "checkpoint" / "run1" / "model-2.index").write_bytes(b"a checkpoint of the user's")
    commit_project(root)
    return root


def gpt2tune(root: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_in(root, sys.executable, "-m", "gpt2tune", *args, **kw)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, lines)
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def export_in_process(root: Path, out: str | Path = FINETUNED_HF) -> None:
    """An earlier export, made without a subprocess (each pays TensorFlow's start-up)."""
    export_hf(root / FINETUNED, root / out)


# --------------------------------------------------------------------------- what it may replace


def users_folder(root: Path) -> tuple[str, str]:
    (root / "thesis" / "sub").mkdir(parents=True)
    (root / "thesis" / "thesis.txt").write_text("chapter one", encoding="utf-8")
    (root / "thesis" / "sub" / "notes.txt").write_text("notes", encoding="utf-8")
    return "thesis", "thesis"


def users_file_in_an_export(root: Path) -> tuple[str, str]:
    """An earlier export of gpt2tune's, plus a model card the user wrote into it."""
    export_in_process(root, "card")
    (root / "card" / "README.md").write_text("my model card", encoding="utf-8")
    return "card", "README.md"


OVER = {  # name -> (make the folder in the project: (--out, what the error must name))
    "a folder of the user's": users_folder,
    "models": lambda root: ("models", "models"),
    "the project root": lambda root: (".", str(root)),
    "a file of the user's in an earlier export": users_file_in_an_export,
}


@pytest.mark.parametrize("case", OVER)
def test_export_over_what_it_did_not_write_is_refused(project, case):
    out, named = OVER[case](project)
    before = snapshot(project)
    line = one_error_line(gpt2tune(project, "export", "--out", out))
    assert named in line and "new or empty folder" in line, line
    assert snapshot(project) == before  # nothing written, nothing deleted


def test_export_into_a_new_or_empty_folder_and_over_its_own(project, tiny_vocab_dir):
    (project / "empty").mkdir()
    for out in ("empty", "new/hf"):
        export_in_process(project, out)
        assert names(project / out) == HF_FILES
    first = (project / "empty" / "model.safetensors").read_bytes()
    save_model(tiny_model(tiny_vocab_dir, 7), project / "models" / "finetuned")  # retrained
    proc = gpt2tune(project, "export", "--out", "empty")
    assert proc.returncode == 0, proc.stderr
    assert (project / "empty" / "model.safetensors").read_bytes() != first
    assert names(project / "empty") == HF_FILES
    assert sorted(p.name for p in project.iterdir() if p.name.startswith(".empty")) == []


def test_a_bare_export_always_exports(project, tiny_vocab_dir):
    """export.hf is false (the default); it governs the DVC stage, not a command one types.
    (It used to print "nothing exported" and delete the export made a moment before.)"""
    out = project / FINETUNED_HF
    export_in_process(project)
    save_model(tiny_model(tiny_vocab_dir, 7), project / "models" / "finetuned")
    before = (out / "model.safetensors").read_bytes()
    again = gpt2tune(project, "export")
    assert again.returncode == 0, again.stderr
    assert f"exported {FINETUNED} to {FINETUNED_HF}" in again.stdout
    assert names(out) == HF_FILES and (out / "model.safetensors").read_bytes() != before
    assert names(project / "models") == [".gitignore", "finetuned", "finetuned-hf", "tiny"]


# --------------------------------------------------------------------------- the DVC stage


def test_the_stage_with_export_hf_false_writes_only_its_note(project):
    out = project / FINETUNED_HF
    proc = run_stage(project, "export")
    assert proc.returncode == 0, proc.stderr
    assert "nothing exported" in proc.stdout and names(out) == NOTE_FILES
    # Over an export of its own (typed by hand earlier): replaced by the note, so that an
    # export of other settings cannot pass for the stage's output.
    export_in_process(project)
    assert names(out) == HF_FILES
    assert run_stage(project, "export").returncode == 0 and names(out) == NOTE_FILES
    # Over files it did not write (run by hand, outside DVC): refused, nothing deleted.
    for f in NOTE_FILES:
        (out / f).unlink()
    (out / "model.safetensors").write_bytes(b"the user's own export")
    before = snapshot(project)
    line = one_error_line(run_stage(project, "export"))
    assert str(FINETUNED_HF) in line and "new or empty folder" in line, line
    assert snapshot(project) == before


def test_dvc_repro_export_with_export_hf_false(project):
    """Under `dvc repro` the stage never meets an earlier folder: DVC removes its output
    itself before running the stage (what it made is in its cache), here an export typed by
    hand. The note is the output."""
    export_in_process(project)
    proc = run_in(project, "dvc", "repro", "-s", "export")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert names(project / FINETUNED_HF) == NOTE_FILES
    status = run_in(project, "dvc", "status", "export")
    assert "up to date" in status.stdout, status.stdout


# --------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[None]:
    """A real small file system at `folder` (needs root and a kernel that lets us mount)."""
    folder.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip() or mount.returncode}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


# `python -m gpt2tune` under a 4 KB file-size limit, SIGXFSZ ignored: writes fail with EFBIG.
FILE_SIZE_LIMIT = (
    "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY)); "
    "sys.argv = ['gpt2tune', *sys.argv[1:]]; runpy.run_module('gpt2tune', run_name='__main__')"
)


@pytest.mark.parametrize("full", ["tmpfs", "file-size limit"])
def test_disk_full_during_the_export_keeps_the_earlier_export(project, tiny_vocab_dir, full):
    disk = project / "disk"
    with contextlib.ExitStack() as stack:
        if full == "tmpfs":  # 1 MiB: room for the small export, not for the bigger one
            stack.enter_context(tmpfs(disk, "1m"))
        export_in_process(project, "disk/hf")
        before = snapshot(disk)
        bigger = tiny_model(tiny_vocab_dir, 3, n_embd=256, n_layer=2)  # ~7 MB of weights
        save_model(bigger, project / "models" / "finetuned")
        command = ["-m", "gpt2tune"] if full == "tmpfs" else ["-c", FILE_SIZE_LIMIT]
        proc = run_in(project, sys.executable, *command, "export", "--out", "disk/hf")
        line = one_error_line(proc)
        assert "could not write disk/hf" in line and "check free disk space" in line, line
        assert "No space left" in line or "File too large" in line, line
        assert snapshot(disk) == before  # the earlier export, byte for byte
        assert names(disk) == ["hf"]  # no temporary folder left
