"""What the run then used, and the plan against it (rule report_plan).

`used_by_run` reads the finished run's outputs into figures keyed like the plan's rows (`row_name`):
LLM requests and the tokens the endpoint reported, the dollars paid, and per training job its
steps, tokens, device-hours and export size. `compare` puts each planned figure beside the used
one with the margin; `table.write_plan_report` writes both as the report's page.
"""

from __future__ import annotations

import json
from pathlib import Path

from asclepius_r.plan.disk import folder_bytes
from asclepius_r.plan.table import row_name

COMPARED = ("requests", "prompt_tokens", "completion_tokens", "steps", "train_tokens", "gpu_hours", "disk_bytes")


def _archive_usage(archive: str | Path, keys: set[str] | None) -> dict:
    """Requests and reported tokens of an archive's answered records (of `keys`; None: all)."""
    from asclepius_r.llm.archive import Archive

    results = [r for k, r in Archive(archive).results() if r["status"] == "ok" and (keys is None or k in keys)]
    reported = [r["usage"] for r in results if r.get("usage")]
    return {
        "responses": len(results),
        "prompt_tokens": sum(u.get("prompt_tokens", 0) for u in reported) if reported else None,
        "completion_tokens": sum(u.get("completion_tokens", 0) for u in reported) if reported else None,
    }


def used_by_run(
    instruction_records: list[str],
    instruction_stats: list[str],
    llm_archive: str,
    judge_stats: str,
    judge_archive: str,
    models: dict[str, str],
    metrics: dict[str, str],
) -> dict:
    """What the run used, keyed like the plan's stages: LLM requests and the tokens the endpoint
    reported for the responses the outputs are made of (archived ones included) and the dollars
    this run paid; per training job its optimizer steps, real tokens, device-hours (from the
    metrics' per-window rates) and export size. `models` and `metrics` are keyed "stage size"."""
    from asclepius_r.files import read_jsonl

    keys = {
        r[k]
        for path in instruction_records
        for r in read_jsonl(path)
        for k in ("question_key", "answer_key")
        if r.get(k)
    }
    stats = [json.loads(Path(path).read_text())["llm"] for path in instruction_stats]
    judged = json.loads(Path(judge_stats).read_text())["client"]
    used = {
        "instructions": {
            "requests": sum(s["requests"] for s in stats),
            "usd_paid": round(sum(s["cost_usd"] for s in stats), 4),
            **_archive_usage(llm_archive, keys),
            "archive_bytes": folder_bytes(llm_archive),
        },
        "judge": {
            "requests": judged["requests"],
            "usd_paid": judged["cost_usd"],
            **(_archive_usage(judge_archive, None) if Path(judge_archive).exists() else {}),
        },
    }
    for name, folder in models.items():
        summary = json.loads((Path(folder) / "training_run.json").read_text())
        records = read_jsonl(metrics[name])
        seconds = sum(r["real_tokens"] / r["tokens_per_s"] for r in records if r.get("tokens_per_s"))
        used[name] = {
            "steps": summary["global_step"],
            "train_tokens": sum(r["real_tokens"] for r in records),
            "gpu_hours": seconds * summary["world_size"] / 3600,
            "disk_bytes": folder_bytes(folder),
        }
    return used


def compare(plan: dict, used: dict) -> list[dict]:
    """Planned against used, per stage and quantity; margin = planned / used - 1 (positive:
    the plan was above what the run used)."""
    out = []
    for row in plan["stages"]:
        name = row_name(row)
        for quantity in COMPARED:
            planned, actual = row.get(quantity), used.get(name, {}).get(quantity)
            if planned is None or actual is None:
                continue
            margin = planned / actual - 1 if actual else None
            out.append({"stage": name, "quantity": quantity, "planned": planned, "used": actual, "margin": margin})
    return out
