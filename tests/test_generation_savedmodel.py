"""The SavedModel export (gpt2tune.generation.savedmodel, `gpt2tune export --format savedmodel`):
a fresh Python that never imports gpt2tune loads it with tf.saved_model.load and gets from its
`generate` signature the ids gpt2tune.generate_tokens gives (greedy, sampled, and past the
context, where the window slides), from `score` the model's log-probabilities within 1e-5;
`saved_model_cli` lists both signatures; the weights are on disk once; a full disk is one
line and leaves nothing behind; the export folder rules hold for a folder with subfolders
(variables/); the export stage's switch.

The loading, listing and exporting run TensorFlow in subprocesses (each ~5-30 s of start-up
and XLA compiling on 2 busy cores): slow. The folder rules need no TensorFlow: default.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers.models import tiny_model
from helpers.processes import run_in, run_stage
from helpers.projects import commit_project, make_project, snapshot
from helpers.vocab import TINY_CORPUS

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.model import hf
from gpt2tune.paths import FINETUNED, FINETUNED_HF, FINETUNED_SAVEDMODEL

PENALTY = 1.3  # the export's fixed repetition_penalty: generate_tokens must be given the same
LENGTH = 40  # new tokens: past the tiny model's context of 32 after a 3-token prompt
PROMPTS = [[5, 6, 7], [8, 9, 10]]
SAMPLED = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 3}

# What a server does with the folder: TensorFlow alone. Requests come as JSON on argv; the
# answers (or the error's first line) go to stdout as JSON.
LOADER = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    folder, requests = sys.argv[1], json.loads(sys.argv[2])
    model = tf.saved_model.load(folder)
    DTYPES = {"tokens": tf.int32, "max_new_tokens": tf.int32, "top_k": tf.int32,
              "temperature": tf.float32, "top_p": tf.float32, "seed": tf.int64}
    answers = []
    for name, inputs in requests:
        fn = model.signatures[name]
        try:
            out = fn(**{k: tf.constant(v, DTYPES[k]) for k, v in inputs.items()})
            answers.append({k: v.numpy().tolist() for k, v in out.items()})
        except tf.errors.InvalidArgumentError as e:
            answers.append({"error": e.message})
    answers.append({"gpt2tune imported": "gpt2tune" in sys.modules})
    print(json.dumps(answers))
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_vocab_dir):
    """(the model, the folder it was saved to, its SavedModel export)."""
    from gpt2tune import save_model
    from gpt2tune.config.params import Sampling
    from gpt2tune.generation.savedmodel import export_savedmodel

    root = tmp_path_factory.mktemp("savedmodel")
    model = tiny_model(tiny_vocab_dir, seed=1, n_layer=2)
    save_model(model, root / "model")
    export_savedmodel(root / "model", root / "sm", Sampling(repetition_penalty=PENALTY))
    return model, root / "model", root / "sm"


def load_and_call(folder: Path, requests: list) -> list:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # gpt2tune not on the path
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), json.dumps(requests)],
        capture_output=True,
        text=True,
        env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    *answers, imported = json.loads(proc.stdout.splitlines()[-1])
    assert imported == {"gpt2tune imported": False}
    return answers


def generate_request(tokens, max_new_tokens=LENGTH, temperature=0.0, top_k=0, top_p=0.0, seed=0):
    return ["generate", {"tokens": tokens, "max_new_tokens": max_new_tokens,
                         "temperature": temperature, "top_k": top_k, "top_p": top_p,
                         "seed": seed}]  # fmt: skip


@pytest.mark.slow
def test_a_fresh_process_gets_gpt2tunes_ids_and_log_probs(exported):
    from gpt2tune import generate_tokens

    model, _, folder = exported
    rng = np.random.default_rng(0)
    scored = rng.integers(0, model.hparams["n_vocab"], size=(2, model.hparams["n_ctx"]))
    greedy, sampled, score, too_few, too_long = load_and_call(folder, [
        generate_request(PROMPTS),
        generate_request([PROMPTS[0]] * 2, **SAMPLED),
        ["score", {"tokens": scored.tolist()}],
        generate_request(PROMPTS, max_new_tokens=0),
        ["score", {"tokens": [[1] * (model.hparams["n_ctx"] + 1)]}],
    ])  # fmt: skip

    common = {"repetition_penalty": PENALTY}
    for row, prompt in zip(greedy["tokens"], PROMPTS, strict=True):
        want = generate_tokens(model, prompt, LENGTH, nsamples=1, temperature=0, **common)
        assert row == want[0].tolist()
    # Row i samples from (seed, i), as generate_tokens' nsamples rows do.
    want = generate_tokens(model, PROMPTS[0], LENGTH, nsamples=2, **SAMPLED, **common)
    assert sampled["tokens"] == want.tolist()
    assert want[0].tolist() != want[1].tolist()  # two rows, two keys: a real check of the rule

    logits = model(scored).numpy().astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)  # the model's log-softmax, in float64
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    want = np.take_along_axis(logp[:, :-1], scored[:, 1:, None], axis=-1)[..., 0]
    got = np.asarray(score["log_probs"])
    assert got.shape == (2, model.hparams["n_ctx"] - 1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    assert "max_new_tokens must be 1..1000000" in too_few["error"]
    assert "tokens: longer than the model context of 32 tokens" in too_long["error"]


@pytest.mark.slow
def test_saved_model_cli_lists_the_signatures(exported):
    *_, folder = exported
    cli = Path(sys.executable).parent / "saved_model_cli"
    proc = subprocess.run(
        [str(cli), "show", "--all", "--dir", str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    def tensors(signature: str, kind: str) -> dict[str, tuple[str, str]]:
        block = re.search(rf"signature_def\['{signature}'\]:\n(.*?)(?=\n\s*Method name)",
                          proc.stdout, re.S)  # fmt: skip
        assert block, proc.stdout
        part = block[1].split("output(s):")[0 if kind == "inputs" else 1]
        found = re.findall(rf"{kind}\['(\w+)'\] tensor_info:\s*dtype: (\w+)\s*shape: (\S+)", part)
        return {name: (dtype, shape) for name, dtype, shape in found}

    matrix = "(-1,"  # the shape prints as (-1, -1): the regex stops at the space
    assert tensors("generate", "inputs") == {
        "tokens": ("DT_INT32", matrix),
        "max_new_tokens": ("DT_INT32", "()"),
        "temperature": ("DT_FLOAT", "()"),
        "top_k": ("DT_INT32", "()"),
        "top_p": ("DT_FLOAT", "()"),
        "seed": ("DT_INT64", "()"),
    }
    assert tensors("generate", "outputs") == {"tokens": ("DT_INT32", matrix)}
    assert tensors("score", "inputs") == {"tokens": ("DT_INT32", matrix)}
    assert tensors("score", "outputs") == {"log_probs": ("DT_FLOAT", matrix)}
    assert "(-1, -1)" in proc.stdout


@pytest.mark.slow
def test_the_weights_are_on_disk_once(exported):
    """variables/ holds each float32 weight once: its size is the weights' bytes plus the
    checkpoint's index and object graph (a few KB), less than half of what a second copy of
    the embedding would add. No constant in the graph holds a weight (the sampler's
    transposed embedding is computed per call)."""
    from tensorflow.core.protobuf import saved_model_pb2

    model, _, folder = exported
    weights = sum(v.numpy().nbytes for v in model.params.values())
    wte = model.params["model/wte"].numpy().nbytes
    size = sum(f.stat().st_size for f in (folder / "variables").iterdir())
    assert weights <= size < weights + wte / 2, (size, weights, wte)

    saved = saved_model_pb2.SavedModel.FromString((folder / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    biggest = max(len(n.attr["value"].tensor.tensor_content) for n in nodes if n.op == "Const")
    smallest_weight = min(v.numpy().nbytes for v in model.params.values() if v.shape.rank > 1)
    assert biggest < smallest_weight, (biggest, smallest_weight)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_sample_precision_exports_those_weights_and_gpt2tunes_rows_at_it(
    exported, tmp_path, precision
):
    """sample.precision bfloat16 or int8: variables/ holds precision.prepare's weights
    (each once) instead of the float32 ones, the README says so, and a fresh process gets
    the ids gpt2tune gives one row at that precision (greedy and sampled: one row each, as
    gpt2tune decodes a batch at float32 on a CPU) and the log-probabilities of the forward
    pass over the prepared weights."""
    import tensorflow as tf

    from gpt2tune import generate_tokens
    from gpt2tune.config.params import Sampling
    from gpt2tune.generation.savedmodel import export_savedmodel
    from gpt2tune.model.gpt2 import forward
    from gpt2tune.model.precision import is_dense_weight, prepare

    model, model_folder, _ = exported
    folder = tmp_path / "sm"
    sampling = Sampling(precision=precision, repetition_penalty=PENALTY)
    export_savedmodel(model_folder, folder, sampling)

    prepared = prepare(model.params, precision)
    assert {t.dtype for t in prepared.values()} == {tf.float32, tf.as_dtype(precision)}
    weights = sum(t.numpy().nbytes for t in prepared.values())
    size = sum(f.stat().st_size for f in (folder / "variables").iterdir())
    # The checkpoint's index and object graph add a few KB; a float32 copy of the matrices
    # beside the prepared ones would add all of their float32 bytes.
    matrices = sum(v.numpy().nbytes for k, v in model.params.items() if is_dense_weight(k))
    assert weights <= size < weights + matrices / 2, (size, weights, matrices)
    assert f"the weights: {precision}" in (folder / "README.txt").read_text(encoding="utf-8")

    rng = np.random.default_rng(1)
    scored = rng.integers(0, model.hparams["n_vocab"], size=(2, model.hparams["n_ctx"]))
    greedy, sampled, score = load_and_call(folder, [
        generate_request(PROMPTS[:1]),
        generate_request(PROMPTS[1:], **SAMPLED),
        ["score", {"tokens": scored.tolist()}],
    ])  # fmt: skip
    common = {"repetition_penalty": PENALTY, "precision": precision, "nsamples": 1}
    want = generate_tokens(model, PROMPTS[0], LENGTH, temperature=0, **common)
    assert greedy["tokens"] == want.tolist()
    want = generate_tokens(model, PROMPTS[1], LENGTH, **SAMPLED, **common)
    assert sampled["tokens"] == want.tolist()

    def log_probs(params) -> np.ndarray:  # the forward pass's, in float64
        logits = forward(params, model.hparams, tf.constant(scored, tf.int32))[0].numpy()
        shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        return np.take_along_axis(logp[:, :-1], scored[:, 1:, None], axis=-1)[..., 0]

    got = np.asarray(score["log_probs"])
    np.testing.assert_allclose(got, log_probs(prepared), atol=1e-5, rtol=0)
    # Not float32's: the export computes with the rounded weights (bfloat16 rounds each
    # weight by up to 2^-9 of itself, int8 by up to 1/254 of its row's largest).
    assert np.abs(got - log_probs(model.params)).max() > 1e-4


@pytest.mark.slow
def test_the_export_stage_writes_the_savedmodel_when_switched_on(tmp_path, tiny_vocab_dir):
    from gpt2tune import save_model

    root = make_project(tmp_path / "project", TINY_CORPUS)
    save_model(tiny_model(tiny_vocab_dir, 1), root / FINETUNED)
    commit_project(root)
    out = root / FINETUNED_SAVEDMODEL

    proc = run_stage(
        root, "export", "--set", "export.savedmodel=true", "--set", "sample.precision=int8"
    )
    assert proc.returncode == 0, proc.stderr
    assert f"exported {FINETUNED} to {FINETUNED_SAVEDMODEL} (TensorFlow SavedModel)" in proc.stdout
    assert "export.hf is false: nothing exported" in proc.stdout
    assert sorted(p.name for p in (root / FINETUNED_HF).iterdir()) == [
        hf.EXPORT_MARKER, "README.txt"
    ]  # fmt: skip
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([
        hf.EXPORT_MARKER, "README.txt", "encoder.json", "fingerprint.pb", "saved_model.pb",
        "variables/variables.data-00000-of-00001", "variables/variables.index", "vocab.bpe",
    ])  # fmt: skip
    readme = (out / "README.txt").read_text(encoding="utf-8")
    assert '"signature_name": "generate"' in readme and "v1/models/gpt2:predict" in readme
    assert "the weights: int8 matrices with a float32 scale per row" in readme
    assert (out / "encoder.json").read_bytes() == (tiny_vocab_dir / "encoder.json").read_bytes()

    # A file of the user's inside variables/ would be deleted with the folder: refused.
    (out / "variables" / "notes.txt").write_text("mine", encoding="utf-8")
    before = snapshot(root)
    proc = run_in(root, sys.executable, "-m", "gpt2tune", "export", "--format", "savedmodel")
    assert proc.returncode == 1 and "variables/notes.txt" in proc.stderr, proc.stderr
    assert snapshot(root) == before
    # Without it, the switched-off stage replaces its own export by the note.
    (out / "variables" / "notes.txt").unlink()
    proc = run_stage(root, "export")
    assert proc.returncode == 0, proc.stderr
    assert "export.savedmodel is false: nothing exported" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [hf.EXPORT_MARKER, "README.txt"]
    assert "--format savedmodel" in (out / "README.txt").read_text(encoding="utf-8")


# An export under a 20 KB file-size limit (SIGXFSZ ignored: writes fail with EFBIG), as on a
# full disk: TensorFlow's own writes (saved_model.pb, variables/) fail.
LIMITED_EXPORT = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
    from gpt2tune.errors import Gpt2tuneError
    from gpt2tune.generation.savedmodel import export_savedmodel
    try:
        export_savedmodel(sys.argv[1], sys.argv[2])
    except Gpt2tuneError as e:
        sys.exit(f"error: {e}")
    """
)


