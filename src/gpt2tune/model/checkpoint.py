"""Read and write model folders in the layout of OpenAI's GPT-2 release.

A model folder holds `hparams.json`, `encoder.json`, `vocab.bpe`, a `checkpoint` state file and
a TF1 name-based checkpoint (`model.ckpt.index`, `model.ckpt.data-00000-of-00001`; the graph
file `model.ckpt.meta` is never needed). Reading uses `tf.train.load_checkpoint`, which needs no
TF1 graph; writing uses `tf.raw_ops.SaveV2` with OpenAI's tensor names, so
`tf.compat.v1.train.Saver().restore(sess, tf.train.latest_checkpoint(folder))` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf

from gpt2tune.errors import Gpt2tuneError, first_line
from gpt2tune.files import (
    MODEL_FOLDER_FILES,
    LockBusy,
    check_model_folder,
    exclusive_lock,
    fsync_file,
    write_text_atomic,
)
from gpt2tune.model import lora
from gpt2tune.model.encoder import load_encoder
from gpt2tune.model.gpt2 import GPT2, check_hparams, variable_shapes

CKPT_PREFIX = "model.ckpt"
# How long a load of a missing model folder waits for a save that is swapping it in.
SAVE_WAIT_S = 10.0


def load_hparams(folder: str | os.PathLike) -> dict[str, int]:
    path = Path(folder) / "hparams.json"
    if not path.is_file():
        raise Gpt2tuneError(f"{path} is missing: a GPT-2 model folder needs hparams.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise Gpt2tuneError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise Gpt2tuneError(f"{path} must hold a JSON object with {', '.join(MODEL_FOLDER_FILES)}")
    return check_hparams(raw, source=str(path))


def checkpoint_prefix(folder: str | os.PathLike) -> Path:
    """The checkpoint named by the folder's `checkpoint` state file (`model.ckpt` if absent).

    Only the file name is used: trainers often write absolute paths into the state file,
    and a model folder that was moved or copied must still read its own files, never those
    of the place it came from.
    """
    folder = Path(folder)
    state = folder / "checkpoint"
    name = CKPT_PREFIX
    if state.is_file():
        text = state.read_text("utf-8", "replace")
        m = re.search(r'^model_checkpoint_path:\s*"(.*)"', text, re.M)
        if not m:
            raise Gpt2tuneError(
                f"{state} has no model_checkpoint_path line; is it a TF checkpoint state?"
            )
        name = m.group(1)
    return folder / Path(name).name


def _read_weights(prefix: Path, hparams: dict[str, int]) -> dict[str, np.ndarray]:
    index = Path(f"{prefix}.index")
    data = Path(f"{prefix}.data-00000-of-00001")
    for f in (index, data):
        if not f.is_file():
            raise Gpt2tuneError(f"{f} is missing: the checkpoint needs both .index and .data files")
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        shapes = reader.get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError, IndexError) as e:
        raise Gpt2tuneError(
            f"{index} is not a readable TF checkpoint index ({first_line(e)})"
        ) from None
    weights = {}
    for name, shape in variable_shapes(hparams).items():
        if name not in shapes:
            raise Gpt2tuneError(
                f"{prefix}: tensor {name} is missing; hparams.json ({hparams}) does not match "
                "this checkpoint, or it is not a GPT-2 checkpoint"
            )
        if tuple(shapes[name]) != shape:
            raise Gpt2tuneError(
                f"{prefix}: tensor {name} has shape {list(shapes[name])} but hparams.json "
                f"implies {list(shape)}"
            )
        try:
            weights[name] = reader.get_tensor(name)
        except (tf.errors.OpError, ValueError, IndexError) as e:  # IndexError: short file
            raise Gpt2tuneError(
                f"{data} is truncated or corrupt: reading {name} failed ({first_line(e)}); "
                "download or copy the model again"
            ) from None
    return weights


def load_model(folder: str | os.PathLike) -> GPT2:
    """Load an OpenAI-format model folder (the official releases load unchanged)."""
    folder = Path(folder)
    if not folder.is_dir():
        _wait_for_save(folder)
    if not folder.is_dir():
        aside = sorted(folder.parent.glob(f".{folder.name}.old-*"))
        if aside:  # a save was killed between moving the old folder aside and the new one in
            raise Gpt2tuneError(
                f"model folder {folder} does not exist: a save was interrupted, and the "
                f"previous model is in {aside[-1]}; rename it back or save again"
            )
    check_model_folder(folder)
    hparams = load_hparams(folder)
    encoder = load_encoder(folder)
    prefix = checkpoint_prefix(folder)
    weights = _read_weights(prefix, hparams)
    # Blocks past n_layer would be silently left out (n_embd is checked by the shapes).
    layers = {int(m[1]) for n, _ in tf.train.list_variables(str(prefix))
              if (m := re.match(r"model/h(\d+)/", n))}  # fmt: skip
    if layers and max(layers) >= hparams["n_layer"]:
        raise Gpt2tuneError(
            f"{prefix} has {max(layers) + 1} layers but {folder / 'hparams.json'} says "
            f"n_layer {hparams['n_layer']}; set n_layer to {max(layers) + 1}"
        )
    return GPT2(hparams, weights, encoder)


def read_weights(path: str | os.PathLike, hparams: dict[str, int]) -> dict[str, np.ndarray]:
    """GPT-2's tensors from a model or run folder (its `checkpoint` state file says which) or
    from a checkpoint prefix such as `checkpoint/run1/model-500`, checked against `hparams`."""
    path = Path(path)
    if path.is_dir():
        return _read_weights(checkpoint_prefix(path), hparams)
    if Path(f"{path}.index").is_file():
        return _read_weights(path, hparams)
    raise Gpt2tuneError(
        f"{path}: neither a model/run folder nor a checkpoint prefix (no {path.name}.index)"
    )


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """A short SHA-256 of a model's tensors (names, dtypes, shapes and bytes): what a run
    folder records of the weights its training started from, to tell them again later."""
    h = hashlib.sha256()
    for name in sorted(weights):
        value = np.ascontiguousarray(weights[name])
        h.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        h.update(memoryview(value).cast("B"))
    return h.hexdigest()[:16]


def assemble(
    base: str | os.PathLike,
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    prefix: str | os.PathLike | None = None,
    trained_on: Mapping[str, str] | None = None,
) -> GPT2:
    """The trained weights from `run_dir` beside the base model's hparams and tokenizer files:
    those its `checkpoint` file names, or those of the checkpoint `prefix` (keeping.py picks
    the best or the latest).

    This is the notebooks' "copy the checkpoint into a model folder" step: the result is an
    ordinary OpenAI-format folder. Adam's slots in the training checkpoint are left behind.
    A LoRA run folder holds only adapters: they are merged (w[0] += alpha / rank * A B,
    lora.merge) into the weights they were trained on, so the folder is the same ordinary
    layout. Those are `trained_on` = {"path", "digest"} (what the run's train_state.json
    records as "base": train.restore_from's weights, if it named a folder), checked against
    the digest; without it, the base model's.
    """
    hparams = load_hparams(base)
    if not (Path(run_dir) / "checkpoint").is_file():
        raise Gpt2tuneError(f"{run_dir} holds no training checkpoint: run `dvc repro train` first")
    prefix = Path(prefix) if prefix else checkpoint_prefix(run_dir)
    adapted = lora.read_adapters(prefix, hparams) if Path(f"{prefix}.index").is_file() else None
    if adapted:
        weights = lora.merge(_adapted_weights(base, run_dir, hparams, trained_on), *adapted)
    else:
        weights = _read_weights(prefix, hparams)
    model = GPT2(hparams, weights, load_encoder(base))
    save_model(model, out)
    return model


def _adapted_weights(
    base: str | os.PathLike,
    run_dir: str | os.PathLike,
    hparams: dict[str, int],
    trained_on: Mapping[str, str] | None,
) -> dict[str, np.ndarray]:
    """The weights a LoRA run's adapters were trained on, as they were then: `trained_on`'s
    path (or `base` when it names none), checked against its digest."""
    path = (trained_on or {}).get("path") or base
    redo = "put those weights back, or train again (`dvc repro -f train`) to use the new ones"
    try:
        weights = read_weights(path, hparams)
    except Gpt2tuneError as e:
        if not trained_on:
            raise
        raise Gpt2tuneError(
            f"{run_dir}: its LoRA adapters were trained on the weights in {path}, which no "
            f"longer read ({e}); {redo}"
        ) from None
    if trained_on and weights_digest(weights) != trained_on.get("digest"):
        raise Gpt2tuneError(
            f"{run_dir}: its LoRA adapters were trained on the weights in {path}, which have "
            f"changed since; {redo}"
        )
    return weights


def save_model(model: GPT2, folder: str | os.PathLike) -> Path:
    """Write `model` to `folder` in OpenAI's layout, replacing any previous content atomically.

    Everything is written into a hidden sibling folder first and swapped in by rename, so an
    interrupted save leaves either the old folder or the new one, never a half-written one.
    """
    if model.encoder is None:
        raise Gpt2tuneError(
            "this model has no encoder, so encoder.json/vocab.bpe cannot be written; "
            "create it with init_model(hparams, load_encoder(folder))"
        )
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        # One save of a folder at a time (the clean-up below would take another's temporary
        # folder), and a load that finds the folder gone between the two renames waits.
        with exclusive_lock(saving_lock(folder), float("inf")):
            # What a save killed part-way (kill -9, power cut) left beside the folder.
            for kind in ("tmp", "old"):
                for stale in folder.parent.glob(f".{folder.name}.{kind}-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            write_checkpoint(tmp, CKPT_PREFIX, model.params)
            (tmp / "hparams.json").write_text(json.dumps(model.hparams, indent=2) + "\n")
            for name, raw in model.encoder.files.items():
                (tmp / name).write_bytes(raw)
            for f in tmp.iterdir():
                fsync_file(f)
            _swap_in(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Gpt2tuneError(
            f"could not save the model to {folder}: {e.strerror or e}; check free disk space "
            "and permissions (a model already there is unchanged)"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def saving_lock(folder: str | os.PathLike) -> Path:
    """The lock file a save of `folder` holds: `.<name>.lock` beside it (not inside: the
    folder is swapped whole, and DVC hashes it)."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _wait_for_save(folder: Path) -> None:
    """If another process is saving `folder` (assemble, between the renames that swap the new
    model in), wait at most SAVE_WAIT_S for it; Gpt2tuneError if it is still saving."""
    lock = saving_lock(folder)
    if not lock.exists():  # no save running: nothing to wait for, and nothing to create
        return
    try:
        with exclusive_lock(lock, SAVE_WAIT_S):
            pass
    except LockBusy as e:
        raise Gpt2tuneError(
            f"model folder {folder} is being written by process {e.holder} (assemble?); "
            "run again once it has finished"
        ) from None
    except OSError:  # a folder we may not write to: no save of ours is running there
        pass


def write_checkpoint(folder: Path, prefix: str, tensors: Mapping[str, tf.Variable]) -> None:
    """Save `tensors` under their names as `folder/prefix` (a TF1 name-based checkpoint), then
    point the folder's `checkpoint` state file at it, by a relative name."""
    names = list(tensors)
    try:
        tf.raw_ops.SaveV2(
            prefix=str(folder / prefix),
            tensor_names=names,
            shape_and_slices=[""] * len(names),
            tensors=[tf.convert_to_tensor(tensors[n]) for n in names],
        )
    except tf.errors.OpError as e:  # a full disk, a read-only folder: TF's C++ file layer
        raise Gpt2tuneError(
            f"could not write the checkpoint {folder / prefix}: {first_line(e)}; check free "
            "disk space and permissions (the folder's previous checkpoint is still the one "
            "its `checkpoint` file names)"
        ) from None
    write_text_atomic(
        folder / "checkpoint",
        f'model_checkpoint_path: "{prefix}"\nall_model_checkpoint_paths: "{prefix}"\n',
    )


def _swap_in(new: Path, folder: Path) -> None:
    if not folder.exists():
        os.rename(new, folder)
        return
    old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(folder, old)
    os.rename(new, folder)
    shutil.rmtree(old, ignore_errors=True)
