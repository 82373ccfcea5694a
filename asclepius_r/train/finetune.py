"""Instruction fine-tuning on mimiciii_discharge.csv (-> Asclepius-R-{size}).

Each example is the released template filled with the note and question, then the answer and
EOS; only the answer and EOS count in the loss. Too-long examples lose the end of the note, not
the answer (2023 lost the answer). Examples are packed without padding: a pack is a flat
sequence whose position_ids restart at 0 for each example, so examples never attend to each
other, and every position is a real token.

    python -m asclepius_r.train.finetune RUN.json      (under `accelerate launch` on GPUs)
"""

from __future__ import annotations

import logging
import random
import sys
from dataclasses import dataclass

import pandas as pd
import torch

from ..logs import setup_logging
from ..prompts import render_released
from .run import TrainRun, load_model_and_tokenizer, train_and_save

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode_example(tokenizer, note: str, question: str, answer: str, max_length: int) -> tuple[Example | None, bool]:
    """Tokenise one row; returns (example or None if even an empty note cannot fit, truncated?)."""
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    note_ids = tokenizer(note, add_special_tokens=False)["input_ids"]
    truncated = False
    keep = len(note_ids)
    while True:
        shown = note if keep == len(note_ids) else tokenizer.decode(note_ids[:keep])
        prompt_ids = tokenizer(render_released(shown, question))["input_ids"]
        overflow = len(prompt_ids) + len(answer_ids) - max_length
        if overflow <= 0:
            break
        if keep == 0:
            return None, True
        truncated = True
        keep = max(0, keep - overflow - 2)  # re-tokenising the cut note can shift a token or two
    return Example(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids), truncated


def encode_dataset(csv_path: str, tokenizer, max_length: int) -> tuple[list[Example], dict]:
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    examples, counts = [], {"rows": len(frame), "truncated_note": 0, "dropped_answer_too_long": 0}
    for row in frame.itertuples(index=False):
        example, truncated = encode_example(tokenizer, row.note, row.question, row.answer, max_length)
        counts["truncated_note"] += truncated and example is not None
        if example is None:
            counts["dropped_answer_too_long"] += 1
            continue
        examples.append(example)
    log.info("fine-tuning data: %s", counts)
    return examples, counts


def pack_examples(examples: list[Example], capacity: int, seed: int) -> list[list[Example]]:
    """First-fit-decreasing bins of at most `capacity` tokens, in a seeded random order."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    packs: list[list[Example]] = []
    room: list[int] = []
    for i in order:
        size = len(examples[i].input_ids)
        target = next((b for b, free in enumerate(room) if free >= size), None)
        if target is None:
            packs.append([])
            room.append(capacity)
            target = len(packs) - 1
        packs[target].append(examples[i])
        room[target] -= size
    random.Random(seed).shuffle(packs)
    return packs


def collate_packed(packs: list[list[Example]]) -> dict[str, torch.Tensor]:
    """One flat row per pack (the Trainer's per-device batch is one pack); no attention mask."""
    assert len(packs) == 1, "fine-tuning packs are batched one per device"
    ids, labels, positions = [], [], []
    for example in packs[0]:
        ids += example.input_ids
        labels += example.labels
        positions += range(len(example.input_ids))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}


class PackDataset(torch.utils.data.Dataset):
    def __init__(self, packs):
        self.packs = packs

    def __len__(self):
        return len(self.packs)

    def __getitem__(self, i):
        return self.packs[i]


def main(run_file: str) -> None:
    run = TrainRun.from_json(run_file)
    model, tokenizer = load_model_and_tokenizer(run)
    examples, _ = encode_dataset(run.data, tokenizer, run.max_length)
    # A pack holds as many tokens as 2023's per-device batch could (batch x max_length).
    capacity = run.per_device_batch_size * run.max_length
    packs = pack_examples(examples, capacity, run.seed)
    used = sum(len(e.input_ids) for e in examples)
    log.info("fine-tuning: %d examples in %d packs, %.1f%% of pack capacity used",
             len(examples), len(packs), 100 * used / max(1, capacity * len(packs)))
    run.per_device_batch_size = 1
    train_and_save(run, model, tokenizer, PackDataset(packs), collate_packed)


if __name__ == "__main__":
    setup_logging()
    main(sys.argv[1])
