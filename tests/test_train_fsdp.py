"""FSDP full_shard on two CPU processes (gloo): sharded training, sharded checkpoints, resume, merge.

The job is started as on GPUs, `accelerate launch --config_file` with the repository's
accelerate/fsdp_full_shard.yaml, changed only where a CPU needs it: use_cpu, 2 processes, a
free port, and fp32 instead of bf16 autocast (so that the losses can be compared exactly).
accelerate 1.15 drops FSDP for CPU process groups (see tests/fsdp_cpu_entry.py, which lifts
that one check); the sharding, the DCP checkpoints, the resume and the merge are the real ones.

Tolerance: the logged losses agree with one process at the same global batch to 1e-4
(relative), as in test_train_distributed: only the order of float additions differs.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

from asclepius_r.train.launch import prepare_run
from asclepius_r.train.run import TrainRun

from .fsdp_cpu_entry import CRASH_EXIT_CODE
from .train_support import REPO, build_fixture_data, launch_env, run_launch, write_run

TOLERANCE = 1e-4
STEPS, CRASH_STEP = 4, 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_fsdp_config(folder: Path) -> Path:
    config = yaml.safe_load((REPO / "accelerate" / "fsdp_full_shard.yaml").read_text())
    assert (
        config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    )
    config.update(use_cpu=True, num_processes=2, mixed_precision="no", main_process_port=free_port())
    path = folder / "fsdp_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch_fsdp(config: Path, run_file: Path, probe: Path, crash_after_step: int | None = None):
    probe.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        str(REPO / "tests" / "fsdp_cpu_entry.py"),
        "asclepius_r.train.finetune",
        str(run_file),
        str(probe),
    ]
    command += [str(crash_after_step)] if crash_after_step else []
    return subprocess.run(command, env=launch_env(), capture_output=True, text=True)


def probes(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def assert_trained_sharded(records: list[dict]) -> None:
    for record in records:
        assert record["world_size"] == 2
        assert record["distributed_type"] == "DistributedType.FSDP" and record["is_fsdp_enabled"]
        assert record["fsdp_version"] == 2 and record["state_dict_type"] == "StateDictType.SHARDED_STATE_DICT"
        assert record["checkpoint_wrapped_layers"] == 2, "FSDP activation checkpointing wraps each decoder layer"
        for name, parameter in record["parameters"].items():
            assert parameter["dtensor"], name
            assert parameter["local_shape"][0] * 2 == parameter["shape"][0], f"{name}: each rank holds half"


def assert_sharded_checkpoint(checkpoint: Path, files: list[str], parameter_bytes: int) -> None:
    """One shard file per rank for weights and optimizer state; no whole state dict anywhere."""
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(f for f in files if f.startswith(part + "/")) == [
            f"{part}/.metadata",
            f"{part}/__0_0.distcp",
            f"{part}/__1_0.distcp",
        ]
    assert not [f for f in files if f.endswith((".safetensors", ".bin"))], files
    model_shards = checkpoint / "pytorch_model_fsdp_0"
    for shard in model_shards.glob("*.distcp"):
        assert shard.stat().st_size < 0.6 * parameter_bytes, f"{shard.name} holds more than its half"
    metadata = FileSystemReader(model_shards).read_metadata()
    for name, tensor in metadata.state_dict_metadata.items():
        written_by = {
            metadata.storage_data[index].relative_path for index in metadata.storage_data if index.fqn == name
        }
        assert len(tensor.chunks) == 2 and written_by == {"__0_0.distcp", "__1_0.distcp"}, name


def losses(metrics: Path) -> list[float]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


@pytest.mark.slow
def test_fsdp_cpu_trains_sharded_resumes_from_shards_and_merges(tmp_path):
    data = build_fixture_data(tmp_path)
    settings = dict(max_steps=STEPS, max_length=1024, learning_rate=3e-3, save_steps=CRASH_STEP, save_total_limit=3)
    # As in test_train_distributed: 2 ranks x 1 pack == 1 process x 2 packs per optimizer step.
    run_file = write_run(tmp_path / "fsdp", "finetune", data, per_device_batch_size=1, **settings)
    single_file = write_run(tmp_path / "one", "finetune", data, per_device_batch_size=2, **settings)
    run = TrainRun.from_json(run_file)
    checkpoints, output = Path(run.checkpoint_dir), Path(run.output_dir)
    config = cpu_fsdp_config(tmp_path)

    prepare_run("finetune", run)  # what asclepius_r.train.launch does before it starts the ranks
    crashed = launch_fsdp(config, run_file, tmp_path / "probe-crashed", crash_after_step=CRASH_STEP)
    assert crashed.returncode != 0 and f"exitcode  : {CRASH_EXIT_CODE}" in crashed.stderr, crashed.stderr[-6000:]
    assert not output.exists() and not (checkpoints / f"checkpoint-{STEPS}").exists()
    records = probes(tmp_path / "probe-crashed")
    assert_trained_sharded(records)
    parameter_bytes = 4 * sum(torch.Size(p["shape"]).numel() for p in records[0]["parameters"].values())
    saved = checkpoints / f"checkpoint-{CRASH_STEP}"
    assert_sharded_checkpoint(saved, records[0]["saves"][saved.name], parameter_bytes)
    assert sorted(f"rng_state_{r}.pth" for r in (0, 1)) == sorted(
        f for f in records[0]["saves"][saved.name] if f.startswith("rng_state")
    )

    prepare_run("finetune", run)
    resumed = launch_fsdp(config, run_file, tmp_path / "probe-resumed")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert_trained_sharded(probes(tmp_path / "probe-resumed"))
    summary = json.loads((output / "training_run.json").read_text())
    assert summary["resumed_from"] == saved.name and summary["global_step"] == STEPS and summary["world_size"] == 2
    assert not checkpoints.exists(), "checkpoints are removed once the merged model is written"

    run_launch("finetune", single_file)
    sharded_curve, single_curve = losses(Path(run.metrics_file)), losses(tmp_path / "one/metrics/finetune.jsonl")
    assert len(sharded_curve) == len(single_curve) == STEPS
    assert single_curve[-1] < single_curve[0], "the loss moves, so matching curves mean something"
    # Steps after the resume match only if the sharded weights, optimizer state and data order came back.
    assert sharded_curve == pytest.approx(single_curve, rel=TOLERANCE)

    merged = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).state_dict()
    gathered = {
        name.replace("_checkpoint_wrapped_module.", ""): tensor
        for name, tensor in torch.load(tmp_path / "probe-resumed" / "gathered.pt").items()
    }
    assert set(gathered) <= set(merged) and len(gathered) == len(records[0]["parameters"])
    for name, tensor in gathered.items():
        assert torch.equal(merged[name], tensor), f"{name}: merged weights differ from the all-gathered shards"
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "one/out/finetune", dtype=torch.float32).state_dict()
    for name, tensor in gathered.items():
        assert torch.allclose(single[name], tensor, rtol=1e-3, atol=1e-5), f"{name}: FSDP and one process diverged"
    assert (output / "tokenizer.model").read_bytes() == (data["model"] / "tokenizer.model").read_bytes()
