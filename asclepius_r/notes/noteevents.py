"""The MIMIC-III NOTEEVENTS.csv format: its columns and a strict, streaming batch reader.

The real file has 2,083,180 rows (about 3.9 GB) and only 3% of them are discharge summaries,
so tokenising every note (what pandas or Arrow's CSV reader do) is wasted work. The file is
memory-mapped (or, gzipped, decompressed in a reader thread) in large windows that worker
threads scan in parallel with a compiled single-pass state machine (record_scanner): it finds
each record, its CATEGORY and its ROW_ID, and unquotes the selected records' short columns
straight into Arrow string arrays. Their TEXT is only hashed where it lies, and read (byte for
byte) later, for the notes the caller keeps (NoteEvents.texts). Every record is still checked:
UTF-8, NUL bytes, field count, quoting, a file that ends inside quotes.

When anything is wrong, a second, slow pass with Python's strict `csv` module finds the first
bad line and its ROW_ID for the error message, which never quotes note text.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import logging
import mmap
import os
import tempfile
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from asclepius_r.errors import UserError
from asclepius_r.notes import record_scanner

log = logging.getLogger(__name__)

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
GZIP_MAGIC = b"\x1f\x8b"
READ_SIZE = 64 << 20  # bytes per window (a stretch of the file for one worker); memory holds a few
MAX_SCAN_WORKERS = 8  # bounds the windows mapped at once (READ_SIZE each), however many cores
# A gzip stream's windows (scanned one after another, as decompressed) and the compressed input fed
# to zlib at a time. Both keep allocations under glibc's 32 MB mmap threshold, so that freed buffers
# are reused instead of fresh pages faulted in (BENCHMARKS.md, issue 3).
STREAM_READ_SIZE = 16 << 20
COMPRESSED_READ_SIZE = 2 << 20
# A record longer than this cannot be a note: the file has a quote that never closes.
MAX_RECORD_BYTES = 64 << 20
RECORDS_PER_CALL = 1 << 18  # output capacity of one compiled scanner call (a 64 MB window holds ~35,000)
MAX_CATEGORIES_PER_CALL = 256  # distinct raw CATEGORY values per call (MIMIC-III has 15)
SPAN_OVERLAP = 1 << 20  # how far a window reaches past its stretch, for the last record's end
# A parallel worker starts where PROBE_RECORDS records in a row parse, within PROBE_BYTES.
PROBE_RECORDS = 3
PROBE_BYTES = 4 << 20
PROBE_STEP = 16 << 10
# The strict pass's longest field; real notes stay far below, so longer means a quote never closed.
MAX_FIELD_BYTES = 16 << 20


class NoteEventsError(UserError, ValueError):
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
            near = difflib.get_close_matches(name, unknown, n=1, cutoff=0.6) or [
                u for u in unknown if u.strip().upper() == name
            ]
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
    selected: (
        pa.Table | None
    )  # the records whose CATEGORY is exactly the one asked for: their columns but TEXT, as strings
    text_hashes: np.ndarray  # a 64-bit hash of each selected record's TEXT, to find duplicate texts
    spans: np.ndarray  # (selected, 2): where each selected record lies, for NoteEvents.texts


class _Layout:
    """Where the fields the scanner needs sit in a record, and which ones are extracted."""

    def __init__(self, header: list[str], category: str, columns: tuple[str, ...]):
        self.n_columns = len(header)
        self.row_id = header.index("ROW_ID")
        self.category = header.index("CATEGORY")
        self.text = header.index("TEXT")
        self.wanted = category
        self.columns = {name: header.index(name) for name in columns if name != "TEXT"}  # output name -> field index


def _unquote(raw: bytes) -> str:
    text = raw.decode("utf-8")
    return text[1:-1].replace('""', '"') if len(text) >= 2 and text[0] == text[-1] == '"' else text


def _strings(offsets: np.ndarray, values: np.ndarray) -> pa.StringArray:
    """An Arrow string array over the scanner's buffers (no copy)."""
    return pa.Array.from_buffers(pa.string(), len(offsets) - 1, [None, pa.py_buffer(offsets), pa.py_buffer(values)])


