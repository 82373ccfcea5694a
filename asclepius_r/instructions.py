"""Instruction generation: one question and one answer per note, self-instruct style.

Each note gets a task drawn with a fixed seed. Its question prompt shows three of the task's
seed questions and up to two questions already generated for that task. Notes go out in waves
of fixed size in ROW_ID order and the pools grow only between waves, so the prompts, and thus
the archive keys, are the same however many requests are in flight.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .files import atomic_path, write_json, write_jsonl
from .llm import ChatRequest, LLMClient
from .prompts import render_answer_prompt, render_question_prompt
from .rouge import rouge_l
from .tasks import DEFAULT_SEED_QUESTIONS, draw_task, load_seed_questions

log = logging.getLogger(__name__)

# 2023 post-filter: texts in which the generator talks about being a model.
MODEL_MENTION = re.compile(r"\b(language model|ai model|the model|as an ai|an ai assistant)\b", re.IGNORECASE)
_LEADING_NOISE = re.compile(r"^\s*(?:[-*•]|\d+[.)]|q(?:uestion)?\s*:|instruction\s*:)\s*", re.IGNORECASE)

DATASET_COLUMNS = ["note", "question", "answer", "task"]


@dataclass(frozen=True)
class GenerationSettings:
    seed: int = 42
    wave_size: int = 256
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
    return ChatRequest(model=s.model, messages=(("user", render_question_prompt(task, note["text"], examples)),),
                       temperature=s.temperature, max_tokens=s.max_tokens,
                       meta={"row_id": note["row_id"], "phase": "question", "task": task})


def answer_request(note: dict, task: str, question: str, client: LLMClient) -> ChatRequest:
    s = client.settings
    return ChatRequest(model=s.model, messages=(("user", render_answer_prompt(note["text"], question)),),
                       temperature=s.temperature, max_tokens=s.max_tokens,
                       meta={"row_id": note["row_id"], "phase": "answer", "task": task})


def _rejection(note: dict, question: str, answer: str, pool: list[str], settings: GenerationSettings) -> str | None:
    if not question:
        return "empty_question"
    if not answer.strip():
        return "empty_answer"
    if any(MODEL_MENTION.search(t) for t in (note["text"], question, answer)):
        return "model_mention"
    if answer.rstrip().endswith("?"):
        return "answer_is_question"
    if settings.near_duplicate_rouge is not None and any(
        rouge_l(question, earlier) > settings.near_duplicate_rouge for earlier in pool
    ):
        return "near_duplicate"
    return None


def generate(notes: list[dict], client: LLMClient, settings: GenerationSettings) -> tuple[list[dict], dict]:
    """Return one record per note (accepted or with the reason it was not) and the counts."""
    seeds = load_seed_questions(settings.seed_questions)
    pools: dict[str, list[str]] = defaultdict(list)
    records: list[dict] = []
    counts: Counter = Counter()
    notes = sorted(notes, key=lambda n: n["row_id"])
    for start in range(0, len(notes), settings.wave_size):
        wave = notes[start:start + settings.wave_size]
        tasks, q_requests = [], []
        for note in wave:
            task = draw_task(note["row_id"], settings.seed)
            rng = random.Random(f"{settings.seed}:{note['row_id']}")
            examples = rng.sample(seeds[task], settings.seeds_per_prompt)
            pool = pools[task]
            examples += rng.sample(pool, min(settings.pool_per_prompt, len(pool)))
            tasks.append(task)
            q_requests.append(question_request(note, task, examples, client))
        q_results = client.run(q_requests, desc=f"questions {start + 1}-{start + len(wave)}")
        questions = [clean_question(r.text) if r.ok else None for r in q_results]
        a_index = [i for i, q in enumerate(questions) if q]
        a_results = client.run([answer_request(wave[i], tasks[i], questions[i], client) for i in a_index],
                               desc=f"answers {start + 1}-{start + len(wave)}")
        answers = dict(zip(a_index, a_results))
        accepted: list[tuple[str, str]] = []
        for i, note in enumerate(wave):
            record = {"row_id": note["row_id"], "task": tasks[i], "question": questions[i], "answer": None,
                      "question_key": q_requests[i].key}
            if not q_results[i].ok:
                record["status"] = "failed_question"
            elif not questions[i]:
                record["status"] = "rejected_empty_question"
            elif not answers[i].ok:
                record["status"] = "failed_answer"
            else:
                record["answer"] = answers[i].text.strip()
                record["answer_key"] = answers[i].key
                reason = _rejection(note, questions[i], record["answer"], pools[tasks[i]], settings)
                record["status"] = f"rejected_{reason}" if reason else "ok"
                if not reason:
                    accepted.append((tasks[i], questions[i]))
            counts[record["status"]] += 1
            records.append(record)
        for task, question in accepted:  # pools change only between waves
            pools[task].append(question)
    stats = {"notes": len(notes), "outcomes": dict(sorted(counts.items())),
             "per_task": dict(sorted(Counter(r["task"] for r in records if r["status"] == "ok").items())),
             "client": dict(sorted(client.stats.items())), "cost_usd": round(client.cost_usd, 4)}
    return records, stats


def run_instruction_stage(notes_path, records_out, stats_out, client: LLMClient, settings: GenerationSettings) -> dict:
    from .notes import read_notes

    records, stats = generate(read_notes(notes_path), client, settings)
    write_jsonl(records_out, records)
    write_json(stats_out, stats)
    log.info("instructions: %s", stats["outcomes"])
    return stats


def write_dataset(notes_path, records_path, csv_out) -> int:
    """`mimiciii_discharge.csv`: note, question, answer, task for every accepted record."""
    from .files import read_jsonl
    from .notes import read_notes

    text = {n["row_id"]: n["text"] for n in read_notes(notes_path)}
    rows = [{"note": text[r["row_id"]], "question": r["question"], "answer": r["answer"], "task": r["task"]}
            for r in read_jsonl(records_path) if r["status"] == "ok"]
    frame = pd.DataFrame(rows, columns=DATASET_COLUMNS)
    with atomic_path(csv_out) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
    return len(frame)
