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
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO
from helpers.httpserver import FolderServer
from helpers.mlflowserver import MlflowServer
from helpers.models import write_official_style_model
from helpers.processes import drain_queue, run_in, stage_env, start_queue_worker
from helpers.projects import commit_project, git, make_project, update_params

from gpt2tune.fetch.manifest import MANIFEST
from gpt2tune.files import RELEASE_FILES as MODEL_FILES

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

    def commit(self, message: str) -> None:
        """Commit what the workspace holds (dvc.lock: the pipeline's results), as a user would."""
        git(self.root, "add", "-A")
        git(self.root, "commit", "-q", "--allow-empty", "-m", message)

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
    # The memorization report: each sample's longest run is in train.npy at its offset (a
    # barely trained model may sample tokens the text never has: then no run at all).
    from gpt2tune.model.encoder import load_encoder

    enc, page = load_encoder(fetched), (root / "samples" / "samples.md").read_text()
    for r in records:
        ids, n, at = enc.encode(r["text"]), r["copied_tokens"], r["copied_offset"]
        assert 0 <= r["copied_fraction"] <= 1
        if n:
            run = tokens[at : at + n].tolist()
            assert any(ids[i : i + n] == run for i in range(len(ids))), r
            assert r["copied_document"] == "data/dset.txt"
            assert f"{n} tokens, at token {at} of train.npy (data/dset.txt)" in page
        else:
            assert at == -1 and not set(ids) & set(tokens.tolist()), r
    copied = json.loads((root / "metrics" / "memorization.json").read_text())["copied_fraction"]
    weights = [len(enc.encode(r["text"])) for r in records]
    fractions = [r["copied_fraction"] for r in records]
    assert copied == pytest.approx(np.average(fractions, weights=weights))

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
    assert run.data.metrics["copied_fraction"] == pytest.approx(copied)
    assert float(run.data.params["train.learning_rate"]) == 0.001
    assert run.data.params["model.name"] == "tiny"
    assert run.data.tags["git.commit"] == git(root, "rev-parse", "HEAD")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # model training
    # Its Datasets: the token sets, by DVC's hash of each (data/encoded's listing in the DVC
    # cache), from data.path, with their token counts.
    listing = encoded_hashes(root)
    stats = json.loads((root / "data" / "encoded" / "stats.json").read_text())
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert {n: (d.digest, json.loads(d.source)["uri"], json.loads(d.profile)["tokens"])
            for n, d in inputs.items()} == {
        f"dset.txt-{s}": (listing[f"{s}.npy"], "data/dset.txt", stats[f"{s}_tokens"])
        for s in ("train", "val")
    }  # fmt: skip

    def artifacts(path: str) -> list[str]:
        return sorted(a.path for a in client.list_artifacts(run.info.run_id, path))

    assert artifacts("samples/train") == [f"samples/train/step_{s:06d}.txt" for s in (4, STEPS)]
    assert artifacts("samples") == [
        "samples/samples.json", "samples/samples.md", "samples/table.json", "samples/train",
    ]  # fmt: skip
    [model] = run.outputs.model_outputs  # assemble's MLflow Model (gpt2tune.servable)
    files = client.list_logged_model_artifacts(model.model_id, "artifacts/finetuned")
    assert sorted(a.path for a in files) == [f"artifacts/finetuned/{n}" for n in FINETUNED_FILES]
    # The weights are uploaded once, inside the MLflow Model: no `model/` folder on the run.
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["loss.png", "samples"]
    logged = client.download_artifacts(run.info.run_id, "samples/samples.json", str(root.parent))
    assert json.loads(Path(logged).read_text()) == records

    # Every sample is also a row of one MLflow table: training's, then the sample stage's.
    table = download_table(client, run.info.run_id, root.parent)
    train_rows, stage_rows = table[:2], table[2:]
    assert [r["step"] for r in train_rows] == [4, STEPS]
    for r in train_rows:
        text = client.download_artifacts(
            run.info.run_id, f"samples/train/step_{r['step']:06d}.txt", str(root.parent)
        )
        assert r["text"] == Path(text).read_text()
        assert (r["prompt"], r["temperature"], r["top_k"], r["length"], r["seed"]) == (
            "", 1.0, 40, 8, r["step"],
        )  # fmt: skip
        assert r["copied_document"] == ("data/dset.txt" if r["copied_tokens"] else "")
    assert [(r["prompt"] or None, r["index"], r["text"]) for r in stage_rows] == [
        (r["prompt"], r["index"], r["text"]) for r in records
    ]
    memo = ("copied_tokens", "copied_offset", "copied_document", "copied_fraction")
    assert [[r[k] for k in memo] for r in stage_rows] == [[r[k] for k in memo] for r in records]
    assert {(r["step"], r["temperature"], r["length"], r["nsamples"]) for r in stage_rows} == {
        (STEPS, 0.8, 8, NSAMPLES)
    }
    assert run.data.tags["mlflow.loggedArtifacts"] == json.dumps(
        [{"path": "samples/table.json", "type": "table"}]
    )


