"""The documents of ``data.path`` in each ``data.format``, as token ids ready to be joined.

``text`` (the default) reads each file as one document (:mod:`gpt2tune.data.text`). Three formats
hold many documents per file, read line by line so that a multi-GB file streams; a line is
held whole while it is parsed, so one longer than ``data.max_line_mb`` million characters (a
CSV cell: the cell) is refused, naming the file and line (:class:`Limit`):

* ``lines``: each line is a document (without its line break; a trailing "\\r" is dropped).
* ``csv``: each row after the header row is a document: its ``data.field`` column. Cells
  may be quoted and span lines; the quoting must be well formed (Python's csv, strict).
* ``jsonl``: each line is a JSON object, and its ``data.field`` key (a string) the document.
  A key given twice in one object is refused (JSON readers keep one silently), and so is
  nesting deeper than Python's reader goes or an integer longer than it reads, in one line.

Empty documents (blank lines, empty cells or strings) add nothing, as empty files do in
``text``; blank lines in csv and jsonl are skipped. Documents are encoded as ``text``'s are:
a literal ``<|endoftext|>`` inside one also becomes that token. A row that does not hold the
field stops the run with the file, line and field (e.g. ``data/raw/a.jsonl:7: no key 'text'
...``); the previous outputs stay, as encode renames new ones into place only at the end.

``npz`` takes tokens already encoded by nshepperd's ``encode.py`` or gpt-2-simple's
``encode_dataset``: ``np.savez_compressed(out, *chunks)``, 1-D integer arrays ``arr_0``,
``arr_1``, ... read in the archive's order (``npz.files``, as their ``load_dataset`` does).
The ids are used as they are: no re-encoding, and nothing inserted between arrays or files,
so train.npy + val.npy hold exactly those tokens (split as any corpus is). That is what
gpt-2-simple trains on too: its chunks already separate the files they combine, and its
sampler never reads across a chunk's end, so it adds no separator either. Every id must be
below the model's n_vocab (an archive from another vocabulary is refused, naming the array).

Joining: documents are separated by ``<|endoftext|>`` (the token GPT-2 saw between
documents) in every format but ``npz``: between files by gpt2tune.data.encode (:func:`separator`),
between the documents of one file here, as the literal text, which the encoder turns into
that token (:class:`EncodedDocuments`). Either way the tokens are those of encoding each
document alone and joining them with the endoftext id.
"""

from __future__ import annotations

import csv
import json
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2tune.config.params import DATA_FORMATS, MAX_LINE_MB
from gpt2tune.data.text import chunks, encode_pieces, numbered_pieces, read_text
from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import display_path
from gpt2tune.model.encoder import EOT

_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "true/false"}


def check_format(data_format: str, field: str) -> None:
    """Gpt2tuneError for a data.format or data.field that cannot be read (before any work)."""
    if data_format not in DATA_FORMATS:
        raise Gpt2tuneError(
            f"data.format = {data_format!r}: must be one of {', '.join(DATA_FORMATS)}"
        )
    if not field.strip():
        raise Gpt2tuneError(
            "data.field is empty; set it to the CSV column or JSON key holding the text"
        )


def separator(data_format: str, eot_token: int, dtype: np.dtype) -> np.ndarray:
    """The ids put between two documents: <|endoftext|>, or nothing for npz (used as is)."""
    return np.array([] if data_format == "npz" else [eot_token], dtype)


