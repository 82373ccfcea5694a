"""The MIMIC-III NOTEEVENTS.csv format: its columns and a strict, streaming reader of its records.

pyarrow's CSV reader streams the file (plain or gzip, told apart by content) in blocks, quoted
newlines included; memory holds a few dozen blocks whatever the file's size. Every record is
checked: UTF-8, the field count, integer ROW_IDs and SUBJECT_IDs, ROW_ID as the primary key, and
what Arrow's parser lets pass but a strict reader does not (see _StrictBytes). When anything is
wrong, a second, slow pass with Python's strict `csv` module finds the first bad record for the
error message: one line naming the file, the line and the ROW_ID (where it is an integer), never a
field's text.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
from tqdm import tqdm

from asclepius_r.errors import UserError

COLUMNS = (
    "ROW_ID",
    "SUBJECT_ID",
    "HADM_ID",
    "CHARTDATE",
    "CHARTTIME",
    "STORETIME",
    "CATEGORY",
    "DESCRIPTION",
    "CGID",
    "ISERROR",
    "TEXT",
)
DISCHARGE_CATEGORY = "Discharge summary"
INTEGER_COLUMNS = ("ROW_ID", "SUBJECT_ID")
INTEGER = "[0-9]{1,18}"  # what an integer column holds: digits only, within int64
GZIP_MAGIC = b"\x1f\x8b"
# Arrow reads a record only if it fits in a block (notes run to tens of kB, so a longer record is a
# quote that never closes), and reads up to 32 blocks ahead: the block size bounds the memory.
BLOCK_SIZE = 4 << 20
QUOTE, COMMA, CR, LF = b'",\r\n'


class NoteEventsError(UserError, ValueError):
    """A NOTEEVENTS file that cannot be read as the MIMIC-III schema; names the file and the line."""


class _Malformed(Exception):
    """A problem in the file: from the fast reader, a bare signal for the slow pass, which locates and
    words it."""


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as probe:
        return probe.read(2) == GZIP_MAGIC


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def read_header(path: str | os.PathLike) -> list[str]:
    """Return the header's column names, checking that all eleven MIMIC columns are there."""
    path = Path(path)
    if not path.is_file():
        raise NoteEventsError(f"{path}: file not found (set `noteevents` in the config)")
    try:
        with _open(path) as raw:
            first = raw.readline()
    except (OSError, EOFError, zlib.error) as err:
        raise NoteEventsError(f"{path}: cannot read ({err})") from None
    if not first.strip():
        raise NoteEventsError(f"{path}: empty file, expected a NOTEEVENTS header on line 1")
    try:
        text = first.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise NoteEventsError(f"{path}: line 1 (the header) is not valid UTF-8") from None
    if "\r" in text.rstrip("\r\n"):
        raise NoteEventsError(
            f"{path}: line 1 holds carriage returns but no line feed: the file has CR-only (classic Mac) line "
            "endings, so it reads as a single line. Convert them to LF (or CRLF) line endings."
        )
    try:
        header = next(csv.reader([text]))
    except csv.Error as err:
        raise NoteEventsError(f"{path}: line 1 (the header) is not valid CSV ({err})") from None
    if not set(header) & set(COLUMNS):
        raise NoteEventsError(
            f"{path}: line 1 holds none of the MIMIC-III column names {', '.join(COLUMNS)}; is the header line missing?"
        )
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise NoteEventsError(f"{path}: line 1: column(s) {', '.join(duplicated)} appear more than once")
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        unknown = [name for name in header if name not in COLUMNS]
        hints = []
        for name in missing:
            near = difflib.get_close_matches(name, unknown, n=1, cutoff=0.6)
            near = near or [u for u in unknown if u.strip().upper() == name]
            hints.append(f"{name} (found {near[0]!r} instead?)" if near else name)
        raise NoteEventsError(
            f"{path}: line 1: missing column(s) {', '.join(hints)}; expected the MIMIC-III "
            f"columns {', '.join(COLUMNS)} in any order"
        )
    return header


