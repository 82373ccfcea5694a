"""The notes stage's compiled record scanner (record_scanner.c), built on first use and called with ctypes.

Why C and not numba (which an earlier version used): numba's import and the loading of its cached
kernels cost a large share of the stage in every process, and its first compilation more than the
whole stage (BENCHMARKS.md, issue 3). The C file is compiled once per install with the system's C compiler (`cc`, or
$CC) into a shared library named by the hash of the source and flags, next to this module or,
where that is read-only, in the user's cache folder; loading it takes a millisecond. ctypes
releases the GIL during each call, so worker threads scan in parallel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".c")
# No -Werror: a newer compiler's new warning must not stop a user's install.
CFLAGS = ("-O3", "-fPIC", "-shared", "-std=gnu11", "-Wall")

# Status codes, as in record_scanner.c.
DONE = 0  # reached `stop`, or the end of data where the rest is a partial record
FULL = 1  # stopped early (output arrays or category table full): call again from `consumed`
NUL_BYTE = 2
INVALID_UTF8 = 3
WRONG_FIELD_COUNT = 4
BAD_QUOTING = 5  # text after a closing quote, or a carriage return not followed by a newline
NO_MEMORY = 6
PROBLEMS = {
    NUL_BYTE: "NUL byte",
    INVALID_UTF8: "invalid UTF-8",
    WRONG_FIELD_COUNT: "wrong number of fields",
    BAD_QUOTING: "text after a closing quote",
}

_POINTER, _INT = ctypes.c_void_p, ctypes.c_int64


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "cc"))


def _library_name() -> str:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(_compiler() + list(CFLAGS)).encode()).hexdigest()[:16]
    return f"record_scanner-{key}.so"


def _build_folders() -> list[Path]:
    """Where the library may live: beside this module, else in the user's cache folder."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asclepius_r"
    return [Path(__file__).parent / "_build", cache]


def _compile(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name, renamed into place: concurrent first uses never see half a library.
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".build-", suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    command = [*_compiler(), *CFLAGS, "-o", str(partial), str(SOURCE)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
        partial.replace(target)
    except FileNotFoundError:
        raise RuntimeError(
            f"the notes stage compiles its scanner ({SOURCE.name}) once per install and needs a C "
            f"compiler: {_compiler()[0]!r} was not found. Install one (`apt install gcc`, "
            f"`conda install -c conda-forge c-compiler`) or point $CC at it"
        ) from None
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"compiling {SOURCE} failed ({shlex.join(command)}):\n{err.stderr[-3000:]}") from None
    finally:
        partial.unlink(missing_ok=True)
    log.info("compiled %s into %s", SOURCE.name, target)


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled scanner, built first if no folder holds it yet."""
    name, errors = _library_name(), []
    for folder in _build_folders():
        if not (folder / name).exists():
            try:
                _compile(folder / name)
            except OSError as err:  # a read-only install: the next folder
                errors.append(f"{folder}: {err}")
                continue
        lib = ctypes.CDLL(str(folder / name))
        lib.scan_records.restype = lib.extract_fields.restype = _INT
        lib.scan_records.argtypes = [
            _POINTER,
            _INT,
            _INT,
            _INT,
            _INT,
            _INT,
            _INT,
            _POINTER,
            _POINTER,
            _POINTER,
            _POINTER,
            _INT,
            _POINTER,
            _INT,
            _POINTER,
        ]
        lib.extract_fields.argtypes = [
            _POINTER,
            _POINTER,
            _POINTER,
            _INT,
            _INT,
            _POINTER,
            _INT,
            _POINTER,
            _POINTER,
            _POINTER,
            _INT,
            _POINTER,
        ]
        return lib
    raise RuntimeError(f"no folder to build the notes scanner in: {'; '.join(errors)}")


def _address(array: np.ndarray) -> int:
    assert array.flags.c_contiguous
    return array.ctypes.data


class ScanOutputs:
    """The scanner's per-record output arrays, reused from call to call."""

    def __init__(self, records: int, categories: int):
        self.row_ids = np.empty(records, np.int64)
        self.starts = np.empty(records, np.int64)
        self.ends = np.empty(records, np.int64)
        self.category_ids = np.empty(records, np.int32)
        self.category_spans = np.empty((categories, 2), np.int64)
        self.result = np.empty(3, np.int64)


def scan_records(
    data: np.ndarray, begin: int, stop: int, n_columns: int, row_id_column: int, category_column: int, out: ScanOutputs
) -> tuple[int, int, int, int]:
    """Scan the records of data[begin:] (a record boundary) up to the first record boundary at or
    after `stop`, into `out`: (status, consumed, records, distinct categories); see record_scanner.c."""
    status = library().scan_records(
        _address(data),
        len(data),
        begin,
        stop,
        n_columns,
        row_id_column,
        category_column,
        _address(out.row_ids),
        _address(out.starts),
        _address(out.ends),
        _address(out.category_ids),
        len(out.row_ids),
        _address(out.category_spans),
        len(out.category_spans),
        _address(out.result),
    )
    consumed, records, categories = out.result.tolist()
    return status, consumed, records, categories


def extract_fields(
    data: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    n_columns: int,
    fields: list[int],
    hash_field: int | None = None,
    into: np.ndarray | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray | None]:
    """The fields `fields` (indices) of the records data[starts[r]:ends[r]], unquoted: per field,
    (Arrow int32 offsets, UTF-8 bytes); and, if `hash_field` is given, a 64-bit hash (not
    cryptographic) of that field's unquoted value per record, computed without copying it. The
    bytes are views into `into` where given (it must hold the records' bytes), else into a new
    array. The records must have passed scan_records."""
    starts, ends = np.ascontiguousarray(starts, np.int64), np.ascontiguousarray(ends, np.int64)
    wanted = np.array(fields, np.int64)
    offsets = np.empty((len(fields), len(starts) + 1), np.int32)
    size = int((ends - starts).sum())
    values = np.empty(size, np.uint8) if into is None else into
    if len(values) < size:
        raise ValueError(f"extract_fields: {len(values)} bytes cannot hold the {size} of the records")
    bases = np.empty(len(fields) + 1, np.int64)
    hashes = None if hash_field is None else np.empty(len(starts), np.uint64)
    status = library().extract_fields(
        _address(data),
        _address(starts),
        _address(ends),
        len(starts),
        n_columns,
        _address(wanted),
        len(fields),
        _address(offsets),
        _address(values),
        _address(bases),
        -1 if hash_field is None else hash_field,
        None if hashes is None else _address(hashes),
    )
    if status == NO_MEMORY:
        raise MemoryError("extract_fields: out of memory")
    return [(offsets[c], values[bases[c] : bases[c + 1]]) for c in range(len(fields))], hashes


if __name__ == "__main__":  # `make venv`: build the library once, at install time
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    library()