class _RecordsInPlace:
    """Selected records of a plain file stay where they are: their spans are offsets in the file."""

    @staticmethod
    def keep(data: np.ndarray, starts: np.ndarray, ends: np.ndarray, base: int) -> np.ndarray:
        return np.stack([starts + base, ends + base], axis=1)


class _StagedRecords:
    """Selected records of a stream (gzip, which cannot be read again cheaply) are copied, raw, into a
    temporary file as they pass: a few percent of the bytes. Their spans are offsets in that file."""

    def __init__(self, file: BinaryIO):
        self.file, self.size = file, 0

    def keep(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray, base: int) -> np.ndarray:
        for start, end in zip(starts.tolist(), ends.tolist()):
            self.file.write(data[start:end])
        lengths = ends - starts
        spans = np.empty((len(starts), 2), np.int64)
        spans[:, 1] = self.size + np.cumsum(lengths)
        spans[:, 0] = spans[:, 1] - lengths
        self.size = int(spans[-1, 1]) if len(spans) else self.size
        return spans


class _Span:
    """The records of one stretch of the file, gathered block by block, then turned into a Chunk."""

    def __init__(self, layout: _Layout, records: _RecordsInPlace | _StagedRecords):
        self.layout, self.records = layout, records
        self.rows = 0
        self.row_ids: list[np.ndarray] = []
        self.categories: Counter = Counter()
        self.selected: list[pa.Table] = []
        self.hashes: list[np.ndarray] = []
        self.spans: list[np.ndarray] = []
        self.bad_row_id: tuple[int, str] | None = None

    def scan(self, data: np.ndarray, begin: int, stop: int, out: record_scanner.ScanOutputs, base: int) -> int:
        """Scan data[begin:] (begin is a record boundary; data[0] is at offset `base` of the file)
        up to the first record boundary at or after `stop`; returns where it stopped (a partial
        record at the end is left). Raises _Malformed for anything a strict CSV reader rejects."""
        layout = self.layout
        status, position = record_scanner.FULL, begin
        while status == record_scanner.FULL:
            status, position, n, n_categories = record_scanner.scan_records(
                data, position, stop, layout.n_columns, layout.row_id, layout.category, out
            )
            if status in record_scanner.PROBLEMS:
                raise _Malformed(record_scanner.PROBLEMS[status])
            ids, starts, ends, category_ids = out.row_ids[:n], out.starts[:n], out.ends[:n], out.category_ids[:n]
            values = [
                _unquote(data[start : start + length].tobytes())
                for start, length in out.category_spans[:n_categories].tolist()
            ]
            for value, count in zip(values, np.bincount(category_ids, minlength=n_categories).tolist()):
                self.categories[value] += count
            wanted = np.isin(category_ids, [k for k, value in enumerate(values) if value == layout.wanted])
            if wanted.any():
                self._select(data, starts[wanted], ends[wanted], base)
            bad = np.flatnonzero(ids < 0)
            if self.bad_row_id is None and len(bad):
                record = data[starts[bad[0]] : ends[bad[0]]].tobytes().decode("utf-8")
                self.bad_row_id = (self.rows + int(bad[0]), next(csv.reader([record]))[layout.row_id][:20])
            self.row_ids.append(ids.copy())
            self.rows += n
        return position

    def _select(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray, base: int) -> None:
        """Keep the asked columns of the given records (unquoted by the scanner, as Arrow strings),
        a hash of their TEXT and where they lie; TEXT itself is read only for the notes kept."""
        layout = self.layout
        columns, text_hashes = record_scanner.extract_fields(
            data, starts, ends, layout.n_columns, list(layout.columns.values()), hash_field=layout.text
        )
        self.selected.append(pa.table({name: _strings(*column) for name, column in zip(layout.columns, columns)}))
        self.hashes.append(text_hashes)
        self.spans.append(self.records.keep(data, starts, ends, base))

    def chunk(self) -> Chunk:
        return Chunk(
            self.rows,
            np.concatenate(self.row_ids) if self.row_ids else np.empty(0, np.int64),
            self.bad_row_id,
            self.categories,
            pa.concat_tables(self.selected) if self.selected else None,
            np.concatenate(self.hashes) if self.hashes else np.empty(0, np.uint64),
            np.concatenate(self.spans) if self.spans else np.empty((0, 2), np.int64),
        )


