"""Benchmark: fine-tuning's truncation policy (`drop` / `note_middle` / `note_tail`) decided by
what the model learns, where the policy matters as in the paper run.

At the learning check's 512-token length every demo note is cut, so `drop` trains nothing there.
Here each policy fine-tunes SmolLM2 for one whole epoch from the learning check's Pretrained-Only
model, with the check's data and settings, at the length where the paper run's share of examples
does not fit (48% at 2048 LLaMA tokens, docs/training.md): `drop` trains on the other 52% in
about half the optimizer steps, the cutting policies on every example. Each model is measured by
its held-out answer loss at a length where no held-out example is cut, so every policy is scored
on the same whole examples. The baseline is `drop` (the default) in the same run; run-to-run
noise is each policy's spread over the training seeds.

    python bench/truncation_learning.py [--workdir learning/workdir] [--seeds 1 2] [--policies drop note_middle ...]
Ends with one RESULT line (the base's and Pretrained-Only's answer loss, where fine-tuning
starts, then each policy's per seed, then their means).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from statistics import mean

import pandas as pd
from transformers import AutoTokenizer

from asclepius_r.evaluate.heldout import heldout_items
from asclepius_r.prompts import TRUNCATION_POLICIES
from asclepius_r.train.finetune import encode_example
from learning import run as learning

log = logging.getLogger("bench.truncation_learning")

# The share of fine-tuning examples longer than 2048 LLaMA-1 tokens on paper-shaped notes
# (BENCHMARKS.md, Training), which `drop` leaves out of the paper run.
PAPER_UNFIT_SHARE = 0.48


def whole_lengths(tokenizer, rows: list[tuple[str, str, str]]) -> list[int]:
    """Tokens of each (note, question, answer) as fine-tuning builds it, nothing cut."""
    return [len(encode_example(tokenizer, *row, max_length=10**9, policy="drop")[0].input_ids) for row in rows]


def length_leaving_out(lengths: list[int], share: float) -> int:
    """The shortest max_length at which at most `share` of the examples do not fit."""
    ordered = sorted(lengths)
    return ordered[math.ceil(len(ordered) * (1 - share)) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=learning.WORKDIR)
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2], help="none: only where fine-tuning starts")
    parser.add_argument("--policies", nargs="+", choices=TRUNCATION_POLICIES, default=list(TRUNCATION_POLICIES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = args.workdir.resolve() / "results"
    if not (results / "models" / learning.PRETRAINED).exists():
        raise SystemExit(f"{results}: no learning check's models here; run `make learning-check` first")
    tokenizer = AutoTokenizer.from_pretrained(results / "models" / learning.PRETRAINED)
    train = pd.read_csv(results / "mimiciii_discharge.csv", keep_default_na=False)
    train_lengths = whole_lengths(tokenizer, list(zip(train.note, train.question, train.answer)))
    max_length = length_leaving_out(train_lengths, PAPER_UNFIT_SHARE)
    held = heldout_items(results / "notes/heldout.parquet", results / "instructions/heldout.jsonl")
    eval_length = max(whole_lengths(tokenizer, [(i["note"], i["question"], i["reference"]) for i in held]))
    unfit = sum(n > max_length for n in train_lengths)
    log.info(
        "fine-tuning at max_length %d: %d of %d examples do not fit; held-out answers scored whole at %d tokens",
        max_length,
        unfit,
        len(train_lengths),
        eval_length,
    )
    losses: dict[str, dict[int, float]] = {policy: {} for policy in args.policies}
    with tempfile.TemporaryDirectory(dir=results) as scratch:
        start = {
            name: learning.heldout_figures(args.workdir, folder, Path(scratch) / f"{name}.json", max_length=eval_length)
            for name, folder in (
                ("base", results / "base_models" / learning.NAME),
                ("pretrained_only", results / "models" / learning.PRETRAINED),
            )
        }
        for seed in args.seeds:
            for policy in args.policies:
                out = Path(scratch) / f"{policy}-{seed}"
                started = time.monotonic()
                model = learning.retrain(
                    args.workdir,
                    "finetune",
                    out,
                    truncation=policy,
                    max_length=max_length,
                    epochs=1,
                    max_steps=-1,
                    seed=seed,
                )
                figures = learning.heldout_figures(args.workdir, model, out / "losses.json", max_length=eval_length)
                run = json.loads((model / "training_run.json").read_text())
                log.info(
                    "seed %d, %s: answer loss %.4f (%d whole, %d cut, %d dropped; %d optimizer steps) in %.0f s",
                    seed,
                    policy,
                    figures["answer_loss"],
                    run["data"]["whole"],
                    run["data"]["truncated"],
                    run["data"]["dropped"],
                    run["global_step"],
                    time.monotonic() - started,
                )
                losses[policy][seed] = figures["answer_loss"]
    result = {"max_length": max_length, "unfit": unfit, "examples": len(train_lengths), "eval_length": eval_length}
    result |= {f"answer_loss_{name}": figures["answer_loss"] for name, figures in start.items()}
    for policy, by_seed in losses.items():
        result |= {f"answer_loss_{policy}_seed{seed}": loss for seed, loss in by_seed.items()}
    result |= {f"answer_loss_{policy}_mean": mean(by_seed.values()) for policy, by_seed in losses.items() if by_seed}
    print(
        "RESULT "
        + " ".join(
            f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}" for key, value in result.items()
        )
    )


if __name__ == "__main__":
    main()
