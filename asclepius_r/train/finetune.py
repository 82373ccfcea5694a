"""Instruction fine-tuning on mimiciii_discharge.csv (-> Asclepius-R-{size}).

Each example is the released template filled with the note and question, then the answer and
EOS; only the answer and EOS count in the loss. An example longer than `max_length` is shaped by
the run's truncation policy (`prompts.fit_prompt`): `drop` leaves it out, `note_middle` keeps the
note's start and end, `note_tail` its start; the answer and question are never cut. The counts
(whole, truncated, dropped) go to `truncation_file` and the model's training_run.json.

Tokenisation is a batched `datasets` map cached on disk under `data_cache_dir`: the main process
tokenises while the other ranks wait, then they all read its cache (one pass, not one per rank),
and a rerun or resume with the same data, tokenizer and settings reuses it.

Examples are packed without padding (first-fit decreasing): a pack is one
flat row of at most `max_length` tokens whose position_ids restart at 0 for each example, so
examples never attend to each other and every position is a real token. A pack takes the place
of a padded row of 2023: each device trains one pack per micro-batch and the devices together take
`global_batch_size` packs per optimizer step, so a step holds at least as many examples as 2023's
and no pack's attention is wider than `max_length`.

    python -m asclepius_r.train.finetune RUN.json      (under `accelerate launch` on GPUs)
"""

from __future__ import annotations

import json
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
from transformers import DataCollatorWithFlattening

from accelerate import PartialState
from asclepius_r.errors import InputError
from asclepius_r.files import atomic_path
from asclepius_r.logs import setup_logging
from asclepius_r.prompts import encode_prompts, fit_prompt, render_released
from asclepius_r.train.run import TrainRun, load_model_and_tokenizer, train_and_save, training_arguments

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
STATUSES = ("whole", "truncated", "dropped")
COLUMNS = ("note", "question", "answer")
ENCODED = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "prompt_tokens": datasets.Value("int32"),
        "status": datasets.Value("string"),
    }
)


@dataclass
class Example:
    """One example's tokens; the first `prompt_tokens` (the prompt) are not trained on.

    `input_ids` is a list or an int32 view into the tokenised dataset's one flat array, so 57k
    examples of ~2k tokens take ~0.5 GB per rank rather than several GB of Python ints.
    """

    input_ids: Sequence[int]
    prompt_tokens: int

    @property
    def labels(self) -> np.ndarray:
        labels = np.array(self.input_ids, dtype=np.int64)
        labels[: self.prompt_tokens] = IGNORE_INDEX
        return labels


def encode_example(
    tokenizer,
    note: str,
    question: str,
    answer: str,
    max_length: int,
    policy: str,
    prompt_ids: list[int] | None = None,
    answer_ids: list[int] | None = None,
) -> tuple[Example | None, str]:
    """One row as (example or None, status): whole, truncated (note cut by `policy`) or dropped.

    `prompt_ids` and `answer_ids` (answer + EOS) are the row's tokens when a batch has them already.
    """
    if answer_ids is None:
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = fit_prompt(tokenizer, note, question, max_length - len(answer_ids), policy, prompt_ids)
    if prompt is None:
        return None, "dropped"
    example = Example(prompt.input_ids + answer_ids, len(prompt.input_ids))
    return example, "truncated" if prompt.truncated else "whole"


def encode_batch(batch: dict[str, list], tokenizer, max_length: int, policy: str) -> dict[str, list]:
    """A `datasets.map` batch of rows -> input_ids, prompt_tokens (unlabelled prefix) and status."""
    prompts = encode_prompts(tokenizer, [render_released(n, q) for n, q in zip(batch["note"], batch["question"])])
    answers = tokenizer(batch["answer"], add_special_tokens=False)["input_ids"]
    out = {"input_ids": [], "prompt_tokens": [], "status": []}
    for note, question, prompt_ids, answer_ids in zip(batch["note"], batch["question"], prompts, answers):
        answer_ids = answer_ids + [tokenizer.eos_token_id]
        example, status = encode_example(tokenizer, note, question, "", max_length, policy, prompt_ids, answer_ids)
        out["input_ids"].append(example.input_ids if example else [])
        out["prompt_tokens"].append(example.prompt_tokens if example else 0)
        out["status"].append(status)
    return out


