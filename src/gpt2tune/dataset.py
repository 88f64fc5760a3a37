"""Training text -> token arrays: the ``encode`` pipeline step, and batches for training.

``encode_corpus(path_spec, encoder, "data/encoded")`` reads ``data.path`` (one text file, every
file under a folder, or a glob), encodes it with GPT-2's tokenizer and writes

* ``train.npy`` and ``val.npy``: 1-D token arrays (uint16 when the vocabulary fits, else int32),
  meant to be opened with ``np.load(..., mmap_mode="r")`` (:func:`load_tokens`) so that a corpus
  larger than memory costs nothing to open;
* ``stats.json``: documents, characters, bytes, tokens, train/val tokens, n_vocab, dtype and the
  source files (relative to the working directory).

Documents
---------
Each file is one document; documents are joined with ``<|endoftext|>`` (the token GPT-2 saw
between documents). A literal ``<|endoftext|>`` inside a file also becomes that one token, so a
single file of documents already separated that way keeps its separators. Folders are read
recursively in sorted order (by path components), skipping hidden files and folders (names that
start with "."); a glob's matches are sorted the same way and only files are kept. Empty files
add no document. A UTF-8 byte-order mark at the start of a file is dropped.

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
drawn from either array may span the seam where a block was taken out, as they may span a
document boundary; that costs a token or two of context at a seam and nothing else.

Large inputs
------------
Nothing holds the whole corpus in memory. Each file is read and decoded in pieces (an
incremental decoder, so a character split between reads is fine) and encoded in pieces of
about ``chunk_chars`` characters, cut only where GPT-2's pre-tokenizer gives the same tokens
whether or not the text is cut (see :func:`_safe_cut`). From 4 MiB on, one thread per core
encodes pieces side by side (tiktoken releases the GIL), a few pieces in flight, results
taken in order. Tokens stream to a temporary file and are then copied into the two ``.npy``
files. Every output goes to a temporary file in ``out_dir`` first and is renamed over the old
one with ``os.replace``, so an error or Ctrl-C part-way leaves the previous outputs as they
were. A tqdm bar (bytes read) shows for inputs of 8 MiB or more when stderr is a terminal.

Training batches
----------------
:func:`random_windows` draws random contiguous windows of ``n_ctx + 1`` tokens (inputs
``w[:, :-1]``, targets ``w[:, 1:]``); :func:`eval_windows` gives evenly spaced, non-overlapping
where possible, deterministic windows for the validation loss. A corpus shorter than
``n_ctx + 1`` tokens gives windows of the whole corpus (:func:`window_length`).
"""

from __future__ import annotations

import codecs
import glob
import json
import math
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import regex
from tqdm import tqdm

from gpt2tune.errors import Gpt2tuneError

EOT = "<|endoftext|>"
SPLITS = ("train", "val")
VAL_BLOCK_TOKENS = 1024  # largest validation block; smaller for corpora under ~100 blocks
PROGRESS_MIN_BYTES = 8 << 20  # smaller inputs encode in a second or two: no bar
_COPY_TOKENS = 1 << 22  # tokens per copy from the temporary stream into train/val.npy
# Inputs from this size on are encoded by one thread per core (smaller ones are a chunk or
# three: nothing to share out).
PARALLEL_MIN_BYTES = 4 << 20

_GLOB_CHARS = re.compile(r"[*?[]")

# Where text may be cut without changing GPT-2's tokens (the reasoning is in _safe_cut).
# `regex`, not `re`: \s, \S and \p{L} must mean what they mean in GPT-2's pattern.
_SAFE_CUT = regex.compile(r"\n(?=\S)|(?<=\S) (?=\p{L})")


# --------------------------------------------------------------------------- finding the text


def _sort_key(path: Path) -> tuple[str, ...]:
    return path.parts  # "a/z.txt" before "a-b.txt": a folder's files stay together