class _MappedFile:
    """Windows of a plain file, memory-mapped read-only: no copy, the scanner reads the page cache
    in place. Each window is unmapped once nothing refers to it, so memory holds only the windows in use.
    """

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.size = os.fstat(raw.fileno()).st_size

    def window(self, offset: int, size: int) -> tuple[np.ndarray, int, bool]:
        """(bytes, index of `offset` in them, whether they reach the end of the file)."""
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        end = min(offset + size, self.size)
        if end <= offset:
            return np.empty(0, np.uint8), 0, True
        mapped = mmap.mmap(self.raw.fileno(), end - aligned, offset=aligned, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, np.uint8), offset - aligned, end == self.size


class _Stream:
    """Windows of a gzip file's decompressed bytes, in order: the partial record left over plus
    fresh blocks, which a reader thread decompresses ahead while the current window is scanned.

    zlib is fed COMPRESSED_READ_SIZE of input at a time: GzipFile's 8 kB steps would take the GIL
    for every step (BENCHMARKS.md, issue 3). Every gzip member is read in turn, as gzip does.
    """

    def __init__(self, compressed: BinaryIO, path: Path, start: int):
        self.path = path
        self.blocks = self._blocks(compressed)
        self.buffer, self.buffer_offset = bytearray(), 0
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="noteevents-read")
        # Two blocks ahead: the reader never waits for the scan to take a block.
        self.reads = deque(self.reader.submit(self._read) for _ in range(2))
        self.window(start, 0)  # past the header line

    def _blocks(self, compressed: BinaryIO) -> Iterator[list[bytes]]:
        """Decompressed pieces, STREAM_READ_SIZE bytes or more at a time."""
        inflater, fed, pieces, size = zlib.decompressobj(wbits=31), False, [], 0
        while data := compressed.read(COMPRESSED_READ_SIZE):
            while data:
                pieces.append(inflater.decompress(data))
                size, fed = size + len(pieces[-1]), True
                data = b""
                if inflater.eof:  # this member ends; another may follow
                    data, inflater, fed = inflater.unused_data, zlib.decompressobj(wbits=31), False
            if size >= STREAM_READ_SIZE:
                yield pieces
                pieces, size = [], 0
        if fed:
            raise EOFError("the stream ends inside a gzip member")
        if pieces:
            yield pieces

    def _read(self) -> list[bytes]:
        try:
            return next(self.blocks, [])
        except (EOFError, zlib.error) as err:
            raise NoteEventsError(f"{self.path}: the compressed stream is truncated or corrupt ({err})") from None

    def window(self, offset: int, size: int) -> tuple[np.ndarray, int, bool]:
        """(bytes from `offset` on, at least `size` of them unless the stream ends; 0; whether it
        ended). `offset` never goes back; past the buffer (the header line) it skips."""
        buffered = self.buffer_offset + len(self.buffer)
        pieces = [memoryview(self.buffer)[offset - self.buffer_offset :]] if offset < buffered else []
        skip = max(0, offset - buffered)
        available, at_end = sum(map(len, pieces)) - skip, False
        while available < size and not at_end:
            data = self.reads.popleft().result()
            self.reads.append(self.reader.submit(self._read))
            at_end = not data
            pieces.extend(data)
            available += sum(map(len, data))
        self.buffer, self.buffer_offset = bytearray().join(pieces), offset
        del self.buffer[:skip]
        return np.frombuffer(self.buffer, np.uint8), 0, at_end

    def close(self) -> None:
        self.reader.shutdown(cancel_futures=True)


def _new_outputs() -> record_scanner.ScanOutputs:
    return record_scanner.ScanOutputs(RECORDS_PER_CALL, MAX_CATEGORIES_PER_CALL)


