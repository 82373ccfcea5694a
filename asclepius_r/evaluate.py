"""Evaluation on the held-out notes: answers from each model, scored against reference answers.

The held-out notes get questions and reference answers from the same instruction engine as the
training data. Each model answers with the released template; ROUGE-L against the reference is
computed per answer, then summarised per model and per task.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from statistics import mean

from .files import read_jsonl, write_json, write_jsonl
from .notes import read_notes
from .rouge import rouge_l

log = logging.getLogger(__name__)


def heldout_items(notes_path, records_path) -> list[dict]:
    text = {n["row_id"]: n["text"] for n in read_notes(notes_path)}
    return [{"row_id": r["row_id"], "task": r["task"], "note": text[r["row_id"]], "question": r["question"],
             "reference": r["answer"]} for r in read_jsonl(records_path) if r["status"] == "ok"]


def answer_heldout(model_dir, notes_path, records_path, answers_out, max_new_tokens: int = 400,
                   batch_size: int = 8, max_prompt_tokens: int | None = None) -> None:
    """Generate one answer per held-out question with the model in `model_dir`."""
    from .generation import generate_answers, load_for_generation

    items = heldout_items(notes_path, records_path)
    model, tokenizer = load_for_generation(str(model_dir))
    answers = generate_answers(model, tokenizer, [(i["note"], i["question"]) for i in items],
                               max_new_tokens, batch_size, max_prompt_tokens)
    write_jsonl(answers_out, [{"row_id": i["row_id"], "task": i["task"], "question": i["question"],
                               "answer": a, "rouge_l": rouge_l(a, i["reference"])}
                              for i, a in zip(items, answers)])
    log.info("%s: answered %d held-out questions", model_dir, len(items))


def summarise(answer_files: dict[str, str], summary_out) -> dict:
    """Mean ROUGE-L per model, overall and per task."""
    summary: dict = {}
    for model, path in sorted(answer_files.items()):
        rows = read_jsonl(path)
        per_task = defaultdict(list)
        for row in rows:
            per_task[row["task"]].append(row["rouge_l"])
        summary[model] = {"n": len(rows), "rouge_l": mean(r["rouge_l"] for r in rows) if rows else None,
                          "rouge_l_per_task": {t: mean(v) for t, v in sorted(per_task.items())}}
    write_json(summary_out, summary)
    return summary
