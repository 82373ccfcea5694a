"""The MIMIC-III NOTEEVENTS.csv format: its columns and a strict, streaming batch reader.

The real file has 2,083,180 rows (about 3.9 GB) and only 3% of them are discharge summaries,
so tokenising every note (what pandas or Arrow's CSV reader do) is wasted work. The scanner
reads record-aligned chunks and, with vectorised numpy over the quote positions, finds each
record's end, its field separators, its CATEGORY and its ROW_ID; Arrow then parses only the
selected records, every value as a string so that TEXT survives byte for byte. Every record is
still checked: UTF-8, NUL bytes, field count, quoting, a file that ends inside quotes.

When anything is wrong, a second, slow pass with Python's strict `csv` module finds the first
bad line and its ROW_ID for the error message, which never quotes note text (Arrow's own
messages do, so they are never passed on).
"""

from __future__ import annotations

import csv
import difflib
import gzip
import logging
import os
import zlib
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm import tqdm

log = logging.getLogger(__name__)

COLUMNS = (
    "ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME",
    "CATEGORY", "DESCRIPTION", "CGID", "ISERROR", "TEXT",
)
DISCHARGE_CATEGORY = "Discharge summary"
GZIP_MAGIC = b"\x1f\x8b"
QUOTE, COMMA, NEWLINE, CR = b'",\n\r'
READ_SIZE = 8 << 20  # bytes per read; chunks in flight stay a few times this
# A record longer than this cannot be a note: the file has a quote that never closes.
MAX_RECORD_BYTES = 64 << 20
CATEGORY_WIDTH = 32  # longest CATEGORY compared in the vectorised pass (quotes included)
ROW_ID_DIGITS = 18
# The strict pass's longest field; real notes stay far below, so longer means a quote never closed.
MAX_FIELD_BYTES = 16 << 20


class NoteEventsError(ValueError):
    """A NOTEEVENTS file that cannot be read as the MIMIC-III schema; names the file and the line."""


class _Malformed(Exception):
    """Raised inside the byte stream: tells the reader to locate the problem and explain it."""


def open_bytes(path: str | os.PathLike) -> BinaryIO:
    """The file's uncompressed bytes; gzip is recognised by its magic number, not by its name."""
    path = Path(path)
    if not path.is_file():
        raise NoteEventsError(f"{path}: file not found (set `noteevents` in the config)")
    with open(path, "rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _read_first_line(path: Path) -> bytes:
    try:
        with open_bytes(path) as raw:
            return raw.readline()
    except (OSError, EOFError, zlib.error) as err:
        raise NoteEventsError(f"{path}: cannot read ({err})") from None


def read_header(path: str | os.PathLike) -> list[str]:
    """Return the header's column names, checking that all eleven MIMIC columns are there."""
    path = Path(path)
    first = _read_first_line(path)
    if not first.strip():
        raise NoteEventsError(f"{path}: empty file, expected a NOTEEVENTS header on line 1")
    try:
        text = first.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise NoteEventsError(f"{path}: line 1 (the header) is not valid UTF-8") from None
    header = next(csv.reader([text]))
    if not set(header) & set(COLUMNS):
        raise NoteEventsError(f"{path}: line 1 holds none of the MIMIC-III column names {', '.join(COLUMNS)}; "
                              f"is the header line missing?")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise NoteEventsError(f"{path}: line 1: column(s) {', '.join(duplicated)} appear more than once")
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        unknown = [name for name in header if name not in COLUMNS]
        hints = []
        for name in missing:
            near = difflib.get_close_matches(name, unknown, n=1, cutoff=0.6) or [
                u for u in unknown if u.strip().upper() == name]
            hints.append(f"{name} (found {near[0]!r} instead?)" if near else name)
        raise NoteEventsError(
            f"{path}: line 1: missing column(s) {', '.join(hints)}; expected the MIMIC-III "
            f"columns {', '.join(COLUMNS)} in any order"
        )
    return header


@dataclass
class Chunk:
    """What one record-aligned stretch of the file holds."""

    rows: int  # records (data rows) in the stretch
    row_ids: np.ndarray  # ROW_ID of every record, in file order
    bad_row_id: tuple[int, str] | None  # (record index, raw value) of the first non-integer ROW_ID
    categories: Counter  # CATEGORY value -> records
    selected: pa.Table  # the records whose CATEGORY is exactly the one asked for, all columns as strings


class _Layout:
    """Where the fields the scanner needs sit in a record, and how selected rows are parsed."""

    def __init__(self, header_line: bytes, header: list[str], category: str, columns: tuple[str, ...]):
        self.header_line = header_line if header_line.endswith(b"\n") else header_line + b"\n"
        self.n_columns = len(header)
        self.row_id = header.index("ROW_ID")
        self.category = header.index("CATEGORY")
        self.wanted = category
        self.convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in header},
                                            include_columns=list(columns), strings_can_be_null=False,
                                            quoted_strings_can_be_null=False)


