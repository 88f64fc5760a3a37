"""The pipeline's folders and files, named once: the stages, the commands and tracking use
these, and a test checks dvc.yaml's deps and outs against them.

All are relative to the project root (where params.yaml and dvc.yaml are), where every stage
and command runs.
"""

from __future__ import annotations

from pathlib import Path

MODELS = Path("models")  # models/<model.name>/: base models, as fetch_model downloads them
ENCODED = Path("data/encoded")  # train.npy, val.npy, stats.json (the encode stage)
# With data.prompt_field: the validation records' prompts and completions (sample stage)
VAL_RECORDS = ENCODED / "val_records.jsonl"
# `gpt2tune evaluate --data val`: ENCODED/val.npy, the tokens training validates on (a file
# called val is ./val)
VALIDATION_DATA = "val"
RUN_DIR = Path("checkpoint/run1")  # the training's run folder: checkpoints, state, history
FINETUNED = MODELS / "finetuned"  # the assembled model, OpenAI's layout
FINETUNED_HF = MODELS / "finetuned-hf"  # its Hugging Face export
FINETUNED_SAVEDMODEL = MODELS / "finetuned-savedmodel"  # its TensorFlow SavedModel export
SAMPLES = Path("samples")  # samples.json and samples.md (the sample stage)
# Local Hugging Face folders (model.name: hf:hf/<folder>): fetch_model depends on it, so an
# edited folder is converted again.
HF_SOURCES = Path("hf")

METRICS = Path("metrics")
TRAIN_METRICS = METRICS / "train.json"  # the DVC metric: what two identical runs reproduce
TIMING = METRICS / "timing.json"  # tokens/s and seconds: they differ between identical runs
LOSS_PLOTS = {"loss": METRICS / "loss.tsv", "val_loss": METRICS / "val_loss.tsv"}  # dvc plots
LOSS_CHART = METRICS / "loss.png"  # the same curves as a picture
MLFLOW_RUN = METRICS / "mlflow_run.json"  # the training's MLflow run, for assemble and sample
MLFLOW_OFFLINE = METRICS / "mlflow_offline"  # what the tracking server missed (not DVC's)
MEMORIZATION = METRICS / "memorization.json"  # the sample stage's copied_fraction (a DVC metric)
# The memorization index of each encoding, <sha256 of train.npy>/ (gpt2tune.data.index): a
# cache, not DVC's; git ignores it.
INDEX_CACHE = Path(".gpt2tune/index")


def base_model(name: str) -> Path:
    """models/<name>: the folder of base model `name` (params' model.name)."""
    return MODELS / name


def kept_runs(run_dir: Path) -> Path:
    """Where the train stage moves a run of other settings that `run_dir` held, instead of
    overwriting it: checkpoint/kept/ beside checkpoint/run1 (not a DVC output; git ignores
    checkpoint/)."""
    return Path(run_dir).parent / "kept"


KEPT_RUNS = kept_runs(RUN_DIR)  # checkpoint/kept/<fingerprint>-step<N>/
