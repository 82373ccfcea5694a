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
import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .files import atomic_path, read_jsonl, write_json, write_jsonl
from .llm import ChatRequest, LLMClient
from .prompts import render_answer_prompt, render_question_prompt
from .rouge import rouge_l, tokens
from .tasks import DEFAULT_SEED_QUESTIONS, draw_task, load_seed_questions

log = logging.getLogger(__name__)

# 2023 post-filter: texts in which the generator talks about being a model.
MODEL_MENTION = re.compile(r"\b(language model|ai model|the model|as an ai|an ai assistant)\b", re.IGNORECASE)
_LEADING_NOISE = re.compile(r"^\s*(?:[-*•]|\d+[.)]|q(?:uestion)?\s*:|instruction\s*:)\s*", re.IGNORECASE)

DATASET_COLUMNS = ["note", "question", "answer", "task"]


@dataclass(frozen=True)
class GenerationSettings:
    """The `instructions` section of the config, plus the workflow seed."""

    seed: int = 42
    pool_lag: int = 2048
    seeds_per_prompt: int = 3
    pool_per_prompt: int = 2
    near_duplicate_rouge: float | None = None  # self-instruct used 0.7; the 2023 run had none
    seed_questions: str | Path = DEFAULT_SEED_QUESTIONS


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
    """Earlier questions of one task, indexed so that a new question is compared (by ROUGE-L)
    only with those it could possibly exceed the threshold with: the all-pairs scan of
    self-instruct is quadratic, about 10^10 word comparisons for 57k notes.

    ROUGE-L F = 2 L / (n + m) > t forces the LCS L above t n / (2 - t), where n is the new
    question's length; an LCS is a shared multiset of words, so the two questions must share at
    least one of any n - L + 1 of the new question's words. Probing the rarest ones finds every
    candidate, so the filter is exact, not approximate. Common words still make the candidates
    grow with the index, so each is first checked for the L shared words (a set intersection)
    and only those with enough are compared by ROUGE-L, a dynamic programme a hundred times dearer.
    """

    def __init__(self, threshold: float, questions: list[str] = ()):
        self.threshold = threshold
        self.questions: list[str] = []
        self.word_sets: list[frozenset[str]] = []
        self.postings: dict[str, list[int]] = defaultdict(list)
        for question in questions:
            self.add(question)

    @staticmethod
    def _words(question: str) -> set[str]:
        """Words numbered by occurrence ('the#1', 'the#2'), so set overlap is multiset overlap."""
        seen: Counter = Counter()
        out = set()
        for word in tokens(question):
            seen[word] += 1
            out.add(f"{word}#{seen[word]}")
        return out

    def is_near_duplicate(self, question: str) -> bool:
        words = self._words(question)
        if not words:
            return False
        min_lcs = int(self.threshold * len(words) / (2 - self.threshold)) + 1
        if min_lcs > len(words):
            return False
        rarest = sorted(words, key=lambda w: len(self.postings.get(w, ())))[: len(words) - min_lcs + 1]
        candidates = {i for word in rarest for i in self.postings.get(word, ())}
        return any(
            len(words & self.word_sets[i]) >= min_lcs and rouge_l(question, self.questions[i]) > self.threshold
            for i in sorted(candidates)
        )

    def add(self, question: str) -> None:
        words = self._words(question)
        for word in words:
            self.postings[word].append(len(self.questions))
        self.questions.append(question)
        self.word_sets.append(frozenset(words))


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


class _Pools:
    """Accepted questions per task with the position of their note, in note order, so that a
    note is shown only those of notes at least `lag` before it, however far settling has got."""

    def __init__(self, lag: int):
        self.lag = lag
        self.questions: dict[str, list[str]] = defaultdict(list)
        self.positions: dict[str, list[int]] = defaultdict(list)

    def add(self, task: str, position: int, question: str) -> None:
        self.questions[task].append(question)
        self.positions[task].append(position)

    def visible(self, task: str, position: int) -> list[str]:
        return self.questions[task][: bisect.bisect_right(self.positions[task], position - self.lag)]


def generate(notes: list[dict], client: LLMClient, settings: GenerationSettings) -> tuple[list[dict], dict]:
    """Return one record per note (accepted or with the reason it was not) and the counts."""
    notes = sorted(notes, key=lambda n: n["row_id"])
    with client.progress(2 * len(notes), "instructions") as bar:
        records = client.drive(_generate(notes, client, settings, bar))
    counts = Counter(r["status"] for r in records)
    stats = {
        "notes": len(notes),
        "outcomes": dict(sorted(counts.items())),
        "per_task": dict(sorted(Counter(r["task"] for r in records if r["status"] == "ok").items())),
        "llm": client.stats,
    }
    return records, stats


async def _generate(notes: list[dict], client: LLMClient, settings: GenerationSettings, bar) -> list[dict]:
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

    records: list[dict] = []
    running: dict[int, asyncio.Task] = {}
    try:
        for position in range(len(notes)):
            # note `position` may start once every note `pool_lag` or more before it is settled
            while len(records) <= position - settings.pool_lag:
                settled = len(records)
                record = await running.pop(settled)
                settle(settled, record)
                records.append(record)
            running[position] = asyncio.create_task(ask_note(position))
        for settled in range(len(records), len(notes)):
            record = await running.pop(settled)
            settle(settled, record)
            records.append(record)
    finally:
        # a failure (budget, replay miss) stops new notes; those in flight finish and are archived
        await asyncio.gather(*running.values(), return_exceptions=True)
    return records


def run_instruction_stage(notes_path, records_out, stats_out, client: LLMClient, settings: GenerationSettings) -> dict:
    from .notes import read_notes

    records, stats = generate(read_notes(notes_path), client, settings)
    write_jsonl(records_out, records)
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
    """`mimiciii_discharge.csv`: note, question, answer, task for every accepted record."""
    from .notes import read_notes

    text = {n["row_id"]: n["text"] for n in read_notes(notes_path)}
    rows = [
        {"note": text[r["row_id"]], "question": r["question"], "answer": r["answer"], "task": r["task"]}
        for r in read_jsonl(records_path)
        if r["status"] == "ok"
    ]
    frame = pd.DataFrame(rows, columns=DATASET_COLUMNS)
    with atomic_path(csv_out) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
    return len(frame)


def main(argv: list[str] | None = None) -> None:
    """The stage without Snakemake: `python -m asclepius_r.instructions --config config.yaml ...`."""
    from . import config as workflow_config
    from .logs import setup_logging

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
    with LLMClient(workflow_config.llm_settings(config)) as client:
        run_instruction_stage(args.notes, args.records, args.stats, client, workflow_config.generation_settings(config))
    if args.dataset:
        write_dataset(args.notes, args.records, args.dataset)


if __name__ == "__main__":
    main()
