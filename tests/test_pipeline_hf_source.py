"""A local Hugging Face folder as the base model (`model.name: hf:hf/<folder>`), under DVC:
fetch_model depends on hf/, so editing the folder converts it again, while an unchanged one
is not converted twice; a folder elsewhere is converted with a note that DVC cannot see it
change."""

from __future__ import annotations

import hashlib
from pathlib import Path

from helpers.models import tiny_model
from helpers.processes import run_in
from helpers.projects import commit_project, make_project

from gpt2tune import save_model
from gpt2tune.model.hf import export_hf


def hf_folder(vocab: Path, out: Path, seed: int) -> None:
    """A tiny GPT-2 (seed `seed`) written as a Hugging Face folder at `out`."""
    openai = out.parent / f".openai-{seed}"
    save_model(tiny_model(vocab, seed=seed), openai)
    export_hf(openai, out)


def weights_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.ckpt.data-00000-of-00001").read_bytes()).hexdigest()


def test_an_edited_hf_folder_is_converted_again(tmp_path, tiny_vocab_dir):
    root = make_project(tmp_path / "p", "text", model={"name": "hf:hf/tiny"})
    hf_folder(tiny_vocab_dir, root / "hf" / "tiny", seed=0)
    commit_project(root)
    converted = root / "models" / "hf:hf" / "tiny"

    first = run_in(root, "dvc", "repro", "fetch_model")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "DVC does not watch" not in first.stderr  # under hf/: DVC watches it
    before = weights_digest(converted)

    again = run_in(root, "dvc", "repro", "fetch_model")
    assert "didn't change" in again.stdout and weights_digest(converted) == before

    hf_folder(tiny_vocab_dir, root / "hf" / "tiny", seed=1)  # the user's edit: other weights
    edited = run_in(root, "dvc", "repro", "fetch_model")
    assert edited.returncode == 0, edited.stdout[-2000:] + edited.stderr[-2000:]
    assert "Running stage 'fetch_model'" in edited.stdout
    assert weights_digest(converted) != before


def test_a_folder_outside_hf_is_converted_with_a_note(tmp_path, tiny_vocab_dir):
    root = make_project(tmp_path / "p", "text", model={"name": "hf:elsewhere"})
    hf_folder(tiny_vocab_dir, root / "elsewhere", seed=0)
    proc = run_in(root, "gpt2tune", "fetch")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "DVC does not watch elsewhere" in proc.stderr and "dvc repro -f fetch_model" in proc.stderr
    )
    assert (root / "models" / "hf:elsewhere" / "hparams.json").is_file()