class EncodedDocuments:
    """(file number, characters, token ids) for every piece of every file of `paths` (array
    number for npz), in order, when iterated (once). Files of many documents (lines, csv,
    jsonl) come as their documents joined with the literal <|endoftext|>, which the encoder
    turns into that one token, in pieces of about chunk_chars: encoding and writing one small
    document at a time cost five times the encoding itself. ``joined`` counts those inner
    separators (documents after a file's first), so the caller can count documents and
    characters right."""

    def __init__(
        self,
        encoder,
        paths: list[Path],
        *,
        data_format: str,
        field: str,
        encoding: str,
        chunk_chars: int,
        dtype: np.dtype,
        workers: int,
        on_bytes: Callable[[int], object],
        max_line_mb: int = MAX_LINE_MB,
    ) -> None:
        self._encoder, self._paths, self._format, self._field = encoder, paths, data_format, field
        self._encoding, self._chunk_chars, self._on_bytes = encoding, chunk_chars, on_bytes
        self._dtype, self._workers, self._max_line_mb = dtype, workers, max_line_mb
        self.joined = 0

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        if self._format == "npz":
            return npz_tokens(self._paths, self._encoder.n_vocab, self._dtype, self._on_bytes)
        if self._format == "text":
            pieces = numbered_pieces(self._paths, self._encoding, self._chunk_chars, self._on_bytes)
        else:
            pieces = self._joined_pieces()
        return encode_pieces(self._encoder, pieces, self._dtype, self._workers)

    def _joined_pieces(self) -> Iterator[tuple[int, str]]:
        read, limit = _READERS[self._format], Limit(self._max_line_mb)
        for i, path in enumerate(self._paths):
            lines = read_lines(path, self._encoding, self._chunk_chars, self._on_bytes, limit)
            for piece in self._joined(read(display_path(path), lines, self._field, limit)):
                yield i, piece

    def _joined(self, docs: Iterable[str]) -> Iterator[str]:
        """The non-empty documents joined with <|endoftext|>, in pieces of about chunk_chars.
        A piece ends where a document ends and the next starts with the separator: no token
        spans a special token, so that cut changes nothing; chunks() cuts a long document."""
        batch: list[str] = []
        size, first = 0, True
        for doc in docs:
            if not doc:
                continue
            if not first:
                batch.append(EOT)
                size += len(EOT)
                self.joined += 1
            first = False
            batch.append(doc)
            size += len(doc)
            if size >= self._chunk_chars:
                yield from chunks(["".join(batch)], self._chunk_chars)
                batch, size = [], 0
        if batch:
            yield from chunks(["".join(batch)], self._chunk_chars)


# --------------------------------------------------------------------------- lines, csv, jsonl


@dataclass(frozen=True)
class Limit:
    """data.max_line_mb: the longest line (a CSV cell: the longest cell) read, in millions of
    characters. A line is held whole while it is parsed, two or three copies of it at once,
    so this bounds the memory a file of long lines takes; text has no such limit."""

    mb: int

    @property
    def chars(self) -> int:
        return self.mb * 10**6

    def error(self, where: str, what: str = "line") -> Gpt2tuneError:
        return Gpt2tuneError(
            f"{where}: {what} longer than {self.mb} million characters (data.max_line_mb), "
            "held whole in memory to be read; split it into several documents, raise "
            "data.max_line_mb, or use data.format text (a file is one document, streamed)"
        )


def read_lines(
    path: Path,
    encoding: str,
    read_size: int,
    on_bytes: Callable[[int], object],
    limit: Limit = Limit(MAX_LINE_MB),
) -> Iterator[tuple[int, str]]:
    """(line number, line with its "\\n") of `path`, streamed; the last may lack the "\\n".
    A line longer than `limit` is refused as soon as that much of it has been read."""
    held: list[str] = []  # the line so far: a long one comes in several reads
    size = n = 0
    for piece in read_text(path, encoding, read_size, on_bytes):
        *ended, rest = piece.split("\n")
        for part in ended:
            n += 1
            if size + len(part) > limit.chars:
                raise limit.error(f"{display_path(path)}:{n}")
            held += (part, "\n")
            yield n, "".join(held)
            held, size = [], 0
        held.append(rest)
        size += len(rest)
        if size > limit.chars:
            raise limit.error(f"{display_path(path)}:{n + 1}")
    if tail := "".join(held):
        yield n + 1, tail


def _strip_break(line: str) -> str:
    line = line[:-1] if line.endswith("\n") else line
    return line[:-1] if line.endswith("\r") else line


def lines_documents(
    name: str, lines: Iterable[tuple[int, str]], field: str, limit: Limit
) -> Iterator[str]:
    """data.format lines: every line (empty ones add no document)."""
    for _, line in lines:
        yield _strip_break(line)


