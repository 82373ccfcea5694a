"""Notes stage: NOTEEVENTS.csv(.gz) -> discharge notes for training + held-out notes for evaluation.

Policies follow the 2023 method by default (keep addenda, exact category match) and fix what it
lacked (drop ISERROR rows and exact-duplicate texts). Memory stays bounded: kept rows stream
into a temporary Parquet file, and only ROW_IDs, SUBJECT_IDs and text digests stay in memory.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from .files import atomic_path, write_json
from .noteevents import DISCHARGE_CATEGORY, NoteEventsError, iter_batches

log = logging.getLogger(__name__)

KEPT_COLUMNS = ("ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "DESCRIPTION", "ISERROR", "TEXT")
NOTE_SCHEMA = pa.schema(
    [("ROW_ID", pa.int64()), ("SUBJECT_ID", pa.int64()), ("HADM_ID", pa.string()),
     ("CHARTDATE", pa.string()), ("DESCRIPTION", pa.string()), ("ISERROR", pa.string()),
     ("TEXT", pa.string())]
)


@dataclass(frozen=True)
class NotePolicy:
    """What the notes stage keeps. Defaults: the 2023 choices plus the two obvious fixes."""

    drop_iserror: bool = True
    keep_addenda: bool = True
    drop_duplicate_text: bool = True
    coarse_placeholders: bool = False
    exclude_row_ids: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True)
class SplitPolicy:
    heldout_notes: int
    seed: int = 42


# 2023 rewrote de-identification placeholders into a few coarse tags and kept dates.
_PLACEHOLDER = re.compile(r"\[\*\*(.*?)\*\*\]", re.DOTALL)
_DATE = re.compile(r"^\s*\d{4}-\d{1,2}(-\d{1,2})?\s*$|^\s*\d{1,2}-\d{1,2}\s*$|^\s*\d{1,2}/\d{1,2}\s*$")
_NAME = re.compile(r"name|doctor|initials|lastname", re.IGNORECASE)
_PLACE = re.compile(r"hospital|location|address|state|country|university|college|company|ward|street", re.IGNORECASE)


def coarsen_placeholder(inner: str) -> str:
    """Map the inside of one `[**...**]` placeholder onto the 2023 coarse tags."""
    if _DATE.match(inner):
        return inner.strip()
    if _NAME.search(inner):
        return "[Name]"
    if _PLACE.search(inner):
        return "[LOC]"
    return "[#]"


def coarsen_placeholders(text: str) -> str:
    return _PLACEHOLDER.sub(lambda m: coarsen_placeholder(m.group(1)), text)


def _near_category(categories: pa.Array) -> pa.Array:
    """'Discharge summary' up to case or surrounding spaces, but not exactly it."""
    folded = pc.utf8_lower(pc.utf8_trim_whitespace(categories))
    return pc.and_(pc.equal(folded, DISCHARGE_CATEGORY.lower()),
                   pc.not_equal(categories, DISCHARGE_CATEGORY))


def _to_int(array: pa.Array, name: str, path: Path) -> np.ndarray:
    try:
        return pc.cast(array, pa.int64()).to_numpy()
    except pa.ArrowInvalid as err:
        bad = next(v for v in array.to_pylist() if not v.strip().lstrip("-").isdigit())
        raise NoteEventsError(f"{path}: {name} {bad!r} is not an integer") from err


def filter_discharge(noteevents: Path, staging: Path, policy: NotePolicy) -> tuple[Counter, np.ndarray]:
    """Stream NOTEEVENTS into `staging` (Parquet), keeping discharge summaries per `policy`.

    Returns the per-reason counts and the kept rows' SUBJECT_IDs (in file order).
    """
    counts: Counter = Counter()
    row_ids: list[np.ndarray] = []
    subjects: list[np.ndarray] = []
    seen_text: set[bytes] = set()
    exclude = pa.array(sorted(policy.exclude_row_ids), pa.int64())
    with pq.ParquetWriter(staging, NOTE_SCHEMA, compression="zstd") as writer, \
            tqdm(desc="NOTEEVENTS rows", unit=" rows", mininterval=5, disable=None) as bar:
        for batch in iter_batches(noteevents, columns=KEPT_COLUMNS + ("CATEGORY",)):
            counts["rows_read"] += batch.num_rows
            bar.update(batch.num_rows)
            ids = _to_int(batch.column("ROW_ID"), "ROW_ID", noteevents)
            row_ids.append(ids)
            category = batch.column("CATEGORY")
            counts["near_miss_category"] += pc.sum(_near_category(category)).as_py() or 0
            keep = pc.equal(category, DISCHARGE_CATEGORY)
            counts["dropped_other_category"] += batch.num_rows - pc.sum(keep).as_py()
            for reason, mask in (
                ("dropped_iserror", pc.equal(batch.column("ISERROR"), "1") if policy.drop_iserror else None),
                ("dropped_addendum", pc.equal(batch.column("DESCRIPTION"), "Addendum") if not policy.keep_addenda else None),
                ("dropped_excluded", pc.is_in(pa.array(ids), exclude) if len(exclude) else None),
            ):
                if mask is not None:
                    hit = pc.and_(keep, mask)
                    counts[reason] += pc.sum(hit).as_py() or 0
                    keep = pc.and_(keep, pc.invert(hit))
            kept = batch.filter(keep)
            if kept.num_rows == 0:
                continue
            texts = kept.column("TEXT").to_pylist()
            if policy.drop_duplicate_text:
                unique = []
                for text in texts:
                    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                    unique.append(digest not in seen_text)
                    seen_text.add(digest)
                counts["dropped_duplicate_text"] += unique.count(False)
                kept = kept.filter(pa.array(unique))
                texts = [t for t, u in zip(texts, unique) if u]
            if policy.coarse_placeholders:
                texts = [coarsen_placeholders(t) for t in texts]
            subject_ids = _to_int(kept.column("SUBJECT_ID"), "SUBJECT_ID", noteevents)
            subjects.append(subject_ids)
            writer.write_table(pa.table(
                [pa.array(_to_int(kept.column("ROW_ID"), "ROW_ID", noteevents)), pa.array(subject_ids),
                 kept.column("HADM_ID"), kept.column("CHARTDATE"), kept.column("DESCRIPTION"),
                 kept.column("ISERROR"), pa.array(texts, pa.string())],
                schema=NOTE_SCHEMA,
            ))
    if counts["rows_read"] == 0:
        raise NoteEventsError(f"{noteevents}: header only, no note rows")
    all_ids = np.concatenate(row_ids)
    unique_ids, first = np.unique(all_ids, return_counts=True)
    if (first > 1).any():
        dup = int(unique_ids[first > 1][0])
        raise NoteEventsError(f"{noteevents}: duplicate ROW_ID {dup} (ROW_ID is the primary key)")
    return counts, (np.concatenate(subjects) if subjects else np.empty(0, np.int64))


def heldout_subjects(subjects: np.ndarray, policy: SplitPolicy) -> set[int]:
    """Choose whole patients, in a seeded hash order, until `heldout_notes` notes are held out."""
    notes_per_subject = Counter(subjects.tolist())
    order = sorted(notes_per_subject, key=lambda s: hashlib.sha256(f"{policy.seed}:{s}".encode()).digest())
    chosen, held = set(), 0
    for subject in order:
        if held >= policy.heldout_notes:
            break
        chosen.add(subject)
        held += notes_per_subject[subject]
    return chosen


def run_notes_stage(
    noteevents: str | Path, discharge_out: str | Path, heldout_out: str | Path,
    heldout_ids_out: str | Path, stats_out: str | Path, policy: NotePolicy, split: SplitPolicy,
) -> dict:
    """Run the whole notes stage; every output appears atomically or not at all."""
    noteevents = Path(noteevents)
    Path(discharge_out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(discharge_out).parent, prefix=".notes-staging.") as work:
        staging = Path(work) / "kept.parquet"
        counts, subjects = filter_discharge(noteevents, staging, policy)
        held = heldout_subjects(subjects, split)
        held_array = pa.array(sorted(held), pa.int64())
        table = pq.read_table(staging)
        is_held = pc.is_in(table.column("SUBJECT_ID"), held_array)
        heldout, train = table.filter(is_held), table.filter(pc.invert(is_held))
        with atomic_path(discharge_out) as tmp_train, atomic_path(heldout_out) as tmp_held, \
                atomic_path(heldout_ids_out) as tmp_ids:
            pq.write_table(train, tmp_train, compression="zstd")
            pq.write_table(heldout, tmp_held, compression="zstd")
            tmp_ids.write_text("".join(f"{i}\n" for i in sorted(heldout.column("ROW_ID").to_pylist())))
    if counts["near_miss_category"]:
        log.warning("%d rows have a CATEGORY equal to %r except for case or spaces; they were NOT kept",
                    counts["near_miss_category"], DISCHARGE_CATEGORY)
    stats = {
        "rows_read": counts["rows_read"],
        "kept_train": train.num_rows,
        "kept_heldout": heldout.num_rows,
        "heldout_subjects": len(held),
        "dropped": {k.removeprefix("dropped_"): counts[k] for k in sorted(counts) if k.startswith("dropped_")},
        "near_miss_category": counts["near_miss_category"],
    }
    write_json(stats_out, stats)
    log.info("notes: read %d rows, kept %d for training and %d held out",
             stats["rows_read"], stats["kept_train"], stats["kept_heldout"])
    return stats


def read_notes(path: str | Path) -> list[dict]:
    """Notes as dicts with `row_id`, `subject_id`, `text`, in ROW_ID order."""
    table = pq.read_table(path, columns=["ROW_ID", "SUBJECT_ID", "TEXT"]).sort_by("ROW_ID")
    return [{"row_id": r, "subject_id": s, "text": t} for r, s, t in zip(
        table.column("ROW_ID").to_pylist(), table.column("SUBJECT_ID").to_pylist(),
        table.column("TEXT").to_pylist())]
