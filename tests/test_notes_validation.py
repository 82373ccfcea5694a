"""Bad NOTEEVENTS files: each fails with an error naming the file and the line or ROW_ID, never
quoting note text, and leaves no output behind. Also what must be accepted: any column order,
extra columns, gzip (recognised by content), a byte-order mark."""

from __future__ import annotations

import gzip
import random

import pytest

from asclepius_r.notes.noteevents import COLUMNS, NoteEventsError
from support.default_settings import note_policy

from .notes_support import OUTPUTS, csv_bytes, kept_rows, note, run

SECRET = "Mr. Secretname"  # stands for patient text: must never appear in an error message
GOOD = [note(1, f'{SECRET} was seen,\n"well".'), note(2), note(3, category="Radiology")]
HEADER = csv_bytes([])
GOOD_BYTES = csv_bytes(GOOD)


def _row(row_id: int, text: bytes, closed: bool = True) -> bytes:
    row = b'%d,7,100001,"2150-01-01",,,"Discharge summary","Report",,,"%s' % (row_id, text)
    return row + b'"\n' if closed else row


# GOOD's three rows span lines 2-9 (their texts hold newlines), so a fourth row starts on line 10.

BAD_FILES = {
    "empty": (b"", "empty file"),
    "blank": (b"\n\n", "empty file"),
    "header only": (HEADER, "header only"),
    "missing column": (HEADER.replace(b'"CGID",', b""), "missing column.*CGID"),
    "misnamed column": (
        GOOD_BYTES.replace(b'"ROW_ID"', b'"ROWID"', 1),
        r"missing column.*ROW_ID \(found 'ROWID' instead\?\)",
    ),
    "lower-case column": (GOOD_BYTES.replace(b'"TEXT"', b'"text"', 1), r"TEXT \(found 'text' instead\?\)"),
    "no header": (GOOD_BYTES.split(b"\n", 1)[1], "is the header line missing"),
    "duplicated column": (GOOD_BYTES.replace(b'"CGID"', b'"TEXT"', 1), "TEXT appear more than once"),
    "unterminated quote at the end": (
        GOOD_BYTES + _row(4, SECRET.encode() + b"\nstill open", closed=False),
        r"line 10 \(ROW_ID 4\): a quoted field .* never closed .*truncated file",
    ),
    "unterminated quote in the middle": (
        HEADER + _row(9, b'open\nand "on') + GOOD_BYTES.split(b"\n", 1)[1],
        r"line 2 \(ROW_ID 9\)",
    ),
    "truncated in a row": (GOOD_BYTES + b"4,7,100001,", r"line 10 \(ROW_ID 4\): 4 fields, expected 11"),
    "truncated in a date": (GOOD_BYTES + b'4,7,100001,"2150-', r"line 10 \(ROW_ID 4\): a quoted field .* never closed"),
    "too many fields": (GOOD_BYTES + b'4,7,,,,,"Nursing","Report",,,"x",extra\n', r"line 10 \(ROW_ID 4\): 12 fields"),
    "invalid UTF-8": (
        GOOD_BYTES + _row(4, b"caf\xe9\nlater"),
        r"line 10 \(ROW_ID 4\): invalid UTF-8 at line 10, column 62",
    ),
    "lone CR outside quotes": (
        GOOD_BYTES + b'4,7,,,,,"Nursing","Report",,,"x"\r5,7,,,,,"Nursing","Report",,,"y"\n',
        r"line 10 \(ROW_ID 4\): malformed quoting",
    ),
    "NUL byte": (GOOD_BYTES + _row(4, b"first\nsec\x00ond"), r"line 10 \(ROW_ID 4\): NUL byte at line 11, column 4"),
    "duplicate ROW_ID": (
        GOOD_BYTES + csv_bytes([note(2, "other text")]).split(b"\n", 1)[1],
        r"line 10 \(ROW_ID 2\): duplicate ROW_ID 2 \(data rows 2, 4\)",
    ),
    "ROW_ID not an integer": (
        GOOD_BYTES.replace(b"\n2,", b"\nabc,", 1),
        "line 4, data row 2: ROW_ID is not an integer",
    ),
    "shifted row, note text in ROW_ID": (
        GOOD_BYTES.replace(b"\n2,", b'\n"%s ",' % SECRET.encode(), 1),
        "line 4, data row 2: ROW_ID is not an integer",
    ),
    "CR-only line endings": (GOOD_BYTES.replace(b"\n", b"\r"), "line 1 .*CR-only"),
    "SUBJECT_ID not an integer": (
        GOOD_BYTES.replace(b"\n2,2,", b"\n2,x2,", 1),
        r"line 4 \(ROW_ID 2\): SUBJECT_ID is not an integer",
    ),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_file_is_named_located_and_leaves_nothing(tmp_path, name):
    data, message = BAD_FILES[name]
    path = tmp_path / "NOTEEVENTS.csv"
    path.write_bytes(data)
    with pytest.raises(NoteEventsError, match=message) as error:
        run(tmp_path, path)
    assert str(error.value).startswith(f"{path}: ") or "config key" in str(error.value)
    assert SECRET not in str(error.value) and error.value.__cause__ is None
    assert not any((tmp_path / "out").iterdir()), "no output (or temporary file) may be left behind"


def test_truncated_gzip_is_named(tmp_path):
    path = tmp_path / "NOTEEVENTS.csv.gz"
    path.write_bytes(gzip.compress(GOOD_BYTES * 50)[:-40])
    with pytest.raises(NoteEventsError, match=f"{path}: .*truncated or corrupt"):
        run(tmp_path, path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(NoteEventsError, match="nowhere.csv: file not found"):
        run(tmp_path, tmp_path / "nowhere.csv")


def test_failure_keeps_previous_outputs_intact(tmp_path):
    good = tmp_path / "good.csv"
    good.write_bytes(GOOD_BYTES)
    run(tmp_path, good)
    before = _contents(tmp_path / "out")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(GOOD_BYTES + _row(4, b"unterminated", closed=False))
    with pytest.raises(NoteEventsError):
        run(tmp_path, bad)
    assert {p.name for p in (tmp_path / "out").iterdir()} == set(OUTPUTS)
    assert _contents(tmp_path / "out") == before


def _contents(folder) -> dict:
    """Every file under `folder` (the datasets' part files too) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_column_order_and_extra_columns_do_not_matter(tmp_path):
    rows = [note(i, subject=i % 3, iserror="1" if i == 4 else "") for i in range(1, 9)]
    columns = list(COLUMNS) + ["EXTRA"]
    random.Random(5).shuffle(columns)
    standard, shuffled = tmp_path / "standard.csv", tmp_path / "shuffled.csv"
    standard.write_bytes(csv_bytes(rows))
    shuffled.write_bytes(csv_bytes([{**r, "EXTRA": "x"} for r in rows], tuple(columns)))
    assert run(tmp_path / "a", shuffled, heldout_notes=2) == run(tmp_path / "b", standard, heldout_notes=2)


@pytest.mark.parametrize("name", ["NOTEEVENTS.csv.gz", "NOTEEVENTS.csv"])
def test_gzip_is_recognised_by_content(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(GOOD_BYTES))
    plain = tmp_path / "plain.csv"
    plain.write_bytes(GOOD_BYTES)
    assert kept_rows(run(tmp_path / "gz", path)) == kept_rows(run(tmp_path / "plain", plain))


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "n.csv"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_BYTES.replace(b"0\n", b"0\r\n"))
    result = run(tmp_path, path, note_policy())
    assert [r["ROW_ID"] for r in result["train"]] == [1, 2]