def read_rows(csv_path: str, cache_dir: str) -> datasets.Dataset:
    """The CSV's note, question and answer columns as an Arrow-backed Dataset cached in `cache_dir`."""
    missing = set(COLUMNS) - set(pd.read_csv(csv_path, nrows=0).columns)
    if missing:
        raise InputError(f"{csv_path}: missing column(s) {sorted(missing)}")
    return datasets.Dataset.from_csv(
        csv_path,
        cache_dir=cache_dir,
        usecols=list(COLUMNS),
        features=datasets.Features({c: datasets.Value("string") for c in COLUMNS}),
        keep_default_na=False,  # an answer "None" or "NA" is text, not missing
    )


def encode_dataset(
    csv_path: str, tokenizer, max_length: int, cache_dir: str, policy: str
) -> tuple[list[Example], dict]:
    """Examples of every row that fits and the truncation counts (the contract of `truncation_file`).

    The CSV's Arrow copy and the tokenised examples are cached in `cache_dir`, keyed by the
    file's path and modification time, the tokenizer, the function's code and its settings.
    """
    # Ranks share one pass: the main process reads and maps (filling the cache) first, the
    # others then load its files.
    with PartialState().main_process_first():
        rows = read_rows(csv_path, cache_dir)
        encoded = rows.map(
            encode_batch,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "policy": policy},
            remove_columns=rows.column_names,
            features=ENCODED,
            desc="tokenizing fine-tuning examples",
        )
    status = encoded["status"]
    counts = {
        "policy": policy,
        "max_length": max_length,
        "examples": len(status),
        **{name: status.count(name) for name in STATUSES},
    }
    log.info("fine-tuning data: %s", counts)
    if counts["truncated"] or counts["dropped"]:
        log.warning(
            "fine-tuning data: %d of %d examples exceed max_length=%d: %d truncated (%s), %d dropped",
            counts["truncated"] + counts["dropped"],
            counts["examples"],
            max_length,
            counts["truncated"],
            policy,
            counts["dropped"],
        )
    column = encoded.data.column("input_ids").combine_chunks()
    flat, offsets = column.values.to_numpy(), column.offsets.to_numpy()
    examples = [
        Example(flat[offsets[i] : offsets[i + 1]], n)
        for i, (n, s) in enumerate(zip(encoded["prompt_tokens"], status))
        if s != "dropped"
    ]
    if not examples:
        raise InputError(f"{csv_path}: no row fits max_length={max_length} under truncation policy {policy!r}")
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
    return _FLATTEN([{"input_ids": np.asarray(e.input_ids).tolist(), "labels": e.labels.tolist()} for e in pack])


class PackDataset(torch.utils.data.Dataset):
    """Packs as dataset items (a list of examples each)."""

    def __init__(self, packs):
        self.packs = packs

    def __len__(self):
        return len(self.packs)

    def __getitem__(self, i):
        return self.packs[i]


def write_counts(path: str, counts: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(counts, indent=2) + "\n")


def main(run_file: str) -> None:
    run = TrainRun.from_json(run_file)
    run.per_device_batch_size = 1  # one pack per micro-batch
    model, tokenizer = load_model_and_tokenizer(run)
    args = training_arguments(run)  # starts the process group, with the run's timeout, before any collective
    cache_dir = run.data_cache_dir or str(Path(run.checkpoint_dir) / "data-cache")
    examples, counts = encode_dataset(run.data, tokenizer, run.max_length, cache_dir, run.truncation)
    if run.truncation_file and args.process_index == 0:
        write_counts(run.truncation_file, counts)
    packs = pack_examples(examples, run.max_length, run.seed)
    tokens = sum(len(e.input_ids) for e in examples)
    summary = {
        **counts,
        "packs": len(packs),
        "tokens": tokens,
        "pack_fill": tokens / max(1, run.max_length * len(packs)),
    }
    log.info(
        "fine-tuning: %d examples (%d tokens) in %d packs of at most %d tokens, %.1f%% full",
        len(examples),
        tokens,
        len(packs),
        run.max_length,
        100 * summary["pack_fill"],
    )
    train_and_save(run, args, model, tokenizer, PackDataset(packs), collate_packed, data_summary=summary)


if __name__ == "__main__":
    setup_logging()
    main(sys.argv[1])
