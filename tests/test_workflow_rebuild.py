"""Partial rebuilds, planned by Snakemake's own API on the finished demo: a changed setting
outdates exactly its stage and what follows, and an unchanged rerun outdates nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

pytestmark = pytest.mark.slow

FINETUNE_AND_AFTER = {
    "results/models/Asclepius-R-7B", "results/models/Asclepius-R-13B",
    "results/metrics/finetune-7B.jsonl", "results/metrics/finetune-13B.jsonl",
    "results/evaluation/answers/Asclepius-R-7B.jsonl", "results/evaluation/answers/Asclepius-R-13B.jsonl",
    "results/evaluation/summary.json",
}


def planned_outputs(workdir: Path, config: dict | None = None) -> set[str]:
    """The files a run would (re)make, from a dry run through the Snakemake API."""
    updated: list[str] = []
    cwd = os.getcwd()
    try:
        with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
            workflow = api.workflow(
                resource_settings=ResourceSettings(cores=1),
                config_settings=ConfigSettings(configfiles=[workdir / "demo/config.yaml"], config=config or {}),
                snakefile=workdir / "Snakefile",
                workdir=workdir,
            )
            workflow.dag(DAGSettings()).execute_workflow(executor="dryrun", updated_files=updated)
    finally:
        os.chdir(cwd)
    return {os.path.relpath(os.path.join(workdir, f), workdir) for f in updated}


def test_unchanged_rerun_outdates_nothing(demo_run):
    assert planned_outputs(demo_run) == set()


def test_finetune_setting_outdates_finetuning_and_what_follows(demo_run):
    planned = planned_outputs(demo_run, {"finetune": {"learning_rate": 5e-4}})
    # Release-side targets (report, archive, release folder) follow too; nothing before finetuning may.
    before = {p for p in planned if p.startswith(("results/notes", "results/instructions", "results/base_models",
                                                 "results/mimiciii", "results/metrics/pretrain"))
              or "Pretrained-Only" in p or "LLaMA-" in p}
    assert before == set()
    assert FINETUNE_AND_AFTER <= planned
    assert "release" in planned


def test_notes_setting_outdates_everything(demo_run):
    planned = planned_outputs(demo_run, {"notes": {"heldout_notes": 5}})
    assert {"results/notes/discharge.parquet", "results/instructions/discharge.jsonl",
            "results/mimiciii_discharge.csv", "results/base_models/7B",
            "results/models/Asclepius-R-7B-Pretrained-Only", "results/models/Asclepius-R-7B",
            "results/evaluation/summary.json", "release"} <= planned
