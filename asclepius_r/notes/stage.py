"""Notes stage: NOTEEVENTS.csv(.gz) -> discharge notes for training + held-out notes for evaluation.

Policies follow the 2023 method by default (keep addenda, exact category match) and fix what it
lacked (drop ISERROR rows and exact-duplicate texts). Memory stays bounded: one pass over the
file keeps everything about the discharge summaries but their texts (ROW_IDs, SUBJECT_IDs, the
short columns, text hashes and where each record lies); once the held-out patients are known,
the kept notes' texts are read back a few row groups at a time into the two outputs, Parquet
datasets (folders of part files, in file order) that threads write in parallel.
Every dropped row is counted under one reason in stats.json; near misses of the category
('discharge summary ', say) are never kept silently but warned about with their counts.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from asclepius_r import config as workflow_config
from asclepius_r.config import ConfigError
from asclepius_r.files import atomic_path, write_json
from asclepius_r.logs import setup_logging
from asclepius_r.notes.noteevents import DISCHARGE_CATEGORY, Chunk, NoteEvents, NoteEventsError, locate_record

log = logging.getLogger(__name__)

KEPT_COLUMNS = ("ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "DESCRIPTION", "ISERROR", "TEXT")
# Why rows are dropped, in the order the checks apply: a row counts under the first that fits.
DROP_REASONS = ("other_category", "iserror", "addendum", "excluded", "duplicate_text")
OUTPUT_ROW_GROUP = 2048  # notes per Parquet row group of the outputs
# Each output is a Parquet dataset: a folder of part files of this many notes, in file order, which
# threads write in parallel: Arrow compresses a single file on one thread (BENCHMARKS.md, issue 3).
# A fixed size keeps the layout machine-independent.
OUTPUT_PART_NOTES = 4 * OUTPUT_ROW_GROUP
MAX_PART_WRITERS = 4  # each holds a row group or two in memory: the cap bounds the stage's memory
# Dictionary-encoding long, unique texts only costs time.
OUTPUT_PARQUET = {"compression": "zstd", "use_dictionary": ["HADM_ID", "CHARTDATE", "DESCRIPTION", "ISERROR"]}
NOTE_SCHEMA = pa.schema(
    [
        ("ROW_ID", pa.int64()),
        ("SUBJECT_ID", pa.int64()),
        ("HADM_ID", pa.string()),
        ("CHARTDATE", pa.string()),
        ("DESCRIPTION", pa.string()),
        ("ISERROR", pa.string()),
        ("TEXT", pa.string()),
    ]
)


@dataclass(frozen=True)
class NotePolicy:
    """What the notes stage keeps. Defaults: the 2023 choices plus the two obvious fixes."""

    drop_iserror: bool = True
    keep_addenda: bool = True
    drop_duplicate_text: bool = True
    coarse_placeholders: bool = False
    exclude_row_ids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_config(cls, section: dict) -> NotePolicy:
        """The `notes` section; `exclude_row_ids` names a file of one ROW_ID per line."""
        exclude = read_row_ids(Path(section["exclude_row_ids"])) if section["exclude_row_ids"] else frozenset()
        return cls(
            drop_iserror=section["drop_iserror"],
            keep_addenda=section["keep_addenda"],
            drop_duplicate_text=section["drop_duplicate_text"],
            coarse_placeholders=section["coarse_placeholders"],
            exclude_row_ids=exclude,
        )


def read_row_ids(path: Path) -> frozenset[int]:
    """The ROW_IDs of notes.exclude_row_ids, one per line. A wrong file (NOTEEVENTS itself, say)
    is named with its line number only: its content may be a note."""
    row_ids = set()
    try:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip() and not line.strip().isdigit():
                    raise ConfigError(
                        f"config key notes.exclude_row_ids: {path}:{number} is not a ROW_ID; the file must hold one "
                        "integer ROW_ID per line (the line is not shown: it may be note text)"
                    )
                if line.strip():
                    row_ids.add(int(line))
    except UnicodeDecodeError:
        raise ConfigError(f"config key notes.exclude_row_ids: {path} is not text (one ROW_ID per line)") from None
    return frozenset(row_ids)


@dataclass(frozen=True)
class SplitPolicy:
    """How many notes the evaluation holds out (whole patients), and the seed of the choice."""

    heldout_notes: int
    seed: int = 42

    @classmethod
    def from_config(cls, config: dict) -> SplitPolicy:
        """`notes.heldout_notes` and the workflow's `seed`."""
        return cls(heldout_notes=config["notes"]["heldout_notes"], seed=config["seed"])


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


