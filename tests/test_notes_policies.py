"""Notes stage policies: exact category, ISERROR, addenda, duplicate texts, exclusions,
placeholders, per-reason stats, the patient-grouped held-out split, and the outputs' layout."""

from __future__ import annotations

import json
import logging
import random

import pyarrow.parquet as pq
import pytest

from asclepius_r.notes import stage as notes
from asclepius_r.notes.noteevents import NoteEventsError
from asclepius_r.notes.stage import NOTE_SCHEMA, coarsen_placeholders
from support.default_settings import note_policy

from .notes_support import expected_kept, kept_rows, note, run, write_noteevents


def test_only_exact_category_is_kept_and_near_misses_are_warned(tmp_path, caplog):
    rows = [
        note(1),
        note(2, category="Radiology"),
        note(3, category="discharge summary "),
        note(4, category="Discharge Summary"),
        note(5, category=" Discharge summary"),
        note(6, category="discharge summary "),
        note(7, category="Discharge summaries"),
    ]
    with caplog.at_level(logging.WARNING):
        result = run(tmp_path, write_noteevents(tmp_path / "n.csv", rows))
    assert [r["ROW_ID"] for r in result["train"]] == [1]
    stats = result["stats"]
    assert stats["dropped"]["other_category"] == 6
    assert stats["near_miss_category"] == 4
    assert stats["near_miss_category_values"] == {
        "discharge summary ": 2,
        "Discharge Summary": 1,
        " Discharge summary": 1,
    }
    assert "4 rows have a CATEGORY" in caplog.text and "'discharge summary ' x 2" in caplog.text


@pytest.mark.parametrize("drop", [True, False])
def test_iserror_policy(tmp_path, drop):
    rows = [note(1), note(2, iserror="1"), note(3, iserror="")]
    result = run(tmp_path, write_noteevents(tmp_path / "n.csv", rows), note_policy(drop_iserror=drop))
    assert [r["ROW_ID"] for r in result["train"]] == ([1, 3] if drop else [1, 2, 3])
    assert result["stats"]["dropped"]["iserror"] == (1 if drop else 0)


@pytest.mark.parametrize("keep", [True, False])
def test_addendum_policy(tmp_path, keep):
    rows = [note(1), note(2, description="Addendum"), note(3)]
    result = run(tmp_path, write_noteevents(tmp_path / "n.csv", rows), note_policy(keep_addenda=keep))
    assert [r["ROW_ID"] for r in result["train"]] == ([1, 2, 3] if keep else [1, 3])
    assert result["stats"]["dropped"]["addendum"] == (0 if keep else 1)


@pytest.mark.parametrize("drop", [True, False])
def test_duplicate_text_policy_keeps_the_first_kept_copy(tmp_path, drop):
    same = 'Discharge Diagnosis:\nCHF, "stable"'
    # Row 1 carries the text but is an ISERROR row, so it does not shadow row 3; row 4 repeats row 3.
    rows = [note(1, same, iserror="1"), note(2), note(3, same), note(4, same), note(5, same + " ")]
    result = run(tmp_path, write_noteevents(tmp_path / "n.csv", rows), note_policy(drop_duplicate_text=drop))
    assert [r["ROW_ID"] for r in result["train"]] == ([2, 3, 5] if drop else [2, 3, 4, 5])
    assert result["stats"]["dropped"]["duplicate_text"] == (1 if drop else 0)


def test_exclusion_list(tmp_path):
    rows = [note(i) for i in range(1, 6)]
    result = run(
        tmp_path, write_noteevents(tmp_path / "n.csv", rows), note_policy(exclude_row_ids=frozenset({2, 4, 99}))
    )
    assert [r["ROW_ID"] for r in result["train"]] == [1, 3, 5]
    assert result["stats"]["dropped"]["excluded"] == 2


@pytest.mark.parametrize("coarse", [True, False])
def test_placeholder_policy(tmp_path, coarse):
    text = (
        "Admission Date: [**2151-7-16**] seen by Dr. [**Known lastname 123**] at [**Hospital 1234**], "
        "MRN [** Numeric Identifier 456**]."
    )
    result = run(
        tmp_path, write_noteevents(tmp_path / "n.csv", [note(1, text)]), note_policy(coarse_placeholders=coarse)
    )
    expected = "Admission Date: 2151-7-16 seen by Dr. [Name] at [LOC], MRN [#]." if coarse else text
    assert result["train"][0]["TEXT"] == expected