class _StrictBytes:
    """The file's bytes on their way into Arrow's CSV reader, checked for what that reader lets pass.

    Arrow reads `"abc"def` as `abcdef`, a lone CR outside quotes as a line end, a NUL byte as a
    character, and a file that ends inside quotes as if the quote closed there; Python's strict csv
    module rejects them all. Where quotes open and close follows from the runs of consecutive quotes:
    outside quotes, a run at a field's start opens a quoted field (elsewhere it is part of an unquoted
    field, where a quote is an ordinary character); inside, pairs are escaped quotes and an odd run
    closes the field, which must end right there.
    """

    def __init__(self, raw: BinaryIO, progress: tqdm):
        self.raw, self.progress = raw, progress
        self.inside = False  # whether the bytes checked so far end inside quotes
        self.before = LF  # the last byte checked (the file's start counts as a line's)
        self.held = b""  # the unchecked end of the last read: quotes or CRs, which the next byte decides
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        block = self.raw.read(size)
        self.progress.update(len(block))
        if b"\0" in block:
            raise _Malformed
        data = self.held + block if self.held else block
        end = len(data)
        while block and end and data[end - 1] in b'"\r':
            end -= 1
        self._check(data, end)
        self.held = data[end:]
        if not block and self.inside:
            raise _Malformed  # the file ends inside quotes
        return block

    def _check(self, data: bytes, end: int) -> None:
        """Check data[:end]; the byte after it, if any, is data[end]."""
        array = np.frombuffer(data, np.uint8)
        quotes = np.flatnonzero(array[:end] == QUOTE)
        starts = quotes[np.diff(quotes, prepend=-2) > 1]  # of each run of quotes
        ends = np.append(quotes[:-1][np.diff(quotes) > 1], quotes[-1:]) + 1
        odd = (ends - starts) % 2
        before = np.where(starts > 0, array[starts - 1], self.before)
        # Outside quotes, a run that is not at a field's start is part of an unquoted field and
        # changes nothing; rare (MIMIC quotes every text column), so they are found one at a time.
        # Between two of them the state flips at each odd run: parity[j] counts those before run j.
        parity = np.append(0, np.cumsum(odd)) % 2
        unquoted = np.flatnonzero((before != COMMA) & (before != LF))
        unquoted_by_parity = [unquoted[parity[unquoted] == p] for p in (0, 1)]
        inside = np.zeros(len(starts), bool)  # before each run
        literal = np.zeros(len(starts), bool)
        first, state = 0, self.inside
        while first < len(starts):
            candidates = unquoted_by_parity[state ^ parity[first]]
            found = candidates[np.searchsorted(candidates, first) :][:1]
            stop = int(found[0]) if len(found) else len(starts)
            inside[first:stop] = state ^ parity[first:stop] ^ parity[first]
            literal[stop:][:1] = True
            first, state = stop + 1, False
        after = (inside ^ odd.astype(bool)) & ~literal
        following = array[np.minimum(ends, len(array) - 1)]
        field_ends = (following == COMMA) | (following == LF) | (following == CR) | (ends == len(array))
        if (~after & ~literal & ~field_ends).any():
            raise _Malformed  # a closing quote followed by something else than a delimiter or line end
        if data.find(b"\r", 0, end) >= 0:
            crs = np.flatnonzero(array[:end] == CR)
            lone = crs[(crs + 1 < len(array)) & (array[np.minimum(crs + 1, len(array) - 1)] != LF)]
            if not np.append(self.inside, after)[np.searchsorted(starts, lone)].all():
                raise _Malformed  # a CR outside quotes that is not part of a CRLF
        self.inside = bool(after[-1]) if len(starts) else self.inside
        self.before = data[end - 1] if end else self.before


def read_batches(path: str | os.PathLike) -> Iterator[pa.RecordBatch]:
    """NOTEEVENTS' records in batches, in file order: ROW_ID and SUBJECT_ID as int64, the rest strings.

    Raises NoteEventsError naming the file and the first bad line (and its ROW_ID where it can be
    read) for anything that is not a well-formed NOTEEVENTS file, a header-only file included.
    """
    path = Path(path)
    header, compressed, row_ids = read_header(path), _is_gzip(path), []
    size = None if compressed else path.stat().st_size
    progress = tqdm(desc=f"reading {path.name}", total=size, unit="B", unit_scale=True, mininterval=5, disable=None)
    try:
        with progress, pa.input_stream(str(path), compression="gzip" if compressed else None) as raw:
            reader = pv.open_csv(
                _StrictBytes(raw, progress),
                read_options=pv.ReadOptions(block_size=BLOCK_SIZE),
                parse_options=pv.ParseOptions(newlines_in_values=True),
                convert_options=pv.ConvertOptions(column_types=dict.fromkeys(header, pa.string())),
            )
            for batch in reader:
                for name in INTEGER_COLUMNS:
                    ids = batch[name]
                    if not pc.all(pc.match_substring_regex(ids, f"^{INTEGER}$"), min_count=0).as_py():
                        raise _Malformed
                    batch = batch.set_column(batch.schema.get_field_index(name), name, pc.cast(ids, pa.int64()))
                row_ids.append(batch["ROW_ID"].to_numpy())
                yield batch
    except OSError as err:  # from Arrow's gzip stream
        raise NoteEventsError(f"{path}: cannot read, the file is truncated or corrupt ({err})") from None
    except (pa.ArrowInvalid, _Malformed):  # Arrow's messages quote the record: never shown
        raise NoteEventsError(f"{path}: {locate_problem(path)}") from None
    if not row_ids:
        raise NoteEventsError(f"{path}: header only, no note rows after line 1")
    _check_primary_key(path, np.concatenate(row_ids))


