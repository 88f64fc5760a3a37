"""The whole DVC pipeline on prompt -> completion records: data.format jsonl with
data.prompt_field, and the sample stage completing the validation records' prompts beside
their reference completions (sample.prompts_from: val).

Like test_pipeline_options.py: a copy of the project in a throwaway git repository, a tiny
GPT-2 in OpenAI's release layout from a local folder, runs in the project's sqlite store.
"""

from __future__ import annotations

import json
import sys

import pytest
from helpers.models import write_official_style_model
from helpers.processes import dvc as run_dvc
from helpers.processes import run_in
from helpers.projects import commit_project, make_project, project_mlflow, training_run_id

HP = {"n_vocab": 50257, "n_ctx": 32, "n_embd": 32, "n_head": 2, "n_layer": 1}
N_CTX = 16
RECORDS = [{"question": f"Q: what is {i} plus one? A:", "answer": f" {i + 1}."} for i in range(60)]
# Longer than a window's 16 tokens: its prompt loses its start.
LONG = {"question": "Q: " + "and what is more " * 6 + "than one? A:", "answer": " two."}


@pytest.fixture(scope="module")
def project(tmp_path_factory, official_vocab_dir):
    tmp = tmp_path_factory.mktemp("pipeline_prompts")
    write_official_style_model(tmp / "served" / "tiny", HP, official_vocab_dir)
    root = make_project(
        tmp / "project", "unused: data.path is the JSON-lines file\n",
        model=dict(base_url=str(tmp / "served")),
        data=dict(path="data/qa.jsonl", format="jsonl", field="answer", prompt_field="question",
                  val_fraction=0.1),
        train=dict(steps=4, batch_size=2, learning_rate=0.001, n_ctx=N_CTX, val_every=2),
        sample=dict(nsamples=1, length=4, prompts=[], prompts_from="val"),
        mlflow=dict(registered_model=""),
    )  # fmt: skip
    lines = [json.dumps(r) for r in [LONG, *RECORDS]]  # LONG trains: no validation record
    (root / "data" / "qa.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    commit_project(root)
    return root


def dvc(root, *args: str) -> str:
    return run_dvc(root, *args, timeout=600)


@pytest.mark.slow  # a whole pipeline of a one-layer model: about a minute on 2 busy cores
def test_prompt_completion_records_through_dvc(project):
    out = dvc(project, "repro", "sample")
    for stage in ("encode", "train", "assemble", "sample"):
        assert f"Running stage '{stage}'" in out, out[-3000:]
    assert "warning: 1 record(s) longer than a window" in out

    stats = json.loads((project / "data/encoded/stats.json").read_text())
    assert (stats["records"], stats["val_records"]) == (61, 6)
    assert (stats["truncated_prompts"], stats["truncated_completions"]) == (1, 0)
    assert stats["window"] == N_CTX and stats["prompt_field"] == "question"
    assert 0 < stats["train_target_tokens"] < stats["train_tokens"]
    kept = [json.loads(line) for line in (project / "data/encoded/val_records.jsonl").open()]
    assert len(kept) == 6

    # One completion of each validation record's prompt (the first 8: all 6 here), beside
    # that record's own completion; the unconditional sample has no reference.
    samples = json.loads((project / "samples/samples.json").read_text())
    unconditional, completions = samples[:1], samples[1:]
    assert unconditional[0]["prompt"] is None and "reference" not in unconditional[0]
    assert [(s["prompt"], s["reference"]) for s in completions] == [
        (r["prompt"], r["completion"]) for r in kept
    ]
    markdown = (project / "samples/samples.md").read_text()
    assert f"Reference: **{kept[0]['prompt']}**{kept[0]['completion']}" in markdown

    # The MLflow samples table has the reference column too.
    client, run_id = project_mlflow(project), training_run_id(project)
    table = json.loads(open(client.download_artifacts(run_id, "samples/table.json")).read())
    columns = table["columns"]
    reference = [row[columns.index("reference")] for row in table["data"]]
    assert reference[-6:] == [r["completion"] for r in kept]
    run = client.get_run(run_id)
    assert run.data.params["data.prompt_field"] == "question"
    # The validation loss is over the completions only, and `gpt2tune evaluate --data val`
    # scores the assembled (best) weights the same way: the lowest val_loss again (the TSV
    # keeps 6 decimals; the two sum the same float32 terms in batches of one size).
    rows = (project / "metrics/val_loss.tsv").read_text().split("\n")[1:]
    best = min(float(r.split("\t")[1]) for r in rows if r)
    proc = run_in(project, sys.executable, "-m", "gpt2tune", "evaluate", "--model",
                  "models/finetuned", "--data", "val", timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss = float(proc.stdout.split("loss ")[1].split()[0])
    assert loss == pytest.approx(best, abs=2e-6), proc.stdout
