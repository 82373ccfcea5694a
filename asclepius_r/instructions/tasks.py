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
    """Read `task<TAB>question` rows; every task needs at least three seeds. A wrong file (a
    notes file, say) is named with its line number only: its content may be a note."""
    seeds: dict[str, list[str]] = defaultdict(list)
    expected = "a TSV with columns task and question, one of the known tasks a row (the line is not shown)"
    try:
        with open(path, encoding="utf-8", newline="") as rows:
            reader = csv.DictReader(rows, delimiter="\t")
            for row in reader:
                task, question = row.get("task"), row.get("question")
                if task not in TASKS or not isinstance(question, str) or not question.strip():
                    raise InputError(f"{path}:{reader.line_num}: expected {expected}")
                seeds[task].append(question.strip())
    except (UnicodeDecodeError, csv.Error):
        raise InputError(f"{path}: expected {expected}") from None
    short = [t for t in TASKS if len(seeds[t]) < 3]
    if short:
        raise InputError(f"{path}: tasks with fewer than 3 seed questions: {', '.join(short)}")
    return dict(seeds)
