"""Reading the training text: which files ``data.path`` names, their decoded text in pieces,
and those pieces re-cut where GPT-2's tokens do not depend on the cut.

Documents
---------
Each file is one document. Folders are read recursively in sorted order (by path components),
skipping hidden files and folders (names that start with "."); a glob's matches are sorted the
same way and only files are kept. A UTF-8 byte-order mark at the start of a file is dropped.
A file reached through a symlink that leads out of the project (the working directory) is
refused unless ``data.follow_symlinks_outside``; every input outside the project is named on
stderr by its resolved path.

Large inputs
------------
Nothing holds a whole file in memory. Each file is read and decoded in pieces (an incremental
decoder, so a character split between reads is fine), and the text is handed on in pieces of
about ``chunk_chars`` characters, cut only where GPT-2's pre-tokenizer gives the same tokens
whether or not the text is cut (see :func:`_safe_cut`), so the pieces can be encoded apart:
side by side by one thread per core (:func:`encode_pieces`) for large inputs.
"""

from __future__ import annotations

import codecs
import glob
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import regex

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.files import display_path
from gpt2tune.model.encoder import EOT

_GLOB_CHARS = re.compile(r"[*?[]")

# Where text may be cut without changing GPT-2's tokens (the reasoning is in _safe_cut).
# `regex`, not `re`: \s, \S and \p{L} must mean what they mean in GPT-2's pattern.
_SAFE_CUT = regex.compile(r"\n(?=\S)|(?<=\S) (?=\p{L})")


# --------------------------------------------------------------------------- finding the text


def _sort_key(path: Path) -> tuple[str, ...]:
    return path.parts  # "a/z.txt" before "a-b.txt": a folder's files stay together


def named(what: str, value: str) -> str:
    """How a message shows the setting `what` and its value: ``data.path = 'x'`` (a
    params.yaml key) or ``--data 'x'`` (a command-line option)."""
    return f"{what} {value!r}" if what.startswith("-") else f"{what} = {value!r}"


def _point(what: str) -> str:
    """How the user changes `what`: in params.yaml for a key, on the command line for an option."""
    return f"point {what}" if what.startswith("-") else f"point {what} in params.yaml"


def find_documents(path_spec: str, what: str = "data.path") -> list[Path]:
    """The files ``data.path`` names: the file itself, every non-hidden file under a folder
    (recursively), or a glob's file matches; sorted. Gpt2tuneError if that is no file, naming
    the setting `what` the path came from (a params.yaml key, or an option such as --data)."""
    where = named(what, path_spec)
    if not path_spec.strip():
        raise Gpt2tuneError(f"{where}: empty; {_point(what)} at a file, folder or glob")
    path = Path(path_spec)
    if path.is_dir():
        return _folder_files(path, where, what)
    if path.exists():
        if not path.is_file():
            raise Gpt2tuneError(
                f"{where}: not a regular file or folder; {_point(what)} at your text"
            )
        return [path]
    if _GLOB_CHARS.search(path_spec):
        matches = [Path(m) for m in glob.glob(path_spec, recursive=True)]
        files = [m for m in matches if m.is_file()]
        if not files:
            found = "only folders" if matches else "nothing"
            raise Gpt2tuneError(
                f"{where}: taken as a glob, it matches {found} (relative to {os.getcwd()}); "
                f"fix the pattern or {_point(what)} at your text file or folder"
            )
        return sorted(files, key=_sort_key)
    raise Gpt2tuneError(
        f"{where}: taken as a file or folder path, it does not exist (relative to "
        f"{os.getcwd()}); put your text there or {_point(what)} at it"
    )