def jsonl_documents(
    name: str, lines: Iterable[tuple[int, str]], field: str, limit: Limit
) -> Iterator[str]:
    """data.format jsonl: the `field` string of every line's JSON object."""
    for row, where in _json_objects(name, lines, f'"{field}": "your text"'):
        yield _json_string(row, field, "data.field", where)


def _json_objects(
    name: str, lines: Iterable[tuple[int, str]], example: str
) -> Iterator[tuple[dict, str]]:
    """(object, "file:line") of every non-blank line; a line that is not a JSON object is one
    error whose fix shows `example` ('"key": "..."') as the object to write."""
    for n, line in lines:
        if not line.strip():
            continue
        where = f"{name}:{n}"
        row = _json_line(line, where)
        if not isinstance(row, dict):
            raise Gpt2tuneError(
                f"{where}: {_json_type(row)}, not a JSON object; data.format jsonl needs one "
                f"object per line, such as {{{example}}}"
            )
        yield row, where


def _json_string(row: dict, field: str, param: str, where: str) -> str:
    """row[field], a string; Gpt2tuneError naming `where` and the `param` that named it."""
    if field not in row:
        keys = ", ".join(map(repr, row)) or "none"
        raise Gpt2tuneError(
            f"{where}: no key {field!r} ({param}); this object's keys: {keys}; set "
            f"{param} to the key holding the text"
        )
    if not isinstance(row[field], str):
        raise Gpt2tuneError(
            f"{where}: key {field!r} ({param}) holds {_json_type(row[field])}, not a "
            "string; store the document's text there"
        )
    return row[field]


def jsonl_records(
    name: str, lines: Iterable[tuple[int, str]], fields: dict[str, str], limit: Limit
) -> Iterator[tuple[str, ...]]:
    """data.format jsonl with data.prompt_field: the strings of `fields` (param -> key, e.g.
    {"data.prompt_field": "question", "data.field": "answer"}) of every line's object."""
    example = ", ".join(f'"{k}": "..."' for k in fields.values())
    for row, where in _json_objects(name, lines, example):
        yield tuple(_json_string(row, key, param, where) for param, key in fields.items())


class _DuplicateKey(Exception):
    pass


