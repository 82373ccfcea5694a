"""The eight clinical NLP tasks, their seed questions and the seeded task draw per note."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

from asclepius_r.errors import InputError

# Index order of the 2023 code.
TASKS = (
    "Named Entity Recognition",
    "Abbreviation Expansion",
    "Relation Extraction",
    "Temporal Information Extraction",
    "Coreference Resolution",
    "Paraphrasing",
    "Summarization",
    "Question Answering",
)

DEFAULT_SEED_QUESTIONS = Path(__file__).parent / "data" / "seed_questions.tsv"


def draw_task(row_id: int, seed: int) -> str:
    """The task of one note: uniform over TASKS, fixed by (seed, ROW_ID), independent of order."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()
    return TASKS[int(digest, 16) % len(TASKS)]


def load_seed_questions(path: str | Path = DEFAULT_SEED_QUESTIONS) -> dict[str, list[str]]:
    """Read `task<TAB>question` rows; every task needs at least three seeds."""
    seeds: dict[str, list[str]] = defaultdict(list)
    with open(path, encoding="utf-8", newline="") as rows:
        for line_no, row in enumerate(csv.DictReader(rows, delimiter="\t"), start=2):
            if row.get("task") not in TASKS or not (row.get("question") or "").strip():
                raise InputError(f"{path}:{line_no}: expected a known task and a question, got {row}")
            seeds[row["task"]].append(row["question"].strip())
    short = [t for t in TASKS if len(seeds[t]) < 3]
    if short:
        raise ValueError(f"{path}: tasks with fewer than 3 seed questions: {', '.join(short)}")
    return dict(seeds)
