"""The token sets a training read, as MLflow datasets (`mlflow.log_input`'s records): the run
page's Datasets section names what trained it, and the experiment's runs that trained on the
same tokens share one dataset (MLflow keeps one per name and digest in an experiment).

One dataset per split of `data/encoded`: the training tokens (context ``training``) and the
validation tokens (``validation``), each with

* name: the text's file or folder name and the split (``dset.txt-train``, ``dset.txt-val``);
* digest: the MD5 of its ``.npy`` file, which is DVC's own hash of that file (DVC 3 hashes file
  contents with plain MD5): the entry of ``train.npy`` in data/encoded's ``.dir`` listing, and
  the name of its copy in the DVC cache (``.dvc/cache/files/md5/<2>/<30>``);
* source: the text it was encoded from (``data.path``; ``data.val_path`` for a separate
  validation text), a local source;
* profile: its token count and the vocabulary it was encoded with; schema: 1-D token ids.

The records are plain dicts, so that, like every call, they can wait in the offline journal
(gpt2tune.tracking.journal) and be logged when the store answers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CONTEXT_TAG = "mlflow.data.context"  # MLflow's input tag: what the run used a dataset for
CONTEXTS = {"train": "training", "val": "validation"}


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    """The MD5 of a file's bytes (DVC's hash of it), read in 1 MiB pieces."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _schema(dtype: str) -> str:
    """MLflow's schema of a tensor dataset: one 1-D tensor of token ids (as from_numpy writes)."""
    import numpy as np
    from mlflow.types.schema import Schema, TensorSpec

    spec = Schema([TensorSpec(np.dtype(dtype), (-1,), "tokens")])
    return json.dumps({"mlflow_tensorspec": {"features": spec.to_json(), "targets": None}})


def token_sets(
    encoded_dir: str | os.PathLike, stats: dict, data_path: str, val_path: str = ""
) -> list[dict]:
    """The datasets of `encoded_dir`'s train.npy and val.npy (those present; an empty val.npy
    is none), encoded from `data_path` (and `val_path`, "" = held out of data_path), whose
    stats.json is `stats`: one record per split for gpt2tune.tracking.run.log_datasets."""
    import numpy as np

    records = []
    for split, context in CONTEXTS.items():
        path = Path(encoded_dir) / f"{split}.npy"
        tokens = int(stats.get(f"{split}_tokens", 0))
        if not path.is_file() or tokens == 0:
            continue
        source = val_path if split == "val" and val_path else data_path
        dtype = str(np.load(path, mmap_mode="r", allow_pickle=False).dtype)
        records.append(
            {
                "name": f"{Path(source).name or source}-{split}",
                "digest": file_md5(path),
                "source_type": "local",
                "source": json.dumps({"uri": source}),
                "schema": _schema(dtype),
                "profile": json.dumps({"tokens": tokens, "n_vocab": int(stats["n_vocab"])}),
                "context": context,
            }
        )
    return records


def dataset_inputs(records: list[dict]) -> list:
    """MLflow's DatasetInput entities of token_sets' records."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    fields = ("name", "digest", "source_type", "source", "schema", "profile")
    return [
        DatasetInput(Dataset(*(r.get(k) for k in fields)), [InputTag(CONTEXT_TAG, r["context"])])
        for r in records
    ]
