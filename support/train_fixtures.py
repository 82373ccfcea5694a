"""Shared set-up of the training tests and benches: a tiny LLaMA, notes and a fine-tuning CSV, all
synthetic; training runs launched as the workflow launches them, and FSDP on two CPU processes
(gloo, through support/fsdp_cpu_entry.py) with each rank's probe read back.

The texts are the project's hand-written demo discharge summaries (no patient data).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from asclepius_r.base_model.tiny import TinyLlamaSpec, build_tiny_llama_from_texts
from support.default_settings import tiny_spec, train_run

REPO = Path(__file__).resolve().parents[1]
DEMO_NOTES = sorted((REPO / "demo" / "discharge_summaries").glob("*.txt"))


def demo_texts() -> list[str]:
    return [p.read_text() for p in DEMO_NOTES]


TINY = tiny_spec(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def build_fixture_data(root: Path, spec: TinyLlamaSpec = TINY) -> dict[str, Path]:
    """A tiny model (of `spec`'s shape), a notes parquet and a fine-tuning CSV under `root`."""
    texts = demo_texts()
    model = root / "tiny"
    build_tiny_llama_from_texts(texts, model, spec)
    notes = root / "notes.parquet"
    pq.write_table(
        pa.table({"ROW_ID": list(range(len(texts))), "SUBJECT_ID": list(range(len(texts))), "TEXT": texts}), notes
    )
    rows = [
        {
            "note": text,
            "question": "Summarize the hospital course in one sentence.",
            "answer": text.strip().splitlines()[-1][:200] or "Not stated.",
            "task": "Summarization",
        }
        for text in texts
    ]
    sft = root / "sft.csv"
    pd.DataFrame(rows).to_csv(sft, index=False)
    return {"model": model, "notes": notes, "sft": sft}


def write_run(root: Path, stage: str, data: dict[str, Path], **settings) -> Path:
    """A TrainRun file for `stage` on the fixture data, with CPU-sized defaults."""
    defaults = dict(
        max_length=512,
        per_device_batch_size=2,
        global_batch_size=2,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        logging_steps=1,
        save_steps=1000,
        save_dtype="float32",
        peak_tflops_per_device=1.0,
        truncation="note_middle",  # the fixture's notes are far over these CPU-size max_lengths
        gradient_checkpointing=False,  # on a CPU, recomputation only costs time
    )
    run = train_run(
        stage,
        base_model=str(data["model"]),
        data=str(data["notes" if stage == "pretrain" else "sft"]),
        output_dir=str(root / "out" / stage),
        checkpoint_dir=str(root / "checkpoints" / stage),
        metrics_file=str(root / "metrics" / f"{stage}.jsonl"),
        **{**defaults, **settings},
    )
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{stage}-run.json"
    path.write_text(json.dumps(asdict(run)))
    return path


def launch_command(stage: str, run_file: Path, *extra: str) -> list[str]:
    """The launcher's command line; the tests train on the CPU on purpose (--cpu-fallback)."""
    return [sys.executable, "-m", "asclepius_r.train.launch", stage, str(run_file), "--cpu-fallback", *extra]


def launch_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_launch(stage: str, run_file: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(launch_command(stage, run_file, *extra), env=launch_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_fsdp_config(folder: Path, mixed_precision: str = "no", **fsdp_settings) -> Path:
    config = yaml.safe_load((REPO / "accelerate" / "fsdp_full_shard.yaml").read_text())
    assert (
        config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    )
    assert config["mixed_precision"] == "bf16" and config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"]
    config.update(use_cpu=True, num_processes=2, mixed_precision=mixed_precision, main_process_port=free_port())
    config["fsdp_config"].update(fsdp_settings)
    path = folder / f"fsdp_cpu_{mixed_precision}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch_fsdp(
    config: Path,
    run_file: Path,
    probe: Path,
    crash_after_step: int | None = None,
    stage: str = "finetune",
    slow_export_s: float | None = None,
):
    probe.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        str(REPO / "support" / "fsdp_cpu_entry.py"),
        f"asclepius_r.train.{stage}",
        str(run_file),
        str(probe),
    ]
    command += [str(crash_after_step or 0)] + ([str(slow_export_s)] if slow_export_s else [])
    return subprocess.run(command, env=launch_env(), capture_output=True, text=True)


def probes(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
