"""Faults injected for real: kill -9 at the worst moment of a stage, a disk that fills up
while a model or checkpoint is written, and two `dvc repro` at once.

Kills come from tests/killpoint/sitecustomize.py, which SIGKILLs a stage process right
before a chosen rename (between "the new file is complete" and "it has its final name", or
between the two renames that swap a model folder in). A full disk is RLIMIT_FSIZE: the
kernel fails the write with EFBIG inside TensorFlow's C++ file layer, as ENOSPC would.
"""

from __future__ import annotations

import filecmp
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.models import tiny_model
from helpers.processes import run_in, run_stage, start_in, wait_until_held
from helpers.projects import commit_project, make_project
from helpers.vocab import TINY_CORPUS

from gpt2tune import save_model


def same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return not filecmp.cmpfiles(a, b, names, shallow=False)[1:] != ([], [])


def weights_equal(a, b) -> bool:
    wa, wb = a.weights_numpy(), b.weights_numpy()
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------- a full disk


def limited_file_size(limit: int):
    """Writes past `limit` bytes fail with EFBIG (not SIGXFSZ) until the returned undo()."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))

    def undo() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)

    return undo


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tiny_vocab_dir):
    from gpt2tune.errors import Gpt2tuneError
    from gpt2tune.model.checkpoint import _read_weights, checkpoint_prefix, write_checkpoint

    run_dir = tmp_path / "run1"
    run_dir.mkdir()
    first, second = tiny_model(tiny_vocab_dir, 1), tiny_model(tiny_vocab_dir, seed=2)
    write_checkpoint(run_dir, "model-4", first.params)
    undo = limited_file_size(4096)  # far less than the weights
    try:
        with pytest.raises(Gpt2tuneError) as err:
            write_checkpoint(run_dir, "model-8", second.params)
    finally:
        undo()
    msg = str(err.value)
    assert "could not write the checkpoint" in msg and "model-8" in msg and "\n" not in msg
    assert checkpoint_prefix(run_dir).name == "model-4"  # still names the good one
    restored = _read_weights(checkpoint_prefix(run_dir), first.hparams)
    assert all(np.array_equal(restored[k], v) for k, v in first.weights_numpy().items())


def test_disk_full_while_assembling_keeps_the_previous_model(tmp_path, tiny_vocab_dir):
    from gpt2tune import load_model
    from gpt2tune.model.checkpoint import write_checkpoint

    root = make_project(tmp_path / "project", TINY_CORPUS)
    save_model(tiny_model(tiny_vocab_dir, 0), root / "models" / "tiny")
    (root / "checkpoint" / "run1").mkdir(parents=True)
    write_checkpoint(root / "checkpoint" / "run1", "model-8", tiny_model(tiny_vocab_dir, 1).params)
    previous = tiny_model(tiny_vocab_dir, 2)
    save_model(previous, root / "models" / "finetuned")

    # The stage under a 4 KB file-size limit, SIGXFSZ ignored so the write fails with EFBIG.
    limit = (
        "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY)); "
        "sys.argv = ['stages/assemble.py']; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    proc = run_in(root, sys.executable, "-c", limit)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: could not write the checkpoint models/.finetuned.tmp-")
    assert "File too large" in lines[0] or "space" in lines[0], lines[0]
    assert weights_equal(load_model(root / "models" / "finetuned"), previous)
    assert sorted(p.name for p in (root / "models").iterdir()) == [
        ".gitignore",
        "finetuned",
        "tiny",
    ]


def save_script(folder: Path, hparams: dict, vocab_dir: Path, seed: int) -> Path:
    """folder/save.py: save a tiny model of `seed` as folder/finetuned, as assemble does."""
    script = folder / "save.py"
    script.write_text(
        "import sys; from gpt2tune import init_model, load_encoder, save_model\n"
        f"hp = {dict(hparams)!r}\n"
        f"save_model(init_model(hp, load_encoder({str(vocab_dir)!r}), seed={seed}), 'finetuned')\n"
    )
    return script


def test_load_while_a_save_swaps_the_model_in_waits_for_it(tmp_path, tiny_vocab_dir, monkeypatch):
    """`gpt2tune sample` while assemble is between the two renames that replace
    models/finetuned: the load waits for the save (a lock beside the folder) and gets the
    new model; one still saving after the wait is named as such, not as an interrupted save."""
    from gpt2tune import load_model
    from gpt2tune.errors import Gpt2tuneError
    from gpt2tune.model import checkpoint

    previous = tiny_model(tiny_vocab_dir, 2)
    save_model(previous, tmp_path / "finetuned")
    script = save_script(tmp_path, previous.hparams, tiny_vocab_dir, seed=3)
    go = tmp_path / "go"
    saving = start_in(tmp_path, sys.executable, str(script),
                      kill_at=f"save.py:rename:finetuned:2:{go}")  # fmt: skip
    try:
        wait_until_held(saving, go, 120)
        assert not (tmp_path / "finetuned").exists()  # between the renames
        monkeypatch.setattr(checkpoint, "SAVE_WAIT_S", 0.2)
        with pytest.raises(Gpt2tuneError, match=r"is being written by process \d+") as err:
            load_model(tmp_path / "finetuned")
        assert "interrupted" not in str(err.value)
        monkeypatch.undo()
        threading.Timer(0.5, go.touch).start()  # the save goes on while the load waits
        loaded = load_model(tmp_path / "finetuned")
    finally:
        go.touch()
        saving.communicate(timeout=120)
    assert saving.returncode == 0
    assert weights_equal(loaded, tiny_model(tiny_vocab_dir, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetuned", "go", "go.held", "save.py"]


@pytest.mark.slow  # ~10 s; beyond what DVC pipelines meet (DVC removes the folder first)
def test_kill_while_replacing_a_model_outside_dvc(tmp_path, tiny_vocab_dir):
    """save_model over an existing folder, killed between its two renames: the old model is
    named by the error of the next load, and the next save cleans up."""
    from gpt2tune import load_model
    from gpt2tune.errors import Gpt2tuneError

    previous = tiny_model(tiny_vocab_dir, 2)
    save_model(previous, tmp_path / "finetuned")
    script = save_script(tmp_path, previous.hparams, tiny_vocab_dir, seed=3)
    assert_killed(
        run_in(tmp_path, sys.executable, str(script), kill_at="save.py:rename:finetuned:2")
    )
    with pytest.raises(Gpt2tuneError, match="a save was interrupted") as err:
        load_model(tmp_path / "finetuned")
    aside = Path(str(err.value).split("previous model is in ")[1].split(";")[0])
    assert weights_equal(load_model(aside), previous)
    save_model(tiny_model(tiny_vocab_dir, 4), tmp_path / "finetuned")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetuned", "save.py"]


# --------------------------------------------------------------------------- kill -9 and DVC


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory, tiny_vocab_dir):
    """A git + DVC project: a tiny GPT-2 fetched from a local folder, a paragraph of text,
    two training steps, one sample; MLflow in the project's sqlite store."""
    tmp = tmp_path_factory.mktemp("faults")
    source = tmp / "releases" / "tiny"
    save_model(tiny_model(tiny_vocab_dir, 0), source)
    (source / "model.ckpt.meta").write_bytes(b"")  # the release has one; it is never read
    root = make_project(
        tmp / "project", TINY_CORPUS * 8,
        model=dict(name="tiny", base_url=str(source.parent)),
        train=dict(steps=2, batch_size=1, n_ctx=16, sample_every=0, save_every=0, val_every=0),
        sample=dict(nsamples=1, length=4, prompts=["Human reason"]),
        mlflow=dict(tracking_uri="sqlite:///mlflow.db", experiment="faults"),
    )  # fmt: skip
    commit_project(root)
    # What encode gives, undisturbed, in a plain copy of the project (no DVC involved).
    ref = tmp / "reference"
    shutil.copytree(root, ref)
    assert run_stage(ref, "fetch_model").returncode == 0
    proc = run_stage(ref, "encode")
    assert proc.returncode == 0, proc.stderr
    return root, ref


