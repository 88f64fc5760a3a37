"""The whole DVC pipeline, end to end, in a throwaway git repository.

A copy of the project gets a tiny GPT-2 in OpenAI's release layout, served over HTTP from
127.0.0.1, about 30 KB of Kant as training text, and a real `mlflow server` as its tracking
store. Then `dvc repro`, a no-op second `dvc repro`, `dvc exp run -S ...` and the metrics and
plots commands run exactly as a user would run them. The fixture runs the first `dvc repro`;
the tests below share that one project and run in file order, each later one on the state the
earlier ones left, `dvc exp run --temp` last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    commit_project,
    git,
    make_project,
    run_in,
    update_params,
    write_official_style_model,
)
from httpserver import FolderServer
from mlflowserver import MlflowServer

from gpt2tune.files import RELEASE_FILES as MODEL_FILES
from gpt2tune.manifest import MANIFEST

HP = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 64, "n_head": 4, "n_layer": 2}
STEPS = 8
PROMPTS = ["Human reason, in one sphere of its cognition,"]
NSAMPLES = 2
EXPERIMENT = "pipeline-test"
# What assemble writes: OpenAI's files less model.ckpt.meta (a TF1 graph, not needed to load).
FINETUNED_FILES = sorted(set(MODEL_FILES) - {"model.ckpt.meta"})


class Project:
    def __init__(self, root: Path, served: FolderServer, mlflow_url: str, served_dir: Path):
        self.root, self.served, self.mlflow_url, self.served_dir = (
            root, served, mlflow_url, served_dir,
        )  # fmt: skip
        self.timings: list[tuple[str, float]] = []

    def run(self, *args: str, timeout: float = 300) -> str:
        t0 = time.monotonic()
        proc = run_in(self.root, *args, timeout=timeout)
        self.timings.append((" ".join(args), round(time.monotonic() - t0, 1)))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{out[-6000:]}"
        return out

    def dvc(self, *args: str) -> str:
        return self.run("dvc", *args)

    def run_info(self) -> dict:
        return json.loads((self.root / "metrics" / "mlflow_run.json").read_text())

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_url)


@pytest.fixture(scope="module")
def project(tmp_path_factory, official_vocab_dir, kant_path):
    tmp = tmp_path_factory.mktemp("pipeline")
    # The server starts while the model is being written.
    with MlflowServer(tmp / "mlflow") as mlflow_server:
        served_dir = tmp / "served"
        write_official_style_model(served_dir / "tiny", HP, official_vocab_dir)
        text = kant_path.read_text(encoding="utf-8")[:30_000]
        # model.base_url: set below, once the file server is up.
        root = make_project(
            tmp / "project", text,
            train=dict(
                steps=STEPS, batch_size=2, learning_rate=0.001, n_ctx=32, sample_every=4,
                sample_length=8, save_every=4, val_every=4, val_batch_count=2,
            ),
            sample=dict(nsamples=NSAMPLES, length=8, prompts=PROMPTS),
            mlflow=dict(tracking_uri=mlflow_server.url, experiment=EXPERIMENT),
        )  # fmt: skip
        mlflow_server.wait_ready()

        with FolderServer(served_dir) as served:
            update_params(root, "model", base_url=served.url)
            commit_project(root)

            p = Project(root, served, mlflow_server.url, served_dir)
            p.first_repro = p.dvc("repro", "sample")
            yield p
            print("\npipeline test timings (s):", p.timings)


def mean_loss(model, windows: np.ndarray) -> float:
    import tensorflow as tf

    logits = model(windows[:, :-1])
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=windows[:, 1:], logits=logits)
    return float(tf.reduce_mean(ce))


def test_repro_runs_every_stage(project):
    out = project.first_repro  # `dvc repro sample` in a fresh clone-like copy
    for stage in ("fetch_model", "encode", "train", "assemble", "sample"):
        assert f"Running stage '{stage}'" in out, out[-3000:]
    root = project.root

    # The model came over HTTP, byte for byte.
    fetched = root / "models" / "tiny"
    assert sorted(p.name for p in fetched.iterdir()) == sorted([*MODEL_FILES, MANIFEST])
    for name in MODEL_FILES:
        assert (fetched / name).read_bytes() == (project.served_dir / "tiny" / name).read_bytes()
    gets = {r.path for r in project.served.requests if r.method == "GET"}
    assert gets == {f"/tiny/{name}" for name in MODEL_FILES}

    # Fine-tuning lowered the loss on the training text.
    from gpt2tune import load_model

    finetuned_dir = root / "models" / "finetuned"
    assert sorted(p.name for p in finetuned_dir.iterdir()) == FINETUNED_FILES
    tokens = np.load(root / "data" / "encoded" / "train.npy").astype(np.int32)
    windows = tokens[: 16 * 33].reshape(16, 33)
    base_loss = mean_loss(load_model(fetched), windows)
    tuned_loss = mean_loss(load_model(finetuned_dir), windows)
    print(f"\nloss on training text: base {base_loss:.3f}, fine-tuned {tuned_loss:.3f}")
    assert tuned_loss < base_loss - 0.1, (base_loss, tuned_loss)

    # DVC metrics.
    metrics = json.loads((root / "metrics" / "train.json").read_text())
    assert {"loss_last10", "base_val_loss", "val_loss", "val_perplexity", "steps"} <= set(metrics)
    assert "tokens_per_s" in json.loads((root / "metrics" / "timing.json").read_text())
    assert metrics["steps"] == STEPS
    assert np.isclose(metrics["val_perplexity"], np.exp(metrics["val_loss"]))

    # Samples: nsamples unconditional, then nsamples per prompt.
    records = json.loads((root / "samples" / "samples.json").read_text())
    assert len(records) == (1 + len(PROMPTS)) * NSAMPLES
    assert [r["prompt"] for r in records] == [None] * NSAMPLES + PROMPTS * NSAMPLES
    assert all(isinstance(r["text"], str) for r in records)
    assert (root / "samples" / "samples.md").is_file()

    # One MLflow run on the server holds everything of this fine-tuning.
    info = project.run_info()
    client = project.client()
    run = client.get_run(info["run_id"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert run.info.experiment_id == exp.experiment_id == info["experiment_id"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # once per step
    val_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
    assert val_steps == [0, 4, STEPS]
    assert "val_perplexity" in run.data.metrics
    assert float(run.data.params["train.learning_rate"]) == 0.001
    assert run.data.params["model.name"] == "tiny"
    assert run.data.tags["git.commit"] == git(root, "rev-parse", "HEAD")

    def artifacts(path: str) -> list[str]:
        return sorted(a.path for a in client.list_artifacts(run.info.run_id, path))

    assert artifacts("samples/train") == [f"samples/train/step_{s:06d}.txt" for s in (4, STEPS)]
    assert artifacts("samples") == ["samples/samples.json", "samples/samples.md", "samples/train"]
    [model] = run.outputs.model_outputs  # assemble's MLflow Model (gpt2tune.servable)
    files = client.list_logged_model_artifacts(model.model_id, "artifacts/finetuned")
    assert sorted(a.path for a in files) == [f"artifacts/finetuned/{n}" for n in FINETUNED_FILES]
    # The weights are uploaded once, inside the MLflow Model: no `model/` folder on the run.
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["samples"]
    logged = client.download_artifacts(run.info.run_id, "samples/samples.json", str(root.parent))
    assert json.loads(Path(logged).read_text()) == records


def test_second_repro_runs_nothing(project):
    requests = len(project.served.requests)
    out = project.dvc("repro", "sample")
    assert "Running stage" not in out, out
    assert "up to date" in out, out
    assert len(project.served.requests) == requests


def test_exp_run_is_a_second_mlflow_run(project):
    first = project.run_info()
    out = project.dvc("exp", "run", "-S", "train.learning_rate=0.002")
    assert "Running stage 'train'" in out, out[-3000:]
    assert "Running stage 'fetch_model'" not in out and "Running stage 'encode'" not in out

    second = project.run_info()
    assert second["run_id"] != first["run_id"]
    client = project.client()
    run = client.get_run(second["run_id"])
    assert run.info.experiment_id == first["experiment_id"]
    assert float(run.data.params["train.learning_rate"]) == 0.002
    refs = git(project.root, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    exp_names = [ref.rsplit("/", 1)[1] for ref in refs]
    assert run.data.tags.get("dvc.exp_name") in exp_names, (run.data.tags, exp_names)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    shown = project.dvc("exp", "show", "--no-pager", "--json")
    assert run.data.tags["dvc.exp_name"] in shown


def test_metrics_and_plots_show(project):
    out = project.dvc("metrics", "show")
    assert "val_loss" in out and "metrics/train.json" in out, out
    project.dvc("plots", "show")
    index = project.root / "dvc_plots" / "index.html"
    assert index.is_file()
    assert "loss" in index.read_text()


def test_exp_run_temp_lands_in_the_same_server(project):
    # What a user does before queueing experiments: commit the pipeline's state, so the
    # temporary workspace checks the model and the encoded data out of the DVC cache.
    git(project.root, "add", "-A")
    git(project.root, "commit", "-q", "-m", "first results")
    before = set(git(project.root, "for-each-ref", "--format=%(refname)", "refs/exps").split())
    out = project.dvc("exp", "run", "--temp", "-S", "train.learning_rate=0.003")
    assert "Running stage 'train'" in out, out[-3000:]
    assert "Running stage 'fetch_model'" not in out and "Running stage 'encode'" not in out

    after = set(git(project.root, "for-each-ref", "--format=%(refname)", "refs/exps").split())
    (ref,) = {r for r in after - before if "/exec/" not in r}
    info = json.loads(git(project.root, "show", f"{ref}:metrics/mlflow_run.json"))
    run = project.client().get_run(info["run_id"])
    assert run.info.experiment_id == project.run_info()["experiment_id"]
    assert float(run.data.params["train.learning_rate"]) == 0.003
    assert run.data.tags["dvc.exp_name"] == ref.rsplit("/", 1)[1]
    assert run.data.tags["git.commit"] == git(project.root, "rev-parse", "HEAD")
    assert run.outputs.model_outputs  # assemble's MLflow Model