def test_coarse_tags_follow_2023():
    assert (
        coarsen_placeholders("[**First Name8 (NamePattern2) 12**] [**Location (un) 5**] [**7-16**]")
        == "[Name] [LOC] 7-16"
    )


def test_every_row_is_counted_once_and_matches_the_oracle(tmp_path):
    rng = random.Random(3)
    rows = [
        note(
            i,
            rng.choice(["a", "b", "c", f"unique {i}"]),
            subject=rng.randint(1, 30),
            category=rng.choice(["Discharge summary", "Discharge summary", "Nursing", "discharge summary"]),
            description=rng.choice(["Report", "Report", "Addendum"]),
            iserror=rng.choice(["", "", "1"]),
        )
        for i in range(1, 301)
    ]
    policy = note_policy(keep_addenda=False, exclude_row_ids=frozenset(range(1, 301, 7)))
    path = write_noteevents(tmp_path / "n.csv", rows)
    result = run(tmp_path, path, policy, heldout_notes=10)
    stats = result["stats"]
    assert stats["rows_read"] == 300
    assert stats["kept"] + sum(stats["dropped"].values()) == 300
    assert all(stats["dropped"][reason] > 0 for reason in stats["dropped"])
    assert kept_rows(result) == sorted(expected_kept(path, policy))
    assert json.loads((tmp_path / "out/stats.json").read_text()) == stats


def test_heldout_split_groups_patients_and_is_deterministic(tmp_path):
    rows = [note(i, subject=1 + i % 40) for i in range(1, 201)]
    path = write_noteevents(tmp_path / "n.csv", rows)
    first = run(tmp_path / "a", path, heldout_notes=23)
    train_subjects = {r["SUBJECT_ID"] for r in first["train"]}
    held_subjects = {r["SUBJECT_ID"] for r in first["heldout"]}
    assert not train_subjects & held_subjects
    assert 23 <= len(first["heldout"]) < 23 + 5  # whole patients of 5 notes each
    assert first["heldout_ids"] == sorted(r["ROW_ID"] for r in first["heldout"])
    assert first["stats"]["heldout_subjects"] == len(held_subjects)
    # Same notes in another row order: the same patients are held out.
    shuffled = write_noteevents(tmp_path / "shuffled.csv", random.Random(1).sample(rows, len(rows)))
    assert run(tmp_path / "b", shuffled, heldout_notes=23)["heldout_ids"] == first["heldout_ids"]
    assert run(tmp_path / "c", path, heldout_notes=23, seed=7)["heldout_ids"] != first["heldout_ids"]


def test_heldout_size_that_leaves_nothing_to_train_on_names_the_key(tmp_path):
    path = write_noteevents(tmp_path / "n.csv", [note(1), note(2)])
    with pytest.raises(NoteEventsError, match=r"config key notes.heldout_notes \(5\)"):
        run(tmp_path, path, heldout_notes=5)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_file_without_discharge_summaries_is_an_error(tmp_path):
    path = write_noteevents(tmp_path / "n.csv", [note(1, category="Radiology"), note(2, category="discharge summary")])
    with pytest.raises(NoteEventsError, match="no note is kept.*other_category 2"):
        run(tmp_path, path)
    assert not any((tmp_path / "out").iterdir())


def test_outputs_are_datasets_of_parts_in_file_order(tmp_path, monkeypatch):
    monkeypatch.setattr(notes, "OUTPUT_ROW_GROUP", 2)
    monkeypatch.setattr(notes, "OUTPUT_PART_GROUPS", 2)
    result = run(tmp_path, write_noteevents(tmp_path / "n.csv", [note(i) for i in range(1, 12)]))
    train = sorted((tmp_path / "out/discharge.parquet").iterdir())
    assert [p.name for p in train] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [(pq.ParquetFile(p).metadata.num_rows, pq.ParquetFile(p).num_row_groups) for p in train] == [
        (4, 2),
        (4, 2),
        (3, 2),
    ]
    assert [row["ROW_ID"] for row in result["train"]] == list(range(1, 12))  # the dataset reads in file order
    # An output with no notes still holds one part, so that it has its schema.
    [heldout] = (tmp_path / "out/heldout.parquet").iterdir()
    assert pq.read_table(heldout).num_rows == 0 and pq.read_schema(heldout).remove_metadata() == NOTE_SCHEMA
