"""Distribution: the tf.distribute strategy `train.strategy` names, multi-worker's TF_CONFIG,
and which process of a multi-worker run keeps the run's files (the chief).

One code path trains on a CPU, one GPU, all local GPUs (MirroredStrategy) or several machines
(MultiWorkerMirroredStrategy); gradients are averaged across replicas (see trainer.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import tensorflow as tf

from gpt2tune.errors import Gpt2tuneError


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The tf.distribute strategy `train.strategy` names.

    one: the default strategy (one device). mirrored: MirroredStrategy over all local GPUs,
    or over the logical CPUs when there is no GPU (so it can be tested on a CPU).
    multi_worker: MultiWorkerMirroredStrategy, configured by the TF_CONFIG environment
    variable. auto: mirrored when more than one GPU is visible, else one.
    """
    if name == "multi_worker":
        # First: it must configure TF's collective ops before anything (even listing the
        # devices) starts the runtime.
        check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "one"
    if name == "one":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    raise Gpt2tuneError(f"train.strategy = {name!r}: must be auto, one, mirrored or multi_worker")


def check_tf_config(text: str | None) -> dict:
    """TF_CONFIG parsed, or an error saying what multi_worker needs."""
    example = (
        'e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
        '"task": {"type": "worker", "index": 0}}\''
    )
    if not text:
        raise Gpt2tuneError(
            f"train.strategy = multi_worker needs the TF_CONFIG variable, {example}"
        )
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        task = config["task"]
        ok = (
            isinstance(workers, list)
            and workers
            and task["type"] in ("worker", "chief")
            and 0 <= int(task["index"]) < len(workers) + (task["type"] == "chief")
        )
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise Gpt2tuneError(f"TF_CONFIG = {text!r} is not a valid worker cluster, {example}")
    return config


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process keeps checkpoints, metrics and MLflow: always, except on the
    non-chief workers of a multi-worker run (TF's pattern: they write to a temp folder)."""
    return bool(strategy.extended.should_checkpoint)


def worker_run_dir(run_dir: Path, tmp: str | os.PathLike) -> Path:
    """Where a non-chief worker keeps its checkpoints: a copy, under `tmp`, of the chief's
    run folder as it is now, so that when the chief resumes from it (it must be visible to
    every worker, e.g. on a shared filesystem) the worker resumes from the same step."""
    copy = Path(tmp) / Path(run_dir).name
    if Path(run_dir).is_dir():
        shutil.copytree(run_dir, copy)
    return copy
