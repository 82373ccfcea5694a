"""Intermediate checkpoints and the final model folder.

A stage keeps its Trainer checkpoints in `checkpoint_dir`, outside the rule's declared output,
because Snakemake deletes declared outputs before a rerun: after a crash (kill -9, a lost node)
the rerun resumes from the newest complete checkpoint. The folder remembers what it was made
for (settings, inputs); when that changes, its checkpoints are stale and are discarded. After
the final model is written, the checkpoints go too, so that a later rerun (new code, new
settings) trains afresh instead of "resuming" a finished run.

`export_checkpoint` is the merge step: it turns a checkpoint (plain safetensors, or FSDP
SHARDED_STATE_DICT shards that no single rank ever held whole) into a Hugging Face folder with
safetensors weights in the release dtype, `use_cache: true`, the tokenizer and the base model's own
tokenizer files (`tokenizer.model`, or `tokenizer.json` and its configs).

    python -m asclepius_r.train.checkpoints CHECKPOINT BASE_MODEL OUT [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from asclepius_r.base_model.describe import copy_tokenizer_model
from asclepius_r.files import atomic_path
from asclepius_r.logs import setup_logging

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_FSDP_MODEL_DIR = "pytorch_model_fsdp_0"


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


def load_sharded_weights(model, sharded_dir: Path) -> None:
    """Fill `model` in place from FSDP SHARDED_STATE_DICT shards (a torch.distributed.checkpoint folder).

    Runs in this process alone (no_dist): accelerate's `merge_fsdp_weights` ends in a barrier,
    so rank 0 calling it by itself pairs that barrier with the other ranks' final one and the job
    fails after writing its output. The default planner refuses a checkpoint that lacks any of
    the model's weights, where `from_pretrained` would only warn and keep random ones.
    """
    import torch.distributed.checkpoint as dcp

    dcp.load({"model": model.state_dict()}, checkpoint_id=sharded_dir, no_dist=True)  # accelerate saves {"model": ...}


def export_checkpoint(
    checkpoint: str | Path,
    base_model: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    extra_files: dict[str, dict] | None = None,
) -> None:
    """Write `out_dir` atomically: safetensors weights in `dtype`, config, tokenizer, the base's tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = Path(checkpoint)
    sharded = checkpoint / _FSDP_MODEL_DIR
    if sharded.is_dir():
        log.info("merging FSDP shards of %s", checkpoint)
        # The base model gives the architecture and the non-persistent buffers (rotary
        # frequencies); every saved weight is then overwritten from the shards, in fp32 as trained.
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        load_sharded_weights(model, sharded)
        model = model.to(getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype))
    # Training turns the KV cache off (packed examples would attend to each other through it);
    # the released model generates, where the cache saves recomputing every earlier token.
    model.config.use_cache = True
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_model).save_pretrained(tmp)
        copy_tokenizer_model(base_model, tmp)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
    log.info("model written to %s (%s, %d parameters)", out_dir, dtype, model.num_parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("base_model", help="the folder the run started from (config and tokenizer)")
    parser.add_argument("out")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    export_checkpoint(args.checkpoint, args.base_model, args.out, args.dtype)


if __name__ == "__main__":
    setup_logging()
    main()
