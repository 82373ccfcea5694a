"""Evaluation on the held-out notes: answers from each model, judge verdicts and cheap metrics.

The held-out notes get questions and reference answers from the same instruction engine as the
training data. Each model answers with the released template (`answer_heldout`); the judge
(`judge.py`) scores all models' answers to a question together; `summarise` puts the judge's
1-4 scores beside ROUGE-L, token F1 and answer length, per model and per model and task.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean

from asclepius_r.config import configured_model
from asclepius_r.evaluate.judge import SCORES
from asclepius_r.files import atomic_path, read_jsonl, write_json, write_jsonl
from asclepius_r.notes.stage import read_notes
from asclepius_r.rouge import rouge_l, tokens

log = logging.getLogger(__name__)

TABLE_COLUMNS = [
    "n",
    "judge_score",
    "judge_scored",
    "judge_failed",
    "rouge_l",
    "token_f1",
    "answer_words",
    "empty_answers",
]
# Per model only (rule heldout_losses): what the model's training optimised, on held-out text.
LOSS_COLUMNS = ["note_perplexity", "answer_loss"]


def heldout_items(notes_path, records_path) -> list[dict]:
    """Held-out questions with an accepted reference answer, with their note text."""
    text = {n["row_id"]: n["text"] for n in read_notes(notes_path)}
    return [
        {
            "row_id": r["row_id"],
            "task": r["task"],
            "note": text[r["row_id"]],
            "question": r["question"],
            "reference": r["answer"],
        }
        for r in read_jsonl(records_path)
        if r["status"] == "ok"
    ]


def truncation_policy(config: dict, evaluated: str | None = None) -> str:
    """finetune.truncation of the model `evaluated` comes from (its models.NAME.finetune override
    included), which also shapes its evaluation prompts; the finetune section's for an extra
    model or none."""
    name = configured_model(config, evaluated) if evaluated else None
    section = {**config["finetune"], **(config["models"][name].get("finetune", {}) if name else {})}
    return section["truncation"]


def token_f1(candidate: str, reference: str) -> float:
    """Bag-of-words F1 (SQuAD style) over the same tokens as ROUGE-L."""
    c, r = Counter(tokens(candidate)), Counter(tokens(reference))
    common = sum((c & r).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(c.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def answer_heldout(
    model_dir,
    notes_path,
    records_path,
    answers_out,
    decoding,
    batch_size: int,
    max_prompt_tokens: int | None,
    truncation: str,
    job: str | None = None,
    gpus: int = 1,
    seed: int = 0,
    cpu_fallback: bool = False,
) -> None:
    """Generate one answer per held-out question with the model in `model_dir`, on a claimed GPU
    (on the CPU where torch sees none only with `cpu_fallback`, see `gpus.claim_for_job`).

    Each row records the prompt's length and whether its note was cut (`truncation`) to fit
    the model's context with `decoding.max_new_tokens`.
    """
    from asclepius_r.evaluate.generation import (
        fit_prompts,
        generate_answers,
        load_for_generation,
        prompt_budget,
    )
    from asclepius_r.gpus import claim_for_job

    items = heldout_items(notes_path, records_path)
    with claim_for_job(job or f"answer_heldout-{Path(model_dir).name}", gpus, cpu_fallback=cpu_fallback) as claim:
        model, tokenizer = load_for_generation(str(model_dir), claim.torch_device() if claim else "cpu")
        budget = prompt_budget(model, decoding.max_new_tokens, max_prompt_tokens)
        prompts = fit_prompts(tokenizer, [(i["note"], i["question"]) for i in items], budget, truncation)
        answers = generate_answers(model, tokenizer, [p.text for p in prompts], decoding, batch_size, seed)
    write_jsonl(
        answers_out,
        [
            {
                "row_id": i["row_id"],
                "task": i["task"],
                "question": i["question"],
                "answer": a,
                "prompt_tokens": len(p.input_ids),
                "prompt_truncated": p.truncated,
                "rouge_l": rouge_l(a, i["reference"]),
                "token_f1": token_f1(a, i["reference"]),
                "answer_words": len(a.split()),
            }
            for i, p, a in zip(items, prompts, answers)
        ],
    )
    log.info(
        "%s: answered %d held-out questions (%d prompts cut to %d tokens, policy %s)",
        model_dir,
        len(items),
        sum(p.truncated for p in prompts),
        budget,
        truncation,
    )


def _metrics(rows: list[dict]) -> dict:
    """Means over `rows`; the judge mean only over answers the judge scored."""
    scored = [row["judge_score"] for row in rows if row["judge_score"] is not None]

    def average(values):
        return mean(values) if values else None

    return {
        "n": len(rows),
        "judge_score": average(scored),
        "judge_scored": len(scored),
        "judge_failed": len(rows) - len(scored),
        "judge_distribution": {str(s): scored.count(s) for s in SCORES},
        "rouge_l": average([row["rouge_l"] for row in rows]),
        "token_f1": average([row["token_f1"] for row in rows]),
        "answer_words": average([row["answer_words"] for row in rows]),
        "empty_answers": sum(not row["answer"].strip() for row in rows),
    }


def summarise(
    answer_files: dict[str, str],
    verdicts_path,
    summary_out,
    per_model_out,
    per_task_out,
    loss_files: dict[str, str] | None = None,
) -> dict:
    """Scores per model (with `per_task` inside, and the held-out losses of `loss_files`) as JSON,
    and the same as two TSV tables."""
    verdicts = {v["row_id"]: v for v in read_jsonl(verdicts_path)}
    summary: dict = {}
    for model, path in sorted(answer_files.items()):
        rows = read_jsonl(path)
        for row in rows:
            verdict = verdicts.get(row["row_id"])
            if verdict is None:
                raise ValueError(f"{verdicts_path}: no judge verdict for held-out ROW_ID {row['row_id']} ({path})")
            row["judge_score"] = verdict["scores"][model] if verdict["status"] == "ok" else None
        per_task = defaultdict(list)
        for row in rows:
            per_task[row["task"]].append(row)
        losses = json.loads(Path(loss_files[model]).read_text()) if loss_files else {}
        summary[model] = {
            **_metrics(rows),
            **{column: losses.get(column) for column in LOSS_COLUMNS},
            "per_task": {t: _metrics(r) for t, r in sorted(per_task.items())},
        }
    write_json(summary_out, summary)
    _write_table(per_model_out, ["model"], [([m], s) for m, s in summary.items()], TABLE_COLUMNS + LOSS_COLUMNS)
    _write_table(
        per_task_out,
        ["model", "task"],
        [([m, t], s) for m, entry in summary.items() for t, s in entry["per_task"].items()],
        TABLE_COLUMNS,
    )
    log.info("evaluation: %s", {m: (s["judge_score"], s["rouge_l"]) for m, s in summary.items()})
    return summary


def _write_table(path, keys: list[str], rows: list[tuple[list[str], dict]], columns: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, delimiter="\t", lineterminator="\n")
        writer.writerow(keys + columns)
        for key, metrics in rows:
            writer.writerow(key + ["" if metrics[c] is None else round(metrics[c], 4) for c in columns])
