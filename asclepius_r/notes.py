"""Notes stage: NOTEEVENTS.csv(.gz) -> discharge notes for training + held-out notes for evaluation.

Policies follow the 2023 method by default (keep addenda, exact category match) and fix what it
lacked (drop ISERROR rows and exact-duplicate texts). Memory stays bounded: kept rows stream
into a temporary Parquet file, and only ROW_IDs, SUBJECT_IDs and text digests stay in memory.
Every dropped row is counted under one reason in stats.json; near misses of the category
('discharge summary ', say) are never kept silently but warned about with their counts.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .files import atomic_path, write_json
from .noteevents import DISCHARGE_CATEGORY, Chunk, NoteEventsError, scan

log = logging.getLogger(__name__)

KEPT_COLUMNS = ("ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "DESCRIPTION", "ISERROR", "TEXT")
# Why rows are dropped, in the order the checks apply: a row counts under the first that fits.
DROP_REASONS = ("other_category", "iserror", "addendum", "excluded", "duplicate_text")
OUTPUT_ROW_GROUP = 2048  # notes per Parquet row group of the outputs (about 20 MB of text)
# Dictionary-encoding long, unique texts only costs time.
OUTPUT_PARQUET = {"compression": "zstd", "use_dictionary": ["HADM_ID", "CHARTDATE", "DESCRIPTION", "ISERROR"]}
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
    """How many notes the evaluation holds out (whole patients), and the seed of the choice."""

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


def _is_near_miss(category: str) -> bool:
    """'Discharge summary' up to case or surrounding spaces, but not exactly it."""
    return category != DISCHARGE_CATEGORY and category.strip().lower() == DISCHARGE_CATEGORY.lower()


def _to_int(array: pa.ChunkedArray) -> pa.Array:
    return pc.cast(array, pa.int64()).combine_chunks()  # the scanner has checked ROW_IDs; SUBJECT_IDs fail here


def _utf8_views(strings: pa.StringArray) -> Iterator[memoryview]:
    """Each value's bytes as a view into the array's buffer (no copies, no Python strings)."""
    offsets = np.frombuffer(strings.buffers()[1], np.int32, len(strings) + 1, strings.offset * 4)
    data = memoryview(strings.buffers()[2])
    for begin, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        yield data[begin:end]


class _Filter:
    """The policy filter over the scanner's chunks; counts every row it drops under the first reason that applies."""

    def __init__(self, path: Path, policy: NotePolicy):
        self.path, self.policy = path, policy
        self.counts = Counter({reason: 0 for reason in DROP_REASONS})
        self.categories: Counter[str] = Counter()
        self.rows_read = 0
        self.row_ids: list[np.ndarray] = []
        self.seen_text: set[bytes] = set()
        # From numpy, not lists: pa.array of a list imports pandas (half a second).
        self.exclude = pa.array(np.array(sorted(policy.exclude_row_ids), np.int64))

    @property
    def near_miss(self) -> Counter:
        return Counter({value: n for value, n in self.categories.items() if _is_near_miss(value)})

    def __call__(self, chunk: Chunk) -> pa.RecordBatch | None:
        if chunk.bad_row_id:
            row, value = chunk.bad_row_id
            raise NoteEventsError(f"{self.path}: data row {self.rows_read + row + 1}: ROW_ID {value!r} "
                                  f"is not an integer")
        self.rows_read += chunk.rows
        self.row_ids.append(chunk.row_ids)
        self.categories.update(chunk.categories)
        kept = chunk.selected
        self.counts["other_category"] += chunk.rows - (kept.num_rows if kept else 0)
        if kept is None:
            return None
        policy = self.policy
        keep = pa.array(np.ones(kept.num_rows, bool))
        for reason, applies, mask in (
            ("iserror", policy.drop_iserror, lambda: pc.equal(kept.column("ISERROR"), "1")),
            ("addendum", not policy.keep_addenda, lambda: pc.equal(kept.column("DESCRIPTION"), "Addendum")),
            ("excluded", len(self.exclude) > 0, lambda: pc.is_in(_to_int(kept.column("ROW_ID")), self.exclude)),
        ):
            if applies:
                hit = pc.and_(keep, mask())
                self.counts[reason] += pc.sum(hit).as_py() or 0
                keep = pc.and_(keep, pc.invert(hit))
        kept = (kept if pc.all(keep).as_py() else kept.filter(keep)).combine_chunks()
        if policy.drop_duplicate_text and kept.num_rows:
            # Digests of the texts' bytes, read in place; the first of identical texts (in file order) is kept.
            # SHA-1 (the fastest hashlib digest here, 1.5 GB/s) is ample against accidental collisions.
            first_seen = np.empty(kept.num_rows, bool)
            for row, text in enumerate(_utf8_views(kept.column("TEXT").chunk(0))):
                digest = hashlib.sha1(text, usedforsecurity=False).digest()
                first_seen[row] = digest not in self.seen_text
                self.seen_text.add(digest)
            self.counts["duplicate_text"] += int((~first_seen).sum())
            if not first_seen.all():
                kept = kept.filter(pa.array(first_seen))
        texts = kept.column("TEXT").combine_chunks()
        if policy.coarse_placeholders:
            texts = pa.array([coarsen_placeholders(t) for t in texts.to_pylist()], pa.string())
        try:
            subjects = _to_int(kept.column("SUBJECT_ID"))
        except pa.ArrowInvalid:
            raise NoteEventsError(f"{self.path}: a SUBJECT_ID of a discharge summary near data row "
                                  f"{self.rows_read} is not an integer") from None
        return pa.record_batch(
            [_to_int(kept.column("ROW_ID")), subjects,
             *(kept.column(name).combine_chunks() for name in ("HADM_ID", "CHARTDATE", "DESCRIPTION", "ISERROR")),
             texts],
            schema=NOTE_SCHEMA,
        )

    def check_unique_row_ids(self) -> None:
        all_ids = np.concatenate(self.row_ids) if self.row_ids else np.empty(0, np.int64)
        values, counts = np.unique(all_ids, return_counts=True)
        if (counts > 1).any():
            duplicate = int(values[counts > 1][0])
            rows = ", ".join(str(i + 1) for i in np.flatnonzero(all_ids == duplicate)[:5])
            raise NoteEventsError(f"{self.path}: duplicate ROW_ID {duplicate} (data rows {rows}); "
                                  f"ROW_ID is the primary key of NOTEEVENTS")


