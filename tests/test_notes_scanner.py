"""The compiled record scanner: its UTF-8 check agrees with Python's decoder, quoting follows the
csv module, parallel stretches that start at a wrong guess are scanned again, the library is
built where it can be (a read-only install uses the user's cache), and the stage never imports
pandas (half a second)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from asclepius_r.notes import noteevents, record_scanner
from asclepius_r.notes.stage import NotePolicy

from .notes_support import csv_bytes, expected_kept, kept_rows, note, run, write_noteevents

REPO = Path(__file__).resolve().parents[1]


def _scan(data: bytes) -> tuple[int, int]:
    """(status, records) of the compiled scanner over `data`, a two-column file body."""
    status, _, records, _ = record_scanner.scan_records(
        np.frombuffer(data, np.uint8), 0, len(data), 2, 0, 1, record_scanner.ScanOutputs(8, 8)
    )
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
    # The text sits in a quoted field at every offset modulo 32, so the 32-bytes-at-a-time path sees it too.
    for pad in range(40):
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
    body = (
        b'1,2,ab"c,"2150-01-01",,,"Discharge summary",Re"port,,,"""quoted"" from the start"\r\n'
        b'2,3,,"",,,Discharge summary,"",,,plain text\n'
        b'3,4,,,,,"Discharge summary","",,,""\n'
    )
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
    monkeypatch.setattr(noteevents, "STREAM_READ_SIZE", 4096)
    monkeypatch.setattr(noteevents, "COMPRESSED_READ_SIZE", 1024)
    fake = "".join(f"{9000 + k},1,,,,,Discharge summary,Report,,,fake {k}\n" for k in range(4))
    rows = [
        note(i, f"line one\n{fake}" * (1 + i % 3) + f"end {i}", category="Discharge summary" if i % 2 else "ECG")
        for i in range(1, 120)
    ]
    path = write_noteevents(tmp_path / "n.csv", rows, gzipped=gzipped)
    result = run(tmp_path, path)
    assert kept_rows(result) == sorted(expected_kept(path, NotePolicy()))
    assert result["stats"]["rows_read"] == len(rows)


def _stage_in_subprocess(tmp_path: Path, env: dict, prelude: str = "") -> subprocess.CompletedProcess:
    path = write_noteevents(tmp_path / "n.csv", [note(1), note(2)])
    code = (
        f"{prelude}; import sys; from pathlib import Path; from asclepius_r.notes.stage import "
        "NotePolicy, SplitPolicy, run_notes_stage; out = Path(sys.argv[2]); "
        "print(run_notes_stage(sys.argv[1], out / 'd.parquet', "
        "out / 'h.parquet', out / 'i.txt', out / 's.json', NotePolicy(), SplitPolicy(0))['kept'])"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "out")],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
    )


def test_a_read_only_install_builds_the_scanner_in_the_user_cache(tmp_path):
    """The package folder cannot be written (simulated by a library name no folder holds yet, and
    a package folder made read-only for the build); the library goes to $XDG_CACHE_HOME."""
    prelude = (
        "from asclepius_r.notes import record_scanner as r; r._build_folders = lambda f=r._build_folders: "
        "[Path('/proc/asclepius-read-only')] + f()[1:]; from pathlib import Path"
    )
    result = _stage_in_subprocess(tmp_path, {"XDG_CACHE_HOME": str(tmp_path / "cache")}, prelude)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["2"]
    assert [p.name for p in (tmp_path / "cache/asclepius_r").iterdir()] == [record_scanner._library_name()]


def test_without_a_c_compiler_the_error_says_what_to_install(tmp_path):
    prelude = "from asclepius_r.notes import record_scanner as r; r._library_name = lambda: 'never-built.so'"
    result = _stage_in_subprocess(tmp_path, {"CC": "no-such-cc", "XDG_CACHE_HOME": str(tmp_path / "cache")}, prelude)
    assert result.returncode != 0
    assert "needs a C compiler: 'no-such-cc' was not found" in result.stderr
    assert "apt install gcc" in result.stderr
    assert not list((REPO / "asclepius_r/_build").glob("never-built*"))


@pytest.mark.parametrize(
    "policy",
    ["NotePolicy()", "NotePolicy(keep_addenda=False, exclude_row_ids=frozenset({2}), coarse_placeholders=True)"],
)
def test_the_stage_never_imports_pandas(tmp_path, policy):
    """pyarrow imports pandas behind pa.array, pa.scalar or a boolean to_numpy (falling back
    quietly where it cannot): a third of a second of a 2 GB run."""
    path = write_noteevents(tmp_path / "n.csv", [note(1), note(2), note(3, description="Addendum"), note(4)])
    code = (
        "import sys; from pathlib import Path; from asclepius_r.notes.stage import NotePolicy, SplitPolicy, "
        f"run_notes_stage; out = Path(sys.argv[2]); stats = run_notes_stage(sys.argv[1], out / 'd.parquet', "
        f"out / 'h.parquet', out / 'i.txt', out / 's.json', {policy}, SplitPolicy(1)); "
        "print(stats['kept'], 'pandas' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "out")],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["4" if policy == "NotePolicy()" else "2", "False"]
