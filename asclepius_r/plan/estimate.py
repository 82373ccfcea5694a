"""The plan: what a run will cost, take and need, stage by stage, before its first job; its CLI.

`make_plan(config, notes_dir)` reads the config and the notes stage's outputs (that stage is
cheap; `main` runs it first when its outputs are missing) and puts together, per stage: the LLM
stages' requests, tokens, dollars and hours (`llm_stages`); the training jobs' GPUs, memory per
GPU (`memory`), checkpoints and exports (`disk`), tokens, steps and GPU-hours, and the held-out
answers' jobs (`gpu_stages`); the release; the totals; and what is missing or unapproved. What
cannot be known before the run is an upper bound, and every assumption behind a figure is written
into the plan (`assumptions`). Without `compute`, the plan leaves out what needs the tokenizer and
torch (training tokens, steps, GPU-hours): that is the part the preflight (`preflight.py`) checks
inside Snakemake before the first job, where importing torch would cost seconds.

    python -m asclepius_r.plan.estimate --config config.yaml [--config demo/config.yaml] [--json results/plan/plan.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asclepius_r import config as workflow_config
from asclepius_r.files import write_json
from asclepius_r.plan.disk import CHECKPOINT_BYTES_PER_PARAM, folder_bytes
from asclepius_r.plan.gpu_stages import (
    DEFAULT_MFU,
    add_training_compute,
    evaluation_row,
    measured_mfu,
    peak_tflops,
    training_rows,
)
from asclepius_r.plan.inputs import ensure_notes, missing_inputs, model_shape, note_lengths, visible_gpus
from asclepius_r.plan.llm_stages import LLM_CHARS_PER_TOKEN, MESSAGE_TOKENS, instruction_row, judge_row, llm_problems
from asclepius_r.plan.memory import GRADIENT_BYTES_PER_PARAM, STATE_BYTES_PER_PARAM
from asclepius_r.plan.table import format_plan, row_name


def make_plan(config: dict, notes_dir: str | Path | None, compute: bool = True, gpus: list[dict] | None = None) -> dict:
    """The plan of a run of `config` from the notes in `notes_dir` (None: not there yet)."""
    notes_dir = Path(notes_dir) if notes_dir else None
    shapes = {size: model_shape(config, size) for size in config["models"]}
    stages: dict[str, dict] = {}  # by row_name, in the order the run goes through them
    notes = None
    if notes_dir is not None:
        train, heldout = note_lengths(notes_dir / "discharge.parquet"), note_lengths(notes_dir / "heldout.parquet")
        notes = {
            "train": len(train),
            "heldout": len(heldout),
            "train_chars": int(train.sum()),
            "heldout_chars": int(heldout.sum()),
            "folder": str(notes_dir),
        }
        stages["notes"] = {"stage": "notes", "jobs": 1, "gpus": 0, "disk_bytes": folder_bytes(notes_dir)}
        stages["instructions"] = instruction_row(config, train, heldout)
    training = training_rows(config, shapes)
    stages.update((row_name(row), row) for row in training)
    stages["answer_heldout"] = evaluation_row(config, shapes, notes["heldout"] if notes else None)
    if notes is not None:
        stages["judge"] = judge_row(config, heldout)
    exports = sum(r["disk_bytes"] for r in training)
    archives = sum(r.get("archive_bytes", 0) for r in stages.values())
    dataset = stages["instructions"]["disk_bytes"] if "instructions" in stages else 0
    stages["release"] = {"stage": "release", "jobs": 1, "gpus": 0, "disk_bytes": int(exports + archives + dataset)}
    gpus = visible_gpus() if gpus is None else gpus
    assumptions = {
        "llm_tokens": f"characters / {LLM_CHARS_PER_TOKEN:g} plus {MESSAGE_TOKENS} per message (an upper bound "
        "for GPT-4o-class tokenizers, about 4 characters per token on English)",
        "completion_tokens": "every request at its max_tokens cap (an upper bound)",
        "requests": "one attempt per request; retries, billed `length` responses and judge parse retries add to it",
        "instructions_prompts": "question prompts with the task's 5 longest seed questions as examples, answer "
        "prompts with the longest seed question",
        "hours_online": "requests and tokens paced at 98% of llm.requests_per_minute and llm.tokens_per_minute",
        "batch": "Batch API at llm.batch_discount; each batch may take up to 24 h",
        "checkpoints": f"save_total_limit + 1 checkpoints of {CHECKPOINT_BYTES_PER_PARAM} bytes per parameter "
        "(fp32 weights and Adam moments) per training job while it runs; deleted once it has exported",
        "memory_per_gpu": f"{STATE_BYTES_PER_PARAM} bytes per parameter of weights and Adam state (sharded over "
        f"the job's devices under FSDP); fp32 gradients: under FSDP a {GRADIENT_BYTES_PER_PARAM}-byte shard per "
        "parameter (reduce-scattered every micro-batch) plus two layers' whole gradients in flight, without FSDP "
        f"{GRADIENT_BYTES_PER_PARAM} bytes per parameter; activations with checkpointing, fp32 logits, 3 GiB overhead",
        "models": {size: source for size, (_, source) in shapes.items()},
    }
    if compute and notes_dir is not None:
        mfu = measured_mfu()
        peak, peak_source = peak_tflops(config, gpus)
        assumptions["mfu"] = (
            f"{mfu[0]:g} measured on {mfu[1]} (BENCHMARKS.md)"
            if mfu
            else f"{DEFAULT_MFU:g} assumed (BENCHMARKS.md has no measured MFU)"
        )
        assumptions["peak_tflops_per_device"] = f"{peak:g} ({peak_source})"
        add_training_compute(config, training, shapes, notes_dir, peak, mfu[0] if mfu else DEFAULT_MFU)
    rows = list(stages.values())
    return {
        "notes": notes,
        "stages": rows,
        "totals": _totals(config, rows),
        "assumptions": assumptions,
        "missing": missing_inputs(config) + llm_problems(config) + ([] if notes else ["notes: not there yet"]),
        "budget_usd": config["llm"]["budget_usd"],
        "gpus_visible": gpus,
    }


def _totals(config: dict, rows: list[dict]) -> dict:
    def total(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) if values else None

    checkpoint = max((r.get("checkpoint_bytes", 0) for r in rows), default=0)
    disk = sum(r.get("disk_bytes", 0) + r.get("archive_bytes", 0) for r in rows)
    return {
        "requests": total("requests"),
        "usd": total("usd_batch" if config["llm"]["mode"] == "batch" else "usd_online"),
        "usd_online": total("usd_online"),
        "usd_batch": total("usd_batch"),
        "gpu_hours": total("gpu_hours"),
        "disk_bytes": disk,
        # One training job's checkpoints at a time beside everything the run keeps.
        "disk_peak_bytes": disk + checkpoint,
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m asclepius_r.plan.estimate --config config.yaml`: print the plan and write it as JSON."""
    from asclepius_r.logs import setup_logging

    parser = argparse.ArgumentParser(description="What a run will cost, take and need, per stage, before it starts.")
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help="config file; repeat to lay one over another (like snakemake --configfile)",
    )
    parser.add_argument("--notes", default="results/notes", help="the notes stage's folder; run into it if missing")
    parser.add_argument("--json", default="results/plan/plan.json", help="where to write the plan as JSON")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = workflow_config.load_layers(args.config)
        notes = ensure_notes(config, args.notes)
        plan = make_plan(config, notes)
    except (workflow_config.ConfigError, ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    write_json(args.json, plan)
    print(format_plan(plan))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