def encoded_hashes(root: Path) -> dict[str, str]:
    """DVC's hash of each file of data/encoded: the .dir listing dvc.lock names, in the cache."""
    [out] = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["encode"]["outs"]
    listing = root / ".dvc" / "cache" / "files" / "md5" / out["md5"][:2] / out["md5"][2:]
    return {entry["relpath"]: entry["md5"] for entry in json.loads(listing.read_text())}


def download_table(client, run_id: str, dest: Path) -> list[dict]:
    """The run's samples table (MLflow's split orientation) as one dict per row."""
    path = client.download_artifacts(run_id, "samples/table.json", str(dest))
    table = json.loads(Path(path).read_text())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def test_second_repro_runs_nothing(project):
    requests = len(project.served.requests)
    out = project.dvc("repro", "sample")
    assert "Running stage" not in out, out
    assert "up to date" in out, out
    assert len(project.served.requests) == requests


def test_tracking_settings_rerun_nothing(project):
    # Where runs are tracked changes no output: dvc.yaml lists no mlflow.* params.
    params = project.root / "params.yaml"
    before = params.read_text()
    update_params(project.root, "mlflow", tracking_uri="sqlite:///elsewhere.db", experiment="x")
    try:
        out = project.dvc("status", "sample")  # what the fixture's `dvc repro sample` ran
        assert "Data and pipelines are up to date" in out, out
    finally:
        params.write_text(before)


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
    datasets = [sorted((i.dataset.name, i.dataset.digest) for i in r.inputs.dataset_inputs)
                for r in (run, client.get_run(first["run_id"]))]  # fmt: skip
    assert datasets[0] == datasets[1] and len(datasets[0]) == 2  # the same tokens: shared
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
    assert "copied_fraction" in out and "metrics/memorization.json" in out, out
    project.dvc("plots", "show")
    index = project.root / "dvc_plots" / "index.html"
    assert index.is_file()
    assert "loss" in index.read_text()

    # One chart, "Loss per step", drawing both curves (not one chart per file).
    plots = json.loads(project.dvc("plots", "show", "--json"))["data"]
    assert list(plots) == ["Loss per step"], list(plots)
    (plot,) = plots["Loss per step"]
    series = Counter(v["filename::field"] for v in plot["content"]["data"]["values"])
    assert series == {"loss.tsv::loss": STEPS, "val_loss.tsv::val_loss": 3}, series


# What docs/experiments.md gives for a table that fits a screen.
EXP_SHOW = ("exp", "show", "--no-pager", "--only-changed", "--drop", r".*/|^hf$|sample\.prompts")


def test_documented_exp_show_is_narrow(project):
    page = (REPO / "docs" / "experiments.md").read_text()
    assert f"dvc exp show --only-changed --drop '{EXP_SHOW[-1]}'" in page
    # What the page says of a table whose experiments vary only the learning rate, as here.
    assert "under 160 characters when only `train.learning_rate` differs" in " ".join(page.split())
    # An experiment to compare, as test_exp_run_is_a_second_mlflow_run makes (when run alone).
    if 0.002 not in exp_names(json.loads(project.dvc("exp", "show", "--json"))).values():
        project.dvc("exp", "run", "-S", "train.learning_rate=0.002")
    # As on a terminal wide enough for everything (rich cuts tables to $COLUMNS, 80 in a pipe).
    wide = stage_env(COLUMNS="10000")
    full, out = (run_in(project.root, "dvc", *args, env=wide).stdout
                 for args in (("exp", "show", "--no-pager"), EXP_SHOW))  # fmt: skip
    print(f"dvc exp show: {max(map(len, full.splitlines()))} wide; documented:\n{out}")
    assert max(map(len, out.splitlines())) < 160, out
    for column in ("src/gpt2tune", "data/encoded", "stages/train.py", "sample.prompts", " hf "):
        assert column in full and column not in out, column
    assert "train.learning_rate" in out and "val_loss" in out, out  # what the experiments vary


