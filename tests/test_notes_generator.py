"""The synthetic NOTEEVENTS generator: the demo file stays put, and the scaled file has the real
category mix and note lengths, and passes the notes stage exactly as the oracle says."""

from __future__ import annotations

import csv
import gzip
from collections import Counter
from pathlib import Path

import pytest

from asclepius_r.notes import noteevents
from support.default_settings import note_policy
from support.synthetic_notes import (
    CATEGORY_MIX,
    DISCHARGE_ROW_ID_BASE,
    MEAN_TEXT_CHARS,
    LongDischargeNotes,
    ScaledNotes,
    demo_rows,
    load_demo_notes,
    main,
    write_noteevents,
)

from .notes_support import expected_kept, kept_rows, run


def _rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as rows:
        return list(csv.DictReader(rows))


def test_demo_rows_are_stable(tmp_path):
    """The demo's archived LLM responses are keyed on these notes: any change must be deliberate."""
    notes = load_demo_notes()
    path = tmp_path / "demo.csv"
    write_noteevents(path, demo_rows(notes))
    rows = _rows(path)
    discharge = sorted(int(r["ROW_ID"]) for r in rows if r["CATEGORY"] == "Discharge summary")
    assert discharge == sorted(
        [DISCHARGE_ROW_ID_BASE + n.number for n in notes] + [DISCHARGE_ROW_ID_BASE + 100, DISCHARGE_ROW_ID_BASE + 101]
    )
    assert len(rows) == 4 * len(notes) + 3
    header = ",".join(f'"{c}"' for c in noteevents.COLUMNS) + "\n"
    assert path.read_bytes() == (header + "".join(demo_rows(notes))).encode()
    assert demo_rows(notes) == demo_rows(load_demo_notes()), "the demo file must not depend on anything but the seed"


def test_scaled_rows_follow_the_real_mix_and_lengths(tmp_path):
    path = tmp_path / "NOTEEVENTS.csv"
    main([str(path), "--rows", "20000", "--seed", "3"])
    rows = _rows(path)
    assert len(rows) == 20000 and len({r["ROW_ID"] for r in rows}) == 20000
    counts = Counter(r["CATEGORY"] for r in rows)
    total = sum(CATEGORY_MIX.values())
    for category in ("Nursing/other", "Radiology", "Discharge summary", "Physician "):
        assert counts[category] / 20000 == pytest.approx(CATEGORY_MIX[category] / total, rel=0.15)
    for category in ("Nursing/other", "Radiology", "Discharge summary", "ECG"):
        lengths = [len(r["TEXT"]) for r in rows if r["CATEGORY"] == category]
        assert sum(lengths) / len(lengths) == pytest.approx(MEAN_TEXT_CHARS[category], rel=0.2)
    discharge = [r for r in rows if r["CATEGORY"] == "Discharge summary"]
    assert any(r["DESCRIPTION"] == "Addendum" for r in discharge)
    assert any('"' in r["TEXT"] and "\n" in r["TEXT"] and "[**" in r["TEXT"] for r in discharge)


def test_size_in_gb_and_gzip(tmp_path):
    path = tmp_path / "NOTEEVENTS.csv.gz"
    main([str(path), "--gb", "0.002", "--gzip"])
    data = gzip.decompress(path.read_bytes())
    assert 2_000_000 <= len(data) < 2_200_000
    assert data.endswith(b"\n")


def test_same_seed_same_file():
    notes = load_demo_notes()
    first = [row for _, row in zip(range(300), ScaledNotes(notes, seed=5))]
    assert first == [row for _, row in zip(range(300), ScaledNotes(notes, seed=5))]
    assert first != [row for _, row in zip(range(300), ScaledNotes(notes, seed=6))]


def test_long_notes_follow_the_token_length_distribution():
    """Stratified lengths: median and tail share hold for a few dozen notes (words and newlines as
    tokens here; the rehearsal counts LLaMA tokens), and shortened notes keep their last lines."""
    notes = load_demo_notes()

    def count(text):
        return len(text.split()) + text.count("\n")

    rows = list(LongDischargeNotes(notes, count, 40, median_tokens=300, sigma=0.5))
    reports = [r for r in csv.reader(rows) if r[6] == "Discharge summary" and r[7] == "Report"]
    assert len(reports) == 40
    lengths = sorted(count(r[10]) for r in reports)
    assert 270 <= lengths[20] <= 330
    assert 4 <= sum(n > 500 for n in lengths) <= 8  # about 15% over 500/300 = 1.67x the median
    endings = {note.text.rsplit("\n", 1)[-1] for note in notes if note.amends is None}
    assert all(r[10].rsplit("\n", 1)[-1] in endings for r in reports)


@pytest.mark.parametrize("gzipped", [False, True])
def test_scaled_file_passes_the_stage_as_the_oracle_says(tmp_path, monkeypatch, gzipped):
    """Small blocks, so that records straddle many block boundaries; gzipped, in two gzip members."""
    monkeypatch.setattr(noteevents, "BLOCK_SIZE", 64 << 10)
    path = tmp_path / "NOTEEVENTS.csv"
    main([str(path), "--rows", "3000", "--seed", "11"])
    if gzipped:
        data = path.read_bytes()
        path = tmp_path / "NOTEEVENTS.csv.gz"
        path.write_bytes(gzip.compress(data[: len(data) // 3]) + gzip.compress(data[len(data) // 3 :]))
    policy = note_policy(keep_addenda=False, exclude_row_ids=frozenset(range(0, 3000, 10)))
    result = run(tmp_path, path, policy, heldout_notes=5)
    assert kept_rows(result) == sorted(expected_kept(path, policy))
    assert result["stats"]["rows_read"] == 3000