def _field_bounds(starts, ends, separators, first_separator, column: int, n_columns: int):
    """Start and end (exclusive) of one column's field in every record."""
    begin = starts if column == 0 else separators[first_separator + column - 1] + 1
    end = ends if column == n_columns - 1 else separators[first_separator + column]
    return begin, end


def _gather(data: np.ndarray, begin: np.ndarray, length: np.ndarray, width: int) -> np.ndarray:
    """Each field's first `width` bytes as a row of a matrix, zero-padded."""
    offsets = np.arange(width)
    matrix = data[np.minimum(begin[:, None] + offsets, len(data) - 1)]
    matrix[offsets >= length[:, None]] = 0
    return matrix


def _unquote(raw: bytes) -> str:
    text = raw.decode("utf-8")
    return text[1:-1].replace('""', '"') if len(text) >= 2 and text[0] == text[-1] == '"' else text


def _scan(buffer: bytearray, size: int, quotes: np.ndarray, layout: _Layout) -> Chunk:
    """Find the records and fields of `buffer[:size]` (record-aligned) without tokenising the notes.

    Quotes delimit the long quoted fields; only the short stretches outside quotes can hold
    record ends (newlines) and field separators (commas), so only those are searched. Arrow then
    parses just the selected records. Raises _Malformed for anything a strict CSV reader rejects.
    """
    data = np.frombuffer(buffer, np.uint8, count=size)
    if buffer.find(b"\0", 0, size) >= 0:
        raise _Malformed("NUL byte")
    try:  # UTF-8 check of the whole stretch, zero-copy, by Arrow's validator
        pa.Array.from_buffers(pa.large_string(), 1, [None, pa.py_buffer(np.array([0, size], np.int64)),
                                                     pa.py_buffer(buffer)]).validate(full=True)
    except pa.ArrowInvalid:
        raise _Malformed("invalid UTF-8") from None
    closing = quotes[1::2]
    after = data[np.minimum(closing + 1, len(data) - 1)]
    if not np.isin(after, (COMMA, NEWLINE, CR, QUOTE)).all():
        raise _Malformed("text after a closing quote")
    outside_begin = np.concatenate(([0], closing + 1))
    outside_length = np.concatenate((quotes[0::2], [len(data)])) - outside_begin
    positions = np.repeat(outside_begin - np.concatenate(([0], np.cumsum(outside_length)[:-1])), outside_length)
    positions += np.arange(len(positions))
    outside = data[positions]
    newlines, separators = positions[outside == NEWLINE], positions[outside == COMMA]
    starts, ends = np.concatenate(([0], newlines[:-1] + 1)), newlines
    ends = ends - (data[np.maximum(ends - 1, 0)] == CR)
    nonblank = ends > starts  # Arrow and csv skip blank lines too
    starts, ends, newlines = starts[nonblank], ends[nonblank], newlines[nonblank]
    first_separator = np.searchsorted(separators, starts)
    if (np.searchsorted(separators, ends) - first_separator != layout.n_columns - 1).any():
        raise _Malformed("wrong number of fields")

    begin, end = _field_bounds(starts, ends, separators, first_separator, layout.category, layout.n_columns)
    length = end - begin
    matrix = np.ascontiguousarray(_gather(data, begin, length, CATEGORY_WIDTH))
    keys = matrix.view(np.dtype((np.void, CATEGORY_WIDTH))).ravel()
    distinct, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    categories, selected = Counter(), np.zeros(len(starts), bool)
    for key, (row, n) in enumerate(zip(first, counts)):
        # Values longer than the matrix (rare, never the wanted one) are counted one by one below.
        if length[row] <= CATEGORY_WIDTH:
            value = _unquote(buffer[begin[row]:end[row]])
            categories[value] += int(n)
            if value == layout.wanted:
                selected |= inverse.ravel() == key
    for row in np.flatnonzero(length > CATEGORY_WIDTH):
        categories[_unquote(buffer[begin[row]:end[row]])] += 1

    begin, end = _field_bounds(starts, ends, separators, first_separator, layout.row_id, layout.n_columns)
    quoted = (data[begin] == QUOTE) & (end - begin >= 2)
    begin, end = begin + quoted, end - quoted
    length = end - begin
    digits = _gather(data, begin, length, ROW_ID_DIGITS).astype(np.int64) - ord("0")
    in_field = np.arange(ROW_ID_DIGITS) < length[:, None]
    valid = ((digits >= 0) & (digits <= 9) | ~in_field).all(axis=1) & (length >= 1) & (length <= ROW_ID_DIGITS)
    powers = 10 ** np.clip(length[:, None] - 1 - np.arange(ROW_ID_DIGITS), 0, ROW_ID_DIGITS - 1)
    row_ids = np.where(in_field & valid[:, None], digits * powers, 0).sum(axis=1)
    bad = np.flatnonzero(~valid)
    bad_row_id = (int(bad[0]), buffer[begin[bad[0]]:end[bad[0]]][:20].decode("utf-8")) if len(bad) else None

    rows = [buffer[s:e + 1] for s, e in zip(starts[selected].tolist(), newlines[selected].tolist())]
    table = pacsv.read_csv(pa.py_buffer(layout.header_line + b"".join(rows)),
                           parse_options=pacsv.ParseOptions(newlines_in_values=True),
                           convert_options=layout.convert) if rows else None
    return Chunk(len(starts), row_ids, bad_row_id, categories, table)