def filter_discharge(noteevents: Path, staging: Path, policy: NotePolicy) -> tuple[_Filter, np.ndarray]:
    """Stream NOTEEVENTS into `staging` (an Arrow IPC file: written and read back at memory
    speed, unlike Parquet), keeping discharge summaries per `policy`. Returns the filter (its
    counts) and the SUBJECT_ID of every kept note."""
    keep = _Filter(noteevents, policy)
    pending: list[pa.RecordBatch] = []
    subjects: list[np.ndarray] = []
    with pa.OSFile(str(staging), "wb") as sink, pa.ipc.new_file(sink, NOTE_SCHEMA) as writer:
        # Batches of OUTPUT_ROW_GROUP notes: the split reads them back one at a time, one output row group each.
        for chunk in scan(noteevents, DISCHARGE_CATEGORY, columns=KEPT_COLUMNS):
            kept = keep(chunk)
            if kept is not None and kept.num_rows:
                pending.append(kept)
                subjects.append(kept.column("SUBJECT_ID").to_numpy())
            if sum(batch.num_rows for batch in pending) >= OUTPUT_ROW_GROUP:
                writer.write_table(pa.Table.from_batches(pending).combine_chunks())
                pending = []
        if pending:
            writer.write_table(pa.Table.from_batches(pending).combine_chunks())
    keep.check_unique_row_ids()
    return keep, np.concatenate(subjects) if subjects else np.empty(0, np.int64)