def _check_primary_key(path: Path, row_ids: np.ndarray) -> None:
    if (row_ids[1:] > row_ids[:-1]).all():  # MIMIC's own order: no sort needed
        return
    values, counts = np.unique(row_ids, return_counts=True)
    if (counts > 1).any():
        duplicate = int(values[counts > 1][0])
        rows = (np.flatnonzero(row_ids == duplicate)[:5] + 1).tolist()
        where = next(where for number, (where, _) in enumerate(_strict_records(path), 1) if number == rows[1])
        raise NoteEventsError(
            f"{path}: {where}: duplicate ROW_ID {duplicate} (data rows {', '.join(map(str, rows))}); "
            "ROW_ID is the primary key of NOTEEVENTS"
        )


def _where(line: int, row_id: str) -> str:
    """'line N (ROW_ID n)'; the ROW_ID only where it is an integer, so that a shifted row's text is never quoted."""
    return f"line {line}" + (f" (ROW_ID {row_id})" if re.fullmatch(INTEGER, row_id) else "")


def _field(line: str, column: int) -> str:
    """A field of a record's first line, if that much of it parses (up to a stray CR)."""
    try:
        fields = next(csv.reader([line.split("\r")[0]]), [])
    except csv.Error:
        return ""
    return fields[column] if len(fields) > column else ""


class _Lines:
    """Decoded lines for the slow pass: counts them, keeps the current record's first line and size,
    and rejects NUL bytes, invalid UTF-8 and a record longer than a block (as Arrow does)."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.number = raw, 0
        self.next_record()

    def next_record(self) -> None:
        self.start, self.first, self.size = self.number + 1, "", 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.raw.readline(BLOCK_SIZE + 1)
        if not line:
            raise StopIteration
        self.number += 1
        self.size += len(line)
        self.first = self.first or line.decode("utf-8", errors="replace")
        if self.size > BLOCK_SIZE:
            raise _Malformed(f"the record runs on for over {BLOCK_SIZE >> 20} MB (an unterminated quote)")
        if (nul := line.find(b"\0")) >= 0:
            raise _Malformed(f"NUL byte at line {self.number}, column {nul + 1}")
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Malformed(
                f"invalid UTF-8 at line {self.number}, column {err.start + 1} (byte 0x{line[err.start]:02x})"
            ) from None


def _strict_records(path: Path) -> Iterator[tuple[str, list[str]]]:
    """('line N (ROW_ID n)', fields) of each record, read by Python's strict csv module; raises
    _Malformed saying where and what at the first record that is not well-formed CSV."""
    limit = csv.field_size_limit(BLOCK_SIZE)
    try:
        with _open(path) as raw:
            lines = _Lines(raw)
            reader = csv.reader(lines, strict=True)
            row_id = [name.removeprefix("\ufeff") for name in next(reader)].index("ROW_ID")
            while True:
                lines.next_record()
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except (_Malformed, csv.Error) as err:
                    where = _where(lines.start, _field(lines.first, row_id))
                    if isinstance(err, _Malformed):
                        raise _Malformed(f"{where}: {err}") from None
                    if str(err) == "unexpected end of data":
                        raise _Malformed(
                            f"{where}: a quoted field opened in this record is never closed before the end of "
                            "the file (unterminated quote, or a truncated file)"
                        ) from None
                    raise _Malformed(f"{where}: malformed quoting, noticed at line {lines.number} ({err})") from None
                if record:  # blank lines are skipped, as Arrow does
                    yield _where(lines.start, record[row_id] if len(record) > row_id else ""), record
    except (OSError, EOFError, zlib.error) as err:
        raise _Malformed(f"cannot read, the file is truncated or corrupt ({err})") from None
    finally:
        csv.field_size_limit(limit)


def locate_problem(path: str | os.PathLike) -> str:
    """The first bad record of a NOTEEVENTS file: 'line N (ROW_ID n): what is wrong', never a field.

    A slow pass (Python's csv module, strict), run only once the fast reader has failed.
    """
    path = Path(path)
    header = read_header(path)
    row_id, subject_id = header.index("ROW_ID"), header.index("SUBJECT_ID")
    try:
        for data_row, (where, record) in enumerate(_strict_records(path), start=1):
            if len(record) != len(header):
                return (
                    f"{where}: {len(record)} fields, expected {len(header)} as in the header "
                    "(a stray quote or comma, or a truncated row)"
                )
            if not re.fullmatch(INTEGER, record[row_id]):
                return (
                    f"{where}, data row {data_row}: ROW_ID is not an integer (a stray quote or comma may have "
                    "shifted the row's fields; the value is not shown)"
                )
            if not re.fullmatch(INTEGER, record[subject_id]):
                return f"{where}: SUBJECT_ID is not an integer (the value is not shown)"
    except _Malformed as problem:
        return str(problem)
    return "malformed CSV that the strict pass could not pin down"
