"""Disk: what a training job's checkpoints and export take, and what a folder holds.

A checkpoint holds fp32 weights and Adam's two fp32 moments (7B: 81 GB), and the Trainer keeps
`save_total_limit` of them plus the one it is writing (`checkpoint_bytes`); an export holds the
weights in `save_dtype` and what it copies from the base folder besides (`export_bytes`).
`folder_bytes` measures what a stage wrote (the notes, a model, an archive).
"""

from __future__ import annotations

from pathlib import Path

from asclepius_r.base_model.describe import base_dir

CHECKPOINT_BYTES_PER_PARAM = 12
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def checkpoint_bytes(params: int, settings: dict) -> int:
    """The checkpoints of one training job while it runs: the Trainer writes a new checkpoint
    before it deletes the oldest one."""
    limit = settings["save_total_limit"]
    return (limit + 1) * CHECKPOINT_BYTES_PER_PARAM * params


def export_bytes(config: dict, size: str, params: int, settings: dict) -> int:
    """A training job's export: its weights in `save_dtype`, with the base folder's other files."""
    return DTYPE_BYTES[settings["save_dtype"]] * params + _side_files(config, size)


def _side_files(config: dict, size: str) -> int:
    """Bytes of what an export copies from the base folder besides weights (tokenizer, configs)."""
    base = config["models"][size]["base"]
    folder = Path(base_dir(config, size) or "")
    weights = (".safetensors", ".bin", ".pt", ".index.json")
    if not base or not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and not f.name.endswith(weights))


def folder_bytes(folder: str | Path) -> int:
    """Bytes of every file under a folder (of the file itself, if it is one)."""
    folder = Path(folder)
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else folder.stat().st_size
