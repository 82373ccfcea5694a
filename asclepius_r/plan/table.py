"""The plan as a table: printed for the terminal (`format_plan`) and as the report's page.

A row of the plan is named by its stage and, for a training job, its model size ("pretrain 7B",
`row_name`): the plan's stages, what the run used and the table's first column all go by that
name. `write_plan_report` writes the report's "0. Plan" page: the plan's table, then planned
against used with the margin, the dollars paid, the assumptions and what was missing.
"""

from __future__ import annotations

import json

GB = 1e9
GIB = 2**30


def row_name(row: dict) -> str:
    """A row's name: its stage, and for a training job its model size ("pretrain 7B")."""
    return row["stage"] + (f" {row['size']}" if row.get("size") else "")


def rows_by_name(plan: dict) -> dict[str, dict]:
    """A plan's rows (its "stages", in the run's order) by `row_name`."""
    return {row_name(row): row for row in plan["stages"]}


def size_text(size: float) -> str:
    """Bytes as GB (10^9) above 1 GB, else MB, to three figures."""
    return f"{size / GB:,.1f} GB" if size >= GB else f"{size / 1e6:.3g} MB"


COLUMNS = (
    ("stage", "stage", row_name),
    ("jobs", "jobs", lambda r: r.get("jobs")),
    ("gpus", "GPUs/job", lambda r: r.get("gpus")),
    ("requests", "requests", lambda r: r.get("requests")),
    ("prompt", "prompt tok", lambda r: r.get("prompt_tokens")),
    ("completion", "compl. tok (max)", lambda r: r.get("completion_tokens")),
    ("usd_online", "$ online", lambda r: r.get("usd_online")),
    ("usd_batch", "$ batch", lambda r: r.get("usd_batch")),
    ("hours_online", "h at quota", lambda r: r.get("hours_online")),
    ("train_tokens", "train tok", lambda r: r.get("train_tokens")),
    ("steps", "steps", lambda r: r.get("steps")),
    ("gpu_hours", "GPU-h", lambda r: r.get("gpu_hours")),
    ("memory", "GiB/GPU", lambda r: r.get("memory_per_gpu_bytes") and r["memory_per_gpu_bytes"] / GIB),
    ("checkpoints", "checkpoints", lambda r: r.get("checkpoint_bytes") and size_text(r["checkpoint_bytes"])),
    ("disk", "disk", lambda r: size_text(r.get("disk_bytes", 0) + r.get("archive_bytes", 0))),
)


def _cell(value) -> str:
    """A figure as a table cell: "-" for none, thousands separated, three figures below 100."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table_rows(plan: dict) -> tuple[list[str], list[list[str]]]:
    """The plan's stages as a header and rows of text cells (for the terminal and the report)."""
    return [title for _, title, _ in COLUMNS], [[_cell(get(row)) for _, _, get in COLUMNS] for row in plan["stages"]]


def format_plan(plan: dict) -> str:
    """The plan for the terminal: its table, the totals, the assumptions, what is missing."""
    header, rows = table_rows(plan)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in [header, *rows]
    ]
    totals = plan["totals"]
    lines += [
        "",
        f"total: {_cell(totals['requests'])} LLM requests, ${_cell(totals['usd'])} in the configured mode "
        f"(online ${_cell(totals['usd_online'])}, batch ${_cell(totals['usd_batch'])}; llm.budget_usd "
        f"{_cell(plan['budget_usd'])}), {_cell(totals['gpu_hours'])} GPU-hours, disk "
        f"{size_text(totals['disk_bytes'])} kept and {size_text(totals['disk_peak_bytes'])} at the peak",
        "assumptions:",
        *(f"  {key}: {value}" for key, value in plan["assumptions"].items()),
    ]
    lines += ["missing or unapproved:", *(f"  - {item}" for item in plan["missing"])] if plan["missing"] else []
    return "\n".join(lines)


def write_plan_report(plan: dict, comparison: list[dict], used: dict, out_html) -> None:
    """The report page: the plan's table, then planned against used (`usage.compare`) with the margin."""
    from asclepius_r.report.figures import html_table, write_html_page

    header, rows = table_rows(plan)
    checks = [
        [
            c["stage"],
            c["quantity"],
            _cell(c["planned"]),
            _cell(c["used"]),
            "-" if c["margin"] is None else f"{c['margin']:+.0%}",
        ]
        for c in comparison
    ]
    spent = [[stage, _cell(used[stage]["usd_paid"])] for stage in ("instructions", "judge")]
    notes = [
        [key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)]
        for key, value in plan["assumptions"].items()
    ]
    write_html_page(
        out_html,
        "Plan and use",
        [
            html_table("The plan, per stage (results/plan/plan.json)", header, rows),
            html_table(
                "Planned against used (margin: planned / used - 1)",
                ["stage", "quantity", "planned", "used", "margin"],
                checks,
            ),
            html_table("Dollars this run paid (responses already archived cost nothing)", ["stage", "USD"], spent),
            html_table("Assumptions of the plan", ["what", "assumed"], notes),
            html_table("Missing or unapproved when planned", ["item"], [[m] for m in plan["missing"]] or [["nothing"]]),
        ],
    )