@pytest.mark.slow
def test_a_full_disk_during_the_export_is_one_line_and_leaves_nothing(exported, tmp_path):
    _, model_folder, _ = exported
    out = tmp_path / "disk" / "sm"
    proc = run_in(tmp_path, sys.executable, "-c", LIMITED_EXPORT, str(model_folder), str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("error: could not write"), proc.stderr
    assert "File too large" in lines[-1] and "check free disk space" in lines[-1], lines[-1]
    assert list((tmp_path / "disk").iterdir()) == []  # no SavedModel, no temporary folder


def test_an_export_with_subfolders_is_replaced_only_if_its_marker_lists_every_file(tmp_path):
    """A SavedModel's files are in subfolders; the marker lists them by relative path. What
    is not listed (a file, a folder, a link) would be deleted by the next export: refused."""
    out = tmp_path / "sm"
    with hf.export_folder(out) as tmp:
        (tmp / "assets").mkdir()  # empty, as tf.saved_model.save leaves it
        (tmp / "variables").mkdir()
        (tmp / "variables" / "variables.index").write_bytes(b"index")
        (tmp / "saved_model.pb").write_bytes(b"graph")
    listed = json.loads((out / hf.EXPORT_MARKER).read_text())["files"]
    assert listed == ["assets/", "saved_model.pb", "variables/", "variables/variables.index"]
    hf.check_export_folder(out)  # over its own export: allowed

    def refused(path: Path) -> str:
        with pytest.raises(Gpt2tuneError) as e:
            hf.check_export_folder(out)
        assert f"but {path.relative_to(out).as_posix()} in it was not written" in str(e.value)
        return str(e.value)

    for make, path in [
        (lambda p: p.write_text("mine"), out / "variables" / "notes.txt"),
        (lambda p: p.mkdir(), out / "variables" / "mine"),
        (lambda p: p.mkdir(), out / "extra"),
        (lambda p: p.symlink_to(tmp_path), out / "variables" / "link"),
    ]:
        make(path)
        refused(path)
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        hf.check_export_folder(out)