def _scan_span(
    source: _MappedFile | _Stream,
    start: int,
    stop: int,
    layout: _Layout,
    records: _RecordsInPlace | _StagedRecords,
    out: record_scanner.ScanOutputs,
) -> tuple[Chunk, int, bool]:
    """The records from `start` (a record boundary) up to the first record boundary at or after
    `stop`: (chunk, that boundary, whether it is the end of the file).

    Windows reach a little past `stop` for the last record; one that holds no complete record
    grows (a long record) up to MAX_RECORD_BYTES, past which a quote never closes. At the end of
    the file the last record needs no newline, but one still inside quotes there is an
    unterminated quote (or a truncated file).
    """
    span, offset, reach = _Span(layout, records), start, SPAN_OVERLAP
    while offset < stop:
        data, begin, at_end = source.window(offset, stop - offset + reach)
        consumed = span.scan(data, begin, begin + stop - offset, out, base=offset - begin)
        offset += consumed - begin
        if at_end and offset < stop:  # the rest of the file is the last record, without its newline
            last = data[consumed:].tobytes()
            if last.strip():
                last += b"\n"
                if span.scan(np.frombuffer(last, np.uint8), 0, len(last), out, base=offset) < len(last):
                    raise _Malformed("unterminated quote")
            return span.chunk(), offset + len(data) - consumed, True
        if consumed == begin:
            if reach >= MAX_RECORD_BYTES:
                raise _Malformed("a record longer than any note")
            reach *= 4
    return span.chunk(), offset, False


def _guess_record_start(source: _MappedFile, offset: int, layout: _Layout) -> int | None:
    """The first line start at or after `offset` from which PROBE_RECORDS records parse with
    integer ROW_IDs: almost surely a record boundary (the caller checks)."""
    data, begin, _ = source.window(offset - 1, PROBE_BYTES)
    out = record_scanner.ScanOutputs(PROBE_RECORDS, PROBE_RECORDS)
    for piece in range(begin, len(data), PROBE_STEP):  # newlines piece by piece: the first fits, mostly
        for newline in (piece + np.flatnonzero(data[piece : piece + PROBE_STEP] == ord("\n"))).tolist():
            status, _, n, _ = record_scanner.scan_records(
                data, newline + 1, len(data), layout.n_columns, layout.row_id, layout.category, out
            )
            if status == record_scanner.FULL and n == PROBE_RECORDS and (out.row_ids >= 0).all():
                return offset + newline - begin
    return None


def _guessed_span(source: _MappedFile, offset: int, stop: int, layout: _Layout) -> tuple:
    """(start, chunk, end) of the stretch from a guessed record start at or after `offset` to
    `stop`; the chunk is the _Malformed error instead if scanning failed, which is real only if
    the guess was right."""
    start = _guess_record_start(source, offset, layout)
    if start is None:
        return None, None, None
    try:
        chunk, end, _ = _scan_span(source, start, stop, layout, _RecordsInPlace(), _new_outputs())
        return start, chunk, end
    except _Malformed as error:
        return start, error, None


def _mapped_chunks(
    source: _MappedFile, offset: int, layout: _Layout, pool: ThreadPoolExecutor, workers: int
) -> Iterator[tuple[Chunk, int]]:
    """A plain file in READ_SIZE stretches, scanned by parallel workers; yields (chunk, bytes
    scanned) in file order.

    A stretch does not know where its first record starts until the one before it is scanned,
    so each worker starts at a guessed record boundary. The guess is kept only if the stretch
    before ends exactly there; otherwise the stretch is scanned again from the true boundary.
    """
    stops = list(range(offset + READ_SIZE, source.size, READ_SIZE)) + [source.size]
    nominal = [offset] + stops[:-1]
    first = pool.submit(
        lambda: (offset, *_scan_span(source, offset, stops[0], layout, _RecordsInPlace(), _new_outputs())[:2])
    )
    pending = deque(
        [first]
        + [
            pool.submit(_guessed_span, source, nominal[k], stops[k], layout)
            for k in range(1, min(workers + 1, len(stops)))
        ]
    )
    out, expected = _new_outputs(), offset
    for k, stop in enumerate(stops):
        start, chunk, end = pending.popleft().result()
        if k + len(pending) + 1 < len(stops):
            later = k + len(pending) + 1
            pending.append(pool.submit(_guessed_span, source, nominal[later], stops[later], layout))
        if start != expected:
            chunk, end, _ = _scan_span(source, expected, stop, layout, _RecordsInPlace(), out)
        elif isinstance(chunk, _Malformed):
            raise chunk
        yield chunk, end - expected
        expected = end


