"""DVC stage train: fine-tune models/<name> on data/encoded, tracked in one MLflow run.

Writes checkpoint/run1/ (resumable: rerun to continue an interrupted training), the DVC
metrics metrics/train.json, the plot data metrics/loss.tsv and metrics/val_loss.tsv, and the
MLflow run id in metrics/mlflow_run.json for the assemble and sample stages. With
`train.strategy: multi_worker` only the chief (worker 0) writes any of these.
"""

import json
import sys
import tempfile
from pathlib import Path

from gpt2tune.stage import import_tensorflow_quietly, run_stage

RUN_DIR = Path("checkpoint/run1")


def main() -> None:
    from gpt2tune.params import load_params

    p = load_params("params.yaml")
    import_tensorflow_quietly()

    from gpt2tune import checkpoint, dataset, distribute, runstate, sampletable, tracking, train
    from gpt2tune.files import write_text_atomic
    from gpt2tune.signals import Stopped

    stats = dataset.read_stats("data/encoded")
    strategy = distribute.make_strategy(p.train.strategy)
    with strategy.scope():  # variables live on every GPU when there are several
        model = checkpoint.load_model(f"models/{p.model.name}")
    n_vocab = model.hparams["n_vocab"]  # ids beyond the model's vocabulary are refused here
    train_tokens = dataset.load_tokens("data/encoded", "train", n_vocab)
    val_tokens = dataset.load_tokens("data/encoded", "val", n_vocab)
    fp = runstate.fingerprint(p.train, p.model.name, stats)
    if not distribute.is_chief(strategy):
        # A non-chief worker of a multi-worker run computes and all-reduces like the chief
        # but keeps nothing: checkpoints go to a temporary copy of the run folder (TF's
        # pattern), metrics and MLflow are the chief's alone.
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = distribute.worker_run_dir(RUN_DIR, tmp)
            train.fit(model, train_tokens, val_tokens, p.train, run_dir,
                      strategy=strategy, run_fingerprint=fp)  # fmt: skip
        return
    resumed = runstate.resumable_state(RUN_DIR, fp, p.train.steps)
    run_id = resumed.get("mlflow_run_id") if resumed else None

    def log_sample(text: str, step: int) -> None:
        tracking.log_text(text, f"samples/train/step_{step:06d}.txt")
        tracking.log_table(sampletable.training_rows(text, step, p.train), sampletable.TABLE)

    with tracking.training_run(p.mlflow, p.flat(), run_id) as run:
        try:
            metrics, history = train.fit(
                model, train_tokens, val_tokens, p.train, RUN_DIR,
                strategy=strategy,
                run_fingerprint=fp,
                log_metrics=tracking.log_metrics,
                log_sample=log_sample,
                state_extra={"mlflow_run_id": run.info.run_id},
            )  # fmt: skip
        except Stopped:  # saved and resumable: killed, not failed (a NaN fails it)
            tracking.end_run("KILLED")
            raise
        if "val_perplexity" in metrics:
            tracking.log_metrics({"val_perplexity": metrics["val_perplexity"]}, p.train.steps)
    runstate.write_plots(history, "metrics")
    write_text_atomic("metrics/train.json", json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    sys.exit(run_stage(main))
