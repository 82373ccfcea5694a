"""Figures and tables for the Snakemake HTML report (`snakemake --report report.html`).

Each function turns files in results/ into one report item, so every number in the report
comes from a named file made by a named rule. Only counts and aggregates are drawn: no note
text, question or answer reaches the report, except on the answers page (`answers_side_by_side`),
made only where `evaluate.report_answers` asks for it (the demo's and the learning check's
synthetic notes, never MIMIC's by default).
"""

from __future__ import annotations

import csv
import html
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; jobs have no display
import matplotlib.pyplot as plt  # noqa: E402

from asclepius_r.files import atomic_path, read_jsonl  # noqa: E402
from asclepius_r.notes.stage import read_notes  # noqa: E402

log = logging.getLogger(__name__)

_STYLE = """<style>
body { font-family: sans-serif; font-size: 14px; margin: 1em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
caption { font-weight: bold; text-align: left; padding: 4px 0; }
</style>"""


def _save(figure, out_png) -> None:
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def html_table(caption: str, header: list[str], rows: list[list]) -> str:
    """One captioned HTML table of text cells (escaped), for a page of `write_html_page`."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>"


def write_html_page(out_html, title: str, tables: list[str]) -> None:
    """A report page of `html_table`s in the report's style (the plan's page uses it too)."""
    with atomic_path(out_html) as tmp:
        tmp.write_text(
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"{_STYLE}</head><body>{''.join(tables)}</body></html>\n",
            encoding="utf-8",
        )


def note_length_histogram(splits: dict[str, str], out_png) -> None:
    """Words per note, one histogram per split (e.g. training and held-out notes)."""
    lengths = {name: [len(n["text"].split()) for n in read_notes(path)] for name, path in splits.items()}
    figure, axes = plt.subplots(figsize=(7, 3.5))
    top = max((max(v) for v in lengths.values() if v), default=1)
    bins = [top * i / 30 for i in range(31)]
    for name, values in lengths.items():
        axes.hist(values, bins=bins, alpha=0.6, label=f"{name} ({len(values)} notes)")
    axes.set_xlabel("words per note")
    axes.set_ylabel("notes")
    axes.legend()
    _save(figure, out_png)


def dataset_statistics(notes_stats, instruction_stats: dict[str, str], out_html) -> None:
    """The notes stage's counts and the instruction stage's outcomes and tasks per split."""
    notes = json.loads(Path(notes_stats).read_text())
    rows = [
        ["rows read from NOTEEVENTS", notes["rows_read"]],
        ["kept for training", notes["kept_train"]],
        ["kept for evaluation (held out)", notes["kept_heldout"]],
        ["held-out patients", notes["heldout_subjects"]],
    ]
    rows += [[f"dropped: {reason}", count] for reason, count in sorted(notes["dropped"].items())]
    rows.append(["near-miss CATEGORY spellings (not kept)", notes["near_miss_category"]])
    tables = [html_table("Notes (results/notes/stats.json)", ["", "count"], rows)]
    split_stats = {split: json.loads(Path(path).read_text()) for split, path in instruction_stats.items()}
    splits = list(split_stats)
    outcomes = sorted({o for s in split_stats.values() for o in s["outcomes"]})
    tables.append(
        html_table(
            "Instruction generation outcomes (results/instructions/{split}.stats.json)",
            ["outcome", *splits],
            [[o, *(split_stats[s]["outcomes"].get(o, 0) for s in splits)] for o in outcomes],
        )
    )
    tasks = sorted({t for s in split_stats.values() for t in s["per_task"]})
    tables.append(
        html_table(
            "Accepted questions per task",
            ["task", *splits],
            [[t, *(split_stats[s]["per_task"].get(t, 0) for s in splits)] for t in tasks],
        )
    )
    write_html_page(out_html, "Dataset statistics", tables)


def training_curves(stage: str, metric_files: dict[str, str], out_png) -> None:
    """Loss, throughput (tokens/s) and MFU against the optimizer step, one line per model size."""
    panels = [("loss", "training loss"), ("tokens_per_s", "tokens / s"), ("mfu", "MFU")]
    figure, axes = plt.subplots(1, len(panels), figsize=(12, 3.5), layout="constrained")
    for size, path in sorted(metric_files.items()):
        records = read_jsonl(path)
        for ax, (key, _) in zip(axes, panels):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=size)
    for ax, (_, label) in zip(axes, panels):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.legend()
    figure.suptitle(f"{stage}")
    _save(figure, out_png)


def _grouped_bars(summary: dict, metric: str, ylabel: str, out_png, ylim=None) -> None:
    models = list(summary)
    tasks = sorted({t for entry in summary.values() for t in entry["per_task"]})
    groups = ["all tasks", *tasks]
    width = 0.8 / max(len(models), 1)
    figure, axes = plt.subplots(figsize=(max(7, 1.3 * len(groups)), 4))
    for i, model in enumerate(models):
        values = [summary[model][metric]] + [summary[model]["per_task"].get(t, {}).get(metric) for t in tasks]
        axes.bar(
            [g + i * width for g in range(len(groups))], [v if v is not None else 0 for v in values], width, label=model
        )
    axes.set_xticks([g + width * (len(models) - 1) / 2 for g in range(len(groups))])
    axes.set_xticklabels(groups, rotation=20, ha="right")
    axes.set_ylabel(ylabel)
    if ylim:
        axes.set_ylim(*ylim)
    axes.legend(fontsize="small", ncol=2)
    _save(figure, out_png)


def evaluation_plots(summary_path, judge_png, rouge_png) -> None:
    """Mean judge score (1-4) and mean ROUGE-L per model, overall and per task."""
    summary = json.loads(Path(summary_path).read_text())
    _grouped_bars(summary, "judge_score", "mean judge score (1-4)", judge_png, ylim=(0, 4))
    _grouped_bars(summary, "rouge_l", "mean ROUGE-L F1", rouge_png, ylim=(0, 1))


def evaluation_tables(per_model_tsv, per_task_tsv, judge_stats, out_html) -> None:
    """The evaluation tables of results/evaluation/ and the judge's outcome counts, as HTML."""
    tables = []
    for caption, path in (
        ("Scores per model (results/evaluation/scores_per_model.tsv)", per_model_tsv),
        ("Scores per model and task (results/evaluation/scores_per_task.tsv)", per_task_tsv),
    ):
        with open(path, newline="", encoding="utf-8") as rows:
            header, *body = list(csv.reader(rows, delimiter="\t"))
        tables.append(html_table(caption, header, body))
    stats = json.loads(Path(judge_stats).read_text())
    tables.append(
        html_table(
            f"Judge outcomes, model {stats['judge_model']} (results/evaluation/judge/stats.json)",
            ["outcome", "questions"],
            sorted(stats["outcomes"].items()),
        )
    )
    write_html_page(out_html, "Evaluation", tables)


