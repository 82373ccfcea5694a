"""The learning check's GPU budget (`python -m learning.run --gpu`, learning/gpu.yaml) is a valid
layer over learning/config.yaml that plans the whole check on one GPU, at the paper's lengths in
whole epochs, and never falls back to the CPU. No GPU is needed to plan it (a dry run)."""

from __future__ import annotations

import os
import subprocess

from learning import run as learning


def test_the_gpu_budget_trains_whole_epochs_at_paper_length_in_bf16_on_one_gpu(tmp_path):
    learning.write_overlay(tmp_path, gpu=True, seed=7)
    config = learning.resolved_config(tmp_path)
    for stage in ("pretrain", "finetune"):
        section = config[stage]
        assert (section["max_steps"], section["max_length"], section["bf16"], section["seed"]) == (-1, 2048, True, 7)
    assert config["finetune"]["epochs"] == 3
    assert config["launch"]["cpu_fallback"] is False
    assert config["evaluate"]["loss_max_length"] == 2048
    assert (config["models"]["smol"]["base"], config["models"]["smol"]["gpus"]) == ("smollm2", 1)


def test_the_cpu_check_keeps_its_own_budget(tmp_path):
    learning.write_overlay(tmp_path)
    config = learning.resolved_config(tmp_path)
    assert (config["pretrain"]["max_steps"], config["finetune"]["max_length"]) == (12, 512)
    assert config["launch"]["cpu_fallback"] is True


def test_a_dry_run_of_the_gpu_budget_plans_every_stage_of_the_check(tmp_path, smollm2_gguf):
    learning.write_overlay(tmp_path, gpu=True)
    command = learning.snakemake_command("2", ["--dry-run", "--quiet", "rules"])
    done = subprocess.run(
        command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(learning.REPO)}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    planned = done.stdout + done.stderr
    for rule in ("convert_gguf_base", "pretrain", "finetune", "heldout_losses", "answer_heldout", "judge"):
        assert rule in planned
