"""A training job killed with SIGKILL under Snakemake resumes from its last checkpoint when the
workflow is rerun (the checkpoints live outside the rule's declared output)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from asclepius_r.train.checkpoints import last_complete_checkpoint
from tests.conftest import SNAKEMAKE, copy_workflow, run_snakemake

pytestmark = pytest.mark.slow

TARGET = "results/models/Asclepius-R-7B-Pretrained-Only"
LONGER_PRETRAINING = "pretrain:\n  max_steps: 400\n  save_steps: 25\n  max_length: 64\n  logging_steps: 5\n"


def test_killed_snakemake_run_resumes_training_from_its_checkpoint(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "crash.yaml").write_text(LONGER_PRETRAINING)
    configs = ["--configfile", "demo/config.yaml", "crash.yaml"]
    command = SNAKEMAKE + [TARGET, "--cores", "2", "--resources", "gpu=1", *configs]
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    job = subprocess.Popen(
        command,
        cwd=workdir,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = workdir / "results/checkpoints/pretrain-7B"
    while not (checkpoints.exists() and last_complete_checkpoint(checkpoints)):
        assert job.poll() is None, f"the run ended before its first checkpoint:\n{job.stderr.read()[-4000:]}"
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)  # Snakemake and its training job die at once
    job.wait()
    killed_at = json.loads((last_complete_checkpoint(checkpoints) / "trainer_state.json").read_text())["global_step"]
    assert killed_at < 400 and not (workdir / TARGET / "model.safetensors").exists()

    # What a user does after a crash: release Snakemake's lock, then rerun.
    run_snakemake(workdir, TARGET, "--unlock", *configs, demo=False)
    run_snakemake(workdir, TARGET, "--rerun-incomplete", *configs, demo=False)

    summary = json.loads((workdir / TARGET / "training_run.json").read_text())
    assert summary["resumed_from"] is not None, "the rerun must resume, not start again"
    assert int(summary["resumed_from"].split("-")[1]) >= killed_at
    assert summary["global_step"] == 400
    assert "resuming from" in (workdir / "logs/pretrain/7B.log").read_text()
