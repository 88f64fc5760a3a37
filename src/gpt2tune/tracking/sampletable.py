"""The samples table: every text sample as one row of an MLflow table, so that MLflow's UI
(a run's Artifacts tab, or the experiment's Evaluation view across runs) sets the samples of
several runs side by side, matched by step (add prompt and index to "Group by" for the sample
stage's rows), the text compared.

Training samples (every `train.sample_every` steps) and the sample stage's go to the same
table, `samples/table.json` of the training's run; `samples/samples.json` and `samples.md` stay
as they are. The sampling settings are columns, so a row says how its text was made:
`gpt2tune.generate(model, prompt, sampling=Sampling(**settings))` with the same weights gives
it again. Rows are appended (MLflow's log_table), so rerunning the sample stage on the same run
adds its rows again, with the settings they were made with.
"""

from __future__ import annotations

import dataclasses
import json

from gpt2tune.config.params import Sampling, TrainParams
from gpt2tune.paths import TRAIN_METRICS
from gpt2tune.train.loop import training_sampling

TABLE = "samples/table.json"
# The memorization report's columns (gpt2tune.data.index.report), where the records have
# them; copied_fraction only the sample stage's rows have (training's have no N).
MEMORIZATION = ("copied_tokens", "copied_offset", "copied_document", "copied_snippet",
                "copied_fraction")  # fmt: skip


# The column order is what MLflow's Evaluation view opens on: it groups by the first column
# and compares the next (unless one is called "output"), so text comes right after step.
COLUMNS = ("step", "text", "prompt", "index")


def rows(step: int, records: list[dict], sampling: Sampling) -> dict[str, list]:
    """Columns step, text, prompt ("" = unconditional), index, reference (only when records
    have one: sample.prompts_from val; "" for the unconditional samples), then every sampling
    setting, then the memorization columns the records have; one row per record of
    gpt2tune.generation.samples.sample_records."""
    settings = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(Sampling)}
    texts = list(COLUMNS)
    if any("reference" in r for r in records):
        texts.append("reference")
    memo = [k for k in MEMORIZATION if records and k in records[0]]
    table: dict[str, list] = {k: [] for k in (*texts, *settings, *memo)}
    for r in records:
        row = dict(step=step, prompt=r["prompt"] or "", index=r["index"], text=r["text"])
        if "reference" in texts:
            row["reference"] = r.get("reference", "")
        for k, v in {**row, **settings, **{k: r[k] for k in memo}}.items():
            table[k].append(v)
    return table


def training_rows(
    text: str, step: int, cfg: TrainParams, memorization: dict | None = None
) -> dict[str, list]:
    """The one row of the training sample `text` taken at `step`, with its memorization
    columns if given."""
    record = {"prompt": None, "index": 0, "text": text, **(memorization or {})}
    return rows(step, [record], training_sampling(cfg, step))


def sample_stage_rows(records: list[dict], sampling: Sampling, steps: int) -> dict[str, list]:
    """The sample stage's rows; their step is where training ended (metrics/train.json's
    `steps`, which a time budget may have cut short), else train.steps (`steps`)."""
    try:
        steps = int(json.loads(TRAIN_METRICS.read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return rows(steps, records, sampling)
