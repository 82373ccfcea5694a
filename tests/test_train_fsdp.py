"""FSDP full_shard on two CPU processes (gloo): sharded training and gradients, sharded checkpoints,
resume, an export written by every rank, and a process group that keeps the configured timeout.

The job is started as on GPUs, `accelerate launch --config_file` with the repository's
accelerate/fsdp_full_shard.yaml, changed only where a CPU needs it: use_cpu, 2 processes, a
free port, and fp32 instead of bf16 autocast (so that the losses can be compared exactly).
accelerate 1.15 drops FSDP for CPU process groups (see support/fsdp_cpu_entry.py, which lifts
that one check); the sharding, the DCP checkpoints, the resume and the merge are the real ones.

Tolerance: the logged losses agree with one process at the same global batch to 1e-4
(relative), as in test_train_distributed: only the order of float additions differs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

from asclepius_r.train.launch import prepare_run
from asclepius_r.train.run import TrainRun, configure_fsdp, training_arguments
from support.default_settings import train_run
from support.fsdp_cpu_entry import CRASH_EXIT_CODE
from support.train_fixtures import (
    TINY,
    build_fixture_data,
    cpu_fsdp_config,
    launch_fsdp,
    probes,
    run_launch,
    write_run,
)

TOLERANCE = 1e-4
STEPS, CRASH_STEP = 4, 2
# FSDP2 pads a parameter's first dimension to a multiple of the ranks: a rank's gradient shard may
# exceed half the model's by that padding, well under 5% for any model (none for these shapes).
GRADIENT_MARGIN = 0.05


@pytest.mark.parametrize("checkpointing", [True, False])
def test_gradient_checkpointing_follows_the_run_with_and_without_fsdp(monkeypatch, checkpointing):
    run = train_run(gradient_checkpointing=checkpointing)
    assert training_arguments(run).activation_checkpointing is checkpointing, "on every device, a CPU too"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", str(not checkpointing).lower())  # the accelerate config's
    assert training_arguments(run).activation_checkpointing is False, "under FSDP, FSDP's own does it"
    plugin = FullyShardedDataParallelPlugin()
    configure_fsdp(plugin, "bf16", run)
    assert plugin.activation_checkpointing is checkpointing
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32, None)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        configure_fsdp(FullyShardedDataParallelPlugin(), "bf16", run)


def assert_trained_sharded(records: list[dict]) -> None:
    for record in records:
        assert record["world_size"] == 2
        assert record["distributed_type"] == "DistributedType.FSDP" and record["is_fsdp_enabled"]
        assert record["fsdp_version"] == 2 and record["state_dict_type"] == "StateDictType.SHARDED_STATE_DICT"
        assert record["checkpoint_wrapped_layers"] == 2, "gradient_checkpointing: FSDP wraps each decoder layer"
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
    settings = dict(
        max_steps=STEPS,
        max_length=1024,
        learning_rate=3e-3,
        save_steps=CRASH_STEP,
        save_total_limit=3,
        gradient_checkpointing=True,
    )
    # As in test_train_distributed: 2 ranks x 1 pack == 1 process x 2 packs per optimizer step.
    run_file = write_run(tmp_path / "fsdp", "finetune", data, global_batch_size=2, **settings)
    single_file = write_run(tmp_path / "one", "finetune", data, global_batch_size=2, **settings)
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
    assert json.loads((output / "config.json").read_text())["use_cache"] is True


@pytest.mark.slow
def test_fsdp_cpu_bf16_reduces_and_accumulates_in_fp32_and_follows_gradient_checkpointing(tmp_path):
    """The repository's bf16 policy for real (bf16 compute on CPU), under an accelerate config that
    turns FSDP activation checkpointing on while the run says gradient_checkpointing: false."""
    # Wide enough (39M parameters, 157 MB in fp32) that holding the weights shows in a process's RSS,
    # and saved in bf16 as LLaMA's 16-bit checkpoints are: fp32 loading copies rather than maps the file.
    data = build_fixture_data(tmp_path, replace(TINY, hidden_size=768, intermediate_size=3072, num_hidden_layers=4))
    AutoModelForCausalLM.from_pretrained(data["model"], dtype=torch.bfloat16).save_pretrained(data["model"])
    run_file = write_run(
        tmp_path / "bf16",
        "pretrain",
        data,
        max_steps=2,
        max_length=128,
        per_device_batch_size=1,
        global_batch_size=4,  # 2 ranks x 1 x 2 accumulated micro-batches
        gradient_checkpointing=False,
    )
    run = TrainRun.from_json(run_file)
    config = cpu_fsdp_config(tmp_path, mixed_precision="bf16", fsdp_activation_checkpointing=True)
    prepare_run("pretrain", run)
    result = launch_fsdp(config, run_file, tmp_path / "probe", stage="pretrain")
    assert result.returncode == 0, result.stderr[-6000:]
    records = probes(tmp_path / "probe")
    loads = [r["load_memory"] for r in records]
    weights = loads[0]["parameter_bytes"]
    assert weights > 150e6
    assert loads[0]["rss_growth"] > 0.9 * weights, loads
    assert loads[1]["peak_rss_growth"] < 0.25 * weights, f"rank 1 held the weights while loading: {loads}"
    for record in records:
        assert record["checkpoint_wrapped_layers"] == 0, "config.yaml's gradient_checkpointing decides, not the YAML"
        # (orig, param, reduce) dtypes of every sharded parameter: fp32 master, bf16 compute, fp32 reduction.
        assert record["mixed_precision"] == [["torch.float32", "torch.bfloat16", "torch.float32"]]
        assert record["accumulated_grad_dtypes"] == ["torch.float32"], "between micro-batches"
        # Each micro-batch is reduce-scattered (sync_each_batch): between micro-batches a rank holds
        # its shard of the fp32 gradients, not the whole model's (1.00x before: 13B OOM at step 1).
        shard = 4 * sum(torch.Size(p["shape"]).numel() for p in record["parameters"].values()) / 2
        held = record["accumulated_grad_bytes"]
        assert held["unsharded"] == 0 and 0 < held["sharded"] <= shard * (1 + GRADIENT_MARGIN), (held, shard)
        assert record["reduce_scatter_dtypes"] == ["torch.float32"]
    metrics = [json.loads(line) for line in Path(run.metrics_file).read_text().splitlines()]
    assert len(metrics) == 2 and all(m["loss"] > 0 for m in metrics)
    assert json.loads((Path(run.output_dir) / "config.json").read_text())["use_cache"] is True


@pytest.mark.slow
def test_a_slow_export_outlasts_a_short_process_group_timeout_and_every_rank_writes_its_part(tmp_path):
    """The configured timeout is the process group's (not the backend's default), and the export after
    training waits on files, not in a collective: rank 0 taking 2.5x the timeout over its part still
    ends well, with the weights split over both ranks' files and equal to the all-gathered shards."""
    timeout_s, slow_s = 15, 40
    data = build_fixture_data(tmp_path)
    run_file = write_run(tmp_path / "run", "pretrain", data, max_steps=2, max_length=128, ddp_timeout_s=timeout_s)
    run = TrainRun.from_json(run_file)
    prepare_run("pretrain", run)
    config = cpu_fsdp_config(tmp_path)
    result = launch_fsdp(config, run_file, tmp_path / "probe", stage="pretrain", slow_export_s=slow_s)
    assert result.returncode == 0, result.stderr[-6000:]
    assert [r["process_group_timeout_s"] for r in probes(tmp_path / "probe")] == [timeout_s, timeout_s]
    output = Path(run.output_dir)
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    merged = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).state_dict()
    gathered = torch.load(tmp_path / "probe" / "gathered.pt")
    assert set(gathered) <= set(merged) and set(index["weight_map"]) == set(gathered)
    for name, tensor in gathered.items():
        assert torch.equal(merged[name], tensor), f"{name}: exported weights differ from the all-gathered shards"
    assert json.loads((output / "training_run.json").read_text())["world_size"] == 2
    assert not Path(run.checkpoint_dir).exists() and not list(output.parent.glob(".*.export"))