def complete_pipeline(root: Path, ref: Path) -> None:
    """root's pipeline run to its end, and its assemble and sample outputs kept in ref as the
    undisturbed ones that the kill tests compare against (once per module)."""
    if (ref / "samples").exists():
        return
    proc = run_in(root, "dvc", "repro")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for out in ("models/finetuned", "samples"):
        shutil.copytree(root / out, ref / out)


def assert_killed(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    # -9 when run directly; under DVC, its report of the stage's exit.
    killed = proc.returncode == -signal.SIGKILL or any(s in out for s in ("-9", "SIGKILL", "137"))
    assert proc.returncode != 0 and killed, out[-3000:]


def test_kill_during_encode_then_repro(dvc_project):
    root, ref = dvc_project
    # Killed with train.npy renamed into place and val.npy, stats.json not yet.
    assert_killed(run_in(root, "dvc", "repro", kill_at="stages/encode.py:replace:val.npy:1"))
    assert not (root / "data" / "encoded" / "stats.json").exists()
    proc = run_in(root, "dvc", "repro")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert same_tree(root / "data" / "encoded", ref / "data" / "encoded")
    assert list((root / "data" / "encoded").glob(".*")) == []  # no temporary files left
    complete_pipeline(root, ref)  # the next tests compare against these outputs


def test_kill_while_moving_the_assembled_model_in(dvc_project):
    root, ref = dvc_project
    complete_pipeline(root, ref)
    # DVC removed the old output before the stage ran; killed with the new model complete
    # in models/.finetuned.tmp-* but not yet renamed to models/finetuned.
    kill = "stages/assemble.py:rename:finetuned:1"
    assert_killed(run_in(root, "dvc", "repro", "-f", "-s", "assemble", kill_at=kill))
    assert not (root / "models" / "finetuned").exists()
    # The save's lock file stays too (the kernel has let go of the lock); the next save removes it.
    leftovers = sorted(p.name[:15] for p in (root / "models").glob(".fine*"))
    assert leftovers == [".finetuned.lock", ".finetuned.tmp-"]
    proc = run_in(root, "dvc", "repro")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DVC restores the model from its cache (the stage's deps did not change) or reruns it.
    assert same_tree(root / "models" / "finetuned", ref / "models" / "finetuned")


def test_kill_during_sample_then_repro(dvc_project):
    root, ref = dvc_project
    complete_pipeline(root, ref)
    kill = "stages/sample.py:replace:samples.md:1"  # samples.json written, samples.md not
    assert_killed(run_in(root, "dvc", "repro", "-f", "-s", "sample", kill_at=kill))
    proc = run_in(root, "dvc", "repro")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert same_tree(root / "samples", ref / "samples")


def test_second_repro_at_once_is_refused(dvc_project, tmp_path):
    root, ref = dvc_project
    complete_pipeline(root, ref)
    # The first repro's assemble is held just before it renames the new model into place,
    # until the test has tried the second one.
    go = tmp_path / "go"
    hold = f"stages/assemble.py:rename:finetuned:1:{go}"
    first = start_in(root, "dvc", "repro", "-f", "-s", "assemble", kill_at=hold,
                     stderr=subprocess.STDOUT)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
    reader.start()
    wait_until_held(first, go, 180, lambda: "".join(lines))
    began = time.monotonic()
    second = run_in(root, "dvc", "repro")
    assert second.returncode != 0
    # DVC's repository lock, or (while a stage command runs) its lock on the stage's paths.
    refused = ("Unable to acquire lock", "is busy, it is being blocked by")
    assert any(r in second.stderr for r in refused), second.stdout + second.stderr
    assert "Running stage" not in second.stdout  # it ran nothing
    assert first.poll() is None, "the first repro should still be running"
    print(f"second repro refused after {time.monotonic() - began:.1f} s")
    go.touch()
    assert first.wait(300) == 0, "".join(lines)
    reader.join()
    assert same_tree(root / "models" / "finetuned", ref / "models" / "finetuned")
    # The next save also removed what the killed one had left in models/.finetuned.tmp-*.
    assert list((root / "models").glob(".fine*")) == []
    status = run_in(root, "dvc", "status")
    assert "up to date" in status.stdout, status.stdout
