"""Causal-LM pretraining on the discharge notes (-> Asclepius-R-{size}-Pretrained-Only).

Each note is framed once by BOS and EOS (2023 put two BOS before each note), the notes are
shuffled with a fixed seed, concatenated and cut into `max_length` blocks; every token counts
in the loss and no block needs padding. Note text is tokenised with special-token strings taken
as text, so the framing BOS and EOS are the only ones in the stream.

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

import numpy as np
import torch
from transformers import default_data_collator

from asclepius_r.errors import InputError
from asclepius_r.logs import setup_logging
from asclepius_r.notes.stage import read_notes
from asclepius_r.train.run import TrainRun, load_model_and_tokenizer, train_and_save

log = logging.getLogger(__name__)

NOTE_ATTENTION = ("across_notes", "within_note")


def pack_notes(texts: list[str], tokenizer, max_length: int, seed: int) -> tuple[np.ndarray, dict]:
    """Token blocks of shape (n_blocks, max_length) and their counts; the incomplete tail is dropped."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    encoded = tokenizer([texts[i] for i in order], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    stream = np.fromiter(
        (t for ids in encoded for t in (tokenizer.bos_token_id, *ids, tokenizer.eos_token_id)), dtype=np.int32
    )
    n_blocks = len(stream) // max_length
    if n_blocks == 0:
        raise InputError(f"the notes hold {len(stream)} tokens, fewer than one block of max_length={max_length}")
    counts = {
        "notes": len(texts),
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


def pretraining_dataset(run: TrainRun, tokenizer, texts: list[str]) -> tuple[BlockDataset, dict]:
    """The blocks of `texts`, attending across or within notes as `run.note_attention` says."""
    if run.note_attention not in NOTE_ATTENTION:
        raise ValueError(f"note_attention must be one of {NOTE_ATTENTION}, not {run.note_attention!r}")
    blocks, counts = pack_notes(texts, tokenizer, run.max_length, run.seed)
    within = run.note_attention == "within_note"
    counts["note_attention"] = run.note_attention
    return BlockDataset(blocks, tokenizer.bos_token_id if within else None), counts


def main(run_file: str) -> None:
    run = TrainRun.from_json(run_file)
    model, tokenizer = load_model_and_tokenizer(run)
    dataset, counts = pretraining_dataset(run, tokenizer, [n["text"] for n in read_notes(run.data)])
    train_and_save(run, model, tokenizer, dataset, default_data_collator, data_summary=counts)


if __name__ == "__main__":
    setup_logging()
    main(sys.argv[1])