@pytest.mark.slow  # a third pipeline run, in DVC's temporary workspace: ~40 s
def test_exp_run_temp_lands_in_the_same_server(project):
    # What a user does before queueing experiments: commit the pipeline's state, so the
    # temporary workspace checks the model and the encoded data out of the DVC cache.
    project.commit("first results")
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


def exp_names(shown: object) -> dict[str, float]:
    """{experiment name: train.learning_rate} of every experiment in `dvc exp show --json`."""
    found = {}
    if isinstance(shown, list):
        for item in shown:
            found.update(exp_names(item))
    elif isinstance(shown, dict):
        params = ((shown.get("data") or {}).get("params") or {}).get("params.yaml") or {}
        lr = (params.get("data") or {}).get("train", {}).get("learning_rate")
        if shown.get("name") and lr is not None:
            found[shown["name"]] = float(lr)
        for value in shown.values():
            found.update(exp_names(value))
    return found


@pytest.mark.slow  # two whole experiments one after the other: ~110 s on a quiet machine
def test_queued_sweep_runs_both_experiments(project):
    # Queued experiments run in temporary workspaces, which check the model and the encoded
    # data out of the DVC cache: commit the pipeline's state first, as a user would.
    project.commit("results before the sweep")
    project.dvc("exp", "run", "--queue", "-S", "train.learning_rate=1e-5,5e-5")
    log = project.root.parent / "queue-start.log"
    start_queue_worker(project.root, log)
    status = drain_queue(project.root, log)
    swept = {
        name: lr
        for name, lr in exp_names(json.loads(project.dvc("exp", "show", "--json"))).items()
        if lr in (1e-5, 5e-5)
    }
    assert sorted(swept.values()) == [1e-5, 5e-5], (swept, status)
    client = project.client()
    exp_id = project.run_info()["experiment_id"]
    for name, lr in swept.items():
        (run,) = client.search_runs([exp_id], f"tags.`dvc.exp_name` = '{name}'")
        assert float(run.data.params["train.learning_rate"]) == lr
        assert run.info.status == "FINISHED" and run.outputs.model_outputs


def test_pushed_outputs_serve_another_clone(project, tmp_path):
    root = project.root
    project.dvc("remote", "add", "-d", "local", str(tmp_path / "remote"))
    project.dvc("repro")  # every stage's outputs (the fixture's repro stops at sample)
    # What a user commits before sharing: dvc.lock (the pipeline's results) and the remote.
    project.commit("results and a DVC remote")
    project.dvc("push")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(root), str(clone))
    requests = len(project.served.requests)
    other = Project(clone, project.served, project.mlflow_url, project.served_dir)

    other.dvc("pull")
    for folder in ("models/tiny", "data/encoded", "models/finetuned", "samples"):
        assert any((clone / folder).iterdir()), folder
    status = json.loads(other.dvc("status", "--json"))
    print("dvc status after pull:", status)
    # Only training's checkpoint (not cached: 3x the model, kept out of git and the remote)
    # is missing, and `--allow-missing` lets repro skip what it would only rebuild.
    assert status == {
        "train": [{"changed outs": {"checkpoint/run1": "deleted"}}],
        "assemble": [{"changed deps": {"checkpoint/run1": "deleted"}}],
    }
    out = other.dvc("repro", "--allow-missing")
    assert "Running stage" not in out, out
    out = other.run("python", "stages/sample.py")
    assert "wrote" in out, out
    assert json.loads((clone / "samples" / "samples.json").read_text()) == json.loads(
        (root / "samples" / "samples.json").read_text()
    )
    assert len(project.served.requests) == requests  # nothing downloaded again


def test_identical_runs_give_identical_metrics(project):
    # Commit what the workspace holds (the fixture's results, or an earlier test's), so that
    # `dvc metrics diff` compares a second training with the same params against it.
    project.dvc("repro", "sample")  # up to date unless an earlier test changed params
    project.commit("results to compare against")
    project.dvc("repro", "-f", "-s", "train")
    diff = json.loads(project.dvc("metrics", "diff", "--json"))
    print("dvc metrics diff:", diff)
    assert diff == {}, diff
