"""What the plan reads besides the config: the notes, the models' shapes, the visible GPUs.

`ensure_notes` finds the notes stage's outputs (running that stage, seconds at MIMIC size, when
they are missing) and `note_lengths` reads each note's length without copying its text out of
Arrow; `model_shape` gives a model's LLaMA shape (its base folder's config.json, the demo's tiny
model, or LLaMA-1's published shape) and `parameter_counts` its parameters; `visible_gpus` asks
nvidia-smi which GPUs this process may use; `missing_inputs` lists the data paths that are not
set or not there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from asclepius_r import config as workflow_config
from asclepius_r.base_model.describe import TINY_BASES, is_built_base, tiny_spec
from asclepius_r.base_model.gguf_reader import gguf_file, gguf_missing, gguf_shape, is_gguf_base
from asclepius_r.notes.stage import NotePolicy, SplitPolicy

log = logging.getLogger(__name__)

# LLaMA-1 shapes (Touvron et al. 2023), used for a size whose base folder is not there yet.
LLAMA1_SHAPES = {
    "7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "13B": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
}
LLAMA1_COMMON = {"vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def note_lengths(path: str | Path) -> np.ndarray:
    """Characters of every note of a notes dataset (no text is copied out of Arrow)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return pc.utf8_length(pq.read_table(path, columns=["TEXT"]).column("TEXT")).to_numpy().astype(np.int64)


def ensure_notes(config: dict, notes_dir: str | Path) -> Path | None:
    """The notes outputs in `notes_dir`, running the notes stage first if they are missing;
    None when NOTEEVENTS is not there either (it may be made by a rule, as in the demo)."""
    from asclepius_r.notes.stage import run_notes_stage, stage_outputs

    outputs = stage_outputs(notes_dir)
    if all(path.exists() for path in outputs.values()):
        return Path(notes_dir)
    if not config["noteevents"] or not Path(config["noteevents"]).exists():
        return None
    log.info("plan: the notes stage's outputs are missing; running it into %s", notes_dir)
    run_notes_stage(
        config["noteevents"],
        **outputs,
        policy=NotePolicy.from_config(config["notes"]),
        split=SplitPolicy.from_config(config),
    )
    return Path(notes_dir)


def model_shape(config: dict, size: str) -> tuple[dict, str]:
    """The LLaMA shape of a model and where it came from: the base folder's config.json, the
    demo's `tiny_model` section (with the model's overrides), or LLaMA-1's published shape."""
    base = config["models"][size]["base"]
    if base in TINY_BASES:
        return {**tiny_spec(config, size), "tie_word_embeddings": False}, "tiny_model"
    if is_gguf_base(base):
        if not gguf_file(base).is_file():
            raise workflow_config.ConfigError(f"config key models.{size}.base: {gguf_missing(base)}")
        return gguf_shape(gguf_file(base)), str(gguf_file(base))
    if base and (Path(base) / "config.json").exists():
        return json.loads((Path(base) / "config.json").read_text()), f"{base}/config.json"
    if size in LLAMA1_SHAPES:
        return {**LLAMA1_COMMON, **LLAMA1_SHAPES[size]}, f"LLaMA-1 {size} (published shape; base folder not read)"
    raise workflow_config.ConfigError(f"config key models.{size}.base: no config.json to read the model's shape from")


def parameter_counts(shape: dict) -> tuple[int, int]:
    """(all parameters, matmul parameters) of a LLaMA; as train.throughput.FlopModel counts them,
    the input embedding is a lookup, not a matmul, and a tied output still costs one."""
    h, inner, layers, vocab = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_hidden_layers"],
        shape["vocab_size"],
    )
    heads = shape["num_attention_heads"]
    kv_width = shape.get("num_key_value_heads", heads) * (h // heads)
    layer = 2 * h * h + 2 * h * kv_width + 3 * h * inner + 2 * h
    tied = shape.get("tie_word_embeddings", False)
    total = vocab * h * (1 if tied else 2) + layers * layer + h
    return total, total - (0 if tied else vocab * h)


def visible_gpus() -> list[dict]:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES respected), by nvidia-smi: name and memory.

    Asked of nvidia-smi rather than torch, so that Snakemake's own process never holds a CUDA
    context (hundreds of MB on GPU 0 for the whole run). Fake GPUs (`ASCLEPIUS_FAKE_GPUS`, see
    gpus.py) count as devices whose work runs on CPU: their memory is None.
    """
    from asclepius_r.gpus import fake_devices

    if fake_devices():
        return [
            {"index": d, "uuid": d, "name": f"fake GPU {d} (work on CPU)", "memory_bytes": None} for d in fake_devices()
        ]
    if not shutil.which("nvidia-smi"):
        return []
    query = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]
    try:
        lines = subprocess.run(query, capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    except (subprocess.SubprocessError, OSError) as error:
        log.warning("nvidia-smi failed (%s): no GPU counted", error)
        return []
    gpus = []
    for line in lines:
        index, uuid, name, memory = (part.strip() for part in line.split(","))
        gpus.append({"index": index, "uuid": uuid, "name": name, "memory_bytes": int(float(memory)) * 2**20})
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus
    wanted = [d.strip() for d in visible.split(",") if d.strip()]
    return [g for d in wanted for g in gpus if d in (g["index"], g["uuid"])]


def missing_inputs(config: dict) -> list[str]:
    """The config's data paths (NOTEEVENTS, base folders) that are not set or not there."""
    problems = []
    for key in workflow_config.data_paths(config):
        value = workflow_config.config_value(config, key)
        if not value:
            problems.append(f"{key} is not set")
        elif is_gguf_base(value) and key != "noteevents":
            if not gguf_file(value).is_file():
                problems.append(f"{key}: {gguf_missing(value)}")
        elif not is_built_base(value) and not Path(value).exists():
            problems.append(f"{key}: {value} does not exist")
    return problems
