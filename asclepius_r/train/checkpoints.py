"""Intermediate checkpoints and the final model folder.

A stage keeps its Trainer checkpoints in `checkpoint_dir`, outside the rule's declared output,
because Snakemake deletes declared outputs before a rerun: after a crash (kill -9, a lost node)
the rerun resumes from the newest complete checkpoint. The folder remembers what it was made
for (settings, inputs); when that changes, its checkpoints are stale and are discarded. After
the final model is written, the checkpoints go too, so that a later rerun (new code, new
settings) trains afresh instead of "resuming" a finished run.

`export_checkpoint` is the merge step: it turns a checkpoint (plain safetensors, or FSDP
SHARDED_STATE_DICT shards that no single rank ever held whole) into a Hugging Face folder with
safetensors weights in the release dtype, `use_cache: true`, a generation config with the base's
token ids and no sampling settings, the tokenizer and the base model's own tokenizer files
(`tokenizer.model`, or `tokenizer.json` and its configs). Under FSDP every rank writes its own
part of the weights, in parallel.

    python -m asclepius_r.train.checkpoints CHECKPOINT BASE_MODEL OUT [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from asclepius_r.base_model.describe import copy_tokenizer_model
from asclepius_r.files import atomic_path
from asclepius_r.logs import setup_logging

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_FSDP_MODEL_DIR = "pytorch_model_fsdp_0"
_DONE_DIR = ".done"  # in the staging folder: one empty file per rank that has written its part


def file_identity(path: str | Path) -> list:
    """Cheap identity of a file or folder (names, sizes, mtimes): a remade input looks different."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [
        [str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns] for p in files
    ]


