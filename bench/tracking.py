"""Training wall time with an MLflow server that never answers, against a local sqlite store.

    python bench/tracking.py                         # tiny model, 40 steps, 3 rounds
    python bench/tracking.py --steps 200 --n_embd 128 --rounds 5

The target (issue 12): a server that accepts and never answers, or whose accept queue is
full, costs a training no more than 10% of its time against sqlite, plus the stage's two
bounded waits (GPT2TUNE_MLFLOW_WAIT_S, default 3 s, at its start and at its end).

Each round trains the same model from the same weights once per store, in this process, as
the train stage tracks it (`tracking.training_run` around `train.fit`, logging every loss,
validation loss and sample): "sqlite" (a fresh `sqlite:///mlflow.db`), "accept" (a port that
accepts and reads nothing) and "backlog" (a port whose accept queue is full). Rounds
alternate the stores so that each sees the same machine load; per store the median of the
rounds counts. A tiny model is the hard case: the fewer seconds a step takes, the larger
the share a blocked tracking call would take. The last line is JSON.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, add_shape_args, loadavg

# The black-hole server, the tiny vocabulary and the tracked training are the tests' own
# (tests/helpers/tracking.py), so that this measures what tests/test_tracking_stalls.py checks.
sys.path.insert(0, str(REPO / "tests"))

from helpers.models import tiny_model  # noqa: E402
from helpers.tracking import BlackHole, tracked_training  # noqa: E402
from helpers.vocab import build_tiny_vocab  # noqa: E402

import gpt2tune  # noqa: E402
from gpt2tune.config.params import MlflowParams, TrainParams  # noqa: E402
from gpt2tune.train.loop import fit  # noqa: E402

STORES = ("sqlite", "accept", "backlog")


def one_training(store: str, model_dir: Path, tokens, cfg: TrainParams, root: Path) -> dict:
    """Seconds of one tracked training against `store`, in a project folder of its own."""
    root.mkdir()
    os.chdir(root)  # the sqlite store, metrics/ and the offline journal go here
    hole = None if store == "sqlite" else BlackHole(store)
    uri = "sqlite:///mlflow.db" if hole is None else hole.url
    try:
        waits, run = tracked_training(
            gpt2tune.load_model(model_dir), tokens, tokens[: len(tokens) // 4], cfg,
            root / "run", MlflowParams(tracking_uri=uri, experiment="bench"),
            {"train.steps": cfg.steps},
        )  # fmt: skip
    finally:
        if hole is not None:
            hole.close()
    kept_offline = bool(run.kept())
    if kept_offline != (hole is not None):  # sqlite must take every call; a hole none
        raise SystemExit(f"{store}: the run was {'' if kept_offline else 'not '}kept offline")
    return {**waits._asdict(), "total": waits.start + waits.fit + waits.end}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The vocabulary is the tests' tiny one; n_ctx is also the training window.
    add_shape_args(ap, vocab=False, n_layer=2, n_embd=32, n_head=2, n_ctx=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wait", type=float, help="GPT2TUNE_MLFLOW_WAIT_S (default: the stage's)")
    args = ap.parse_args()
    if args.wait is not None:
        os.environ["GPT2TUNE_MLFLOW_WAIT_S"] = str(args.wait)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("DVC_ROOT", None)

    cfg = TrainParams(steps=args.steps, batch_size=args.batch, n_ctx=args.n_ctx,
                      learning_rate=3e-3, seed=0, sample_every=10, sample_length=4,
                      save_every=0, val_every=20, val_batch_count=2)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        tmp = Path(tmp)
        build_tiny_vocab(tmp / "vocab")
        shape = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                     n_ctx=args.n_ctx)  # fmt: skip
        gpt2tune.save_model(tiny_model(tmp / "vocab", 0, **shape), tmp / "model")
        n_vocab = gpt2tune.load_encoder(tmp / "vocab").n_vocab
        # A short pattern repeated: what the tests train on, learnt within a few dozen steps.
        tokens = np.tile(np.array([5, 17, 42, 99, 7, 63, 200], np.int32) % n_vocab, 60 * args.n_ctx)
        # Untracked, first: the first training of a process also traces TensorFlow's functions.
        fit(gpt2tune.load_model(tmp / "model"), tokens, tokens[:100], cfg, tmp / "warm",
            progress=False)  # fmt: skip
        runs: dict[str, list[dict]] = {s: [] for s in STORES}
        for r in range(args.rounds):
            for store in STORES:
                runs[store].append(
                    one_training(store, tmp / "model", tokens, cfg, tmp / f"{store}-{r}")
                )
                print(store, r, {k: round(v, 2) for k, v in runs[store][-1].items()},
                      file=sys.stderr)  # fmt: skip
        os.chdir(REPO)

    def median(store: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[store])

    result = {s: {k: round(median(s, k), 3) for k in runs[s][0]} for s in STORES}
    base = result["sqlite"]
    for s in STORES[1:]:  # the training's own time, and the stage's whole
        result[s]["fit_ratio"] = round(result[s]["fit"] / base["fit"], 3)
        result[s]["total_ratio"] = round(result[s]["total"] / base["total"], 3)
    tokens_per_step = args.batch * args.n_ctx
    result.update(
        tokens_per_s=round(args.steps * tokens_per_step / base["fit"], 1),
        wait_s=float(os.environ.get("GPT2TUNE_MLFLOW_WAIT_S", "3")),
        steps=args.steps, rounds=args.rounds, shape=shape, loadavg=loadavg(),
        when=time.strftime("%Y-%m-%d %H:%M"),
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
