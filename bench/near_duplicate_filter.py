"""The near-duplicate filter alone at growing sizes: does its cost per question stay flat?

The stage's filtering (`instructions.near_duplicate_rouge`, ROUGE-L 0.7): one index per task,
questions in note order, each kept unless it beats the threshold against an earlier kept one of
its task. The questions are those the stage benchmark's server writes (6-14 Zipf-distributed
words from 3,000; bench/instruction_stage.py), the tasks drawn as the stage draws them. Each size
runs in a process of its own, with the package of this checkout and, as the baseline, with the
package at `--baseline-ref` (the filter before prefix filtering on both sides); both must keep
the same questions.

    python bench/near_duplicate_filter.py                       # 5k, 10k, 20k, 57k questions
    python bench/near_duplicate_filter.py --memory --sizes 10000,57000   # bytes held a question

Last line: RESULT us_per_question=<new at each size> baseline_us_per_question=<old at each size>
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROUGE = 0.7
# main before this filter: one-sided probing of the rarest words, every question's word set kept
BASELINE_REF = "0ed6f46"


def write_questions(size: int, path: Path) -> None:
    """`size` (task, question) pairs as the stage benchmark's server and the stage make them."""
    from asclepius_r.instructions.tasks import draw_task
    from bench.instruction_stage import WEIGHTS, WORDS

    rng = random.Random(11)
    questions = [
        (draw_task(100_000 + i, 42), "What " + " ".join(rng.choices(WORDS, WEIGHTS, k=rng.randint(5, 13))) + "?")
        for i in range(size)
    ]
    path.write_text(json.dumps(questions))


def measure(questions_file: str, memory: bool = False) -> dict:
    """Filter the questions with the package PYTHONPATH gives (this process imports nothing of the
    checkout's first); CPU seconds and kept count, or with `memory` the bytes the indexes hold at
    the end (tracemalloc, which slows the run)."""
    from asclepius_r.instructions.generate import NearDuplicateIndex

    questions = json.loads(Path(questions_file).read_text())
    size = len(questions)
    if memory:
        tracemalloc.start()
    indexes: dict[str, NearDuplicateIndex] = {}
    kept = 0
    started = time.process_time()
    for task, question in questions:
        index = indexes.setdefault(task, NearDuplicateIndex(ROUGE))
        if not index.is_near_duplicate(question):
            index.add(question)
            kept += 1
    result = {"size": size, "cpu_s": time.process_time() - started, "kept": kept}
    if memory:
        result["held_bytes"] = tracemalloc.get_traced_memory()[0]
    return result


def run(questions: Path, pythonpath: Path, memory: bool = False) -> dict:
    command = [sys.executable, __file__, "--measure", str(questions), *(["--memory"] if memory else [])]
    out = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(pythonpath)}, check=True, capture_output=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,10000,20000,57000")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--memory", action="store_true", help="bytes the filter holds per question, not CPU time")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one questions file, in this process
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.memory)))
        return
    sys.path.insert(0, str(REPO))  # the parent only: questions and the baseline's checkout
    from bench.instruction_stage import package_at

    sizes = [int(size) for size in args.sizes.split(",")]
    if args.memory:
        held = []
        with tempfile.TemporaryDirectory() as work:
            baseline = package_at(args.baseline_ref, Path(work))
            for size in sizes:
                write_questions(size, questions := Path(work) / f"questions-{size}.json")
                new, old = run(questions, REPO, memory=True), run(questions, baseline, memory=True)
                held.append((new["held_bytes"] / size, old["held_bytes"] / size))
                print(
                    f"{size:6d} questions: {held[-1][0]:.0f} bytes a question, baseline {held[-1][1]:.0f}", flush=True
                )
        print(
            "RESULT bytes_per_question=" + ",".join(f"{n:.0f}" for n, _ in held),
            "baseline_bytes_per_question=" + ",".join(f"{o:.0f}" for _, o in held),
        )
        return
    new_us, old_us = [], []
    with tempfile.TemporaryDirectory() as work:
        baseline = package_at(args.baseline_ref, Path(work))
        for size in sizes:
            write_questions(size, questions := Path(work) / f"questions-{size}.json")
            new, old = run(questions, REPO), run(questions, baseline)
            if new["kept"] != old["kept"]:
                raise SystemExit(f"{size} questions: {new['kept']} kept, the baseline kept {old['kept']}")
            new_us.append(new["cpu_s"] / size * 1e6)
            old_us.append(old["cpu_s"] / size * 1e6)
            print(
                f"{size:6d} questions, {new['kept']} kept: {new['cpu_s']:.2f} s CPU ({new_us[-1]:.0f} us a question), "
                f"baseline {old['cpu_s']:.2f} s ({old_us[-1]:.0f} us)",
                flush=True,
            )
    print(
        "RESULT us_per_question=" + ",".join(f"{u:.0f}" for u in new_us),
        "baseline_us_per_question=" + ",".join(f"{u:.0f}" for u in old_us),
    )


if __name__ == "__main__":
    main()