def _object(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, refusing a key given twice (json keeps the last one silently)."""
    row = dict(pairs)
    if len(row) < len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return row


def _json_line(line: str, where: str) -> object:
    """One JSONL line parsed, its line break and all (no copy of a long line); Gpt2tuneError
    naming `where`."""
    try:
        return json.loads(line, object_pairs_hook=_object)
    except json.JSONDecodeError as e:
        column = min(e.pos, len(_strip_break(line))) + 1  # "at the end", not at the break
        raise Gpt2tuneError(
            f"{where}: not valid JSON ({e.msg}, column {column}); data.format jsonl "
            "needs one JSON object per line"
        ) from None
    except _DuplicateKey as e:
        raise Gpt2tuneError(
            f"{where}: key {e.args[0]!r} appears twice in one object (JSON readers keep one "
            "of them silently); keep one"
        ) from None
    except RecursionError:
        raise Gpt2tuneError(
            f"{where}: JSON nested too deeply to read (Python's reader stops near "
            f"{sys.getrecursionlimit()} levels); data.format jsonl needs one flat object per "
            "line: store the text in data.field and drop or flatten the nested part"
        ) from None
    except ValueError:  # not a JSONDecodeError: an integer too long for int() (4300 digits)
        raise Gpt2tuneError(
            f"{where}: a number of more than {sys.get_int_max_str_digits()} digits, more than "
            "Python reads; write it as a string (in quotes) or drop it"
        ) from None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), "a number")


def csv_documents(
    name: str, lines: Iterable[tuple[int, str]], field: str, limit: Limit
) -> Iterator[str]:
    """data.format csv: the `field` column of every row after the header row."""
    for (cell,) in csv_records(name, lines, {"data.field": field}, limit):
        yield cell


def csv_records(
    name: str, lines: Iterable[tuple[int, str]], fields: dict[str, str], limit: Limit
) -> Iterator[tuple[str, ...]]:
    """The cells of the `fields` columns (param -> column name) of every row after the header
    row, in that order."""
    # csv refuses cells over 128 KiB by default (a long document); a cell over the limit,
    # spread over many lines, is refused by csv itself and named below.
    old_limit = csv.field_size_limit(limit.chars)
    try:
        reader = csv.reader((line for _, line in lines), strict=True)
        columns: list[int] = []
        start = 1  # the line the row being read begins on
        try:
            for row in reader:
                if not columns:
                    columns = [_csv_column(name, row, f, p) for p, f in fields.items()]
                elif row:
                    for (param, field), column in zip(fields.items(), columns, strict=True):
                        if len(row) <= column:
                            raise Gpt2tuneError(
                                f"{name}:{start}: row has {len(row)} cell(s), none in column "
                                f"{field!r} ({param}, column {column + 1} of the header); "
                                "give every row that many cells"
                            )
                    yield tuple(row[c] for c in columns)
                start = reader.line_num + 1
        except csv.Error as e:
            if str(e).startswith("field larger than field limit"):
                raise limit.error(f"{name}:{start}", "a cell of the row starting here") from None
            raise Gpt2tuneError(
                f"{name}:{start}: not valid CSV ({e}, in the row starting on this line); quote "
                'cells holding commas, quotes or line breaks, with "" for a quote inside'
            ) from None
    finally:
        csv.field_size_limit(old_limit)


def _csv_column(name: str, header: list[str], field: str, param: str = "data.field") -> int:
    """The index of `field` in the header row; Gpt2tuneError if it is not there once."""
    if header.count(field) != 1:
        problem = "twice or more" if field in header else "no column"
        columns = ", ".join(map(repr, header)) or "none"
        raise Gpt2tuneError(
            f"{name}:1: {problem} {field!r} ({param}) in the header row (columns: "
            f"{columns}); data.format csv needs a header row naming the text's column once"
        )
    return header.index(field)


_READERS = {"lines": lines_documents, "csv": csv_documents, "jsonl": jsonl_documents}
RECORD_READERS = {"csv": csv_records, "jsonl": jsonl_records}  # data.prompt_field's formats


# --------------------------------------------------------------------------- npz


def npz_tokens(
    paths: list[Path], n_vocab: int, dtype: np.dtype, on_bytes: Callable[[int], object]
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(array number, 0, token ids) for every non-empty array of every .npz, in order."""
    n = 0
    for path in paths:
        name = display_path(path)
        try:
            npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise Gpt2tuneError(
                f"{name}: not a readable .npz archive of token arrays ({e}); data.format npz "
                "reads the out.npz of gpt-2-simple / nshepperd's encode.py"
            ) from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise Gpt2tuneError(
                f"{name}: a single .npy array, not a .npz archive; data.format npz reads "
                "np.savez_compressed(out, *chunks) archives"
            )
        with npz:
            for array in npz.files:
                ids = _token_array(npz, array, name, n_vocab)
                if len(ids):
                    n += 1
                    yield n, 0, ids.astype(dtype)
        on_bytes(path.stat().st_size)


def _token_array(npz, array: str, name: str, n_vocab: int) -> np.ndarray:
    """npz[array] checked to be 1-D integer ids below n_vocab."""
    where = f"{name}: array {array}"
    try:
        ids = npz[array]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise Gpt2tuneError(f"{where}: cannot be read ({e})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise Gpt2tuneError(
            f"{where}: a {ids.dtype} array of shape {ids.shape}, not 1-D integer token ids"
        )
    bad = np.flatnonzero((ids < 0) | (ids >= n_vocab))
    if len(bad):
        raise Gpt2tuneError(
            f"{where}: token id {ids[bad[0]]} at position {bad[0]} is outside the model's "
            f"vocabulary (0..{n_vocab - 1}); these tokens were encoded for another "
            "vocabulary: set model.name to that model, or encode the text with data.format text"
        )
    return ids