def make_smollm2_like(model: Path) -> None:
    """The fixture's tiny base, made like SmolLM2 where a real base differs from LLaMA-1: tied input
    and output embeddings, and a tokenizer that adds no BOS by itself."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    base.config.tie_word_embeddings = True
    base.tie_weights()
    base.save_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A", special_tokens=[])
    tokenizer.save_pretrained(model)
    (model / "tokenizer.model").unlink()  # the BPE tokenizer.json is now the base's own


@pytest.mark.slow
def test_fsdp_cpu_keeps_tied_embeddings_tied_and_trains_a_bos_less_base_as_one_process(tmp_path):
    """A SmolLM2-like base (tied embeddings, no BOS from its tokenizer) under FSDP2 on two ranks: it
    trains as one process does (one shared weight, sharded once), and the export reloads tied,
    with the trained embedding and no separate output matrix."""
    data = build_fixture_data(tmp_path)
    make_smollm2_like(data["model"])
    settings = dict(max_steps=3, max_length=1024, learning_rate=3e-3)
    run_file = write_run(tmp_path / "fsdp", "finetune", data, global_batch_size=2, **settings)
    single_file = write_run(tmp_path / "one", "finetune", data, global_batch_size=2, **settings)
    run = TrainRun.from_json(run_file)
    prepare_run("finetune", run)
    result = launch_fsdp(cpu_fsdp_config(tmp_path), run_file, tmp_path / "probe")
    assert result.returncode == 0, result.stderr[-6000:]
    assert "lm_head.weight" not in probes(tmp_path / "probe")[0]["parameters"], "one shared weight, sharded once"
    run_launch("finetune", single_file)
    sharded_curve, single_curve = losses(Path(run.metrics_file)), losses(tmp_path / "one/metrics/finetune.jsonl")
    assert sharded_curve == pytest.approx(single_curve, rel=TOLERANCE)

    base = AutoModelForCausalLM.from_pretrained(data["model"], dtype=torch.float32)
    exported = {}
    for name, folder in (("fsdp", Path(run.output_dir)), ("one", tmp_path / "one/out/finetune")):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert model.config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), name
        assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight), f"{name}: trained"
        exported[name] = model.model.embed_tokens.weight
    assert torch.allclose(exported["fsdp"], exported["one"], rtol=1e-3, atol=1e-5)