def _record_aligned(raw: BinaryIO, path: Path, progress: tqdm) -> Iterator[tuple[bytearray, int, np.ndarray]]:
    """The file's bytes after the header, as (buffer, end, quote positions) stretches whose
    `buffer[:end]` starts and ends at record boundaries.

    A newline ends a record when an even number of quotes precede it, so the last record
    boundary is the last newline in a stretch outside quotes (found from the quote positions,
    which the scanner then reuses); the rest is carried into the next read. A file that ends
    inside quotes (truncated, or an unterminated quote) raises _Malformed.
    """
    carry, carry_quotes = bytearray(), np.empty(0, np.int64)
    while True:
        buffer = bytearray(len(carry) + READ_SIZE)
        buffer[:len(carry)] = carry
        try:
            n_read = raw.readinto(memoryview(buffer)[len(carry):])
        except (OSError, EOFError, zlib.error) as err:
            raise NoteEventsError(f"{path}: the compressed stream is truncated or corrupt ({err})") from None
        progress.update(n_read)
        if not n_read:
            break
        size = len(carry) + n_read
        new = np.frombuffer(buffer, np.uint8, count=n_read, offset=len(carry))
        quotes = np.concatenate((carry_quotes, np.flatnonzero(new == QUOTE) + len(carry)))
        # Stretches outside quotes, last first: after the last quote (if the count is even),
        # then between each closing quote and the next opening one.
        begins = np.concatenate(([0], quotes[1::2] + 1))
        ends = np.concatenate((quotes[0::2], [size]))[: len(begins)]
        cut = -1
        for begin, end in zip(begins[::-1].tolist(), ends[::-1].tolist()):
            cut = buffer.rfind(b"\n", begin, end)
            if cut >= 0:
                break
        if cut < 0:
            if size > MAX_RECORD_BYTES:
                raise _Malformed("a record longer than any note")
            carry, carry_quotes = buffer[:size], quotes
            continue
        end = cut + 1
        split = np.searchsorted(quotes, end)
        yield buffer, end, quotes[:split]
        carry, carry_quotes = buffer[end:size], quotes[split:] - end
    if len(carry_quotes) % 2:
        raise _Malformed("unterminated quote")
    if carry.strip():
        carry += b"\n"
        yield carry, len(carry), carry_quotes


