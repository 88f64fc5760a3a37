"""Training text -> token arrays: the ``encode`` pipeline step, and reading them back.

``encode_corpus(path_spec, encoder, "data/encoded")`` reads ``data.path`` (one text file, every
file under a folder, or a glob; see :mod:`gpt2tune.data.text`), encodes it with GPT-2's
tokenizer and writes

* ``train.npy`` and ``val.npy``: 1-D token arrays (uint16 when the vocabulary fits, else int32),
  meant to be opened with ``np.load(..., mmap_mode="r")`` (:func:`load_tokens`) so that a corpus
  larger than memory costs nothing to open;
* ``stats.json``: documents, characters, bytes, tokens, train/val tokens, n_vocab, dtype, the
  data.format and the source files (relative to the working directory).

Records
-------
With ``data.prompt_field`` (data.format jsonl or csv) each object or row is a prompt ->
completion record (:mod:`gpt2tune.data.records`), and encode also writes ``train_mask.npy``
and ``val_mask.npy`` (uint8, 1 for each token the loss counts: the completion's) and
``val_records.jsonl`` (the validation records' texts, for ``sample.prompts_from: val``).
stats.json adds ``records``, ``val_records``, ``train_target_tokens``,
``val_target_tokens``, ``window`` and the counts of records cut to fit it
(``truncated_prompts``, ``truncated_completions``). The split below is then made of records
instead of tokens (the same rule, ``val_block_records`` records a block), so no record is
cut between train and val, and each validation record's text is known.

Documents are joined with ``<|endoftext|>`` (the token GPT-2 saw between documents). A literal
``<|endoftext|>`` inside a file also becomes that one token, so a single file of documents
already separated that way keeps its separators. Empty files add no document. That is
``data.format: text``; files of one document per line, CSV row or JSON object, and tokens
encoded by gpt-2-simple (``.npz``) are read by :mod:`gpt2tune.data.formats`.

Validation split
----------------
With ``val_path`` (``data.val_path``) the validation set is that text, encoded the same way,
and all of ``path_spec`` is training text. Otherwise:
Taking the last ``val_fraction`` of the text would be a bad validation set: a Gutenberg book
ends in ~18 KB of licence boilerplate, and a folder's last file is not like the others. Instead
the token stream is cut into blocks of ``min(1024, max(2, n_tokens // 100))`` tokens (1 token
for corpora under 4 tokens, so there are always ~100 or more blocks to choose from), and
``k = round(val_fraction * n_blocks)`` blocks, evenly spaced through the stream (the middle of
each of k equal stretches), go to ``val.npy``; the rest, in order, to ``train.npy``. So val is
a sample of the whole text, its share of tokens is within about a block of ``val_fraction``,
and the split depends only on the token count (deterministic). With ``val_fraction > 0`` and
at least 2 tokens both splits are non-empty (k is clamped to 1..n_blocks-1); with
``val_fraction == 0``, ``val.npy`` is empty and ``train.npy`` is the whole stream. Windows
drawn from either array (:mod:`gpt2tune.data.batches`) may span the seam where a block was taken
out, as they may span a document boundary; that costs a token or two of context at a seam and
nothing else.

Large inputs
------------
Nothing holds the whole corpus in memory. The text comes in pieces of about ``chunk_chars``
characters cut where the tokens do not change (:func:`gpt2tune.data.text.chunks`). From 4 MiB on,
one thread per core encodes pieces side by side (tiktoken releases the GIL), a few pieces in
flight, results taken in order. Tokens stream to a temporary file and are then copied into the
two ``.npy`` files. Every output goes to a temporary file in ``out_dir`` first and is renamed
over the old one with ``os.replace``, so an error or Ctrl-C part-way leaves the previous
outputs as they were. A tqdm bar (bytes read) shows when stderr is a terminal.
"""

from __future__ import annotations

import codecs
import json
import math
import os
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2tune.config.params import MAX_LINE_MB
from gpt2tune.data.formats import EncodedDocuments, check_format, separator
from gpt2tune.data.records import MASK_DTYPE, RecordCounts, read_records, write_records
from gpt2tune.data.text import cores, find_inputs, named
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import display_path, fsync_file
from gpt2tune.model.encoder import EOT
from gpt2tune.paths import ENCODED, VAL_RECORDS