def answers_side_by_side(records_path, answer_files: dict[str, str], out_html) -> None:
    """Each held-out question with its reference answer and every model's answer beside it."""
    references = {r["row_id"]: r for r in read_jsonl(records_path) if r["status"] == "ok"}
    answers = {model: {a["row_id"]: a["answer"] for a in read_jsonl(path)} for model, path in answer_files.items()}
    rows = [
        [row_id, record["task"], record["question"], record["answer"], *(answers[m].get(row_id, "") for m in answers)]
        for row_id, record in sorted(references.items())
    ]
    header = ["ROW_ID", "task", "question", "reference answer", *answers]
    caption = "Held-out answers side by side (results/evaluation/answers/*.jsonl, results/instructions/heldout.jsonl)"
    write_html_page(out_html, "Answers", [html_table(caption, header, rows)])


def models_table(training_runs: dict[str, tuple[str, str]], out_html) -> None:
    """Every configured model side by side: its base (read from the base folder by training), the
    max_length each stage trained at, and what fine-tuning did with examples longer than that.

    `training_runs`: model name -> (pretrained-only, fine-tuned) checkpoint folders.
    """
    rows = []
    for name, folders in training_runs.items():
        pretrained, finetuned = (json.loads((Path(f) / "training_run.json").read_text()) for f in folders)
        base, data = pretrained["base"], finetuned["data"]  # fine-tuning's base is the pretrained-only checkpoint
        rows.append(
            [
                name,
                base["folder"],
                base["tokenizer"],
                f"{base['vocab_size']:,}",
                f"{base['context_length']:,}",
                pretrained["settings"]["max_length"],
                finetuned["settings"]["max_length"],
                data["policy"],
                data["examples"],
                data["whole"],
                data["truncated"],
                data["dropped"],
            ]
        )
    header = ["model", "base", "tokenizer", "vocabulary", "context", "pretrain max_length", "finetune max_length"]
    header += ["truncation", "examples", "whole", "truncated", "dropped"]
    caption = "Models (training_run.json of results/models/Asclepius-R-NAME and -Pretrained-Only)"
    write_html_page(out_html, "Models", [html_table(caption, header, rows)])