def heldout_subjects(subjects: np.ndarray, policy: SplitPolicy) -> set[int]:
    """Choose whole patients, in a seeded hash order, until `heldout_notes` notes are held out.

    The choice depends only on the set of kept notes per patient, not on the file's row order.
    """
    notes_per_subject = Counter(subjects.tolist())
    order = sorted(notes_per_subject, key=lambda s: hashlib.sha256(f"{policy.seed}:{s}".encode()).digest())
    chosen, held = set(), 0
    for subject in order:
        if held >= policy.heldout_notes:
            break
        chosen.add(subject)
        held += notes_per_subject[subject]
    return chosen


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Pause Python's cyclic garbage collector while the stage runs.

    The stage's own objects are freed by reference counting; the collector would only traverse,
    again and again, the ~10^5 objects that numba and Arrow hold (about a tenth of the stage's
    CPU time, measured).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def run_notes_stage(
    noteevents: str | Path, discharge_out: str | Path, heldout_out: str | Path,
    heldout_ids_out: str | Path, stats_out: str | Path, policy: NotePolicy, split: SplitPolicy,
    threads: int | None = None,
) -> dict:
    """Run the whole notes stage; every output appears atomically or not at all.

    Two streaming passes: NOTEEVENTS -> a staging file of kept notes, then staging ->
    training and held-out files once the held-out patients are known. Memory holds only one
    batch, the ROW_IDs and the kept texts' digests.
    """
    noteevents = Path(noteevents)
    if threads:
        pa.set_cpu_count(threads)
    Path(discharge_out).parent.mkdir(parents=True, exist_ok=True)
    with _cyclic_gc_paused(), tempfile.TemporaryDirectory(dir=Path(discharge_out).parent, prefix=".notes-staging.") as work:
        staging = Path(work) / "kept.arrow"
        kept, subjects = filter_discharge(noteevents, staging, policy)
        if len(subjects) == 0:
            raise NoteEventsError(f"{noteevents}: no note is kept ({kept.rows_read} rows read; dropped: "
                                  f"{_reasons(kept.counts)}); check the file and the `notes` policies")
        held = heldout_subjects(subjects, split)
        n_held = int(np.isin(subjects, list(held)).sum())
        if n_held == len(subjects):
            raise NoteEventsError(f"config key notes.heldout_notes ({split.heldout_notes}) holds out all "
                                  f"{len(subjects)} kept notes of {noteevents}; none would be left for training")
        held_array = pa.array(np.array(sorted(held), np.int64))
        heldout_ids = []
        with atomic_path(discharge_out) as tmp_train, atomic_path(heldout_out) as tmp_held, \
                atomic_path(heldout_ids_out) as tmp_ids, \
                pq.ParquetWriter(tmp_train, NOTE_SCHEMA, **OUTPUT_PARQUET) as train_writer, \
                pq.ParquetWriter(tmp_held, NOTE_SCHEMA, **OUTPUT_PARQUET) as heldout_writer, \
                pa.OSFile(str(staging)) as source:
            staged = pa.ipc.open_file(source)
            for index in range(staged.num_record_batches):  # one at a time (read, not mapped): memory stays flat
                batch = pa.Table.from_batches([staged.get_batch(index)])
                is_held = pc.is_in(batch.column("SUBJECT_ID"), held_array)
                train_writer.write_table(batch.filter(pc.invert(is_held)))
                heldout = batch.filter(is_held)
                heldout_writer.write_table(heldout)
                heldout_ids.extend(heldout.column("ROW_ID").to_pylist())
            tmp_ids.write_text("".join(f"{i}\n" for i in sorted(heldout_ids)))
    if kept.near_miss:
        log.warning("%d rows have a CATEGORY equal to %r except for case or spaces and were NOT kept: %s",
                    sum(kept.near_miss.values()), DISCHARGE_CATEGORY,
                    ", ".join(f"{value!r} x {n}" for value, n in kept.near_miss.most_common()))
    stats = {
        "rows_read": kept.rows_read,
        "kept": len(subjects),
        "kept_train": len(subjects) - n_held,
        "kept_heldout": n_held,
        "heldout_subjects": len(held),
        "dropped": {reason: kept.counts[reason] for reason in DROP_REASONS},
        "near_miss_category": sum(kept.near_miss.values()),
        "near_miss_category_values": dict(kept.near_miss.most_common()),
        "rows_per_category": dict(kept.categories.most_common()),
    }
    write_json(stats_out, stats)
    log.info("notes: read %d rows, kept %d for training and %d held out (%d patients); dropped: %s",
             stats["rows_read"], stats["kept_train"], stats["kept_heldout"], len(held), _reasons(kept.counts))
    return stats


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{reason} {counts[reason]}" for reason in DROP_REASONS)


def read_notes(path: str | Path) -> list[dict]:
    """Notes as dicts with `row_id`, `subject_id`, `text`, in ROW_ID order."""
    table = pq.read_table(path, columns=["ROW_ID", "SUBJECT_ID", "TEXT"]).sort_by("ROW_ID")
    return [{"row_id": r, "subject_id": s, "text": t} for r, s, t in zip(
        table.column("ROW_ID").to_pylist(), table.column("SUBJECT_ID").to_pylist(),
        table.column("TEXT").to_pylist())]
