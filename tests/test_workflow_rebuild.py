"""Partial rebuilds, planned by Snakemake's own API on the finished demo: a changed setting
outdates exactly its stage and what follows, and an unchanged rerun outdates nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FINETUNE_AND_AFTER = {
    "results/models/Asclepius-R-7B",
    "results/models/Asclepius-R-13B",
    "results/metrics/finetune-7B.jsonl",
    "results/metrics/finetune-13B.jsonl",
    "results/evaluation/answers/Asclepius-R-7B.jsonl",
    "results/evaluation/answers/Asclepius-R-13B.jsonl",
    "results/evaluation/summary.json",
}


PLAN = """
import json, os, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

workdir, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
updated = []
with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
    workflow = api.workflow(
        resource_settings=ResourceSettings(cores=1),
        config_settings=ConfigSettings(configfiles=[workdir / "demo/config.yaml"], config=overrides),
        snakefile=workdir / "Snakefile",
        workdir=workdir,
    )
    workflow.dag(DAGSettings()).execute_workflow(executor="dryrun", updated_files=updated)
print(json.dumps([os.path.relpath(os.path.join(workdir, f), workdir) for f in updated]))
"""


def planned_outputs(workdir: Path, config: dict | None = None) -> set[str]:
    """The files a run would (re)make, from a dry run through the Snakemake API.

    It runs in a child process so that the workflow imports the package of `workdir`, not the
    copy this test process has already imported.
    """
    result = subprocess.run(
        [sys.executable, "-c", PLAN, str(workdir), json.dumps(config or {})],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(workdir)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_unchanged_rerun_outdates_nothing(demo_run):
    assert planned_outputs(demo_run) == set()


def test_operational_settings_outdate_nothing(demo_run):
    """Concurrency, budget, endpoint, threads, batch size: how the run goes, not what it makes
    (before, the LLM's changed 21 jobs, retraining both models)."""
    operational = {
        "llm": {"max_concurrency": 3, "budget_usd": 1000, "base_url": "http://127.0.0.1:9/v1", "timeout_s": 5},
        "launch": {"threads": 1, "ddp_timeout_s": 600},
        "evaluate": {"batch_size": 2},
        "finetune": {"logging_steps": 1, "gradient_checkpointing": True},
    }
    assert planned_outputs(demo_run, operational) == set()


def test_finetune_setting_outdates_finetuning_and_what_follows(demo_run):
    planned = planned_outputs(demo_run, {"finetune": {"learning_rate": 5e-4}})
    # Release-side targets (report, archive, release folder) follow too; nothing before finetuning may.
    before = {
        p
        for p in planned
        if p.startswith(
            (
                "results/notes",
                "results/instructions",
                "results/base_models",
                "results/mimiciii",
                "results/metrics/pretrain",
            )
        )
        or "Pretrained-Only" in p
        or "/Base-" in p
    }
    assert before == set()
    assert FINETUNE_AND_AFTER <= planned
    assert "release" in planned


def test_notes_setting_outdates_everything(demo_run):
    planned = planned_outputs(demo_run, {"notes": {"heldout_notes": 5}})
    assert {
        "results/notes/discharge.parquet",
        "results/instructions/discharge.jsonl",
        "results/mimiciii_discharge.csv",
        "results/base_models/7B",
        "results/models/Asclepius-R-7B-Pretrained-Only",
        "results/models/Asclepius-R-7B",
        "results/evaluation/summary.json",
        "release",
    } <= planned
