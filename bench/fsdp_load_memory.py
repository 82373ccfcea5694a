"""Benchmark: host memory each FSDP rank takes to load the model, with and without rank-0-only loading.

Two gloo CPU processes run one pretraining step under the repository's FSDP config (bf16 policy)
through support/fsdp_cpu_entry.py, which records each rank's RSS growth across
load_model_and_tokenizer. The model is a 39M-parameter LLaMA (157 MB in fp32) saved in bf16, as
LLaMA's checkpoints are 16-bit. Baseline: fsdp_cpu_ram_efficient_loading off, where every rank
reads the weights (what every rank did before, also with it on, under transformers 5.23).

    .venv/bin/python bench/fsdp_load_memory.py      (about 3 minutes on 2 cores)
Last lines: RESULT loading=<every_rank|rank_0> rss_growth_mb=<rank 0>,<rank 1> peak_rss_growth_mb=<...>
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from asclepius_r.train.launch import prepare_run
from asclepius_r.train.run import TrainRun
from support.train_fixtures import TINY, build_fixture_data, cpu_fsdp_config, launch_fsdp, probes, write_run


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        data = build_fixture_data(root, replace(TINY, hidden_size=768, intermediate_size=3072, num_hidden_layers=4))
        AutoModelForCausalLM.from_pretrained(data["model"], dtype=torch.bfloat16).save_pretrained(data["model"])
        for rank_0_only in (False, True):
            name = "rank_0" if rank_0_only else "every_rank"
            run_file = write_run(root / name, "pretrain", data, max_steps=1, max_length=128, per_device_batch_size=1)
            prepare_run("pretrain", TrainRun.from_json(run_file))
            config = cpu_fsdp_config(root, mixed_precision="bf16", fsdp_cpu_ram_efficient_loading=rank_0_only)
            result = launch_fsdp(config, run_file, root / f"probe-{name}", stage="pretrain")
            if result.returncode != 0:
                raise SystemExit(result.stderr[-3000:])
            loads = [r["load_memory"] for r in probes(root / f"probe-{name}")]
            print(json.dumps(loads))
            growth = ",".join(f"{m['rss_growth'] / 1e6:.0f}" for m in loads)
            peak = ",".join(f"{m['peak_rss_growth'] / 1e6:.0f}" for m in loads)
            print(f"RESULT loading={name} rss_growth_mb={growth} peak_rss_growth_mb={peak}")


if __name__ == "__main__":
    main()
