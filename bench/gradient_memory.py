"""Benchmark: gradient memory per GPU while accumulating under FSDP2, measured and as the plan counts it.

Measured: two gloo CPU processes train 2 pretraining steps of 2 accumulated micro-batches under the
repository's FSDP config (bf16 policy) through support/fsdp_cpu_entry.py, which records the gradient
bytes each rank holds between micro-batches (unsharded and sharded). The model is a 39M-parameter
LLaMA (157 MB of fp32 gradients). Baseline: the Trainer's default accumulation, no gradient sync
until a step's last micro-batch (what training did before); ours: a reduce-scatter after every
micro-batch (`sync_each_batch` under FSDP, asclepius_r.train.run.training_arguments).

Planned: the plan's memory per GPU (asclepius_r.plan.memory.training_memory_bytes) for LLaMA-7B and 13B at
the paper's batch (config.yaml: 8 GPUs, FSDP, 2048 tokens, 2 blocks per micro-batch), with the
gradients as the code now holds them and, as the baseline, whole fp32 gradients on every GPU.

    .venv/bin/python bench/gradient_memory.py      (about 2 minutes on 2 cores)
Last lines: RESULT accumulation=<unsynced|synced> grad_bytes_per_rank=<unsharded>+<sharded> full=<bytes>
            RESULT plan size=<7B|13B> stage=<...> gib_per_gpu=<ours> baseline_gib_per_gpu=<...> gradient_gib=<...>
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from asclepius_r import config as workflow_config
from asclepius_r.plan.inputs import model_shape, parameter_counts
from asclepius_r.plan.memory import GRADIENT_BYTES_PER_PARAM, gradient_bytes, training_memory_bytes
from asclepius_r.plan.table import GIB
from asclepius_r.train.launch import prepare_run
from asclepius_r.train.run import TrainRun
from asclepius_r.train.settings import training_settings
from support.train_fixtures import TINY, build_fixture_data, cpu_fsdp_config, launch_fsdp, probes, write_run

REPO = Path(__file__).resolve().parents[1]


def measured() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        data = build_fixture_data(root, replace(TINY, hidden_size=768, intermediate_size=3072, num_hidden_layers=4))
        AutoModelForCausalLM.from_pretrained(data["model"], dtype=torch.bfloat16).save_pretrained(data["model"])
        for name, unsynced in (("unsynced", "1"), ("synced", "0")):
            run_file = write_run(
                root / name, "pretrain", data, max_steps=2, max_length=128, per_device_batch_size=1, global_batch_size=4
            )
            prepare_run("pretrain", TrainRun.from_json(run_file))
            os.environ["PROBE_UNSYNCED_ACCUMULATION"] = unsynced
            config = cpu_fsdp_config(root / name, mixed_precision="bf16")
            result = launch_fsdp(config, run_file, root / name / "probe", stage="pretrain")
            if result.returncode:
                raise SystemExit(result.stderr[-4000:])
            for record in probes(root / name / "probe"):
                full = 4 * sum(math.prod(p["shape"]) for p in record["parameters"].values())
                held = record["accumulated_grad_bytes"]
                share = (held["unsharded"] + held["sharded"]) / full
                print(
                    f"rank {record['rank']}, {name}: {held['unsharded'] / 1e6:.1f} MB unsharded + "
                    f"{held['sharded'] / 1e6:.1f} MB sharded = {share:.2f} x the model's fp32 gradients"
                )
            print(f"RESULT accumulation={name} grad_bytes_per_rank={held['unsharded']}+{held['sharded']} full={full}")


def planned() -> None:
    config = workflow_config.load(REPO / "config.yaml", require_data=False)
    for size in ("7B", "13B"):
        shape, _ = model_shape(config, size)
        params = parameter_counts(shape)[0]
        gpus = config["models"][size]["gpus"]
        for stage in ("pretrain", "finetune"):
            settings = training_settings(config, stage, size, shape["max_position_embeddings"])
            ours = training_memory_bytes(shape, params, settings, stage, gpus, sharded=True)
            gradients = gradient_bytes(shape, params, gpus, sharded=True)
            whole = GRADIENT_BYTES_PER_PARAM * params  # every parameter's fp32 gradient on every GPU
            print(
                f"RESULT plan size={size} stage={stage} gib_per_gpu={ours / GIB:.1f} "
                f"baseline_gib_per_gpu={(ours - gradients + whole) / GIB:.1f} gradient_gib={gradients / GIB:.2f} "
                f"baseline_gradient_gib={whole / GIB:.1f}"
            )


if __name__ == "__main__":
    planned()
    measured()
