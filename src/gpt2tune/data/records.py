"""Prompt -> completion records (``data.prompt_field``): their tokens, the loss mask beside them,
and their texts.

With ``data.format`` jsonl or csv and ``data.prompt_field`` set, each JSON object (CSV row) is
one record: its ``data.prompt_field`` string is the prompt and its ``data.field`` string the
completion. One rule joins them: a record's tokens are the prompt's tokens, then the
completion's, then ``<|endoftext|>`` -- nothing is put between prompt and completion, so a
separator the model should see ("\\nA:", " =>") belongs at the end of the prompt text (or the
start of the completion's). Prompt and completion are encoded apart, as TRL's SFT trainer
does, so the cut between them is also a cut between tokens. Records follow each other, so
``<|endoftext|>`` separates them as it separates documents in every other format.

The loss mask (``train_mask.npy``, ``val_mask.npy``: one uint8 per token) is 1 for the
tokens the loss counts as targets -- the completion's and its closing ``<|endoftext|>`` (so
the model learns where an answer ends) -- and 0 for the prompt's, which are only inputs.
Training still draws windows anywhere in the packed stream (data/batches.py); the mask says
which targets of a window count.

A record longer than a window's inputs (``train.n_ctx`` tokens) would never be seen whole, so
it is cut from the left of its prompt (the end of the prompt, nearest the answer, stays); when
the completion alone fills the window, the prompt keeps one token and the completion is cut
from its end (its closing ``<|endoftext|>`` stays). stats.json counts both
(``truncated_prompts``, ``truncated_completions``) and the encode stage prints a warning.
Fitting records to n_ctx tokens (not the n_ctx + 1 of a window) also means every window
holds at least one target: any n_ctx tokens in a row hold a record's closing
``<|endoftext|>``.

The records' texts go, one JSON object ``{"prompt", "completion"}`` a line, to a temporary
file; the encode stage keeps the validation records' in ``val_records.jsonl``, where the
sample stage finds prompts and reference completions (``sample.prompts_from: val``). A cut
prompt is kept there as it was trained on (its kept tokens, decoded), the completion whole.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from gpt2tune.data.formats import RECORD_READERS, Limit, read_lines
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import display_path

MASK_DTYPE = np.dtype("u1")
KEYS = ("prompt", "completion")  # of each line of val_records.jsonl


@dataclass
class RecordCounts:
    records: int = 0
    characters: int = 0
    tokens: int = 0
    targets: int = 0  # tokens whose mask is 1
    truncated_prompts: int = 0
    truncated_completions: int = 0


def fit_record(prompt: list[int], completion: list[int], window: int) -> tuple[list, list, str]:
    """(prompt, completion, what was cut: "", "prompt" or "completion") of a record of at most
    `window` tokens (>= 2); `completion` ends with its <|endoftext|>. The prompt loses tokens
    from its left first; a completion that fills the window alone keeps one prompt token
    before it (its first target needs an input) and loses tokens from its end, but not the
    closing <|endoftext|> (so records stay separated)."""
    if len(prompt) + len(completion) <= window:
        return prompt, completion, ""
    if len(completion) < window:
        return prompt[len(prompt) + len(completion) - window :], completion, "prompt"
    prompt = prompt[-1:]
    return prompt, completion[: window - len(prompt) - 1] + completion[-1:], "completion"


def read_records(
    paths: list[Path],
    *,
    data_format: str,
    fields: dict[str, str],
    encoding: str,
    read_size: int,
    on_bytes: Callable[[int], object],
    max_line_mb: int,
) -> Iterator[tuple[str, str]]:
    """(prompt, completion) of every record of `paths`, in order; fields: {"data.prompt_field":
    key, "data.field": key}. Records whose prompt and completion are both empty add nothing."""
    read, limit = RECORD_READERS[data_format], Limit(max_line_mb)
    for path in paths:
        lines = read_lines(path, encoding, read_size, on_bytes, limit)
        for prompt, completion in read(display_path(path), lines, fields, limit):
            if prompt or completion:
                yield prompt, completion


def write_records(
    encoder,
    records: Iterator[tuple[str, str]],
    window: int,
    dtype: np.dtype,
    sinks: tuple[BinaryIO, BinaryIO, TextIO],
    starts: array,
) -> RecordCounts:
    """Encode each record, fit it to `window` tokens, and write its tokens, mask and texts to
    sinks (tokens, mask, texts); append where each record starts in the token stream to
    `starts`."""
    tokens_out, mask_out, texts_out = sinks
    counts = RecordCounts()
    eot = [encoder.eot_token]
    for prompt_text, completion_text in records:
        p = encoder.encode(prompt_text, allow_endoftext=True)
        c = encoder.encode(completion_text, allow_endoftext=True) + eot
        p, c, cut = fit_record(p, c, window)
        counts.truncated_prompts += cut == "prompt"
        counts.truncated_completions += cut == "completion"
        starts.append(counts.tokens)
        tokens_out.write(np.array(p + c, dtype).tobytes())
        mask_out.write(bytes(len(p)) + b"\1" * len(c))
        # A cut prompt is kept as trained on, so that the sample stage can complete it.
        shown = encoder.decode(p) if cut else prompt_text
        texts_out.write(json.dumps({"prompt": shown, "completion": completion_text},
                                   ensure_ascii=False) + "\n")  # fmt: skip
        counts.records += 1
        counts.characters += len(prompt_text) + len(completion_text)
        counts.tokens += len(p) + len(c)
        counts.targets += len(c)
    return counts


def read_val_records(path: Path) -> list[dict]:
    """The {"prompt", "completion"} records of a val_records.jsonl, in order; Gpt2tuneError
    when it is missing or not what the encode stage writes."""
    again = "run `dvc repro encode` with data.prompt_field set (data.format jsonl or csv)"
    try:
        with open(path, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        raise Gpt2tuneError(f"{display_path(path)} not found; {again}") from None
    except (OSError, ValueError) as e:
        raise Gpt2tuneError(
            f"{display_path(path)} is not readable JSON lines ({e}); {again}"
        ) from None
    for n, r in enumerate(records, 1):
        if not (isinstance(r, dict) and all(isinstance(r.get(k), str) for k in KEYS)):
            raise Gpt2tuneError(
                f'{display_path(path)}:{n}: not a {{"prompt", "completion"}} record; {again}'
            )
    return records
