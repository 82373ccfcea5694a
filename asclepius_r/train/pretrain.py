"""Causal-LM pretraining on the discharge notes (-> Asclepius-R-{size}-Pretrained-Only).

Each note is framed once by BOS and EOS (2023 put two BOS before each note), the notes are
shuffled with a fixed seed, concatenated and cut into `max_length` blocks; every token counts
in the loss and no block needs padding.

    python -m asclepius_r.train.pretrain RUN.json      (under `accelerate launch` on GPUs)
"""

from __future__ import annotations

import logging
import random
import sys

import numpy as np
import torch
from transformers import default_data_collator

from ..logs import setup_logging
from ..notes import read_notes
from .run import TrainRun, load_model_and_tokenizer, train_and_save

log = logging.getLogger(__name__)


def pack_notes(texts: list[str], tokenizer, max_length: int, seed: int) -> tuple[np.ndarray, dict]:
    """Token blocks of shape (n_blocks, max_length) and their counts; the incomplete tail is dropped."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    encoded = tokenizer([texts[i] for i in order], add_special_tokens=False)["input_ids"]
    stream = np.fromiter(
        (t for ids in encoded for t in (tokenizer.bos_token_id, *ids, tokenizer.eos_token_id)), dtype=np.int32
    )
    n_blocks = len(stream) // max_length
    if n_blocks == 0:
        raise ValueError(f"the notes hold {len(stream)} tokens, fewer than one block of max_length={max_length}")
    counts = {
        "notes": len(texts),
        "tokens": len(stream),
        "blocks": n_blocks,
        "tail_tokens_dropped": len(stream) - n_blocks * max_length,
    }
    log.info("pretraining data: %s (blocks of %d tokens)", counts, max_length)
    return stream[: n_blocks * max_length].reshape(n_blocks, max_length), counts


class BlockDataset(torch.utils.data.Dataset):
    """Blocks as causal-LM examples: every token is a label (the model shifts them)."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        ids = torch.from_numpy(self.blocks[i].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


def main(run_file: str) -> None:
    run = TrainRun.from_json(run_file)
    model, tokenizer = load_model_and_tokenizer(run)
    blocks, counts = pack_notes([n["text"] for n in read_notes(run.data)], tokenizer, run.max_length, run.seed)
    train_and_save(run, model, tokenizer, BlockDataset(blocks), default_data_collator, data_summary=counts)


if __name__ == "__main__":
    setup_logging()
    main(sys.argv[1])