OUTPUTS = ("train.npy", "val.npy", "stats.json")
# With data.prompt_field, also: the loss masks and the validation records' texts.
RECORD_OUTPUTS = ("train_mask.npy", "val_mask.npy", VAL_RECORDS.name)
VAL_BLOCK_TOKENS = 1024  # largest validation block; smaller for corpora under ~100 blocks
_COPY_TOKENS = 1 << 22  # tokens per copy from the temporary stream into train/val.npy
# Inputs from this size on are encoded by one thread per core (smaller ones are a chunk or
# three: nothing to share out).
PARALLEL_MIN_BYTES = 4 << 20
__all__ = ["encode_corpus", "split_plan"]


# --------------------------------------------------------------------------- encode_corpus


# Over 60 lines with its 13-line signature and docstring; the body is the steps in order.
def encode_corpus(
    path_spec: str,
    encoder,
    out_dir: str | os.PathLike = ENCODED,
    *,
    encoding: str = "utf-8",
    data_format: str = "text",
    field: str = "text",
    val_fraction: float = 0.05,
    val_path: str = "",
    progress: bool | None = None,
    chunk_chars: int = 1 << 20,
    workers: int | None = None,
    what: str = "data.path",
    max_line_mb: int = MAX_LINE_MB,
    follow_symlinks_outside: bool = False,
    prompt_field: str = "",
    window: int = 1024,
) -> dict:
    """Encode the text of ``path_spec`` into out_dir/train.npy, val.npy and stats.json, and
    return the stats. ``val_path`` (data.val_path): a separate validation text; then all of
    ``path_spec`` is training data and ``val_fraction`` is not used. ``progress``: True/False
    force the bar on/off; None shows it on a terminal. ``chunk_chars``:
    characters encoded at a time (memory, not result). ``workers``: threads encoding chunks
    side by side (None: one per core for inputs of PARALLEL_MIN_BYTES or more, else 1); the
    tokens are the same for any number. ``data_format``, ``field``: data.format and
    data.field, how the files hold documents (:mod:`gpt2tune.data.formats`); ``max_line_mb``
    (data.max_line_mb): their longest line, in millions of characters.
    ``follow_symlinks_outside`` (data.follow_symlinks_outside): read files that symlinks in
    the project (the working directory) lead to outside it, instead of refusing them.
    ``what``: what path_spec is called in messages, the params.yaml key or an option such as
    ``--data``. ``prompt_field`` (data.prompt_field): read prompt -> completion records
    instead, with a loss mask, each cut to ``window`` tokens (train.n_ctx; see
    :mod:`gpt2tune.data.records` and "Records" above).
    """
    _check_options(encoding, val_fraction, chunk_chars, workers)
    check_format(data_format, field)
    out = Path(out_dir)
    files, val_files, total_bytes = find_inputs(
        path_spec, val_path, out, what, follow_symlinks_outside=follow_symlinks_outside
    )
    if workers is None:
        workers = cores() if total_bytes >= PARALLEL_MIN_BYTES else 1
    dtype = _dtype(encoder.n_vocab)
    if prompt_field:
        return _encode_records(
            files, val_files, encoder, out, dtype, total_bytes,
            _RecordOptions(data_format, field, prompt_field, encoding, val_fraction, val_path,
                           progress, chunk_chars, what, path_spec, max_line_mb, window),
        )  # fmt: skip
    finals = [out / name for name in OUTPUTS]
    stream = out / f".tokens.{os.getpid()}.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
        with _progress_bar(total_bytes, progress) as bar, open(stream, "wb") as sink:

            def encode(paths: list[Path]) -> _Counts:
                encoded = EncodedDocuments(
                    encoder, paths, data_format=data_format, field=field, encoding=encoding,
                    chunk_chars=chunk_chars, dtype=dtype, workers=workers, on_bytes=bar.update,
                    max_line_mb=max_line_mb,
                )  # fmt: skip
                eot = separator(data_format, encoder.eot_token, dtype)
                counts = _append_documents(encoded, sink, eot)
                # Documents joined inside a file's pieces (lines, csv, jsonl): not counted
                # above, and their <|endoftext|> was text, not a document's characters.
                counts.documents += encoded.joined
                counts.characters -= encoded.joined * len(EOT)
                return counts

            train, val = encode(files), encode(val_files)
        _check_tokens(train, val, named(what, path_spec), val_path, len(files), len(val_files))
        split = _split(train.tokens, val.tokens, val_fraction, separate=bool(val_files))
        stats = _stats(train, val, split, total_bytes, encoder.n_vocab, dtype, encoding)
        stats["format"] = data_format
        stats["files"] = [display_path(f) for f in files]
        if val_files:
            stats["val_files"] = [display_path(f) for f in val_files]
        _write_outputs(stream, finals, split, dtype, stats)
        _remove_outputs(out, RECORD_OUTPUTS)  # a previous encode's records: not this data's
    except OSError as e:  # reading errors are Gpt2tuneErrors already: this is the output side
        raise _write_error(e, out) from None
    finally:
        for temp in [stream, *map(_temp, finals)]:
            temp.unlink(missing_ok=True)
    return stats


