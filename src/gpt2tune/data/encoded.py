"""Reading the encode stage's outputs back: ``data/encoded/{train,val}.npy`` and ``stats.json``.

Both are checked on load, because they can be edited, cut short or mixed from two runs outside
DVC: a token id past the vocabulary would otherwise surface as an index error deep inside a
training step, and a missing stats.json as a traceback from the train stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import display_path

SPLITS = ("train", "val")
_AGAIN = "run `dvc repro encode` again (or `dvc repro -f encode` if DVC thinks it is done)"


def read_stats(out_dir: str | os.PathLike) -> dict:
    """out_dir/stats.json, checked to be what encode_corpus writes (n_vocab, token counts)."""
    path = Path(out_dir) / "stats.json"
    name = display_path(path)
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Gpt2tuneError(f"{name} not found; {_AGAIN}") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise Gpt2tuneError(f"{name} is not readable JSON ({e}); {_AGAIN}") from None
    counts = ("n_vocab", "train_tokens", "val_tokens")
    if not isinstance(stats, dict) or not all(
        type(stats.get(k)) is int and stats[k] >= 0 for k in counts
    ):
        raise Gpt2tuneError(
            f"{name} must be a JSON object with the counts {', '.join(counts)}; {_AGAIN}"
        )
    return stats


def load_tokens(out_dir: str | os.PathLike, split: str, n_vocab: int | None = None) -> np.ndarray:
    """The token array of `split` ("train" or "val") in out_dir, memory-mapped read-only.

    Checked against out_dir/stats.json: its length, and every id below `n_vocab` (the
    model's; default: the vocabulary it was encoded with). Finding the largest id reads the
    file once (a fraction of a second for 100 MB).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(out_dir) / f"{split}.npy"
    name = display_path(path)
    tokens = _mapped(path, "; run `dvc repro encode` to encode data.path first", "token array")
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise Gpt2tuneError(
            f"{name} holds a {tokens.dtype} array of shape {tokens.shape}, not 1-D "
            f"token ids; {_AGAIN}"
        )
    stats = read_stats(out_dir)
    if len(tokens) != stats[f"{split}_tokens"]:
        raise Gpt2tuneError(
            f"{name} holds {len(tokens)} tokens but stats.json says {stats[f'{split}_tokens']}: "
            f"the files are from different runs or cut short; {_AGAIN}"
        )
    limit = stats["n_vocab"] if n_vocab is None else n_vocab
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= limit):
        bad = int(np.argmax((tokens < 0) | (tokens >= limit)))
        raise Gpt2tuneError(
            f"{name}: token id {int(tokens[bad])} at position {bad} is out of range for a "
            f"vocabulary of {limit} (ids 0..{limit - 1}); the file is damaged or was encoded "
            f"for another model; {_AGAIN}"
        )
    return tokens


def load_mask(out_dir: str | os.PathLike, split: str) -> np.ndarray | None:
    """The loss mask of `split` (data.prompt_field: 1 for each token the loss counts), memory-
    mapped read-only, or None when the data are plain text (every token counts). Checked to
    be as long as the split's tokens and to hold only 0 and 1."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    stats = read_stats(out_dir)
    if not stats.get("prompt_field"):
        return None
    path = Path(out_dir) / f"{split}_mask.npy"
    name = display_path(path)
    missing = ", but stats.json says the data are prompt -> completion records (data.prompt_field)"
    mask = _mapped(path, f"{missing}; {_AGAIN}", "loss mask")
    if mask.ndim != 1 or mask.dtype != np.uint8 or len(mask) != stats[f"{split}_tokens"]:
        raise Gpt2tuneError(
            f"{name} holds a {mask.dtype} array of shape {mask.shape}, not one uint8 per token "
            f"of {split}.npy ({stats[f'{split}_tokens']}); {_AGAIN}"
        )
    if len(mask) and int(mask.max()) > 1:
        raise Gpt2tuneError(f"{name}: values other than 0 and 1; {_AGAIN}")
    return mask


def _mapped(path: Path, missing: str, what: str) -> np.ndarray:
    """The .npy at `path`, memory-mapped read-only; one line if it is absent ("<path> not
    found" + `missing`) or not a readable array (`what` names it)."""
    name = display_path(path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise Gpt2tuneError(f"{name} not found{missing}") from None
    except (ValueError, OSError, EOFError) as e:
        raise Gpt2tuneError(f"{name} is not a readable {what} ({e}); {_AGAIN}") from None