def find_documents(path_spec: str, key: str = "data.path") -> list[Path]:
    """The files ``data.path`` (or `key`) names: the file itself, every non-hidden file under
    a folder (recursively), or a glob's file matches; sorted. Gpt2tuneError if that is no file."""
    where = f"{key} = {path_spec!r}"
    if not path_spec.strip():
        raise Gpt2tuneError(f"{where}: empty; set {key} in params.yaml to a file, folder or glob")
    path = Path(path_spec)
    if path.is_dir():
        return _folder_files(path, where, key)
    if path.exists():
        if not path.is_file():
            raise Gpt2tuneError(f"{where}: not a regular file or folder; point {key} at your text")
        return [path]
    if _GLOB_CHARS.search(path_spec):
        matches = [Path(m) for m in glob.glob(path_spec, recursive=True)]
        files = [m for m in matches if m.is_file()]
        if not files:
            what = "only folders" if matches else "nothing"
            raise Gpt2tuneError(
                f"{where}: taken as a glob, it matches {what} (relative to {os.getcwd()}); "
                f"fix the pattern or set {key} to your text file or folder"
            )
        return sorted(files, key=_sort_key)
    raise Gpt2tuneError(
        f"{where}: taken as a file or folder path, it does not exist (relative to "
        f"{os.getcwd()}); put your text there or set {key} in params.yaml"
    )


