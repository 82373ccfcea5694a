"""The MIMIC-III NOTEEVENTS.csv format: its columns and a strict, streaming batch reader.

The real file has 2,083,180 rows (about 3.9 GB), so it is read in Arrow record batches and
never held whole. Every value is read as a string so that TEXT survives byte for byte.

Arrow's CSV reader is fast but lenient, and its error messages quote the offending row (patient
text, which must not reach logs). So the raw bytes are checked on their way into Arrow (NUL
bytes, quote parity, a truncated gzip stream), and when anything is wrong a second, slow pass
with Python's strict `csv` module finds the first bad line and its ROW_ID for the error message.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import logging
import os
import zlib
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
QUOTE = 0x22
# Small blocks keep memory flat and parallelise well; larger ones gained nothing in bench/notes_filter.py.
BLOCK_SIZE = 4 << 20
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


class _CheckedStream:
    """The file's bytes on their way into Arrow, checked for what Arrow lets through.

    Arrow silently accepts NUL bytes and a file that ends inside a quoted field (a truncated
    file: the last TEXT just stops). A quote toggles Arrow's quoted state and an escaped quote
    is two of them, so an odd number of quote bytes in the whole file means it ended inside one.
    """

    closed = False

    def __init__(self, raw: BinaryIO, path: Path, progress: tqdm):
        self.raw, self.path, self.progress = raw, path, progress
        self.quotes = 0
        self.offset = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.raw.read(size)
        except (OSError, EOFError, zlib.error) as err:
            raise NoteEventsError(
                f"{self.path}: the compressed stream is truncated or corrupt after {self.offset:,} "
                f"uncompressed bytes ({err})") from None
        if b"\0" in data:
            raise _Malformed("NUL byte")
        # numpy releases the GIL here, so counting overlaps with Arrow's parsing threads.
        self.quotes += int(np.count_nonzero(np.frombuffer(data, np.uint8) == QUOTE))
        self.offset += len(data)
        self.progress.update(len(data))
        return data

    def close(self) -> None:
        self.raw.close()
        self.closed = True


def iter_batches(
    path: str | os.PathLike, columns: tuple[str, ...] = COLUMNS, block_size: int | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream the file as record batches of string columns, in any column order.

    Raises NoteEventsError naming the file and the first bad line (and its ROW_ID where it can
    be read) for anything that is not a well-formed NOTEEVENTS file, including a header-only file.
    """
    path = Path(path)
    header = read_header(path)
    size = path.stat().st_size
    rows = 0
    with open_bytes(path) as raw, tqdm(desc=f"reading {path.name}", unit="B", unit_scale=True, mininterval=5,
                                       total=None if isinstance(raw, gzip.GzipFile) else size, disable=None) as bar:
        stream = _CheckedStream(raw, path, bar)
        try:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=block_size or BLOCK_SIZE, use_threads=True),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in header},
                    include_columns=list(columns),
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
            for batch in reader:
                rows += batch.num_rows
                yield batch
        except (pa.ArrowInvalid, _Malformed):
            # `from None`: Arrow's own message quotes the row's text.
            raise NoteEventsError(f"{path}: {locate_problem(path)}") from None
        if stream.quotes % 2:
            raise NoteEventsError(f"{path}: {locate_problem(path)}")
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
