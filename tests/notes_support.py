"""Helpers for the notes tests: NOTEEVENTS files written by hand, and an independent oracle.

The oracle reads a file with Python's csv module and applies the policies row by row in plain
Python, so the tests compare the streaming stage against a second, naive implementation.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import pyarrow.parquet as pq

from asclepius_r.notes.noteevents import COLUMNS
from asclepius_r.notes.stage import NotePolicy, coarsen_placeholders, run_notes_stage
from support.default_settings import note_policy, split_policy

NUMERIC = {"ROW_ID", "SUBJECT_ID", "HADM_ID", "CGID"}
OUTPUTS = ("discharge.parquet", "heldout.parquet", "heldout_row_ids.txt", "stats.json")


def note(
    row_id: int,
    text: str | None = None,
    subject: int | None = None,
    category: str = "Discharge summary",
    description: str = "Report",
    iserror: str = "",
    **other: str,
) -> dict:
    """One NOTEEVENTS row as a dict; the text defaults to something unique per ROW_ID."""
    return {
        "ROW_ID": str(row_id),
        "SUBJECT_ID": str(subject if subject is not None else row_id),
        "HADM_ID": "100001",
        "CHARTDATE": "2150-01-01",
        "CHARTTIME": "",
        "STORETIME": "",
        "CATEGORY": category,
        "DESCRIPTION": description,
        "CGID": "",
        "ISERROR": iserror,
        "TEXT": text if text is not None else f'Admission Date: [**2150-1-1**]\nnote {row_id}, "quoted"\n',
        **other,
    }


def csv_bytes(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> bytes:
    """MIMIC's own quoting: text columns always quoted, numbers bare, empty values empty."""
    out = io.StringIO(newline="")
    out.write(",".join(f'"{c}"' for c in columns) + "\n")
    for row in rows:
        fields = []
        for column in columns:
            value = row.get(column, "")
            bare = column in NUMERIC or value == "" and column in {"CHARTTIME", "STORETIME", "ISERROR"}
            fields.append(value if bare else '"' + value.replace('"', '""') + '"')
        out.write(",".join(fields) + "\n")
    return out.getvalue().encode("utf-8")


def write_noteevents(path: Path, rows: list[dict], columns: tuple[str, ...] = COLUMNS, gzipped: bool = False) -> Path:
    data = csv_bytes(rows, columns)
    path.write_bytes(gzip.compress(data) if gzipped else data)
    return path


def run(
    tmp_path: Path, noteevents: Path, policy: NotePolicy | None = None, heldout_notes: int = 0, seed: int = 42
) -> dict:
    """Run the stage into tmp_path/out; returns stats plus the output tables as lists of dicts."""
    out = tmp_path / "out"
    stats = run_notes_stage(
        noteevents,
        *(out / name for name in OUTPUTS),
        policy=policy or note_policy(),
        split=split_policy(heldout_notes=heldout_notes, seed=seed),
    )
    return {
        "stats": stats,
        "train": pq.read_table(out / OUTPUTS[0]).to_pylist(),
        "heldout": pq.read_table(out / OUTPUTS[1]).to_pylist(),
        "heldout_ids": [int(i) for i in (out / OUTPUTS[2]).read_text().split()],
    }


def expected_kept(noteevents: Path, policy: NotePolicy) -> list[tuple[int, str]]:
    """(ROW_ID, TEXT) of the rows the policies keep, in file order: the naive oracle."""
    opener = gzip.open if noteevents.read_bytes()[:2] == b"\x1f\x8b" else open
    kept, seen = [], set()
    with opener(noteevents, "rt", encoding="utf-8", newline="") as rows:
        for row in csv.DictReader(rows):
            if row["CATEGORY"] != "Discharge summary":
                continue
            if (
                policy.drop_iserror
                and row["ISERROR"] == "1"
                or not policy.keep_addenda
                and row["DESCRIPTION"] == "Addendum"
                or int(row["ROW_ID"]) in policy.exclude_row_ids
            ):
                continue
            if policy.drop_duplicate_text and row["TEXT"] in seen:
                continue
            seen.add(row["TEXT"])
            text = coarsen_placeholders(row["TEXT"]) if policy.coarse_placeholders else row["TEXT"]
            kept.append((int(row["ROW_ID"]), text))
    return kept


def kept_rows(result: dict) -> list[tuple[int, str]]:
    """(ROW_ID, TEXT) of both outputs together, in ROW_ID order."""
    return sorted((r["ROW_ID"], r["TEXT"]) for r in result["train"] + result["heldout"])