def _folder_files(folder: Path, where: str, key: str) -> list[Path]:
    def fail(e: OSError) -> None:
        raise Gpt2tuneError(f"{where}: cannot list {e.filename}: {e.strerror or e}")

    files = []
    for root, dirs, names in os.walk(folder, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(root, name)
            if not name.startswith(".") and path.is_file():
                files.append(path)
    if not files:
        raise Gpt2tuneError(
            f"{where}: taken as a folder, it holds no files (hidden ones are skipped); "
            f"put your text files in it or set {key} to a file or glob"
        )
    return sorted(files, key=lambda f: _sort_key(f.relative_to(folder)))


def _display(path: Path) -> str:
    """`path` relative to the working directory if it lies below it, else as given; "/"s."""
    path = Path(path)
    try:
        return path.absolute().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


# --------------------------------------------------------------------------- reading and cutting


def _read_text(
    path: Path, encoding: str, read_size: int, on_bytes: Callable[[int], object]
) -> Iterator[str]:
    """The decoded text of `path`, in pieces; Gpt2tuneError naming the byte offset of bad input."""
    name = _display(path)
    is_utf8 = codecs.lookup(encoding).name == "utf-8"
    # In an ASCII-compatible codec a NUL byte is a NUL character, which no text holds: it is
    # a binary file (an image, a .npy, a zip) that happens to decode.
    nul_is_binary = "\0a".encode(encoding) == b"\0a"
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    fed, first = 0, True
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise Gpt2tuneError(f"{name}: cannot read: {e.strerror or e}") from None
    with fh:
        while True:
            try:
                raw = fh.read(read_size)
            except OSError as e:
                raise Gpt2tuneError(f"{name}: cannot read: {e.strerror or e}") from None
            final = not raw
            nul = raw.find(b"\0") if nul_is_binary else -1
            if nul >= 0:
                raise Gpt2tuneError(
                    f"{name}: binary data, not text (a NUL byte at byte offset {fed + nul}); "
                    "point data.path at text files only"
                )
            held = _held_bytes(decoder)
            try:
                text = decoder.decode(raw, final)
            except UnicodeDecodeError as e:
                # e.start counts from the start of (bytes the decoder held back) + raw.
                offset = fed - held + e.start
                bad = bytes(e.object[e.start : min(e.end, e.start + 8)])
                raise Gpt2tuneError(
                    f"{name}: not valid {encoding}: {bad!r} at byte offset {offset} ({e.reason}); "
                    f"set data.encoding in params.yaml to the file's codec (e.g. cp1252 or "
                    f"latin-1) or convert the file to {encoding}"
                ) from None
            fed += len(raw)
            on_bytes(len(raw))
            if first and text:
                first = False
                if is_utf8 and text[0] == "\ufeff":
                    text = text[1:]
            if text:
                yield text
            if final:
                return


def _held_bytes(decoder: codecs.IncrementalDecoder) -> int:
    """How many bytes fed so far the decoder still holds (an unfinished character)."""
    try:
        state = decoder.getstate()[0]
    except Exception:  # a codec without getstate: offsets may be a few bytes late
        return 0
    return len(state) if isinstance(state, (bytes, bytearray)) else 0


def _safe_cut(text: str, target: int) -> int | None:
    """A safe cut of `text` near `target`: the last at or before it, else the first after it,
    else None. At a safe cut p (0 < p < len(text)) encoding text[:p] and text[p:] separately
    gives exactly the tokens of encoding text.

    GPT-2's pattern is ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|
    \\s+(?!\\S)|\\s+``. A cut is safe where no match crosses it and no match before it looks
    past it; only ``\\s+(?!\\S)`` looks ahead, and it sees the end of the text differently
    from a letter. Two kinds of place qualify:

    * before a "\\n" that a non-space character X follows. In the whole text a whitespace run
      W ending in that "\\n" splits as W[:-1] (``\\s+(?!\\S)`` backs off from X) and "\\n"
      alone; cut before the "\\n", the first part ends in W[:-1], matched whole at the end, and
      the second starts with "\\n" then X, as before. (Cutting right *after* the "\\n", before
      X, would not do: "a\\n\\n" at the end of a piece becomes the single token "\\n\\n" where
      "a\\n\\nb" gives "\\n", "\\n".) X must not start ``<|endoftext|>``, which ends a
      segment like the end of the text does.
    * before a space that follows a non-space and precedes a letter: the space starts
      `` ?\\p{L}+``, and the token before ends at the non-space either way. This keeps pieces
      small in text without line breaks.

    Neither kind falls inside ``<|endoftext|>``, and the last 14 characters are never cut,
    so whether a "<" starts that literal is always known.
    """
    limit = len(text) - len(EOT) - 1  # room to see a whole <|endoftext|> after a cut
    if limit < 1:
        return None

    def ok(p: int) -> bool:
        return 0 < p <= limit and not text.startswith(EOT, p + 1)

    target = min(target, limit)
    window = 1 << 12
    while True:  # backwards from target, in growing windows
        start = max(0, target - window)
        best = None
        for m in _SAFE_CUT.finditer(text, start, target + 2):  # +2: the lookahead's character
            if m.start() <= target and ok(m.start()):
                best = m.start()
        if best is not None:
            return best
        if start == 0:
            break
        window *= 4
    for m in _SAFE_CUT.finditer(text, max(target, 0) + 1):
        if m.start() > limit:
            return None
        if ok(m.start()):
            return m.start()
    return None


def _chunks(pieces: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """`pieces` re-cut into strings of about chunk_chars, cut only at safe points (longer where
    the text has none); joined they are the same text, and each encodes on its own exactly as
    it does inside the whole."""
    pending = ""
    for piece in pieces:
        pending += piece
        while len(pending) >= chunk_chars:
            cut = _safe_cut(pending, chunk_chars)
            if cut is None:
                break  # wait for more text
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _encode_pieces(
    encoder, pieces: Iterable[tuple[int, str]], dtype: np.dtype, workers: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(tag, characters, token ids) for each (tag, piece), in order. With workers > 1 the
    pieces are encoded by that many threads, at most two per worker in flight, so memory
    stays a few chunks whatever the corpus size. Pieces are cut at safe points (_chunks), so
    encoding them apart gives the tokens of the whole."""

    def encode(piece: str) -> np.ndarray:
        return np.array(encoder.encode(piece, allow_endoftext=True), dtype)

    if workers == 1:
        for tag, piece in pieces:
            yield tag, len(piece), encode(piece)
        return
    # Threads, not processes: tiktoken releases the GIL while it encodes, and a process pool
    # would re-import the caller's main module (spawn) or fork a multi-threaded process.
    pool = ThreadPoolExecutor(workers, thread_name_prefix="encode")
    in_flight: deque = deque()
    try:
        for tag, piece in pieces:
            in_flight.append((tag, len(piece), pool.submit(encode, piece)))
            if len(in_flight) >= 2 * workers:
                tag0, n0, done = in_flight.popleft()
                yield tag0, n0, done.result()
        while in_flight:
            tag0, n0, done = in_flight.popleft()
            yield tag0, n0, done.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


# --------------------------------------------------------------------------- encode_corpus


def _dtype(n_vocab: int) -> np.dtype:
    return np.dtype("<u2") if n_vocab <= 1 << 16 else np.dtype("<i4")


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_npy(path: Path, source: np.ndarray, ranges: list[tuple[int, int]], dtype) -> None:
    """A 1-D .npy of source[a:b] for each (a, b) in ranges, written without loading it all."""
    n = sum(b - a for a, b in ranges)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for a, b in ranges:
            for s in range(a, b, _COPY_TOKENS):
                np.ascontiguousarray(source[s : min(b, s + _COPY_TOKENS)]).tofile(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _check_outside(files: list[Path], out_dir: Path, path_spec: str) -> None:
    out = out_dir.resolve()
    for f in files:
        if out in f.resolve().parents:
            raise Gpt2tuneError(
                f"data.path = {path_spec!r} takes in {_display(f)}, which is inside the "
                f"output folder {_display(out_dir)}; keep the training text elsewhere "
                "(e.g. data/raw/) and point data.path there"
            )


def encode_corpus(
    path_spec: str,
    encoder,
    out_dir: str | os.PathLike = "data/encoded",
    *,
    encoding: str = "utf-8",
    val_fraction: float = 0.05,
    val_path: str = "",
    progress: bool | None = None,
    chunk_chars: int = 1 << 20,
    workers: int | None = None,
) -> dict:
    """Encode the text of ``path_spec`` into out_dir/train.npy, val.npy and stats.json, and
    return the stats. ``val_path`` (data.val_path): a separate validation text; then all of
    ``path_spec`` is training data and ``val_fraction`` is not used. ``progress``: True/False
    force the bar on/off; None shows it for large inputs on a terminal. ``chunk_chars``:
    characters encoded at a time (memory, not result). ``workers``: threads encoding chunks
    side by side (None: one per core for inputs of PARALLEL_MIN_BYTES or more, else 1); the
    tokens are the same for any number.
    """
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
    files = find_documents(path_spec)
    val_files = find_documents(val_path, "data.val_path") if val_path else []
    out = Path(out_dir)
    _check_outside(files, out, path_spec)
    _check_outside(val_files, out, val_path)
    if shared := sorted({f.resolve() for f in files} & {f.resolve() for f in val_files}):
        raise Gpt2tuneError(
            f"data.val_path = {val_path!r} and data.path = {path_spec!r} share "
            f"{_display(shared[0])}; validation text must not also be training text"
        )
    sizes = []
    for f in files + val_files:
        try:
            sizes.append(f.stat().st_size)
        except OSError as e:
            raise Gpt2tuneError(f"{_display(f)}: cannot read: {e.strerror or e}") from None
    total_bytes = sum(sizes)
    # Empty files are refused before out_dir is made; files with only a BOM, after encoding.
    if val_files and sum(sizes[len(files) :]) == 0:
        raise Gpt2tuneError(f"data.val_path = {val_path!r}: no text in {len(val_files)} file(s)")
    if sum(sizes[: len(files)]) == 0:
        if len(files) == 1:
            raise Gpt2tuneError(
                f"{_display(files[0])} is empty; put your training text in it or set data.path "
                "in params.yaml to another file"
            )
        raise Gpt2tuneError(
            f"data.path = {path_spec!r}: all {len(files)} files are empty (e.g. "
            f"{_display(files[0])}); add training text"
        )

    dtype = _dtype(encoder.n_vocab)
    out.mkdir(parents=True, exist_ok=True)
    finals = {name: out / name for name in ("train.npy", "val.npy", "stats.json")}
    stream = out / f".tokens.{os.getpid()}.tmp"
    temps = [stream] + [_temp(p) for p in finals.values()]
    if progress is None:
        disable = None if total_bytes >= PROGRESS_MIN_BYTES else True
    else:
        disable = not progress
    bar = tqdm(
        total=total_bytes, desc="encode", unit="B", unit_scale=True, unit_divisor=1024,
        disable=disable,
    )  # fmt: skip
    try:
        with bar, open(stream, "wb") as sink:
            eot = np.array([encoder.eot_token], dtype)

            if workers is None:
                workers = _cores() if total_bytes >= PARALLEL_MIN_BYTES else 1

            def encode_files(paths: list[Path]) -> tuple[int, int, int]:
                """Documents, characters and tokens of `paths`, appended to the stream."""
                documents = characters = n_tokens = 0
                pieces = (
                    (i, piece)
                    for i, path in enumerate(paths)
                    for piece in _chunks(
                        _read_text(path, encoding, chunk_chars, bar.update), chunk_chars
                    )
                )
                last_file = -1
                for file_index, n_chars, ids in _encode_pieces(encoder, pieces, dtype, workers):
                    characters += n_chars
                    if file_index != last_file:  # a file's first non-empty piece: a document
                        last_file = file_index
                        documents += 1
                        if n_tokens:
                            eot.tofile(sink)
                            n_tokens += 1
                    ids.tofile(sink)
                    n_tokens += len(ids)
                return documents, characters, n_tokens

            documents, characters, n_tokens = encode_files(files)
            val_documents, val_characters, n_val_text = encode_files(val_files)
        if n_tokens < 2:  # files of only a BOM, or a single character
            raise Gpt2tuneError(
                f"data.path = {path_spec!r}: {n_tokens} token(s) in {len(files)} file(s); "
                "training needs at least 2 (an input and the token after it): add text"
            )
        if val_files and n_val_text == 0:
            raise Gpt2tuneError(
                f"data.val_path = {val_path!r}: no text in {len(val_files)} file(s)"
            )

        if val_files:  # the stream is the training text, then the validation text
            block, val_blocks = 0, []
            train_ranges, val_ranges = [(0, n_tokens)], [(n_tokens, n_tokens + n_val_text)]
        else:
            block, val_blocks = split_plan(n_tokens, val_fraction)
            val_ranges = [(i * block, min(n_tokens, (i + 1) * block)) for i in val_blocks]
            train_ranges, at = [], 0
            for a, b in val_ranges + [(n_tokens, n_tokens)]:
                if a > at:
                    train_ranges.append((at, a))
                at = b
        tokens = np.memmap(stream, dtype=dtype, mode="r", shape=(n_tokens + n_val_text,))
        try:
            _write_npy(_temp(finals["train.npy"]), tokens, train_ranges, dtype)
            _write_npy(_temp(finals["val.npy"]), tokens, val_ranges, dtype)
        finally:
            del tokens
        n_val = sum(b - a for a, b in val_ranges)
        stats = {
            "documents": documents + val_documents,
            "characters": characters + val_characters,
            "bytes": total_bytes,
            "tokens": n_tokens + n_val_text,
            "train_tokens": sum(b - a for a, b in train_ranges),
            "val_tokens": n_val,
            "val_block_tokens": block,
            "val_blocks": len(val_blocks),
            "n_vocab": encoder.n_vocab,
            "dtype": dtype.name,
            "encoding": encoding,
            "files": [_display(f) for f in files],
        }
        if val_files:
            stats["val_files"] = [_display(f) for f in val_files]
        _write_json(_temp(finals["stats.json"]), stats)
        for final in finals.values():
            os.replace(_temp(final), final)
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    return stats


# --------------------------------------------------------------------------- training side


def load_tokens(out_dir: str | os.PathLike, split: str) -> np.ndarray:
    """The token array of `split` ("train" or "val") in out_dir, memory-mapped read-only."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(out_dir) / f"{split}.npy"
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise Gpt2tuneError(
            f"{_display(path)} not found; run `dvc repro encode` to encode data.path first"
        ) from None
    except (ValueError, OSError, EOFError) as e:
        raise Gpt2tuneError(
            f"{_display(path)} is not a readable token array ({e}); run `dvc repro encode` again"
        ) from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise Gpt2tuneError(
            f"{_display(path)} holds a {tokens.dtype} array of shape {tokens.shape}, not 1-D "
            "token ids; run `dvc repro encode` again"
        )
    return tokens


def window_length(n_tokens: int, n_ctx: int) -> int:
    """Tokens per window, counting the shifted target: n_ctx + 1, or the whole stream if it is
    shorter. Gpt2tuneError if there are fewer than 2 tokens (no input-target pair)."""
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
    if n_tokens < 2:
        raise Gpt2tuneError(
            f"the training text is only {n_tokens} token(s) long; training needs at least 2 "
            "(an input and the token after it): add text to data.path and run `dvc repro encode`"
        )
    return min(n_ctx + 1, n_tokens)


def random_windows(
    tokens: np.ndarray, n_ctx: int, batch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """int32 [batch_size, window_length] random contiguous windows of `tokens`
    (inputs ``w[:, :-1]``, targets ``w[:, 1:]``); the same rng state gives the same batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    length = window_length(len(tokens), n_ctx)
    starts = rng.integers(0, len(tokens) - length + 1, size=batch_size)
    return np.asarray(tokens[starts[:, None] + np.arange(length)], dtype=np.int32)


def eval_windows(tokens: np.ndarray, n_ctx: int, count: int) -> np.ndarray:
    """int32 [k, window_length] windows evenly spaced through `tokens`, first at 0 and last at
    the end, k = min(count, how many fit without overlapping) and at least 1; always the same.
    k is 0 (shape [0, len(tokens)]) when there are fewer than 2 tokens, e.g. an empty val.npy:
    then there is nothing to validate on."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    n = len(tokens)
    if n < 2:
        return np.zeros((0, n), np.int32)
    length = window_length(n, n_ctx)
    k = min(count, max(1, n // length))
    span = n - length  # last possible start
    starts = np.array([0] if k == 1 else [j * span // (k - 1) for j in range(k)])
    return np.asarray(tokens[starts[:, None] + np.arange(length)], dtype=np.int32)