# --------------------------------------------------------------------------- checks before work


def _check_options(encoding: str, val_fraction: float, chunk_chars: int, workers: int | None):
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    split_plan(0, val_fraction)  # checks val_fraction before any work
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise Gpt2tuneError(
            f"data.encoding = {encoding!r}: not a codec Python knows; use e.g. utf-8 or latin-1"
        ) from None


def _check_tokens(
    train: _Counts, val: _Counts, where: str, val_path: str, n_files: int, n_val_files: int
) -> None:
    if train.tokens < 2:  # files of only a BOM, or a single character
        raise Gpt2tuneError(
            f"{where}: {train.tokens} token(s) in {n_files} file(s); "
            "training needs at least 2 (an input and the token after it): add text"
        )
    if n_val_files and val.tokens == 0:
        raise Gpt2tuneError(f"data.val_path = {val_path!r}: no text in {n_val_files} file(s)")


# --------------------------------------------------------------------------- encoding


@dataclass
class _Counts:
    documents: int = 0
    characters: int = 0
    tokens: int = 0


def _append_documents(
    encoded: Iterable[tuple[int, int, np.ndarray]], sink, eot: np.ndarray
) -> _Counts:
    """Write each document's tokens to `sink`, `eot` (<|endoftext|>, or nothing for npz)
    between documents; count them."""
    counts, last_file = _Counts(), -1
    for file_index, n_chars, ids in encoded:
        counts.characters += n_chars
        if file_index != last_file:  # a file's first non-empty piece: a document
            last_file = file_index
            counts.documents += 1
            if counts.tokens:
                sink.write(eot)
                counts.tokens += len(eot)
        sink.write(ids)  # not ndarray.tofile, which ignores a failed write (a full disk)
        counts.tokens += len(ids)
    return counts


# --------------------------------------------------------------------------- the split