def scan(path: str | os.PathLike, category: str = DISCHARGE_CATEGORY,
         columns: tuple[str, ...] = COLUMNS) -> Iterator[Chunk]:
    """Stream the file in record-aligned chunks: every record counted and checked, and the rows
    of `category` (exact match) parsed into string columns by Arrow.

    Raises NoteEventsError naming the file and the first bad line (and its ROW_ID where it can
    be read) for anything that is not a well-formed NOTEEVENTS file, including a header-only file.
    """
    path = Path(path)
    header = read_header(path)
    rows = 0
    workers = max(1, pa.cpu_count())
    with open_bytes(path) as raw, ThreadPoolExecutor(workers) as pool, \
            tqdm(desc=f"reading {path.name}", unit="B", unit_scale=True, mininterval=5, disable=None,
                 total=None if isinstance(raw, gzip.GzipFile) else path.stat().st_size) as progress:
        layout = _Layout(raw.readline(), header, category, columns)
        pending: deque[Future] = deque()
        try:
            # Chunks are scanned in parallel (numpy and Arrow release the GIL) and yielded in order.
            for buffer, size, quotes in _record_aligned(raw, path, progress):
                pending.append(pool.submit(_scan, buffer, size, quotes, layout))
                if len(pending) > workers:
                    chunk = pending.popleft().result()
                    rows += chunk.rows
                    yield chunk
            while pending:
                chunk = pending.popleft().result()
                rows += chunk.rows
                yield chunk
        except (pa.ArrowInvalid, _Malformed):
            for future in pending:
                future.cancel()
            # `from None`: Arrow's own message would quote the row's text.
            raise NoteEventsError(f"{path}: {locate_problem(path)}") from None
    if rows == 0:
        raise NoteEventsError(f"{path}: header only, no note rows after line 1")


class _Lines:
    """Decoded physical lines for the strict pass; remembers the current record's first line."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.number = 0
        self.record_first: str | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.raw.readline()
        if not line:
            raise StopIteration
        self.number += 1
        if self.record_first is None:
            self.record_first = line.decode("utf-8", errors="replace")
        nul = line.find(b"\0")
        if nul >= 0:
            raise _Problem(f"NUL byte at line {self.number}, column {nul + 1}")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Problem(f"invalid UTF-8 at line {self.number}, column {err.start + 1} "
                           f"(byte 0x{line[err.start]:02x})") from None
        return text


class _Problem(Exception):
    """A line that is bad in itself (NUL byte, invalid UTF-8), found by the strict pass."""


def locate_problem(path: str | os.PathLike) -> str:
    """Describe the first malformed spot of a NOTEEVENTS file by line number and ROW_ID.

    A slow pass (Python's csv module, strict), run only once the fast reader has failed.
    The description never quotes note text.
    """
    log.info("%s: malformed; locating the first problem (one slow pass over the file)", path)
    limit = csv.field_size_limit(MAX_FIELD_BYTES)
    try:
        with open_bytes(path) as raw:
            lines = _Lines(raw)
            reader = csv.reader(lines, strict=True)
            header = [name.removeprefix("\ufeff") for name in next(reader)]
            record_start, lines.record_first = lines.number + 1, None

            def where() -> str:
                return f"line {record_start}{_row_id(lines.record_first, header)}"

            try:
                for record in reader:
                    if record and len(record) != len(header):
                        return (f"{where()}: {len(record)} fields, expected {len(header)} as in the header "
                                f"(a stray quote or comma, or a truncated row)")
                    record_start, lines.record_first = lines.number + 1, None
            except _Problem as problem:
                return f"{where()}: {problem}"
            except csv.Error as err:
                if "field limit" in str(err):
                    return (f"{where()}: a field of this record runs on for over {MAX_FIELD_BYTES >> 20} MB "
                            f"(an unterminated quote)")
                if raw.read(1) == b"":
                    return (f"{where()}: a quoted field opened in this record is never closed before the end "
                            f"of the file (unterminated quote, or a truncated file)")
                return f"{where()}: malformed quoting in this record, noticed at line {lines.number} ({err})"
    finally:
        csv.field_size_limit(limit)
    return "malformed CSV that the strict pass could not pin down"


def _row_id(first_line: str | None, header: list[str]) -> str:
    """' (ROW_ID n)' when the record's first line holds its ROW_ID, else ''."""
    if not first_line or "ROW_ID" not in header:
        return ""
    try:
        fields = next(csv.reader([first_line]), [])
    except csv.Error:
        return ""
    column = header.index("ROW_ID")
    value = fields[column].strip() if len(fields) > column else ""
    return f" (ROW_ID {value})" if value.isdigit() else ""