def _stream_chunks(
    source: _Stream, offset: int, layout: _Layout, records: _StagedRecords, pool: ThreadPoolExecutor
) -> Iterator[tuple[Chunk, int]]:
    """A stream in STREAM_READ_SIZE stretches, each scanned (in a worker) while the caller works on
    the one before; yields (chunk, bytes scanned) in file order."""
    out = _new_outputs()
    ahead = pool.submit(_scan_span, source, offset, offset + STREAM_READ_SIZE, layout, records, out)
    while True:
        chunk, end, finished = ahead.result()
        if not finished:
            ahead = pool.submit(_scan_span, source, end, end + STREAM_READ_SIZE, layout, records, out)
        yield chunk, end - offset
        if finished:
            return
        offset = end


class NoteEvents:
    """A NOTEEVENTS file (plain or gzip), opened for one streaming scan of its records, then for
    reading the TEXT of the records the scan selected.

    The scan checks every record and returns the selected ones without their TEXT (the bulk of the
    bytes) but with where they lie, so a caller that must see the whole file before it can decide
    where each note goes (the held-out split) reads the texts afterwards, only for the notes it keeps:
    from the file itself when it is plain (still in the page cache), or from a temporary copy of the
    selected records made during the scan when it is a stream (in `staging_dir`).
    """

    def __init__(self, path: str | os.PathLike, staging_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        self.header = read_header(self.path)
        self._raw = open(self.path, "rb")
        compressed = self._raw.read(2) == GZIP_MAGIC
        self._staging = tempfile.TemporaryFile(dir=staging_dir) if compressed else None
        self._layout: _Layout | None = None
        self._records: _MappedFile | None = None

    def __enter__(self) -> NoteEvents:
        return self

    def __exit__(self, *exc) -> None:
        self._raw.close()
        if self._staging:
            self._staging.close()

    def scan(self, category: str = DISCHARGE_CATEGORY, columns: tuple[str, ...] = COLUMNS) -> Iterator[Chunk]:
        """Stream the file in record-aligned chunks: every record counted and checked, and the rows
        of `category` (exact match) parsed into string columns (all of `columns` but TEXT).

        Scanning runs in worker threads (the compiled scanner and Arrow release the GIL), ahead of
        the caller's work on the chunks it has. Raises NoteEventsError naming the file and the first
        bad line (and its ROW_ID where it can be read) for anything that is not a well-formed
        NOTEEVENTS file, including a header-only file.
        """
        # One worker more than cores: a worker waiting on page faults or the GIL leaves a core idle
        # otherwise (BENCHMARKS.md, issue 3). Each holds a window in memory, hence the cap.
        path, raw, rows, workers = self.path, self._raw, 0, min(pa.cpu_count() + 1, MAX_SCAN_WORKERS)
        with (
            ThreadPoolExecutor(workers, thread_name_prefix="noteevents-scan") as pool,
            tqdm(
                desc=f"reading {path.name}",
                unit="B",
                unit_scale=True,
                mininterval=5,
                disable=None,
                total=None if self._staging else path.stat().st_size,
            ) as progress,
        ):
            header_bytes = len(_read_first_line(path))
            progress.update(header_bytes)
            self._layout = _Layout(self.header, category, columns)
            raw.seek(0)
            if self._staging:
                source = _Stream(raw, path, header_bytes)
                chunks = _stream_chunks(source, header_bytes, self._layout, _StagedRecords(self._staging), pool)
            else:
                source = _MappedFile(raw)
                chunks = _mapped_chunks(source, header_bytes, self._layout, pool, workers)
            try:
                for chunk, scanned in chunks:
                    progress.update(scanned)
                    rows += chunk.rows
                    yield chunk
            except _Malformed:
                raise NoteEventsError(f"{path}: {locate_problem(path)}") from None
            finally:
                chunks.close()
                pool.shutdown(cancel_futures=True)
                if isinstance(source, _Stream):
                    source.close()
        if rows == 0:
            raise NoteEventsError(f"{path}: header only, no note rows after line 1")
        if self._staging:
            self._staging.flush()
        self._records = _MappedFile(self._staging or raw)

    def texts(self, spans: np.ndarray, into: np.ndarray | None = None) -> pa.StringArray:
        """The TEXT of selected records, given their spans (from the scan's chunks, in file order).

        The bytes go into `into` where given (at least text_bytes(spans) long), else into a new
        array. A caller that reuses its arrays spares the kernel zeroing fresh pages for every
        call (BENCHMARKS.md, issue 3).
        """
        if self._records is None:
            raise RuntimeError("NoteEvents.texts() needs a finished scan()")
        if len(spans) == 0:
            return _strings(np.zeros(1, np.int32), np.empty(0, np.uint8))
        # The file's last record may lack its newline; its span counts one.
        first, last = int(spans[0, 0]), min(int(spans[:, 1].max()), self._records.size)
        data, begin, _ = self._records.window(first, last - first)
        [(offsets, values)], _ = record_scanner.extract_fields(
            data,
            spans[:, 0] - first + begin,
            np.minimum(spans[:, 1], last) - first + begin,
            self._layout.n_columns,
            [self._layout.text],
            into=into,
        )
        return _strings(offsets, values)

    @staticmethod
    def text_bytes(spans: np.ndarray) -> int:
        """Bytes enough for the texts of these records (the size texts' `into` needs)."""
        return int((spans[:, 1] - spans[:, 0]).sum())


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
            raise _Problem(
                f"invalid UTF-8 at line {self.number}, column {err.start + 1} (byte 0x{line[err.start]:02x})"
            ) from None
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
                        return (
                            f"{where()}: {len(record)} fields, expected {len(header)} as in the header "
                            f"(a stray quote or comma, or a truncated row)"
                        )
                    record_start, lines.record_first = lines.number + 1, None
            except _Problem as problem:
                return f"{where()}: {problem}"
            except csv.Error as err:
                if "field limit" in str(err):
                    return (
                        f"{where()}: a field of this record runs on for over {MAX_FIELD_BYTES >> 20} MB "
                        f"(an unterminated quote)"
                    )
                if raw.read(1) == b"":
                    return (
                        f"{where()}: a quoted field opened in this record is never closed before the end "
                        f"of the file (unterminated quote, or a truncated file)"
                    )
                return f"{where()}: malformed quoting in this record, noticed at line {lines.number} ({err})"
    finally:
        csv.field_size_limit(limit)
    return "malformed CSV that the strict pass could not pin down"


def locate_record(path: str | os.PathLike, data_row: int | None = None, row_id: int | None = None) -> str:
    """'line N (ROW_ID n)' of a record known by its data row number (1-based) or its ROW_ID.

    A slow pass like locate_problem's, run only to word an error; the ROW_ID appears only when
    it is an integer, so a shifted row's content is never quoted.
    """
    limit = csv.field_size_limit(MAX_FIELD_BYTES)
    try:
        with open_bytes(path) as raw:
            lines = _Lines(raw)
            reader = csv.reader(lines)
            header = [name.removeprefix("\ufeff") for name in next(reader)]
            column = header.index("ROW_ID")
            start = lines.number + 1
            for number, record in enumerate(reader, start=1):
                value = record[column].strip() if len(record) > column else ""
                if number == data_row or (row_id is not None and value == str(row_id)):
                    return f"line {start}" + (f" (ROW_ID {value})" if value.isdigit() else "")
                start = lines.number + 1
    finally:
        csv.field_size_limit(limit)
    return f"data row {data_row}" if data_row is not None else f"ROW_ID {row_id}"


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