def prepare_checkpoint_dir(checkpoint_dir: str | Path, fingerprint: dict) -> None:
    """Keep resumable checkpoints made for the same fingerprint; drop stale and incomplete ones."""
    folder = Path(checkpoint_dir)
    stored = folder / FINGERPRINT_FILE
    if folder.exists() and (not stored.exists() or json.loads(stored.read_text()) != fingerprint):
        if any(folder.glob("checkpoint-*")):
            log.warning("%s: settings or inputs changed since its checkpoints were written; starting afresh", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for checkpoint in checkpoints_newest_first(folder):
        if is_complete(checkpoint):
            break
        log.warning("removing incomplete checkpoint %s (the job died while writing it)", checkpoint)
        shutil.rmtree(checkpoint)
    with atomic_path(stored) as tmp:
        tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


def checkpoints_newest_first(folder: str | Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def is_complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json after weights, optimizer and RNG states."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    if not Path(folder).is_dir():
        return None
    return next((c for c in checkpoints_newest_first(folder) if is_complete(c)), None)


class KeepTokenizerModel(TrainerCallback):
    """Copies the base model's own tokenizer files (tokenizer.model, or tokenizer.json and its configs)
    into every checkpoint."""

    def __init__(self, base_model: str | Path):
        self.base_model = base_model

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            copy_tokenizer_model(self.base_model, Path(args.output_dir) / f"checkpoint-{state.global_step}")


def weight_parts(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """Tensor names in `parts` groups of near-equal bytes: the largest first, each into the lightest
    group (ties by name, so every rank computes the same split); names sorted within a group."""
    groups: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        lightest = loads.index(min(loads))
        groups[lightest].append(name)
        loads[lightest] += sizes[name]
    return [sorted(group) for group in groups]


def part_file(index: int, parts: int) -> str:
    """Hugging Face's names: one file `model.safetensors`, or `model-00001-of-00008.safetensors` and an index."""
    return "model.safetensors" if parts == 1 else f"model-{index + 1:05d}-of-{parts:05d}.safetensors"


def sharded_weights(sharded_dir: Path, tied_embeddings: bool) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (shape, dtype) of every weight in FSDP SHARDED_STATE_DICT shards, from their metadata.

    accelerate saves `{"model": state_dict}`, so the stored names carry a `model.` prefix. A tied
    output layer is stored beside the input embedding but, as in `save_pretrained`, not exported.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(sharded_dir).read_metadata().state_dict_metadata
    weights = {
        fqn.removeprefix("model."): (meta.size, meta.properties.dtype)
        for fqn, meta in metadata.items()
        if fqn.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    if tied_embeddings:
        weights.pop("lm_head.weight", None)
    return weights


def write_weights_part(sharded_dir: Path, names: list[str], shapes: dict, dtype, out_file: Path) -> int:
    """Read `names` from the shards in this process alone and write them as one safetensors file; its bytes.

    `no_dist`: the ranks export in parallel, each its own part, with no collective between them.
    The default planner refuses a checkpoint that lacks any of `names`.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    state = {name: torch.empty(shapes[name][0], dtype=shapes[name][1]) for name in names}
    dcp.load({"model": state}, checkpoint_id=sharded_dir, no_dist=True)
    converted = {name: tensor.to(dtype).contiguous() for name, tensor in state.items()}
    with atomic_path(out_file) as tmp:
        save_file(converted, tmp, metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in converted.values())


def export_staging(out_dir: str | Path) -> Path:
    """Where the ranks write an export before it is renamed onto `out_dir` (beside it, so the rename is atomic)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.export")


def prepare_export(out_dir: str | Path) -> None:
    """Rank 0, before any rank writes: an empty staging folder (an interrupted export's parts are discarded)."""
    staging = export_staging(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    (staging / _DONE_DIR).mkdir(parents=True)


def export_checkpoint(
    checkpoint: str | Path,
    base_model: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    extra_files: dict[str, dict] | None = None,
    rank: int = 0,
    processes: int = 1,
) -> None:
    """This process's share of writing `out_dir`: safetensors weights in `dtype`, config, generation
    config, tokenizer and the base's tokenizer files. `prepare_export` must have run first.

    From FSDP shards every rank writes one part of the weights (1/processes of them, read from
    the shards it needs), so no process ever holds the whole model and the export takes about
    1/processes of one process's time; rank 0 then writes the rest, waits for every part and
    renames the folder onto `out_dir`. That wait is on files, not a collective: however long
    an export takes, no process-group timeout applies, and the other ranks have exited. A plain
    checkpoint (one process, or DDP) is loaded and saved by rank 0 alone.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    checkpoint, staging = Path(checkpoint), export_staging(out_dir)
    torch_dtype = getattr(torch, dtype)
    sharded = checkpoint / _FSDP_MODEL_DIR
    config = AutoConfig.from_pretrained(base_model)
    weights = sharded_weights(sharded, config.tie_word_embeddings) if sharded.is_dir() else None
    parts = min(processes, len(weights)) if weights else 1
    groups = weight_parts({n: s.numel() * d.itemsize for n, (s, d) in weights.items()}, parts) if weights else []
    if rank < len(groups):
        name = part_file(rank, parts)
        written = write_weights_part(sharded, groups[rank], weights, torch_dtype, staging / name)
        log.info("rank %d: wrote %s (%d tensors, %.2f GB)", rank, name, len(groups[rank]), written / 1e9)
    (staging / _DONE_DIR / str(rank)).touch()
    if rank != 0:
        return
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    # Training turns the KV cache off (packed examples would attend to each other through it);
    # the released model generates, where the cache saves recomputing every earlier token.
    if weights:
        config.use_cache = True
        config.dtype = torch_dtype
        config.save_pretrained(staging)
        if parts > 1:
            index = {
                "metadata": {"total_size": sum(s.numel() * torch_dtype.itemsize for s, _ in weights.values())},
                "weight_map": {name: part_file(i, parts) for i, group in enumerate(groups) for name in group},
            }
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype)
        model.config.use_cache = True
        model.save_pretrained(staging)
    # Decoding is the caller's choice (the release writes the evaluation's): nothing of the base's
    # own sampling settings (LLaMA-2's temperature 0.6, top_p 0.9) is inherited, only its token ids.
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    copy_tokenizer_model(base_model, staging)
    for name, content in (extra_files or {}).items():
        (staging / name).write_text(json.dumps(content, indent=2) + "\n")
    wait_for_parts(staging / _DONE_DIR, processes)
    shutil.rmtree(staging / _DONE_DIR)
    if Path(out_dir).is_dir():
        shutil.rmtree(out_dir)  # os.replace cannot replace a folder
    os.replace(staging, out_dir)
    log.info("model written to %s (%s, %d weight file(s))", out_dir, dtype, parts)


def wait_for_parts(done_dir: Path, processes: int, poll_s: float = 1.0) -> None:
    """Until every rank has marked its part done. A rank that dies ends the whole job (the launcher
    stops every process), so this needs no timeout of its own."""
    waited = 0.0
    while (done := len(list(done_dir.iterdir()))) < processes:
        if waited % 60 == 0:
            log.info("export: %d of %d ranks have written their part; waiting", done, processes)
        time.sleep(poll_s)
        waited += poll_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("base_model", help="the folder the run started from (config and tokenizer)")
    parser.add_argument("out")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    prepare_export(args.out)
    export_checkpoint(args.checkpoint, args.base_model, args.out, args.dtype)


if __name__ == "__main__":
    setup_logging()
    main()
