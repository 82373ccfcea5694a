"""The NOTEEVENTS reader as the stage sees it: UTF-8 judged as Python's decoder judges it, quoting
as Python's strict csv module does (Arrow's parser alone is more lenient), wherever the reader's
blocks cut the file."""

from __future__ import annotations

import csv
import io

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asclepius_r.notes import noteevents
from asclepius_r.notes.noteevents import NoteEventsError
from support.default_settings import note_policy

from .notes_support import csv_bytes, expected_kept, kept_rows, note, run, write_noteevents

HEADER = csv_bytes([])
POLICY = note_policy(drop_duplicate_text=False)


def _record(row_id: int, raw_text: bytes) -> bytes:
    """A discharge summary whose TEXT field is `raw_text` as it stands in the file (quotes included)."""
    return b'%d,7,100001,"2150-01-01",,,"Discharge summary","Report",,,%s\n' % (row_id, raw_text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=40).map(lambda b: b.replace(b'"', b"").replace(b"\0", b"")))
@example(b"\xc0\x80")  # overlong
@example(b"\xe0\x80\x80")  # overlong
@example(b"\xed\xa0\x80")  # a surrogate
@example(b"\xf4\x90\x80\x80")  # above U+10FFFF
@example(b"\xe2\x82")  # truncated before the closing quote
@example("é°F🫀".encode())
def test_utf8_is_judged_as_python_judges_it(tmp_path, text):
    path = tmp_path / "n.csv"
    path.write_bytes(HEADER + _record(1, b'"' + text + b'"'))
    try:
        expected = text.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(NoteEventsError, match=r"line 2 \(ROW_ID 1\): invalid UTF-8 at line \d+, column \d+"):
            run(tmp_path, path, POLICY)
    else:
        assert kept_rows(run(tmp_path, path, POLICY)) == [(1, expected)]


def _strict_csv_reads(data: bytes) -> list[list[str]] | None:
    """The records Python's strict csv module reads (blank lines skipped), or None if it fails."""
    try:
        return [r for r in csv.reader(io.StringIO(data.decode(), newline=""), strict=True) if r]
    except csv.Error:
        return None


# The raw bytes of TEXT fields: any mix of quotes, delimiters and line ends (CRs only in CRLF, as a
# lone CR outside quotes is rejected by the reader but read as a line end by the csv module).
RAW_FIELDS = st.lists(st.sampled_from(['"', '"', ",", "\n", "\r\n", "a", " "]), max_size=12).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(RAW_FIELDS, min_size=1, max_size=4), st.sampled_from([128, 256, 1 << 20]))
@example(['"open\nand "on"'], 1 << 20)  # a closing quote followed by text
@example(['"never closed\n'], 1 << 20)
@example(['ab"c'], 128)  # a quote inside an unquoted field is a character
def test_quoting_is_judged_as_the_strict_csv_module_judges_it(tmp_path, monkeypatch, texts, block_size):
    """Accepted exactly when Python's strict csv module reads eleven fields a record; then every TEXT
    as it reads it. Small blocks (a record must fit in one) cut runs of quotes and CRLFs between reads."""
    monkeypatch.setattr(noteevents, "BLOCK_SIZE", block_size)
    data = HEADER + b"".join(_record(i + 1, text.encode()) for i, text in enumerate(texts))
    path = tmp_path / "n.csv"
    path.write_bytes(data)
    records = _strict_csv_reads(data)
    if records is not None and all(len(r) == 11 for r in records):
        assert kept_rows(run(tmp_path, path, POLICY)) == [(int(r[0]), r[10]) for r in records[1:]]
    else:
        with pytest.raises(NoteEventsError, match=r"^\S+n\.csv: line \d+"):
            run(tmp_path, path, POLICY)


def test_quotes_follow_the_csv_module(tmp_path):
    """A quote inside an unquoted field is a character; "" inside quotes is one quote; CRLF ends lines."""
    header = csv_bytes([]).replace(b"\n", b"\r\n")
    body = (
        b'1,2,ab"c,"2150-01-01",,,"Discharge summary",Re"port,,,"""quoted"" from the start"\r\n'
        b'2,3,,"",,,Discharge summary,"",,,plain text\n'
        b'3,4,,,,,"Discharge summary","",,,""\n'
    )
    path = tmp_path / "n.csv"
    path.write_bytes(header + body)
    result = run(tmp_path, path, POLICY)
    assert kept_rows(result) == expected_kept(path, POLICY)
    first = result["train"][0]
    assert (first["HADM_ID"], first["DESCRIPTION"], first["TEXT"]) == ('ab"c', 'Re"port', '"quoted" from the start')


@pytest.mark.parametrize("gzipped", [False, True])
def test_notes_holding_lines_like_records_across_blocks(tmp_path, monkeypatch, gzipped):
    """Notes that hold lines looking like whole records, in blocks much smaller than the file: every
    block boundary falls somewhere in a record, often inside quotes."""
    monkeypatch.setattr(noteevents, "BLOCK_SIZE", 4096)
    fake = "".join(f"{9000 + k},1,,,,,Discharge summary,Report,,,fake {k}\n" for k in range(4))
    rows = [
        note(i, f"line one\n{fake}" * (1 + i % 3) + f"end {i}", category="Discharge summary" if i % 2 else "ECG")
        for i in range(1, 120)
    ]
    path = write_noteevents(tmp_path / "n.csv", rows, gzipped=gzipped)
    result = run(tmp_path, path)
    assert kept_rows(result) == sorted(expected_kept(path, note_policy()))
    assert result["stats"]["rows_read"] == len(rows)