def split_plan(n_tokens: int, val_fraction: float) -> tuple[int, list[int]]:
    """(block size, sorted indices of the blocks that go to validation) for a stream of
    n_tokens tokens; see the module docstring."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n_tokens < 4:
        block = 1
    else:
        block = min(VAL_BLOCK_TOKENS, max(2, n_tokens // 100))
    n_blocks = math.ceil(n_tokens / block)
    if val_fraction == 0 or n_blocks < 2:
        return block, []
    k = min(max(math.floor(val_fraction * n_blocks + 0.5), 1), n_blocks - 1)
    # The middle block of each of k equal stretches: spaced >= 1 apart, never past the end.
    return block, [(2 * j + 1) * n_blocks // (2 * k) for j in range(k)]


@dataclass(frozen=True)
class _Split:
    block: int  # tokens per validation block (0: a separate validation text)
    val_blocks: int  # blocks taken out for validation
    train: list[tuple[int, int]]  # (start, end) token ranges of the stream, in order
    val: list[tuple[int, int]]


def _split(n_train: int, n_val: int, val_fraction: float, *, separate: bool) -> _Split:
    """Which ranges of the token stream go to train.npy and val.npy. With a separate
    validation text the stream is the training text, then that text."""
    if separate:
        return _Split(0, 0, [(0, n_train)], [(n_train, n_train + n_val)])
    block, val_blocks = split_plan(n_train, val_fraction)
    val = [(i * block, min(n_train, (i + 1) * block)) for i in val_blocks]
    train, at = [], 0
    for a, b in val + [(n_train, n_train)]:
        if a > at:
            train.append((at, a))
        at = b
    return _Split(block, len(val_blocks), train, val)


# --------------------------------------------------------------------------- outputs


def _progress_bar(total_bytes: int, progress: bool | None) -> tqdm:
    disable = None if progress is None else not progress  # tqdm: None = only on a terminal
    return tqdm(
        total=total_bytes, desc="encode", unit="B", unit_scale=True, unit_divisor=1024,
        disable=disable,
    )  # fmt: skip


def _stats(
    train: _Counts, val: _Counts, split: _Split, total_bytes: int, n_vocab: int, dtype, encoding
) -> dict:
    return {
        "documents": train.documents + val.documents,
        "characters": train.characters + val.characters,
        "bytes": total_bytes,
        "tokens": train.tokens + val.tokens,
        "train_tokens": sum(b - a for a, b in split.train),
        "val_tokens": sum(b - a for a, b in split.val),
        "val_block_tokens": split.block,
        "val_blocks": split.val_blocks,
        "n_vocab": n_vocab,
        "dtype": dtype.name,
        "encoding": encoding,
    }


def _dtype(n_vocab: int) -> np.dtype:
    return np.dtype("<u2") if n_vocab <= 1 << 16 else np.dtype("<i4")


def _write_error(e: OSError, out: Path) -> Gpt2tuneError:
    """The one line for a failed write of the encode stage's outputs."""
    return Gpt2tuneError(
        f"could not write {display_path(e.filename or out)}: {e.strerror or e}; check "
        f"free disk space and permissions of {display_path(out)} (its previous outputs "
        "are unchanged)"
    )


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _remove_stale_temps(out: Path) -> None:
    """Temporary files that a killed encode (kill -9, outside DVC) left in `out`: those named
    after a process that no longer runs (a live one may be encoding into `out` right now)."""
    for temp in out.glob(".*.tmp"):
        pid = temp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            temp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _write_outputs(
    stream: Path, finals: list[Path], split: _Split, dtype: np.dtype, stats: dict
) -> None:
    """train.npy and val.npy from the token stream, and stats.json: each written to its
    temporary name, then all renamed into place."""
    tokens = np.memmap(stream, dtype=dtype, mode="r", shape=(stats["tokens"],))
    try:
        _write_npy(_temp(finals[0]), tokens, split.train, dtype)
        _write_npy(_temp(finals[1]), tokens, split.val, dtype)
    finally:
        del tokens
    _write_json(_temp(finals[2]), stats)
    for final in finals:
        os.replace(_temp(final), final)


def _write_npy(path: Path, source: np.ndarray, ranges: list[tuple[int, int]], dtype) -> None:
    """A 1-D .npy of source[a:b] for each (a, b) in ranges, written without loading it all."""
    n = sum(b - a for a, b in ranges)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for a, b in ranges:
            for s in range(a, b, _COPY_TOKENS):
                fh.write(np.ascontiguousarray(source[s : min(b, s + _COPY_TOKENS)]))
    fsync_file(path)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    fsync_file(path)


