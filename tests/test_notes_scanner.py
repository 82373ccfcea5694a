"""The compiled record scanner: its UTF-8 check agrees with Python's decoder, quoting follows the
csv module, parallel stretches that start at a wrong guess are scanned again, and the stage still
runs where numba cannot cache (a read-only install)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from asclepius_r import noteevents, record_scanner
from asclepius_r.notes import NotePolicy

from .notes_support import csv_bytes, expected_kept, kept_rows, note, run, write_noteevents

REPO = Path(__file__).resolve().parents[1]


def _scan(data: bytes) -> tuple[int, int]:
    """(status, records) of the compiled scanner over `data`, a two-column file body."""
    array = np.frombuffer(bytearray(data), np.uint8)
    out = noteevents._ScanOutputs(8, 8)
    status, _, records, _ = record_scanner.scan_records(
        array, array[: len(array) // 8 * 8].view(np.uint64), 0, len(array), 2, 0, 1,
        out.row_ids, out.starts, out.ends, out.category_ids, out.category_spans)
    return status, records


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40).map(lambda b: b.replace(b'"', b"").replace(b"\0", b"")))
@example(b"\xc0\x80")  # overlong
@example(b"\xe0\x80\x80")  # overlong
@example(b"\xed\xa0\x80")  # a surrogate
@example(b"\xf4\x90\x80\x80")  # above U+10FFFF
@example(b"\xe2\x82")  # truncated before the closing quote
@example("é°F🫀".encode())
def test_utf8_check_agrees_with_python(text):
    # The text sits in a quoted field at every offset modulo 8, so the word-at-a-time path sees it too.
    for pad in range(8):
        status, records = _scan(b'1,"' + b"x" * pad + text + b'"\n')
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            assert status == record_scanner.INVALID_UTF8
        else:
            assert (status, records) == (record_scanner.DONE, 1)


def test_quotes_follow_the_csv_module(tmp_path):
    """A quote inside an unquoted field is a character; "" inside quotes is one quote; CRLF ends lines."""
    header = csv_bytes([]).replace(b"\n", b"\r\n")
    body = (b'1,2,ab"c,"2150-01-01",,,"Discharge summary",Re"port,,,"""quoted"" from the start"\r\n'
            b'2,3,,"",,,Discharge summary,"",,,plain text\n'
            b'3,4,,,,,"Discharge summary","",,,""\n')
    path = tmp_path / "n.csv"
    path.write_bytes(header + body)
    policy = NotePolicy(drop_duplicate_text=False)
    result = run(tmp_path, path, policy)
    assert kept_rows(result) == expected_kept(path, policy)
    first = result["train"][0]
    assert (first["HADM_ID"], first["DESCRIPTION"], first["TEXT"]) == ('ab"c', 'Re"port', '"quoted" from the start')


@pytest.mark.parametrize("gzipped", [False, True])
def test_stretches_starting_inside_a_note_are_scanned_again(tmp_path, monkeypatch, gzipped):
    """Notes that hold lines looking like whole records: a parallel worker that starts on one of
    them guessed wrong, and its stretch must be scanned again from the true record boundary."""
    monkeypatch.setattr(noteevents, "READ_SIZE", 4096)
    fake = "".join(f"{9000 + k},1,,,,,Discharge summary,Report,,,fake {k}\n" for k in range(4))
    rows = [note(i, f"line one\n{fake}" * (1 + i % 3) + f"end {i}", category="Discharge summary" if i % 2 else "ECG")
            for i in range(1, 120)]
    path = write_noteevents(tmp_path / "n.csv", rows, gzipped=gzipped)
    result = run(tmp_path, path)
    assert kept_rows(result) == sorted(expected_kept(path, NotePolicy()))
    assert result["stats"]["rows_read"] == len(rows)


def test_without_a_writable_numba_cache_the_stage_compiles_in_memory(tmp_path):
    """A read-only install: numba finds no cache folder it can write, yet the stage runs."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    path = write_noteevents(tmp_path / "n.csv", [note(1), note(2)])
    code = ("import sys; from pathlib import Path; from asclepius_r.notes import NotePolicy, SplitPolicy, "
            "run_notes_stage; out = Path(sys.argv[2]); print(run_notes_stage(sys.argv[1], out / 'd.parquet', "
            "out / 'h.parquet', out / 'i.txt', out / 's.json', NotePolicy(), SplitPolicy(0))['kept'])")
    env = {"PYTHONPATH": str(REPO), "NUMBA_CACHE_DIR": str(not_a_folder / "cache"),
           "NUMBA_CACHE_LOCATOR_CLASSES": "UserProvidedCacheLocator", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "out")], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["2"]
