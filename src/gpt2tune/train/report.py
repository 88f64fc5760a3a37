"""What a training leaves besides its run folder: the DVC metrics and plot data in
`metrics/`, a loss chart, and the MLflow run's name, description and final figures.

`metrics/train.json` (the DVC metric) holds only what two identical runs reproduce: the
steps, the tokens seen, `loss_last10` (the mean training loss of the last 10 steps; MLflow's
`loss` is each step's own), `base_val_loss` (the starting weights' validation loss, before
step 1), the final `val_loss` and `val_perplexity`. Timings differ from run to run, so they go
to `metrics/timing.json` (a plain output, not a metric) and to MLflow. A finished run found
again in the run folder is reported from what was saved with its checkpoint (train.fit).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from gpt2tune.config.params import Params
from gpt2tune.files import write_bytes_atomic, write_text_atomic
from gpt2tune.paths import LOSS_CHART, TIMING, TRAIN_METRICS
from gpt2tune.train.runstate import TIMING_KEYS, write_plots


def run_name(p: Params) -> str:
    """The MLflow run's name: the DVC experiment's, else a summary of what is trained."""
    return os.environ.get("DVC_EXP_NAME") or (
        f"{p.model.name} {p.train.steps} steps lr {p.train.learning_rate:g}"
    )


def run_description(p: Params, stats: dict) -> dict[str, str]:
    """The run's description (MLflow's `mlflow.note.content` tag): which data trained it."""
    val = f" and {p.data.val_path}" if p.data.val_path else ""
    note = (
        f"Fine-tuned {p.model.name} on {p.data.path}{val}: {stats['train_tokens']} training "
        f"tokens, {stats['val_tokens']} validation tokens (data/encoded)."
    )
    return {"mlflow.note.content": note}


def split_timing(metrics: dict) -> tuple[dict, dict]:
    """(the reproducible metrics, the timings) of `fit`'s summary."""
    timing = {k: metrics[k] for k in TIMING_KEYS if k in metrics}
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}, timing


def log_final(metrics: dict, timing: dict, chart: Path, log_metrics, log_file) -> None:
    """The end-of-run figures and the chart, to MLflow (a reopened run keeps the first ones)."""
    final = {k: metrics[k] for k in ("val_perplexity", "loss_last10") if metrics.get(k) is not None}
    if "tokens_per_s" in timing:
        final["mean_tokens_per_s"] = timing["tokens_per_s"]
    if "train_seconds" in timing:
        final["train_seconds"] = timing["train_seconds"]
    log_metrics(final, metrics["steps"])
    log_file(chart, None)


def write_outputs(metrics: dict, timing: dict, history: dict) -> Path:
    """metrics/train.json, timing.json, the plot files and loss.png; returns the chart's path."""
    write_plots(history)
    write_bytes_atomic(LOSS_CHART, loss_chart(history, metrics.get("base_val_loss")))
    write_text_atomic(TIMING, json.dumps(timing, indent=2) + "\n")
    write_text_atomic(TRAIN_METRICS, json.dumps(metrics, indent=2) + "\n")
    return LOSS_CHART


def loss_chart(history: dict, base_val_loss: float | None) -> bytes:
    """A PNG of the training and validation loss per step, the base model's validation loss
    as a horizontal line. Same history, same bytes (no date or version in the file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)  # no pyplot: no global state, no GUI backend
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label, style in (("loss", "train loss", "-"), ("val_loss", "validation loss", "o-")):
        if history[key]:
            steps, values = zip(*history[key], strict=True)
            ax.plot(steps, values, style, label=label, markersize=3)
    if base_val_loss is not None:
        ax.axhline(base_val_loss, color="gray", linestyle="--", label="base model (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = io.BytesIO()
    fig.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()
