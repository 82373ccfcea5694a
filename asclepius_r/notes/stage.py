"""Notes stage: NOTEEVENTS.csv(.gz) -> discharge notes for training + held-out notes for evaluation.

Policies follow the 2023 method by default (keep addenda, exact category match) and fix what it
lacked (drop ISERROR rows and exact-duplicate texts). One pass over the file filters it batch by
batch and spills the notes it keeps to a temporary Arrow file, holding only their ROW_IDs,
SUBJECT_IDs and text digests; once the held-out patients are known, the spill streams into the
two outputs, Parquet datasets (folders of part files, in file order). Memory stays flat at any
input size.
Every dropped row is counted under one reason in stats.json; near misses of the category
('discharge summary ', say) are never kept silently but warned about with their counts.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from asclepius_r import config as workflow_config
from asclepius_r.config import ConfigError
from asclepius_r.files import atomic_path, write_json
from asclepius_r.logs import setup_logging
from asclepius_r.notes.noteevents import DISCHARGE_CATEGORY, NoteEventsError, read_batches

log = logging.getLogger(__name__)

# Why rows are dropped, in the order the checks apply: a row counts under the first that fits.
DROP_REASONS = ("other_category", "iserror", "addendum", "excluded", "duplicate_text")
OUTPUT_ROW_GROUP = 2048  # notes per Parquet row group of the outputs
OUTPUT_PART_GROUPS = 4  # row groups per part file: each output is a Parquet dataset, a folder of parts
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
    """What the notes stage keeps (the `notes` section; the schema's defaults are the 2023 choices
    plus the two obvious fixes)."""

    drop_iserror: bool
    keep_addenda: bool
    drop_duplicate_text: bool
    coarse_placeholders: bool
    exclude_row_ids: frozenset[int]

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
    seed: int

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


class _Filter:
    """The policies over the reader's batches: counts every row it drops under the first reason that
    applies, and spills the notes it keeps (in file order, placeholders coarsened if asked) to `spill`."""

    def __init__(self, policy: NotePolicy, spill: pa.ipc.RecordBatchStreamWriter):
        self.policy, self.spill = policy, spill
        self.counts = Counter(dict.fromkeys(DROP_REASONS, 0))
        self.categories: Counter[str] = Counter()
        self.rows_read = 0
        self.row_ids: list[np.ndarray] = []  # of the kept notes
        self.subjects: list[np.ndarray] = []
        self.digests: set[bytes] = set()  # of the kept notes' texts
        self.exclude = pa.array(sorted(policy.exclude_row_ids), pa.int64())

    def __call__(self, batch: pa.RecordBatch) -> None:
        self.rows_read += batch.num_rows
        categories = pc.value_counts(batch["CATEGORY"])  # in order of first appearance
        self.categories.update(dict(zip(*(categories.field(name).to_pylist() for name in ("values", "counts")))))
        notes = batch.select(NOTE_SCHEMA.names).filter(pc.equal(batch["CATEGORY"], DISCHARGE_CATEGORY))
        self.counts["other_category"] += batch.num_rows - notes.num_rows
        policy = self.policy
        for reason, applies, drops in (
            ("iserror", policy.drop_iserror, lambda notes: pc.equal(notes["ISERROR"], "1")),
            ("addendum", not policy.keep_addenda, lambda notes: pc.equal(notes["DESCRIPTION"], "Addendum")),
            ("excluded", len(self.exclude) > 0, lambda notes: pc.is_in(notes["ROW_ID"], self.exclude)),
            ("duplicate_text", policy.drop_duplicate_text, self._kept_before),
        ):
            if applies:
                dropped = drops(notes)
                self.counts[reason] += dropped.true_count
                notes = notes.filter(pc.invert(dropped))
        if policy.coarse_placeholders:
            texts = pa.array([coarsen_placeholders(text) for text in notes["TEXT"].to_pylist()], pa.string())
            notes = notes.set_column(NOTE_SCHEMA.get_field_index("TEXT"), "TEXT", texts)
        self.spill.write_batch(notes)
        self.row_ids.append(notes["ROW_ID"].to_numpy())
        self.subjects.append(notes["SUBJECT_ID"].to_numpy())

    def _kept_before(self, notes: pa.RecordBatch) -> pa.BooleanArray:
        """Whether a note with the same TEXT was kept before this one (the first copy stays)."""
        repeated = []
        for text in notes["TEXT"]:
            digest = hashlib.sha1(text.as_buffer(), usedforsecurity=False).digest()
            repeated.append(digest in self.digests)
            self.digests.add(digest)
        return pa.array(repeated, pa.bool_())


def _spilled(path: str, chosen: np.ndarray) -> Iterator[pa.RecordBatch]:
    """The spilled notes where `chosen` (one flag a note, in spill order) is true."""
    with pa.input_stream(path) as source, pa.ipc.open_stream(source) as spill:
        offset = 0
        for notes in spill:
            yield notes.filter(pa.array(chosen[offset : offset + notes.num_rows]))
            offset += notes.num_rows


def _write_parts(notes: Iterator[pa.RecordBatch], folder: Path) -> None:
    """Notes, in the order they come, as part files of OUTPUT_PART_GROUPS row groups of OUTPUT_ROW_GROUP
    notes (at least one part, so that an empty output still has its schema)."""

    def row_groups() -> Iterator[pa.Table]:
        pending = NOTE_SCHEMA.empty_table()
        for batch in notes:
            pending = pa.concat_tables([pending, pa.Table.from_batches([batch])])
            while pending.num_rows >= OUTPUT_ROW_GROUP:
                yield pending.slice(0, OUTPUT_ROW_GROUP)
                pending = pending.slice(OUTPUT_ROW_GROUP)
        if pending.num_rows:
            yield pending

    groups = row_groups()
    group, part = next(groups, None), 0
    while part == 0 or group is not None:
        with pq.ParquetWriter(folder / f"part-{part:05d}.parquet", NOTE_SCHEMA, **OUTPUT_PARQUET) as writer:
            for _ in range(OUTPUT_PART_GROUPS):
                if group is None:
                    break
                writer.write_table(group.combine_chunks())  # one chunk: the pages do not depend on the batches
                group = next(groups, None)
        part += 1


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
    """Run the whole notes stage; every output appears atomically or not at all."""
    noteevents = Path(noteevents)
    if threads:
        pa.set_cpu_count(threads)
    Path(discharge_out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(discharge_out).parent, prefix=".notes-staging.") as work:
        spill_path = str(Path(work) / "kept.arrows")
        with pa.OSFile(spill_path, "wb") as sink, pa.ipc.new_stream(sink, NOTE_SCHEMA) as spill:
            kept = _Filter(policy, spill)
            for batch in read_batches(noteevents):
                kept(batch)
        subjects, row_ids = np.concatenate(kept.subjects), np.concatenate(kept.row_ids)
        if len(subjects) == 0:
            raise NoteEventsError(
                f"{noteevents}: no note is kept ({kept.rows_read} rows read; dropped: "
                f"{_reasons(kept.counts)}); check the file and the `notes` policies"
            )
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
            _write_parts(_spilled(spill_path, ~is_held), tmp_train)
            _write_parts(_spilled(spill_path, is_held), tmp_held)
            tmp_ids.write_text("".join(f"{i}\n" for i in np.sort(row_ids[is_held]).tolist()))
    near_miss = Counter({value: n for value, n in kept.categories.items() if _is_near_miss(value)})
    if near_miss:
        log.warning(
            "%d rows have a CATEGORY equal to %r except for case or spaces and were NOT kept: %s",
            sum(near_miss.values()),
            DISCHARGE_CATEGORY,
            ", ".join(f"{value!r} x {n}" for value, n in near_miss.most_common()),
        )
    stats = {
        "rows_read": kept.rows_read,
        "kept": len(subjects),
        "kept_train": len(subjects) - n_held,
        "kept_heldout": n_held,
        "heldout_subjects": len(held),
        "dropped": {reason: kept.counts[reason] for reason in DROP_REASONS},
        "near_miss_category": sum(near_miss.values()),
        "near_miss_category_values": dict(near_miss.most_common()),
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
    parser.add_argument("--threads", type=int, help="Arrow's threads (default: the core count)")
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
