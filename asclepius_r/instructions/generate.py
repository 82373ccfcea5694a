"""Instruction generation: one question and one answer per note, self-instruct style.

Each note gets a task drawn with a fixed seed. Its question prompt shows three of the task's
seed questions and up to two questions accepted for that task from notes at least `pool_lag`
notes before it in ROW_ID order. Requests flow continuously: a note's answer is asked as soon as
its question is back, and a note starts as soon as every note `pool_lag` before it is settled
(accepted or not, in ROW_ID order), so up to `pool_lag` notes are in progress and the rate limit
stays busy through slow answers. What a prompt shows depends only on settled notes, so the
prompts, the archive keys and the dataset are the same whatever the latency, the requests in
flight or the crashes and reruns.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import csv
import json
import logging
import math
import os
import random
import re
import tempfile
from array import array
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from asclepius_r import config as workflow_config
from asclepius_r.errors import InputError
from asclepius_r.files import atomic_path, write_json
from asclepius_r.instructions.tasks import DEFAULT_SEED_QUESTIONS, draw_task, load_seed_questions
from asclepius_r.llm import ChatRequest, LLMClient, LLMSettings
from asclepius_r.logs import setup_logging
from asclepius_r.prompts import render_answer_prompt, render_question_prompt
from asclepius_r.rouge import rouge_l_of_tokens, tokens

log = logging.getLogger(__name__)

# 2023 post-filter: texts in which the generator talks about being a model.
MODEL_MENTION = re.compile(r"\b(language model|ai model|the model|as an ai|an ai assistant)\b", re.IGNORECASE)
_LEADING_NOISE = re.compile(r"^\s*(?:[-*•]|\d+[.)]|q(?:uestion)?\s*:|instruction\s*:)\s*", re.IGNORECASE)

DATASET_COLUMNS = ["note", "question", "answer", "task"]


@dataclass(frozen=True)
class GenerationSettings:
    """The `instructions` section of the config, plus the workflow seed."""

    seed: int
    pool_lag: int
    near_duplicate_rouge: float | None  # self-instruct used 0.7; the 2023 run had none
    seed_questions: str | Path
    # The method's own shape, no config key: seed and pool questions shown in one prompt.
    seeds_per_prompt: int = 3
    pool_per_prompt: int = 2

    @classmethod
    def from_config(cls, config: dict) -> GenerationSettings:
        """The `instructions` section and the workflow's `seed`."""
        section = config["instructions"]
        return cls(
            seed=config["seed"],
            pool_lag=section["pool_lag"],
            near_duplicate_rouge=section["near_duplicate_rouge"],
            seed_questions=section["seed_questions"] or DEFAULT_SEED_QUESTIONS,
        )


class NoteTexts:
    """The notes in ROW_ID order, each text read from disk when asked for, so the stage's memory
    does not grow with the notes (57k MIMIC discharge summaries hold about 550 MB of text).

    The texts are copied once, in ROW_ID order, into an unlinked temporary file beside the
    stage's output, whatever the order of the Parquet parts: two passes of record batches, the
    first for the ROW_IDs and text lengths, the second writing each text at its place.
    """

    BATCH_ROWS = 1024

    def __init__(self, row_ids: list[int], offsets: array, spill):
        self.row_ids, self.offsets, self.spill = row_ids, offsets, spill

    @classmethod
    def read(cls, path: str | Path, spill_dir: str | Path | None = None) -> NoteTexts:
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        files = ds.dataset(str(path), format="parquet").files

        def batches(columns):
            for file in files:
                yield from pq.ParquetFile(file).iter_batches(batch_size=cls.BATCH_ROWS, columns=columns)

        row_ids, lengths = [], []
        for batch in batches(["ROW_ID", "TEXT"]):
            row_ids += batch.column("ROW_ID").to_pylist()
            lengths += pc.binary_length(batch.column("TEXT")).to_pylist()
        order = sorted(range(len(row_ids)), key=row_ids.__getitem__)
        offsets, start = array("q", [0] * (len(order) + 1)), array("q", [0] * len(order))
        for rank, i in enumerate(order):
            start[i] = offsets[rank]
            offsets[rank + 1] = offsets[rank] + lengths[i]
        spill = tempfile.TemporaryFile(dir=spill_dir)
        i = 0
        for batch in batches(["TEXT"]):
            for text in batch.column("TEXT").to_pylist():
                os.pwrite(spill.fileno(), text.encode("utf-8"), start[i])
                i += 1
        return cls([row_ids[i] for i in order], offsets, spill)

    @classmethod
    def from_dicts(cls, notes: list[dict]) -> NoteTexts:
        notes = sorted(notes, key=lambda n: n["row_id"])
        spill = tempfile.TemporaryFile()
        offsets = array("q", [0])
        for note in notes:
            offsets.append(offsets[-1] + spill.write(note["text"].encode("utf-8")))
        spill.flush()
        return cls([n["row_id"] for n in notes], offsets, spill)

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, position: int) -> dict:
        start, end = self.offsets[position], self.offsets[position + 1]
        text = os.pread(self.spill.fileno(), end - start, start).decode("utf-8")
        return {"row_id": self.row_ids[position], "text": text}