# pa.array, pa.scalar and to_numpy would do for these five, but they import pandas, an import the
# stage otherwise avoids (its cost: BENCHMARKS.md, issue 3).
def _int64_array(values: np.ndarray) -> pa.Array:
    """numpy int64 -> Arrow, without a copy."""
    values = np.ascontiguousarray(values, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _string_scalar(value: str) -> pa.Scalar:
    data = value.encode()
    return pa.Array.from_buffers(
        pa.string(), 1, [None, pa.py_buffer(np.array([0, len(data)], np.int32)), pa.py_buffer(data)]
    )[0]


def _string_array(values: list[str]) -> pa.StringArray:
    data = [value.encode() for value in values]
    offsets = np.zeros(len(data) + 1, np.int32)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def _bools(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An Arrow boolean array without nulls (a comparison of non-null values) -> numpy."""
    mask = mask.combine_chunks() if isinstance(mask, pa.ChunkedArray) else mask
    bits = np.frombuffer(mask.buffers()[1], np.uint8)
    return np.unpackbits(bits, bitorder="little")[mask.offset : mask.offset + len(mask)].astype(bool)


def _int64s(column: pa.ChunkedArray) -> np.ndarray:
    """An Arrow int64 column without nulls -> numpy, without a copy."""
    array = column.combine_chunks()
    return np.frombuffer(array.buffers()[1], np.int64, len(array), array.offset * 8)


def _utf8_views(strings: pa.StringArray) -> Iterator[memoryview]:
    """Each value's bytes as a view into the array's buffer (no copies, no Python strings)."""
    offsets = np.frombuffer(strings.buffers()[1], np.int32, len(strings) + 1, strings.offset * 4)
    data = memoryview(strings.buffers()[2])
    for begin, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        yield data[begin:end]


def _to_int(array: pa.ChunkedArray) -> pa.Array:
    import pyarrow.compute as pc  # see _Filter.__call__

    return pc.cast(array, pa.int64()).combine_chunks()  # the scanner has checked ROW_IDs; SUBJECT_IDs fail here


class _Filter:
    """The policy filter over the scanner's chunks; counts every row it drops under the first reason that applies."""

    def __init__(self, path: Path, policy: NotePolicy):
        self.path, self.policy = path, policy
        self.counts = Counter({reason: 0 for reason in DROP_REASONS})
        self.categories: Counter[str] = Counter()
        self.rows_read = 0
        self.row_ids: list[np.ndarray] = []
        self.exclude = _int64_array(np.array(sorted(policy.exclude_row_ids), np.int64))

    @property
    def near_miss(self) -> Counter:
        return Counter({value: n for value, n in self.categories.items() if _is_near_miss(value)})

    def __call__(self, chunk: Chunk) -> tuple[pa.Table, np.ndarray, np.ndarray] | None:
        """The chunk's notes that pass the row-level policies (all columns but TEXT, ROW_ID and
        SUBJECT_ID as integers), where their records lie and their TEXT hashes."""
        if chunk.bad_row_id:
            row, _ = chunk.bad_row_id  # the value is not shown: in a shifted row it is note text
            data_row = self.rows_read + row + 1
            raise NoteEventsError(
                f"{self.path}: {locate_record(self.path, data_row=data_row)}, data row {data_row}: ROW_ID is not "
                "an integer (a stray quote or comma may have shifted the row's fields; the value is not shown)"
            )
        self.rows_read += chunk.rows
        self.row_ids.append(chunk.row_ids)
        self.categories.update(chunk.categories)
        selected = chunk.selected
        self.counts["other_category"] += chunk.rows - (selected.num_rows if selected else 0)
        if selected is None:
            return None
        # Imported here, where first used: that is while the scan's workers run, which hides its
        # import time behind the scan.
        import pyarrow.compute as pc

        policy = self.policy
        keep = np.ones(selected.num_rows, bool)
        for reason, applies, mask in (
            ("iserror", policy.drop_iserror, lambda: pc.equal(selected.column("ISERROR"), _string_scalar("1"))),
            (
                "addendum",
                not policy.keep_addenda,
                lambda: pc.equal(selected.column("DESCRIPTION"), _string_scalar("Addendum")),
            ),
            ("excluded", len(self.exclude) > 0, lambda: pc.is_in(_to_int(selected.column("ROW_ID")), self.exclude)),
        ):
            if applies:
                hit = keep & _bools(mask())
                self.counts[reason] += int(hit.sum())
                keep &= ~hit
        kept = selected.take(_int64_array(np.flatnonzero(keep)))
        try:
            subjects = _to_int(kept.column("SUBJECT_ID"))
        except pa.ArrowInvalid:
            raise NoteEventsError(
                f"{self.path}: {locate_record(self.path, row_id=self._bad_subject(kept))}: SUBJECT_ID is not an "
                "integer (the value is not shown)"
            ) from None
        table = pa.table(
            [
                _to_int(kept.column("ROW_ID")),
                subjects,
                *(kept.column(name).combine_chunks() for name in NOTE_SCHEMA.names[2:-1]),
            ],
            schema=NOTE_SCHEMA.remove(NOTE_SCHEMA.get_field_index("TEXT")),
        )
        return table, chunk.spans[keep], chunk.text_hashes[keep]

    @staticmethod
    def _bad_subject(kept: pa.Table) -> int:
        """The ROW_ID of the first note whose SUBJECT_ID does not convert (the error path only)."""
        for row_id, subject in zip(kept.column("ROW_ID").to_pylist(), kept.column("SUBJECT_ID").to_pylist()):
            try:
                _to_int(pa.chunked_array([[subject]], pa.string()))
            except pa.ArrowInvalid:
                return int(row_id)
        raise AssertionError("a SUBJECT_ID failed to convert, but none does alone")

    def first_copies(self, source: NoteEvents, hashes: np.ndarray, spans: np.ndarray) -> np.ndarray:
        """Whether each note is the first, in file order, with its exact TEXT; counts the others.

        Only notes whose 64-bit hash another note shares (the duplicates, and rare collisions) are
        read back and compared, by SHA-1 of their texts, a few row groups' worth at a time.
        """
        first = np.ones(len(hashes), bool)
        _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
        shared = np.flatnonzero(counts[inverse] > 1)  # ascending, so in file order
        seen: set[bytes] = set()
        for k in range(0, len(shared), OUTPUT_ROW_GROUP):
            rows = shared[k : k + OUTPUT_ROW_GROUP]
            for row, text in zip(rows.tolist(), _utf8_views(source.texts(spans[rows]))):
                digest = hashlib.sha1(text, usedforsecurity=False).digest()
                first[row] = digest not in seen
                seen.add(digest)
        self.counts["duplicate_text"] += int((~first).sum())
        return first

    def check_unique_row_ids(self) -> None:
        all_ids = np.concatenate(self.row_ids) if self.row_ids else np.empty(0, np.int64)
        if (all_ids[1:] > all_ids[:-1]).all():  # MIMIC's own order: no sort needed
            return
        values, counts = np.unique(all_ids, return_counts=True)
        if (counts > 1).any():
            duplicate = int(values[counts > 1][0])
            rows = np.flatnonzero(all_ids == duplicate)[:5] + 1
            where = locate_record(self.path, data_row=int(rows[1]))  # the second copy is the wrong one
            raise NoteEventsError(
                f"{self.path}: {where}: duplicate ROW_ID {duplicate} (data rows {', '.join(map(str, rows.tolist()))}); "
                "ROW_ID is the primary key of NOTEEVENTS"
            )


def filter_discharge(source: NoteEvents, policy: NotePolicy) -> tuple[_Filter, pa.Table, np.ndarray]:
    """Scan NOTEEVENTS once, keeping discharge summaries per `policy`. Returns the filter (its
    counts), the kept notes without their TEXT, in file order, and where their records lie."""
    keep = _Filter(source.path, policy)
    passed = [kept for chunk in source.scan(DISCHARGE_CATEGORY, columns=KEPT_COLUMNS) if (kept := keep(chunk))]
    keep.check_unique_row_ids()
    if not passed:
        return keep, pa.table({}), np.empty((0, 2), np.int64)
    tables, spans, hashes = zip(*passed)
    notes, spans = pa.concat_tables(tables).combine_chunks(), np.concatenate(spans)
    if policy.drop_duplicate_text:
        first = keep.first_copies(source, np.concatenate(hashes), spans)
        if not first.all():
            notes, spans = notes.take(_int64_array(np.flatnonzero(first))), spans[first]
    return keep, notes, spans


def _write_part(
    source: NoteEvents, notes: pa.Table, spans: np.ndarray, path: Path, rows: np.ndarray, policy: NotePolicy
) -> None:
    """One part file: the notes `rows`, TEXT read back from `source` a row group at a time into
    one byte array reused throughout (fresh pages cost the kernel's zeroing)."""
    import pyarrow.parquet as pq

    buffer = np.empty(0, np.uint8)
    with pq.ParquetWriter(path, NOTE_SCHEMA, **OUTPUT_PARQUET) as writer:
        for k in range(0, len(rows), OUTPUT_ROW_GROUP):
            group = rows[k : k + OUTPUT_ROW_GROUP]
            needed = source.text_bytes(spans[group])
            if len(buffer) < needed:
                buffer = np.empty(needed, np.uint8)
            texts = source.texts(spans[group], into=buffer)
            if policy.coarse_placeholders:
                texts = _string_array([coarsen_placeholders(t) for t in texts.to_pylist()])
            # Synchronous: the writer has copied what it needs before the buffer is reused.
            writer.write_table(notes.take(_int64_array(group)).append_column(NOTE_SCHEMA.field("TEXT"), texts))


def write_notes(
    source: NoteEvents, notes: pa.Table, spans: np.ndarray, outputs: list[tuple[Path, np.ndarray]], policy: NotePolicy
) -> None:
    """Write the notes chosen by each (folder, row indices) pair as part files of OUTPUT_PART_NOTES
    notes (at least one, so that an empty output still has its schema), TEXT read back from
    `source`; parts are written in parallel threads (reading and compressing release the GIL)."""
    parts = [
        (folder / f"part-{k:05d}.parquet", rows[start : start + OUTPUT_PART_NOTES])
        for folder, rows in outputs
        for k, start in enumerate(range(0, max(len(rows), 1), OUTPUT_PART_NOTES))
    ]
    with ThreadPoolExecutor(min(pa.cpu_count(), MAX_PART_WRITERS), thread_name_prefix="notes-write") as pool:
        for done in [pool.submit(_write_part, source, notes, spans, path, rows, policy) for path, rows in parts]:
            done.result()


def heldout_subjects(subjects: np.ndarray, policy: SplitPolicy) -> set[int]:
    """Choose whole patients, in a seeded hash order, until `heldout_notes` notes are held out.

    The choice depends only on the set of kept notes per patient, not on the file's row order.
    """
    unique, counts = np.unique(subjects, return_counts=True)
    notes_per_subject = dict(zip(unique.tolist(), counts.tolist()))
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
    again and again, the many long-lived objects that the imported libraries hold.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def stage_outputs(folder: str | Path) -> dict[str, Path]:
    """The stage's outputs inside `folder`, named as the workflow names them in results/notes/."""
    folder = Path(folder)
    return {
        "discharge_out": folder / "discharge.parquet",
        "heldout_out": folder / "heldout.parquet",
        "heldout_ids_out": folder / "heldout_row_ids.txt",
        "stats_out": folder / "stats.json",
    }


def run_notes_stage(
    noteevents: str | Path,
    discharge_out: str | Path,
    heldout_out: str | Path,
    heldout_ids_out: str | Path,
    stats_out: str | Path,
    policy: NotePolicy,
    split: SplitPolicy,
    threads: int | None = None,
) -> dict:
    """Run the whole notes stage; every output appears atomically or not at all.

    One pass over NOTEEVENTS finds and filters the discharge summaries, holding everything about
    them but their text; once the held-out patients are known, the kept notes' texts are read
    back from where they lie (see NoteEvents) into the training and held-out datasets (folders of
    Parquet part files, see OUTPUT_PART_NOTES).
    """
    noteevents = Path(noteevents)
    if threads:
        pa.set_cpu_count(threads)
    Path(discharge_out).parent.mkdir(parents=True, exist_ok=True)
    with (
        _cyclic_gc_paused(),
        tempfile.TemporaryDirectory(dir=Path(discharge_out).parent, prefix=".notes-staging.") as work,
        NoteEvents(noteevents, staging_dir=work) as source,
    ):
        kept, notes, spans = filter_discharge(source, policy)
        if notes.num_rows == 0:
            raise NoteEventsError(
                f"{noteevents}: no note is kept ({kept.rows_read} rows read; dropped: "
                f"{_reasons(kept.counts)}); check the file and the `notes` policies"
            )
        subjects = _int64s(notes.column("SUBJECT_ID"))
        held = heldout_subjects(subjects, split)
        is_held = np.isin(subjects, np.array(sorted(held), np.int64))
        n_held = int(is_held.sum())
        if n_held == len(subjects):
            raise NoteEventsError(
                f"config key notes.heldout_notes ({split.heldout_notes}) holds out all "
                f"{len(subjects)} kept notes of {noteevents}; none would be left for training"
            )
        with (
            atomic_path(discharge_out, is_dir=True) as tmp_train,
            atomic_path(heldout_out, is_dir=True) as tmp_held,
            atomic_path(heldout_ids_out) as tmp_ids,
        ):
            write_notes(
                source,
                notes,
                spans,
                [(tmp_held, np.flatnonzero(is_held)), (tmp_train, np.flatnonzero(~is_held))],
                policy,
            )
            heldout_ids = np.sort(_int64s(notes.column("ROW_ID"))[is_held])
            tmp_ids.write_text("".join(f"{i}\n" for i in heldout_ids.tolist()))
    if kept.near_miss:
        log.warning(
            "%d rows have a CATEGORY equal to %r except for case or spaces and were NOT kept: %s",
            sum(kept.near_miss.values()),
            DISCHARGE_CATEGORY,
            ", ".join(f"{value!r} x {n}" for value, n in kept.near_miss.most_common()),
        )
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
    log.info(
        "notes: read %d rows, kept %d for training and %d held out (%d patients); dropped: %s",
        stats["rows_read"],
        stats["kept_train"],
        stats["kept_heldout"],
        len(held),
        _reasons(kept.counts),
    )
    return stats


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{reason} {counts[reason]}" for reason in DROP_REASONS)


def read_notes(path: str | Path) -> list[dict]:
    """Notes as dicts with `row_id`, `subject_id`, `text`, in ROW_ID order, from a notes dataset
    (a folder of part files, as the notes stage writes) or a single Parquet file."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["ROW_ID", "SUBJECT_ID", "TEXT"]).sort_by("ROW_ID")
    return [
        {"row_id": r, "subject_id": s, "text": t}
        for r, s, t in zip(
            table.column("ROW_ID").to_pylist(), table.column("SUBJECT_ID").to_pylist(), table.column("TEXT").to_pylist()
        )
    ]


def main(argv: list[str] | None = None) -> None:
    """The stage without Snakemake: `python -m asclepius_r.notes.stage --config config.yaml [--out DIR]`."""

    parser = argparse.ArgumentParser(description="NOTEEVENTS.csv(.gz) -> discharge and held-out notes.")
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help="config file; repeat to lay one over another (like snakemake --configfile)",
    )
    parser.add_argument("--noteevents", help="NOTEEVENTS.csv(.gz) (default: the config's noteevents)")
    parser.add_argument("--out", default="results/notes", help="output folder (default: results/notes)")
    parser.add_argument("--threads", type=int, help="scan and writer threads (default: the core count)")
    parser.add_argument("--log", help="log file (default: stderr)")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    try:
        config = workflow_config.load_layers(args.config)
        if args.noteevents:
            config["noteevents"] = args.noteevents
        workflow_config.check_data_paths(config, ["noteevents"])
        run_notes_stage(
            config["noteevents"],
            **stage_outputs(args.out),
            policy=NotePolicy.from_config(config["notes"]),
            split=SplitPolicy.from_config(config),
            threads=args.threads,
        )
    except (workflow_config.ConfigError, NoteEventsError) as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
