"""The whole DVC pipeline once more, with options the main pipeline test leaves at their
defaults: JSON-lines training data, early stopping and `assemble.checkpoint: best`.

Like test_pipeline.py, a copy of the project in a throwaway git repository, a tiny GPT-2 in
OpenAI's release layout and Kant as the text; kept small (one layer, no HTTP or MLflow server:
the model comes from a local folder, runs go to the project's sqlite store).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from helpers.models import write_official_style_model
from helpers.processes import dvc as run_dvc
from helpers.projects import commit_project, make_project, project_mlflow, training_run_id

from gpt2tune.model.checkpoint import load_model

HP = {"n_vocab": 50257, "n_ctx": 32, "n_embd": 32, "n_head": 2, "n_layer": 1}
STEPS = 40
EARLY = {"early_stopping_patience": 2, "early_stopping_min_delta": 0.5}


@pytest.fixture(scope="module")
def project(tmp_path_factory, official_vocab_dir, kant_path):
    tmp = tmp_path_factory.mktemp("pipeline_options")
    write_official_style_model(tmp / "served" / "tiny", HP, official_vocab_dir)
    text = kant_path.read_text(encoding="utf-8")[:20_000]
    lines = [json.dumps({"text": text[i : i + 400]}) for i in range(0, len(text), 400)]
    root = make_project(
        tmp / "project", "unused: data.path is the JSON-lines file\n",
        model=dict(base_url=str(tmp / "served")),
        data=dict(path="data/dset.jsonl", format="jsonl", field="text", val_fraction=0.1),
        train=dict(steps=STEPS, batch_size=2, learning_rate=0.001, n_ctx=16, val_every=2,
                   save_every=10, **EARLY),
        assemble=dict(checkpoint="best"),
        sample=dict(nsamples=1, length=4, prompts=[]),
        mlflow=dict(registered_model=""),
    )  # fmt: skip
    (root / "data" / "dset.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    commit_project(root)
    return root


def dvc(root, *args: str) -> str:
    return run_dvc(root, *args, timeout=600)


@pytest.mark.slow  # a second whole pipeline: ~50 s on 2 idle cores
def test_jsonl_early_stopping_and_the_best_checkpoint_through_dvc(project):
    out = dvc(project, "repro", "sample")
    for stage in ("encode", "train", "assemble", "sample"):
        assert f"Running stage '{stage}'" in out, out[-3000:]

    # Training stopped early, cleanly: DVC took the stage as done, the state says why.
    state = json.loads((project / "checkpoint/run1/train_state.json").read_text())
    metrics = json.loads((project / "metrics/train.json").read_text())
    end = metrics["steps"]
    assert end < STEPS and state["step"] == end
    why = f"step {end}: no val_loss improvement >= 0.5 in 2 validations"
    assert state["stopped_early"] == why

    client, run_id = project_mlflow(project), training_run_id(project)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["gpt2tune.stopped_early"] == why
    assert run.data.params["train.early_stopping_patience"] == "2"
    assert run.data.params["data.format"] == "jsonl"

    # models/finetuned holds the best step's weights, and the run says which step that was.
    best = state["best"]["step"]
    assert f"assembled models/finetuned from the best checkpoint (step {best}" in out
    assert run.data.tags["gpt2tune.assembled_step"] == str(best)
    assert run.data.tags["gpt2tune.assembled_checkpoint"] == "best"
    reader = tf.train.load_checkpoint(str(project / f"checkpoint/run1/best/model-{best}"))
    for name, var in load_model(project / "models/finetuned").params.items():
        np.testing.assert_array_equal(var.numpy(), reader.get_tensor(name), err_msg=name)

    # Nothing to do again, and a forced rerun does not train past the stop.
    assert "Running stage" not in dvc(project, "repro", "sample")
    out = dvc(project, "repro", "-f", "train")
    assert "is complete; nothing to train" in out, out[-3000:]
    assert json.loads((project / "metrics/train.json").read_text())["steps"] == end
    losses = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, end + 1))
