"""Instruction fine-tuning on mimiciii_discharge.csv (-> Asclepius-R-{size}).

Each example is the released template filled with the note and question, then the answer and
EOS; only the answer and EOS count in the loss. Too-long examples lose the end of the note, not
the answer (2023 lost the answer); the count is logged and kept in the model's
training_run.json. Examples are packed without padding (first-fit decreasing): a pack is one
flat row of at most `max_length` tokens whose position_ids restart at 0 for each example, so
examples never attend to each other and every position is a real token. A pack takes the place
of a padded row of 2023: each device trains one pack per micro-batch and accumulates
`per_device_batch_size x gradient_accumulation_steps` of them per optimizer step, so a step
holds at least as many examples as 2023's and no pack's attention is wider than `max_length`.

    python -m asclepius_r.train.finetune RUN.json      (under `accelerate launch` on GPUs)
"""

from __future__ import annotations

import logging
import random
import sys
from dataclasses import dataclass

import pandas as pd
import torch
from transformers import DataCollatorWithFlattening

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
    """Examples of every row; counts of rows, truncated notes and dropped (answer alone too long) rows."""
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = {"note", "question", "answer"} - set(frame.columns)
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}")
    examples, counts = [], {"rows": len(frame), "truncated_note": 0, "dropped_answer_too_long": 0}
    for row in frame.itertuples(index=False):
        example, truncated = encode_example(tokenizer, row.note, row.question, row.answer, max_length)
        counts["truncated_note"] += truncated and example is not None
        if example is None:
            counts["dropped_answer_too_long"] += 1
            continue
        examples.append(example)
    if counts["truncated_note"] or counts["dropped_answer_too_long"]:
        log.warning(
            "fine-tuning data: %d of %d notes truncated to keep the answer within max_length=%d; "
            "%d rows dropped because the question and answer alone exceed it",
            counts["truncated_note"],
            counts["rows"],
            max_length,
            counts["dropped_answer_too_long"],
        )
    log.info("fine-tuning data: %s", counts)
    if not examples:
        raise ValueError(f"{csv_path}: no row fits max_length={max_length} even with its note removed")
    return examples, counts


def first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of `sizes` in bins of at most `capacity`: largest first (ties in index order), each
    into the first bin with room. A max-tree over the bins' free room finds that bin in
    O(log n), where a scan of the open bins took minutes for 57k examples; unopened bins sit
    after the open ones with full room, so the leftmost fit is first fit exactly.
    """
    leaves = 1
    while leaves < len(sizes):
        leaves *= 2
    room = [capacity] * (2 * leaves)
    bins: list[list[int]] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if sizes[i] > capacity:
            raise ValueError(f"an item of {sizes[i]} does not fit a bin of {capacity}")
        node = 1
        while node < leaves:
            node = 2 * node if room[2 * node] >= sizes[i] else 2 * node + 1
        if node - leaves == len(bins):
            bins.append([])
        bins[node - leaves].append(i)
        room[node] -= sizes[i]
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return bins


def pack_examples(examples: list[Example], capacity: int, seed: int) -> list[list[Example]]:
    """First-fit-decreasing bins of at most `capacity` tokens, in a seeded random order."""
    bins = first_fit_decreasing([len(e.input_ids) for e in examples], capacity)
    packs = [[examples[i] for i in members] for members in bins]
    random.Random(seed).shuffle(packs)
    return packs


# One flat row of the examples it is given, position_ids restarting at 0 for each and no attention
# mask, so the model derives the per-example causal mask from them. It also sets each example's
# first label to -100, which the prompt mask has done already.
_FLATTEN = DataCollatorWithFlattening()


def collate_packed(packs: list[list[Example]]) -> dict[str, torch.Tensor]:
    """One flat row per pack (the Trainer's per-device batch is one pack)."""
    (pack,) = packs
    return _FLATTEN([vars(example) for example in pack])


class PackDataset(torch.utils.data.Dataset):
    """Packs as dataset items (a list of examples each)."""

    def __init__(self, packs):
        self.packs = packs

    def __len__(self):
        return len(self.packs)

    def __getitem__(self, i):
        return self.packs[i]


def main(run_file: str) -> None:
    run = TrainRun.from_json(run_file)
    model, tokenizer = load_model_and_tokenizer(run)
    examples, counts = encode_dataset(run.data, tokenizer, run.max_length)
    packs = pack_examples(examples, run.max_length, run.seed)
    tokens = sum(len(e.input_ids) for e in examples)
    counts.update(
        examples=len(examples), packs=len(packs), tokens=tokens, pack_fill=tokens / max(1, run.max_length * len(packs))
    )
    log.info(
        "fine-tuning: %d examples (%d tokens) in %d packs of at most %d tokens, %.1f%% full",
        len(examples),
        tokens,
        len(packs),
        run.max_length,
        100 * counts["pack_fill"],
    )
    run.gradient_accumulation_steps *= run.per_device_batch_size
    run.per_device_batch_size = 1
    train_and_save(run, model, tokenizer, PackDataset(packs), collate_packed, data_summary=counts)


if __name__ == "__main__":
    setup_logging()
    main(sys.argv[1])