def _remove_outputs(out: Path, names: Iterable[str]) -> None:
    for name in names:
        (out / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class _RecordOptions:
    data_format: str
    field: str
    prompt_field: str
    encoding: str
    val_fraction: float
    val_path: str
    progress: bool | None
    chunk_chars: int
    what: str
    path_spec: str
    max_line_mb: int
    window: int


def _encode_records(
    files: list[Path], val_files: list[Path], encoder, out: Path, dtype: np.dtype,
    total_bytes: int, o: _RecordOptions,
) -> dict:  # fmt: skip
    """encode_corpus with data.prompt_field: records, their loss masks and the validation
    records' texts (see "Records" in the module docstring)."""
    if o.data_format not in ("jsonl", "csv"):
        raise Gpt2tuneError(
            f"data.prompt_field = {o.prompt_field!r}: needs data.format jsonl or csv, not "
            f"{o.data_format}"
        )
    if o.window < 2:
        raise ValueError(f"window must be >= 2, got {o.window}")
    fields = {"data.prompt_field": o.prompt_field, "data.field": o.field}
    names = (*OUTPUTS, *RECORD_OUTPUTS)
    finals = {name: out / name for name in names}
    pid = os.getpid()
    streams = {k: out / f".{k}.{pid}.tmp" for k in ("tokens", "mask", "texts")}
    try:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
        starts = array("q")
        with (
            _progress_bar(total_bytes, o.progress) as bar,
            open(streams["tokens"], "wb") as tokens_sink,
            open(streams["mask"], "wb") as mask_sink,
            open(streams["texts"], "w", encoding="utf-8") as texts_sink,
        ):

            def encode(paths: list[Path]) -> RecordCounts:
                records = read_records(
                    paths, data_format=o.data_format, fields=fields, encoding=o.encoding,
                    read_size=o.chunk_chars, on_bytes=bar.update, max_line_mb=o.max_line_mb,
                )  # fmt: skip
                sinks = (tokens_sink, mask_sink, texts_sink)
                return write_records(encoder, records, o.window, dtype, sinks, starts)

            train, val = encode(files), encode(val_files)
        where = named(o.what, o.path_spec)
        if train.records < 2 and not (val_files and train.records):
            raise Gpt2tuneError(
                f"{where}: {train.records} record(s) with a prompt or a completion in "
                f"{len(files)} file(s); training on records needs at least 2 (1 with "
                "data.val_path): add records"
            )
        if val_files and not val.records:
            raise Gpt2tuneError(
                f"data.val_path = {o.val_path!r}: no records in {len(val_files)} file(s)"
            )
        n = train.records + val.records
        starts.append(train.tokens + val.tokens)  # the end of the last record
        # The split of the records, in records (the token rule, with records for tokens).
        split = _split(train.records, val.records, o.val_fraction, separate=bool(val_files))
        to_tokens = (
            [(starts[a], starts[b]) for a, b in split.train],
            [(starts[a], starts[b]) for a, b in split.val],
        )
        val_ids = [i for a, b in split.val for i in range(a, b)]
        token_split = _Split(split.block, split.val_blocks, *to_tokens)
        mask = np.memmap(streams["mask"], dtype=MASK_DTYPE, mode="r", shape=(starts[n],))
        try:
            train_targets = sum(int(mask[a:b].sum(dtype=np.int64)) for a, b in to_tokens[0])
        finally:
            del mask
        stats = _stats(
            _Counts(train.records + val.records, train.characters + val.characters,
                    train.tokens + val.tokens),
            _Counts(), token_split, total_bytes, encoder.n_vocab, dtype, o.encoding,
        )  # fmt: skip
        stats["format"] = o.data_format
        stats["files"] = [display_path(f) for f in files]
        if val_files:
            stats["val_files"] = [display_path(f) for f in val_files]
        stats.update({
            "prompt_field": o.prompt_field,
            "records": n,
            "val_records": len(val_ids),
            "window": o.window,
            "train_target_tokens": train_targets,
            "val_target_tokens": train.targets + val.targets - train_targets,
            "truncated_prompts": train.truncated_prompts + val.truncated_prompts,
            "truncated_completions": train.truncated_completions + val.truncated_completions,
        })  # fmt: skip
        # The validation blocks are of records: val_block_records of them each.
        stats["val_block_records"] = stats.pop("val_block_tokens")
        _write_record_outputs(streams, finals, token_split, dtype, stats, val_ids)
    except OSError as e:
        raise _write_error(e, out) from None
    finally:
        for temp in [*streams.values(), *map(_temp, finals.values())]:
            temp.unlink(missing_ok=True)
    return stats


def _write_record_outputs(
    streams: dict[str, Path], finals: dict[str, Path], split: _Split, dtype: np.dtype,
    stats: dict, val_ids: list[int],
) -> None:  # fmt: skip
    """train/val.npy, their masks, val_records.jsonl and stats.json, each written to its
    temporary name, then all renamed into place."""
    n = stats["tokens"]
    tokens = np.memmap(streams["tokens"], dtype=dtype, mode="r", shape=(n,))
    mask = np.memmap(streams["mask"], dtype=MASK_DTYPE, mode="r", shape=(n,))
    try:
        _write_npy(_temp(finals["train.npy"]), tokens, split.train, dtype)
        _write_npy(_temp(finals["val.npy"]), tokens, split.val, dtype)
        _write_npy(_temp(finals["train_mask.npy"]), mask, split.train, MASK_DTYPE)
        _write_npy(_temp(finals["val_mask.npy"]), mask, split.val, MASK_DTYPE)
    finally:
        del tokens, mask
    wanted = set(val_ids)
    with (
        open(streams["texts"], encoding="utf-8") as texts,
        open(_temp(finals[VAL_RECORDS.name]), "w", encoding="utf-8") as kept,
    ):
        for i, line in enumerate(texts):
            if i in wanted:
                kept.write(line)
    fsync_file(_temp(finals[VAL_RECORDS.name]))
    _write_json(_temp(finals["stats.json"]), stats)
    for final in finals.values():
        os.replace(_temp(final), final)