def find_inputs(
    path_spec: str,
    val_path: str,
    out_dir: Path,
    what: str = "data.path",
    *,
    follow_symlinks_outside: bool = False,
) -> tuple[list[Path], list[Path], int]:
    """The training files, the validation files (none without val_path) and their bytes in
    all; checked to lie outside out_dir, not to overlap and not to be all empty, and not to
    leave the project (the working directory) through a symlink unless
    follow_symlinks_outside. Inputs outside the project are named on stderr. `what`: the
    setting path_spec came from (see find_documents)."""
    files = find_documents(path_spec, what)
    val_files = find_documents(val_path, "data.val_path") if val_path else []
    inputs = ((what, path_spec, files), ("data.val_path", val_path, val_files))
    for key, spec, found in inputs:
        _check_outside(found, out_dir, named(key, spec), key)
    notes = [_check_in_project(found, key, spec, follow_symlinks_outside)
             for key, spec, found in inputs]  # fmt: skip
    if shared := sorted({f.resolve() for f in files} & {f.resolve() for f in val_files}):
        raise Gpt2tuneError(
            f"data.val_path = {val_path!r} and {named(what, path_spec)} share "
            f"{display_path(shared[0])}; validation text must not also be training text"
        )
    total = _check_not_empty(files, val_files, path_spec, val_path, what)
    for note in filter(None, notes):  # once every check has passed
        print(note, file=sys.stderr)
    return files, val_files, total


def _check_outside(files: list[Path], out_dir: Path, where: str, what: str) -> None:
    out = out_dir.resolve()
    for f in files:
        if out in f.resolve().parents:
            raise Gpt2tuneError(
                f"{where} takes in {display_path(f)}, which is inside the output folder "
                f"{display_path(out_dir)}; keep the text elsewhere (e.g. data/raw/) and "
                f"{_point(what)} there"
            )


def _check_in_project(files: list[Path], key: str, spec: str, follow_symlinks: bool) -> str:
    """A file reached through a symlink that leaves the project is refused (unless
    follow_symlinks): a link in data/ to /etc/shadow put that file in the training tokens
    without a word. Returns the note naming every input outside the project, by link or
    named so, with its resolved path ("" if none): it is trained on, and DVC does not track
    it."""
    root = Path.cwd().resolve()
    outside = []
    for f in files:
        real = f.resolve()
        if real.is_relative_to(root):
            continue
        if Path(os.path.abspath(f)).is_relative_to(root) and not follow_symlinks:
            raise Gpt2tuneError(
                f"{named(key, spec)}: {display_path(f)} leads through a symlink to {real}, "
                f"outside the project ({root}); copy the file into the project, or set "
                "data.follow_symlinks_outside: true in params.yaml to read it"
            )
        outside.append(str(real))
    if not outside:
        return ""
    more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
    return (
        f"note: {named(key, spec)}: reading {len(outside)} file(s) outside the project "
        f"({root}): {', '.join(outside[:3])}{more}"
    )


def _check_not_empty(
    files: list[Path], val_files: list[Path], path_spec: str, val_path: str, what: str
) -> int:
    """The bytes of all input files; Gpt2tuneError if the training or validation files are
    all empty. (Files holding only a BOM are caught after encoding, by _check_tokens.)"""
    sizes = []
    for f in files + val_files:
        try:
            sizes.append(f.stat().st_size)
        except OSError as e:
            raise Gpt2tuneError(f"{display_path(f)}: cannot read: {e.strerror or e}") from None
    if val_files and sum(sizes[len(files) :]) == 0:
        raise Gpt2tuneError(f"data.val_path = {val_path!r}: no text in {len(val_files)} file(s)")
    if sum(sizes[: len(files)]) == 0:
        if len(files) == 1:
            raise Gpt2tuneError(
                f"{display_path(files[0])} is empty; put your text in it or {_point(what)} at "
                "another file"
            )
        raise Gpt2tuneError(
            f"{named(what, path_spec)}: all {len(files)} files are empty (e.g. "
            f"{display_path(files[0])}); add text"
        )
    return sum(sizes)


def _folder_files(folder: Path, where: str, what: str) -> list[Path]:
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
            f"put your text files in it or {_point(what)} at a file or glob"
        )
    return sorted(files, key=lambda f: _sort_key(f.relative_to(folder)))


# --------------------------------------------------------------------------- reading and cutting