def clean_question(text: str) -> str:
    """The first non-empty line, without list markers or wrapping quotes."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    return _LEADING_NOISE.sub("", line).strip().strip('"“”').strip()


def question_request(note: dict, task: str, examples: list[str], client: LLMClient) -> ChatRequest:
    s = client.settings
    return ChatRequest(
        model=s.model,
        messages=(("user", render_question_prompt(task, note["text"], examples)),),
        temperature=s.temperature,
        max_tokens=s.max_tokens,
        meta={"row_id": note["row_id"], "phase": "question", "task": task},
    )


def answer_request(note: dict, task: str, question: str, client: LLMClient) -> ChatRequest:
    s = client.settings
    return ChatRequest(
        model=s.model,
        messages=(("user", render_answer_prompt(note["text"], question)),),
        temperature=s.temperature,
        max_tokens=s.max_tokens,
        meta={"row_id": note["row_id"], "phase": "answer", "task": task},
    )


class NearDuplicateIndex:
    """Earlier questions of one task, indexed so that a new question is compared (by ROUGE-L) only
    with those that could exceed the threshold: the all-pairs scan of self-instruct is quadratic.

    Prefix filtering, exact: ROUGE-L F = 2 L / (n + m) > t needs an LCS L > t (n + m) / 2, so L
    at least L_n = t n / (2 - t) and at least L_m = t m / (2 - t) (as L <= m and L <= n), and an
    LCS is a shared multiset of words. Under one fixed order of the words, rarest first, the k
    first shared words (k <= L) lie among the first n - L + k words of each question, hence
    among its first n - L_n + k. So each question is indexed under its first m - L_m + 3 words
    only, a new one probes with its own first n - L_n + 3, and a candidate needs three hits (or
    L's bound, if lower): common words are in few prefixes, and questions that share two
    middling-common words, frequent among thousands, rarely share three. The order is the
    words' counts when the index was last rebuilt (words seen since then count as rarest); the
    index rebuilds itself each time it doubles, so the order follows the questions at a linear
    total cost. A candidate is then checked for enough shared words before its LCS is computed.
    The questions' word codes are kept end to end in two flat arrays, with no object per question
    (4 bytes a word): the index's memory grows with the words, a few dozen bytes a question.
    """

    HITS = 3  # prefix hits a candidate needs where the LCS bound allows (fewer where it is lower)
    FIRST_REBUILD = 64

    def __init__(self, threshold: float, questions: list[str] = ()):
        self.threshold = threshold
        self.codes: dict[str, int] = {}  # word -> code; a word's k-th occurrence is the word "word#k"
        self.counts: Counter = Counter()  # occurrence code -> questions holding it
        self.order: dict[int, int] = {}  # occurrence code -> its count at the last rebuild
        # every indexed question's word codes (text order) and occurrence codes, end to end
        self.words, self.occurrences, self.ends = array("I"), array("I"), array("Q", [0])
        self.postings: dict[int, array] = defaultdict(lambda: array("I"))
        self.rebuild_at = self.FIRST_REBUILD
        self._last: tuple[str | None, tuple[array, array] | None] = (None, None)
        for question in questions:
            self.add(question)

    def _encode(self, question: str) -> tuple[array, array]:
        if self._last[0] == question:  # the stage adds the question it has just checked
            return self._last[1]
        words, occurrences, seen = array("I"), array("I"), Counter()
        for word in tokens(question):
            words.append(self.codes.setdefault(word, len(self.codes)))
            seen[word] += 1
            occurrences.append(self.codes.setdefault(f"{word}#{seen[word]}", len(self.codes)))
        self._last = (question, (words, occurrences))
        return words, occurrences

    def _min_lcs(self, length: float) -> int:
        """The least LCS that can beat the threshold, a hair low so float rounding never excludes a pair."""
        return max(1, math.ceil(self.threshold * length / (2 - self.threshold) - 1e-9))

    def _prefix(self, occurrences: array) -> list[int]:
        """The first words in the order: `HITS` - 1 beyond the n - L_n + 1 that must meet."""
        ordered = sorted(occurrences, key=lambda code: (self.order.get(code, 0), code))
        return ordered[: len(ordered) - self._min_lcs(len(ordered)) + self.HITS]

    def is_near_duplicate(self, question: str) -> bool:
        if self.threshold >= 1:  # ROUGE-L F is at most 1
            return False
        words, occurrences = self._encode(question)
        if not words:
            return False
        n, shared, least = len(words), set(occurrences), self._min_lcs(len(words))
        postings = [self.postings[code] for code in self._prefix(occurrences) if code in self.postings]
        if not postings:
            return False
        # the postings grow with the index: count the hits in numpy, not one by one in Python
        ids, counts = np.unique(
            np.concatenate([np.frombuffer(p, dtype=np.uint32) for p in postings]), return_counts=True
        )
        enough = counts >= min(self.HITS, least)
        for i, count in zip(ids[enough].tolist(), counts[enough].tolist()):
            start, end = self.ends[i], self.ends[i + 1]
            m = end - start
            if count < min(self.HITS, max(least, self._min_lcs(m))):
                continue
            # the LCS is at most the shorter length and the shared words: both must reach the bound
            needed = max(1, math.ceil(self.threshold * (n + m) / 2 - 1e-9))
            if min(n, m) < needed or sum(code in shared for code in self.occurrences[start:end]) < needed:
                continue
            if rouge_l_of_tokens(words, self.words[start:end]) > self.threshold:
                return True
        return False

    def __len__(self) -> int:
        return len(self.ends) - 1

    def add(self, question: str) -> None:
        words, occurrences = self._encode(question)
        self.counts.update(occurrences)
        self.words.extend(words)
        self.occurrences.extend(occurrences)
        self.ends.append(len(self.words))
        if len(self) >= self.rebuild_at:
            self._rebuild()
        else:
            self._post(len(self) - 1)

    def _post(self, i: int) -> None:
        for code in self._prefix(self.occurrences[self.ends[i] : self.ends[i + 1]]):
            self.postings[code].append(i)

    def _rebuild(self) -> None:
        self.order = dict(self.counts)
        self.postings.clear()
        for i in range(len(self)):
            self._post(i)
        self.rebuild_at = 2 * len(self)


def _rejection(note: dict, question: str, answer: str, earlier: NearDuplicateIndex | None) -> str | None:
    if not question:
        return "empty_question"
    if not answer.strip():
        return "empty_answer"
    if any(MODEL_MENTION.search(t) for t in (note["text"], question, answer)):
        return "model_mention"
    if answer.rstrip().endswith("?"):
        return "answer_is_question"
    if earlier is not None and earlier.is_near_duplicate(question):
        return "near_duplicate"
    return None


class _Prefix(Sequence):
    """The first `length` items of a list, without copying them: `random.sample` draws the same
    items from it as from the copied slice (it picks by index), at no cost per item."""

    def __init__(self, items: list, length: int):
        self.items, self.length = items, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.items[index]


class _Pools:
    """Accepted questions per task with the position of their note, in note order, so that a
    note is shown only those of notes at least `lag` before it, however far settling has got."""

    def __init__(self, lag: int):
        self.lag = lag
        self.questions: dict[str, list[str]] = defaultdict(list)
        self.positions: dict[str, array] = defaultdict(lambda: array("q"))

    def add(self, task: str, position: int, question: str) -> None:
        self.questions[task].append(question)
        self.positions[task].append(position)

    def visible(self, task: str, position: int) -> _Prefix:
        return _Prefix(self.questions[task], bisect.bisect_right(self.positions[task], position - self.lag))


def generate(notes: list[dict], client: LLMClient, settings: GenerationSettings) -> tuple[list[dict], dict]:
    """Return one record per note (accepted or with the reason it was not) and the counts."""
    records: list[dict] = []
    stats = generate_into(notes, client, settings, records.append)
    return records, stats


def generate_into(notes, client: LLMClient, settings: GenerationSettings, emit) -> dict:
    """Call `emit(record)` for each note in ROW_ID order as soon as it is settled (nothing is kept
    for the notes already done) and return the counts. `notes` may be a `NoteTexts`."""
    if not isinstance(notes, NoteTexts):
        notes = NoteTexts.from_dicts(notes)
    outcomes: Counter = Counter()
    per_task: Counter = Counter()

    def settled(record: dict) -> None:
        outcomes[record["status"]] += 1
        if record["status"] == "ok":
            per_task[record["task"]] += 1
        emit(record)

    with client.progress(2 * len(notes), "instructions") as bar:
        client.drive(_generate(notes, client, settings, bar, settled))
    return {
        "notes": len(notes),
        "outcomes": dict(sorted(outcomes.items())),
        "per_task": dict(sorted(per_task.items())),
        "llm": client.stats,
    }


async def _generate(notes: NoteTexts, client: LLMClient, settings: GenerationSettings, bar, emit) -> None:
    seeds = load_seed_questions(settings.seed_questions)
    pools = _Pools(settings.pool_lag)
    earlier = (
        {task: NearDuplicateIndex(settings.near_duplicate_rouge, seeds[task]) for task in seeds}
        if settings.near_duplicate_rouge is not None
        else {}
    )

    async def ask_note(position: int) -> dict:
        note = notes[position]
        task = draw_task(note["row_id"], settings.seed)
        rng = random.Random(f"{settings.seed}:{note['row_id']}")
        examples = rng.sample(seeds[task], settings.seeds_per_prompt)
        pool = pools.visible(task, position)
        examples += rng.sample(pool, min(settings.pool_per_prompt, len(pool)))
        q_request = question_request(note, task, examples, client)
        record = {
            "row_id": note["row_id"],
            "task": task,
            "question": None,
            "answer": None,
            "question_key": q_request.key,
        }
        q_result = await client.ask(q_request)
        if not q_result.ok:
            record["status"] = "failed_question"
        else:
            record["question"] = clean_question(q_result.text or "")
            if not record["question"]:
                record["status"] = "rejected_empty_question"
        if "status" in record:
            bar.total -= 1  # no answer is asked for a missing question
            return record
        a_result = await client.ask(answer_request(note, task, record["question"], client))
        if not a_result.ok:
            record["status"] = "failed_answer"
        else:
            record["answer"] = (a_result.text or "").strip()
            record["answer_key"] = a_result.key
        return record

    def settle(position: int, record: dict) -> None:
        """Judge a note against the notes before it (in order); accepted questions join the pool."""
        if "status" in record:
            return
        task, question = record["task"], record["question"]
        reason = _rejection(notes[position], question, record["answer"], earlier.get(task))
        record["status"] = f"rejected_{reason}" if reason else "ok"
        if not reason:
            pools.add(task, position, question)
            if earlier:
                earlier[task].add(question)

    running: dict[int, asyncio.Task] = {}
    done = 0  # notes settled, in order

    async def settle_next() -> None:
        nonlocal done
        record = await running.pop(done)
        settle(done, record)
        emit(record)
        done += 1

    try:
        for position in range(len(notes)):
            # note `position` may start once every note `pool_lag` or more before it is settled
            while done <= position - settings.pool_lag:
                await settle_next()
            running[position] = asyncio.create_task(ask_note(position))
        while done < len(notes):
            await settle_next()
    finally:
        # a failure (budget, replay miss) stops new notes; those in flight finish and are archived
        await asyncio.gather(*running.values(), return_exceptions=True)


def run_instruction_stage(notes_path, records_out, stats_out, client: LLMClient, settings: GenerationSettings) -> dict:
    """Records are written as the notes settle and the file is renamed into place at the end; after
    a crash the rerun asks the archive again, not this file."""
    with atomic_path(records_out) as tmp, open(tmp, "w", encoding="utf-8") as out:

        def write(record: dict) -> None:
            out.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")

        stats = generate_into(NoteTexts.read(notes_path, spill_dir=Path(records_out).parent), client, settings, write)
    write_json(stats_out, stats)
    llm = stats["llm"]
    log.info(
        "instructions: %s; requests %d (archived %d, sent %d, failed %d), %d+%d tokens, $%.4f",
        stats["outcomes"],
        llm["requests"],
        llm["archived"],
        llm["sent_ok"],
        llm["failed"],
        llm["usage"]["prompt_tokens"],
        llm["usage"]["completion_tokens"],
        llm["cost_usd"],
    )
    return stats


def write_dataset(notes_path, records_path, csv_out) -> int:
    """`mimiciii_discharge.csv`: note, question, answer, task for every accepted record, written
    row by row (pandas' `to_csv` quoting: the csv module's minimal quoting, which pandas uses)."""
    notes = NoteTexts.read(notes_path, spill_dir=Path(csv_out).parent)
    rows = 0
    with (
        atomic_path(csv_out) as tmp,
        open(tmp, "w", encoding="utf-8", newline="") as out,
        open(records_path, encoding="utf-8") as records,
    ):
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(DATASET_COLUMNS)
        for number, line in enumerate(records, start=1):
            record = json.loads(line)
            note = notes[number - 1] if number <= len(notes) else None
            if note is None or note["row_id"] != record["row_id"]:
                raise InputError(
                    f"{records_path}:{number}: ROW_ID {record['row_id']} is not note {number} of {notes_path}; "
                    "the records were made from other notes (rerun the instruction stage)"
                )
            if record["status"] == "ok":
                writer.writerow([note["text"], record["question"], record["answer"], record["task"]])
                rows += 1
    return rows


def main(argv: list[str] | None = None) -> None:
    """The stage without Snakemake: `python -m asclepius_r.instructions.generate --config config.yaml ...`."""

    parser = argparse.ArgumentParser(description="Generate one question and answer per note, then the dataset CSV.")
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help="config file; repeat to lay one over another (like snakemake --configfile)",
    )
    parser.add_argument("--notes", required=True, help="notes Parquet from the notes stage")
    parser.add_argument("--records", required=True, help="output: one JSON record per note")
    parser.add_argument("--stats", required=True, help="output: counts, usage, cost and failures (JSON)")
    parser.add_argument("--dataset", help="also write mimiciii_discharge.csv here")
    parser.add_argument("--log", help="log file (default: stderr)")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    config = workflow_config.load_layers(args.config)
    with LLMClient(LLMSettings.from_config(config["llm"])) as client:
        run_instruction_stage(args.notes, args.records, args.stats, client, GenerationSettings.from_config(config))
    if args.dataset:
        write_dataset(args.notes, args.records, args.dataset)


if __name__ == "__main__":
    main()
