"""The near-duplicate filter alone at growing sizes: does its cost per question stay flat?

The stage's filtering (`instructions.near_duplicate_rouge`, ROUGE-L 0.7): one index per task,
questions in note order, each kept unless it beats the threshold against an earlier kept one of
its task. The questions are those the stage benchmark's server writes (6-14 Zipf-distributed
words from 3,000; bench/instruction_stage.py), the tasks drawn as the stage draws them. Each size
runs in a process of its own, with the package of this checkout and, as the baseline, with the
package at `--baseline-ref` (the filter before prefix filtering on both sides); both must keep
the same questions.

    python bench/near_duplicate_filter.py                       # 5k, 10k, 20k, 57k questions

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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # last: the package measured comes from PYTHONPATH (this checkout or the baseline)

from bench.instruction_stage import WEIGHTS, WORDS, package_at  # noqa: E402

ROUGE = 0.7
# main before this filter: one-sided probing of the rarest words, every question's word set kept
BASELINE_REF = "0ed6f46"


def measure(size: int) -> dict:
    """Filter `size` questions with whichever package is first on the path; CPU seconds and kept count."""
    from asclepius_r.instructions import NearDuplicateIndex
    from asclepius_r.tasks import draw_task

    rng = random.Random(11)
    questions = [
        (draw_task(100_000 + i, 42), "What " + " ".join(rng.choices(WORDS, WEIGHTS, k=rng.randint(5, 13))) + "?")
        for i in range(size)
    ]
    indexes: dict[str, NearDuplicateIndex] = {}
    kept = 0
    started = time.process_time()
    for task, question in questions:
        index = indexes.setdefault(task, NearDuplicateIndex(ROUGE))
        if not index.is_near_duplicate(question):
            index.add(question)
            kept += 1
    return {"size": size, "cpu_s": time.process_time() - started, "kept": kept}


def run(size: int, pythonpath: Path) -> dict:
    command = [sys.executable, __file__, "--measure", str(size)]
    out = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(pythonpath)}, check=True, capture_output=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,10000,20000,57000")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    new_us, old_us = [], []
    with tempfile.TemporaryDirectory() as work:
        baseline = package_at(args.baseline_ref, Path(work))
        for size in map(int, args.sizes.split(",")):
            new, old = run(size, REPO), run(size, baseline)
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