# Just over 60 lines: one decoder loop with its three error cases (undecodable bytes, a
# NUL byte, UTF-16 read as UTF-8), each a one-line message naming the file and offset.
def read_text(
    path: Path, encoding: str, read_size: int, on_bytes: Callable[[int], object]
) -> Iterator[str]:
    """The decoded text of `path`, in pieces; Gpt2tuneError naming the byte offset of bad input."""
    name = display_path(path)
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
            if nul >= 0 and fed == 0 and _looks_like_utf16(raw):
                raise Gpt2tuneError(
                    f"{name}: looks like UTF-16 text (NUL bytes between the characters), not "
                    f"{encoding}; set data.encoding in params.yaml to utf-16 (utf-16-le or "
                    "utf-16-be if the file has no byte-order mark) or convert it to UTF-8"
                )
            if nul >= 0:
                raise Gpt2tuneError(
                    f"{name}: binary data, not text (a NUL byte at byte offset {fed + nul}); "
                    "only text files can be read: move it out or leave it out of the path"
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
            except UnicodeError as e:  # Python's utf-16/32 decoders on a file without a BOM
                raise Gpt2tuneError(
                    f"{name}: not valid {encoding} ({e}); set data.encoding in params.yaml to "
                    "the byte order, such as utf-16-le or utf-16-be, or convert the file to UTF-8"
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


def _looks_like_utf16(start: bytes) -> bool:
    """A UTF-16 byte-order mark, or text whose every other byte is NUL (ASCII in UTF-16):
    NULs at one parity only, in at least a third of the pairs (binary files such as .npy or
    images have NULs in runs, at both parities)."""
    if start[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return True
    head = start[: 1 << 12]
    pairs = len(head) // 2
    even, odd = head[0::2].count(0), head[1::2].count(0)
    return pairs >= 2 and min(even, odd) == 0 and max(even, odd) * 3 >= pairs


def _held_bytes(decoder: codecs.IncrementalDecoder) -> int:
    """How many bytes fed so far the decoder still holds (an unfinished character)."""
    try:
        state = decoder.getstate()[0]
    except Exception:  # a codec without getstate: offsets may be a few bytes late
        return 0
    return len(state) if isinstance(state, (bytes, bytearray)) else 0


def _safe_cut(text: str, target: int, start: int = 0) -> int | None:
    """A safe cut of `text` after `start` near `target`: the last at or before it, else the
    first after it, else None. At a safe cut p (start < p < len(text)) encoding text[start:p]
    and text[p:] separately gives exactly the tokens of encoding text[start:] (start being
    0 or a safe cut itself).

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
    if limit <= start:
        return None

    def ok(p: int) -> bool:
        return start < p <= limit and not text.startswith(EOT, p + 1)

    target = min(target, limit)
    window = 1 << 12
    while True:  # backwards from target, in growing windows
        begin = max(start, target - window)
        best = None
        for m in _SAFE_CUT.finditer(text, begin, target + 2):  # +2: the lookahead's character
            if m.start() <= target and ok(m.start()):
                best = m.start()
        if best is not None:
            return best
        if begin == start:
            break
        window *= 4
    for m in _SAFE_CUT.finditer(text, max(target, 0) + 1):
        if m.start() > limit:
            return None
        if ok(m.start()):
            return m.start()
    return None


def chunks(pieces: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """`pieces` re-cut into strings of about chunk_chars, cut only at safe points (longer where
    the text has none); joined they are the same text, and each encodes on its own exactly as
    it does inside the whole."""
    # pending[at:] is the text not yet handed on: cutting by offset, not by slicing off the
    # front each time, keeps one long piece (a 200 MB JSONL document) linear, not quadratic.
    pending, at = "", 0
    for piece in pieces:
        pending, at = pending[at:] + piece, 0
        while len(pending) - at >= chunk_chars:
            cut = _safe_cut(pending, at + chunk_chars, at)
            if cut is None:
                break  # wait for more text
            yield pending[at:cut]
            at = cut
    if at < len(pending):
        yield pending[at:]


# --------------------------------------------------------------------------- encoding pieces


def numbered_pieces(
    paths: list[Path], encoding: str, chunk_chars: int, on_bytes: Callable[[int], object]
) -> Iterator[tuple[int, str]]:
    """(index of the file, piece of its text) for every piece of every file, in order."""
    for i, path in enumerate(paths):
        for piece in chunks(read_text(path, encoding, chunk_chars, on_bytes), chunk_chars):
            yield i, piece


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def encode_pieces(
    encoder, pieces: Iterable[tuple[int, str]], dtype: np.dtype, workers: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(tag, characters, token ids) for each (tag, piece), in order. With workers > 1 the
    pieces are encoded by that many threads, at most two per worker in flight, so memory
    stays a few chunks whatever the corpus size. Pieces are cut at safe points (chunks), so
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
