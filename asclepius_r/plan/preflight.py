"""Preflight: the plan checked against this machine and the config before the first GPU or paid job.

Snakemake calls `check` from its onstart hook (rules/plan.smk), once the DAG is built and before
any job starts, when the jobs to run include a GPU stage (pretrain, finetune, answer_heldout) or
a paid one (instructions or the judge through a live endpoint). It checks:
- disk: free space where results/ lies against what the jobs to run will write, with the
  checkpoints of as many training jobs as the GPUs let run at once;
- GPUs (local execution only; a cluster's nodes are not this machine): as many visible as each
  job is given, with the memory its model and micro-batch need; without a GPU, that the CPU
  fallback is meant for the model (the demo's tiny ones) and fits in memory;
- base models: each real base folder one the workflow handles (config, a SentencePiece or BPE
  tokenizer, a LLaMA architecture; `describe_base`) and complete (every weight file);
- LLM: the paid stages' endpoints approved, their keys set and priced, and each archive's
  spending so far plus the plan's dollars for the rest (archived responses are not paid again)
  within `llm.budget_usd`, which is the archive's across runs.
A failed check raises PreflightError naming every failure and what to change; no job has run.
`ASCLEPIUS_FREE_DISK_GB` replaces the measured free disk (to keep a reserve, or in tests).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from asclepius_r import config as workflow_config
from asclepius_r.base_model.describe import is_built_base
from asclepius_r.errors import UserError
from asclepius_r.files import write_json
from asclepius_r.llm import LLMSettings
from asclepius_r.plan.disk import DTYPE_BYTES
from asclepius_r.plan.estimate import make_plan
from asclepius_r.plan.inputs import ensure_notes, model_shape, parameter_counts, visible_gpus
from asclepius_r.plan.memory import USABLE_MEMORY_FRACTION, training_memory_bytes
from asclepius_r.plan.table import GB, GIB, rows_by_name, size_text
from asclepius_r.train.settings import training_settings

GPU_RULES = ("pretrain", "finetune", "answer_heldout")
# Training on CPU processes is for the demo's tiny models; a real LLaMA would take years.
CPU_TRAINING_MAX_PARAMS = 1e9
FREE_DISK_ENV = "ASCLEPIUS_FREE_DISK_GB"
# The plan row holding the disk each rule writes.
ROW_OF_RULE = {
    "filter_notes": "notes",
    "generate_instructions": "instructions",
    "answer_heldout": "answer_heldout",
    "judge_heldout": "judge",
    "release": "release",
}


class PreflightError(RuntimeError):
    """The run would fail or overspend; the message lists each reason and what to change."""


@dataclass(frozen=True)
class Job:
    """A job of the DAG that is about to run: its rule, wildcards and the GPUs it is given."""

    rule: str
    wildcards: dict
    gpus: int = 0


def paid_rules(config: dict) -> set[str]:
    """Rules that send requests to a live endpoint (and so may cost money)."""
    if config["llm"]["backend"] == "replay":
        return set()
    return {"generate_instructions"} | ({"judge_heldout"} if config["judge"]["backend"] == "llm" else set())


def base_folder_problems(size: str, folder: Path) -> list[str]:
    """A real base folder must hold a config, tokenizer and architecture the workflow handles
    (`describe_base`), and every weight file, complete."""
    from asclepius_r.base_model.describe import describe_base

    where = f"models.{size}.base ({folder})"
    if not folder.is_dir():
        return [f"{where} does not exist"]
    try:
        describe_base(folder)
    except UserError as error:
        return [f"{where} cannot be used: {error}"]
    shape = json.loads((folder / "config.json").read_text())
    missing = []
    indexes = [folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")]
    index = next((path for path in indexes if path.exists()), None)
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [name for name in shards if not (folder / name).exists()]
        weights = [folder / name for name in shards if (folder / name).exists()]
    else:
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin"))
        if not weights:
            missing.append("model.safetensors (no weight file)")
    if missing:
        return [f"{where} is incomplete: missing {', '.join(missing)}"]
    expected = parameter_counts(shape)[0] * DTYPE_BYTES.get(str(shape.get("torch_dtype", "float16")), 2)
    found = sum(path.stat().st_size for path in weights)
    if found < 0.95 * expected:
        return [
            f"{where} is incomplete: its weight files hold {found / GB:.1f} GB where "
            f"{expected / GB:.1f} GB are expected (an interrupted download?)"
        ]
    return []


def free_disk_bytes(folder: Path) -> float:
    override = os.environ.get(FREE_DISK_ENV)
    if override is not None:
        return float(override) * GB
    return shutil.disk_usage(folder).free


def _disk_problem(
    config: dict, plan: dict, jobs: list[Job], workdir: Path, gpu_limit: int | None, summary: list[str]
) -> list[str]:
    rows = rows_by_name(plan)
    needed, parts = 0, []
    for job in jobs:
        if job.rule in ("pretrain", "finetune"):
            row = rows[f"{job.rule} {job.wildcards['size']}"]
            label = f"{job.rule} {job.wildcards['size']} export"
        elif job.rule in ROW_OF_RULE:
            row = rows.get(ROW_OF_RULE[job.rule])
            label = ROW_OF_RULE[job.rule]
            if row is None or job.rule == "answer_heldout":  # one row for all answer jobs
                continue
        else:
            continue
        needed += row.get("disk_bytes", 0) + row.get("archive_bytes", 0) / max(1, row.get("jobs", 1))
        parts.append(label)
    if any(job.rule == "answer_heldout" for job in jobs):
        needed += rows["answer_heldout"]["disk_bytes"]
    # Checkpoints: of as many training jobs at once as the GPUs allow, largest first.
    training = sorted(
        (
            (rows[f"{job.rule} {job.wildcards['size']}"]["checkpoint_bytes"], job.gpus)
            for job in jobs
            if job.rule in ("pretrain", "finetune")
        ),
        reverse=True,
    )
    checkpoints, gpus_in_use = 0, 0
    for size, gpus in training:
        if checkpoints and gpu_limit is not None and gpus_in_use + gpus > gpu_limit:
            break
        checkpoints += size
        gpus_in_use += gpus
    needed += checkpoints
    free = free_disk_bytes(workdir)
    summary.append(f"disk: {size_text(needed)} needed (checkpoints {size_text(checkpoints)}), {size_text(free)} free")
    if needed <= free:
        return []
    return [
        f"disk: the jobs to run need about {size_text(needed)} ({', '.join(parts) or 'outputs'}; training "
        f"checkpoints {size_text(checkpoints)} while they run) but {size_text(free)} are free on "
        f"{workdir.resolve()}: free space or run in a larger folder, lower save_total_limit in pretrain/finetune "
        "(checkpoints kept per job), or run fewer training jobs at once (--resources gpu)"
    ]


def _gpu_problems(config: dict, plan: dict, jobs: list[Job], gpus: list[dict]) -> list[str]:
    """Each GPU job against the visible devices: their count, and the memory its model and
    micro-batch need (on CPU: the host's memory, and a model small enough to train there)."""
    problems = []
    on_cpu = not gpus or any(g["memory_bytes"] is None for g in gpus)  # none, or fake ones
    memory = (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if on_cpu else min(g["memory_bytes"] for g in gpus)
    )
    sharded = bool(config["launch"]["accelerate_config"])
    for job in jobs:
        if job.rule not in GPU_RULES:
            continue
        if job.rule == "answer_heldout":
            row = rows_by_name(plan)["answer_heldout"]
            name, params, need, devices = (
                f"answer_heldout {job.wildcards.get('model', '')}",
                row["params"],
                row["memory_per_gpu_bytes"],
                1,
            )
        else:
            size = job.wildcards["size"]
            shape, _ = model_shape(config, size)
            params = parameter_counts(shape)[0]
            settings = training_settings(config, job.rule, size)
            # Without CUDA the launcher starts cpu_processes processes, each with the whole model.
            devices = config["launch"]["cpu_processes"] if on_cpu else max(1, job.gpus)
            need = training_memory_bytes(
                shape, params, settings, job.rule, devices, sharded and devices > 1 and not on_cpu
            )
            name = f"{job.rule} {size}"
        if gpus and job.gpus > len(gpus):
            problems.append(
                f"GPUs: {name} is given {job.gpus} GPU(s) but {len(gpus)} are visible: lower models.<size>.gpus "
                "or --resources gpu, or run where more are visible"
            )
        if on_cpu and params > CPU_TRAINING_MAX_PARAMS:
            problems.append(
                f"GPUs: no real GPU is visible here (nvidia-smi lists none), so {name} would run on CPU with "
                f"{params / 1e9:.1f}B parameters: run on a GPU machine, or with a cluster profile"
            )
        elif on_cpu and need * devices > USABLE_MEMORY_FRACTION * memory:
            problems.append(
                f"memory: {name} on CPU needs about {need * devices / GIB:.1f} GiB, {memory / GIB:.1f} are here"
            )
        elif not on_cpu and need > USABLE_MEMORY_FRACTION * memory:
            problems.append(
                f"GPU memory: {name} needs about {need / GIB:.1f} GiB per GPU on {devices} GPU(s)"
                f"{' (FSDP)' if sharded and devices > 1 else ''}, gradients included, but the visible GPUs have "
                f"{memory / GIB:.1f} GiB: give it more GPUs (models.<size>.gpus and --resources gpu), lower "
                "pretrain.per_device_batch_size (the global batch stays global_batch_size), or use GPUs with more "
                "memory"
            )
    return problems


def _archive_state(archive: str | None, settings, requests: int) -> tuple[float, float]:
    """(share of the planned requests already answered, dollars already billed) of an archive;
    the budget is the archive's, across runs, as the client counts it."""
    from asclepius_r.llm.archive import Archive

    if not archive or not Path(archive).exists():
        return 0.0, 0.0
    store = Archive(archive)
    answered = store.answered()
    spent = sum(settings.price(usage, batch, model) for (model, batch), usage in store.billed.items())
    return (min(1.0, answered / requests) if requests else 0.0), spent


def _money_problems(config: dict, plan: dict, jobs: list[Job], summary: list[str]) -> list[str]:
    """The paid stages' LLM problems (approval, key, price) and each archive's spending so far
    plus the plan's upper bound for the rest against `llm.budget_usd`."""
    from asclepius_r.evaluate.judge import judge_llm_settings

    rules = {job.rule for job in jobs} & paid_rules(config)
    if not rules:
        return []
    problems = [
        item
        for item in plan["missing"]
        if (item.startswith("llm:") and "generate_instructions" in rules)
        or (item.startswith("judge:") and "judge_heldout" in rules)
    ]
    batch = config["llm"]["mode"] == "batch"
    budget = config["llm"]["budget_usd"]
    stages = (
        ("generate_instructions", "instructions", LLMSettings.from_config(config["llm"])),
        ("judge_heldout", "judge", judge_llm_settings(config)),
    )
    for rule, stage, settings in stages:
        row = rows_by_name(plan).get(stage)
        if rule not in rules or row is None or row["usd_online"] is None:
            continue
        answered, spent = _archive_state(settings.archive, settings, row["requests"])
        rest = (row["usd_batch"] if batch else row["usd_online"]) * (1 - answered)
        summary.append(
            f"{stage}: at most ${rest:,.2f} more, ${spent:,.2f} spent in {settings.archive}; budget {budget}"
        )
        if budget is not None and spent + rest > budget:
            cheaper = "" if batch else f"; llm.mode: batch would cost about ${rest * settings.batch_discount:,.2f}"
            problems.append(
                f"budget: {stage} needs at most ${rest:,.2f} by the plan's upper bound (every completion at "
                f"max_tokens) beside ${spent:,.2f} already spent in {settings.archive}, over llm.budget_usd "
                f"${budget:,.2f}: raise llm.budget_usd, lower llm.max_tokens or judge.max_tokens, or choose a "
                f"cheaper model{cheaper}"
            )
    return problems


def check(config: dict, jobs: list[Job], workdir: str | Path = ".", local: bool = True, gpu_limit: int | None = None):
    """Check the jobs about to run; return the plan checked, with what was checked under
    "preflight" (None when no job is a GPU or paid one), or raise PreflightError. The plan is
    also written to results/plan/preflight.json."""
    workdir = Path(workdir)
    checked = [job for job in jobs if job.rule in GPU_RULES or job.rule in paid_rules(config)]
    if not checked:
        return None
    gpus = visible_gpus() if local else []
    notes_dir = workdir / "results/notes"
    (workdir / "results").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir / "results", prefix=".preflight-notes.") as scratch:
        # The notes as the run will see them: results/notes if the DAG keeps it, else the notes
        # stage run into a scratch folder (seconds; the rule makes its own outputs).
        current = "filter_notes" not in {job.rule for job in jobs} and notes_dir.is_dir()
        plan = make_plan(config, notes_dir if current else ensure_notes(config, scratch), compute=False, gpus=gpus)
    problems = []
    for size in sorted(
        {
            job.wildcards.get("size") or job.wildcards.get("model", "").removeprefix(workflow_config.BASE_PREFIX)
            for job in checked
        }
    ):
        base = config["models"].get(size, {}).get("base")
        if base and not is_built_base(base):
            problems += base_folder_problems(size, Path(base))
    summary: list[str] = []
    problems += _disk_problem(config, plan, jobs, workdir, gpu_limit, summary)
    if local:
        problems += _gpu_problems(config, plan, checked, gpus)
        summary.append(f"GPUs: {len(gpus)} visible" + (f" ({gpus[0]['name']})" if gpus else ", the jobs run on CPU"))
    else:
        summary.append("GPUs: not checked here (jobs run on cluster nodes, not on this machine)")
    problems += _money_problems(config, plan, checked, summary)
    plan["preflight"] = {"jobs": [job.rule for job in checked], "checked": summary, "problems": problems}
    write_json(workdir / "results/plan/preflight.json", plan)
    if problems:
        raise PreflightError(
            "preflight stopped the run before any job:\n  - "
            + "\n  - ".join(problems)
            + "\nThe plan it checked: results/plan/preflight.json (`make plan` prints it)."
        )
    return plan
