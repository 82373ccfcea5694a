"""Causal-LM pretraining on the discharge notes (-> Asclepius-R-{size}-Pretrained-Only).

Each note is framed once by BOS and EOS (2023 put two BOS before each note), the notes are
shuffled with a fixed seed, concatenated and cut into `max_length` blocks; every token counts
in the loss and no block needs padding. Note text is tokenised with special-token strings taken
as text, so the framing BOS and EOS are the only ones in the stream. Tokenisation is one cached
`datasets` pass shared by the ranks, as fine-tuning's (`encode_notes`).

`note_attention` decides what a token sees inside a block: `across_notes` (2023) one causal
context over the whole block, so a note attends to the end of the notes before it;
`within_note` position ids that restart at 0 at each note's BOS (and at the block's start), with
no attention mask, so the model masks attention per note (padding-free, as fine-tuning packs its
examples) and each note is trained as if it stood alone. A note cut by a block boundary goes on
at position 0 in the next block, without its beginning, in both modes.

    python -m asclepius_r.train.pretrain RUN.json      (under `accelerate launch` on GPUs)
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import default_data_collator

from accelerate import PartialState
from asclepius_r.errors import InputError
from asclepius_r.logs import setup_logging
from asclepius_r.train.run import TrainRun, load_model_and_tokenizer, train_and_save, training_arguments

log = logging.getLogger(__name__)

NOTE_ATTENTION = ("across_notes", "within_note")
ENCODED = datasets.Features({"ROW_ID": datasets.Value("int64"), "input_ids": datasets.List(datasets.Value("int32"))})


def tokenize_notes(batch: dict[str, list], tokenizer) -> dict[str, list]:
    """A `datasets.map` batch of notes -> their tokens, special-token strings read as text."""
    return {"input_ids": tokenizer(batch["TEXT"], add_special_tokens=False, split_special_tokens=True)["input_ids"]}


def encode_notes(path: str | Path, tokenizer, cache_dir: str) -> list[np.ndarray]:
    """The tokens of every note of a notes dataset (a folder of part files or one Parquet file), in
    ROW_ID order, as int32 views into one flat array.

    As fine-tuning's examples: one batched `datasets` map, cached in `cache_dir` (keyed by the
    files' paths and modification times, the tokenizer and the function's code); the main process
    tokenises while the other ranks wait, then they all read its cache, and a rerun or resume
    reuses it.
    """
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    with PartialState().main_process_first():
        notes = datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=cache_dir, columns=["ROW_ID", "TEXT"])
        encoded = notes.map(
            tokenize_notes,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer},
            remove_columns=["TEXT"],
            features=ENCODED,
            desc="tokenizing notes",
        )
    column = encoded.data.column("input_ids").combine_chunks()
    flat, offsets = column.values.to_numpy(), column.offsets.to_numpy()
    order = np.argsort(encoded.data.column("ROW_ID").to_numpy(), kind="stable")
    return [flat[offsets[i] : offsets[i + 1]] for i in order]


def pack_notes(notes: Sequence[Sequence[int]], tokenizer, max_length: int, seed: int) -> tuple[np.ndarray, dict]:
    """Token blocks of shape (n_blocks, max_length) and their counts; the incomplete tail is dropped.

    `notes` are the notes' tokens (`tokenize_notes`); each is framed by the tokenizer's BOS and EOS
    in a seeded order.
    """
    order = list(range(len(notes)))
    random.Random(seed).shuffle(order)
    bos, eos = np.array([tokenizer.bos_token_id], np.int32), np.array([tokenizer.eos_token_id], np.int32)
    pieces = [piece for i in order for piece in (bos, np.asarray(notes[i], dtype=np.int32), eos)]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    n_blocks = len(stream) // max_length
    if n_blocks == 0:
        raise InputError(f"the notes hold {len(stream)} tokens, fewer than one block of max_length={max_length}")
    counts = {
        "notes": len(notes),
        "tokens": len(stream),
        "blocks": n_blocks,
        "tail_tokens_dropped": len(stream) - n_blocks * max_length,
    }
    log.info("pretraining data: %s (blocks of %d tokens)", counts, max_length)
    return stream[: n_blocks * max_length].reshape(n_blocks, max_length), counts


def note_position_ids(block: np.ndarray, bos_token_id: int) -> np.ndarray:
    """Positions that restart at 0 at each BOS (a note's start) and at the start of the block."""
    index = np.arange(len(block))
    starts = np.where(block == bos_token_id, index, 0)
    return index - np.maximum.accumulate(starts)


class BlockDataset(torch.utils.data.Dataset):
    """Blocks as causal-LM examples: every token is a label (the model shifts them).

    With `bos_token_id`, each example also carries per-note position ids (`within_note`).
    """

    def __init__(self, blocks: np.ndarray, bos_token_id: int | None = None):
        self.blocks = blocks
        self.bos_token_id = bos_token_id

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        ids = torch.from_numpy(self.blocks[i].astype(np.int64))
        example = {"input_ids": ids, "labels": ids.clone()}
        if self.bos_token_id is not None:
            example["position_ids"] = torch.from_numpy(note_position_ids(self.blocks[i], self.bos_token_id))
        return example


def pretraining_dataset(run: TrainRun, tokenizer, notes: Sequence[Sequence[int]]) -> tuple[BlockDataset, dict]:
    """The blocks of the notes' tokens, attending across or within notes as `run.note_attention` says."""
    if run.note_attention not in NOTE_ATTENTION:
        raise ValueError(f"note_attention must be one of {NOTE_ATTENTION}, not {run.note_attention!r}")
    blocks, counts = pack_notes(notes, tokenizer, run.max_length, run.seed)
    within = run.note_attention == "within_note"
    counts["note_attention"] = run.note_attention
    return BlockDataset(blocks, tokenizer.bos_token_id if within else None), counts


def main(run_file: str) -> None:
    run = TrainRun.from_json(run_file)
    model, tokenizer = load_model_and_tokenizer(run)
    args = training_arguments(run)  # starts the process group, with the run's timeout, before any collective
    cache_dir = run.data_cache_dir or str(Path(run.checkpoint_dir) / "data-cache")
    dataset, counts = pretraining_dataset(run, tokenizer, encode_notes(run.data, tokenizer, cache_dir))
    train_and_save(run, args, model, tokenizer, dataset, default_data_collator, data_summary=counts)


if __name__ == "__main__":
    setup_logging()
    main(sys.argv[1])
