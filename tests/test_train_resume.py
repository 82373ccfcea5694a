"""Crash resume: a training job killed with SIGKILL continues from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from asclepius_r.train.checkpoints import last_complete_checkpoint, prepare_checkpoint_dir
from asclepius_r.train.launch import run_fingerprint
from asclepius_r.train.run import TrainRun
from support.train_fixtures import build_fixture_data, launch_command, launch_env, run_launch, write_run

STEPS = 300


@pytest.mark.slow
def test_killed_pretraining_resumes_from_its_checkpoint(tmp_path):
    data = build_fixture_data(tmp_path)
    run_file = write_run(tmp_path, "pretrain", data, max_length=64, max_steps=STEPS, save_steps=10)
    run = json.loads(run_file.read_text())
    checkpoints, output = Path(run["checkpoint_dir"]), Path(run["output_dir"])
    job = subprocess.Popen(
        launch_command("pretrain", run_file),
        env=launch_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Kill once a checkpoint is complete and its tokenizer.model (copied just after) is in place.
    while (last := last_complete_checkpoint(checkpoints)) is None or not (last / "tokenizer.model").exists():
        assert job.poll() is None, f"training ended before its first checkpoint: {job.stderr.read()[-4000:]}"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    killed_at = last_complete_checkpoint(checkpoints)
    step_at_kill = json.loads((killed_at / "trainer_state.json").read_text())["global_step"]
    assert step_at_kill < STEPS and not output.exists(), "the job must die mid-training"
    assert (killed_at / "tokenizer.model").read_bytes() == (data["model"] / "tokenizer.model").read_bytes()
    (checkpoints / f"checkpoint-{STEPS - 1}").mkdir()  # as if killed while writing a newer checkpoint

    result = run_launch("pretrain", run_file)

    summary = json.loads((output / "training_run.json").read_text())
    resumed = int(summary["resumed_from"].split("-")[1])
    assert step_at_kill <= resumed < STEPS, result.stderr[-3000:]
    assert summary["global_step"] == STEPS
    assert "removing incomplete checkpoint" in result.stderr
    steps = [json.loads(line)["step"] for line in Path(run["metrics_file"]).read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), "each step logged once: resumed, not restarted"
    assert (output / "tokenizer.model").exists() and (output / "model.safetensors").exists()
    assert not checkpoints.exists(), "checkpoints are removed once the model is written"


def test_checkpoints_of_other_settings_are_discarded(tmp_path):
    folder = tmp_path / "checkpoints"
    prepare_checkpoint_dir(folder, {"learning_rate": 1e-3})
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    prepare_checkpoint_dir(folder, {"learning_rate": 1e-3})
    assert last_complete_checkpoint(folder).name == "checkpoint-5", "same settings: resume"
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "trainer_state.json").write_text('{"global_st')  # torn write
    prepare_checkpoint_dir(folder, {"learning_rate": 1e-3})
    assert not (folder / "checkpoint-10").exists()
    prepare_checkpoint_dir(folder, {"learning_rate": 2e-3})
    assert last_complete_checkpoint(folder) is None, "changed settings: start afresh"


def test_a_job_that_died_of_its_timeout_resumes_under_a_longer_one(tmp_path):
    """How a run is waited for, watched or saved is not what its checkpoints hold: a rerun with a
    longer ddp_timeout_s (or other logging or saving) resumes; a changed hyperparameter starts afresh."""
    data = build_fixture_data(tmp_path)
    run = TrainRun.from_json(write_run(tmp_path / "run", "pretrain", data, ddp_timeout_s=600))
    fingerprint = run_fingerprint("pretrain", run)
    for neutral in ({"ddp_timeout_s": 36000}, {"logging_steps": 50, "save_steps": 7}):
        assert run_fingerprint("pretrain", replace(run, **neutral)) == fingerprint
    assert run_fingerprint("pretrain", replace(run, learning_rate=3e-5)) != fingerprint
