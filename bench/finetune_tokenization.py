"""Benchmark: tokenising the fine-tuning set (57k examples at paper shape) with and without the
`datasets` cache, in one process and in two ranks, and the truncation counts at max_length 2048.

Examples: synthetic discharge summaries of MIMIC-III's lengths in LLaMA-1 tokens
(`LongDischargeNotes`: log-normal, median 1,800), each with a question and an answer of two or
three of its lines. The tokenizer is LLaMA-1's own vocabulary (`gguf_vocab`, from llama.cpp's
GGUF). Each case runs `finetune.encode_dataset` in fresh processes (imports not timed):
- 1 process, cold cache: the CSV read into Arrow and every example tokenised and fitted;
- 1 process, warm cache: the same call again, reading the cached Arrow files;
- 2 ranks (torchrun, gloo), cold: rank 0 tokenises under `main_process_first`, rank 1 then loads
  its cache; the baseline is 2 ranks that each tokenise everything (what training did before:
  every rank tokenised every note), each into its own cache;
- 2 ranks, warm.
The wall time of a case is the slowest rank's; its CPU time (threads included) is all ranks'.

    python bench/finetune_tokenization.py [--examples 57000] [--workdir DIR]
Prints a Markdown table for BENCHMARKS.md; last line: RESULT cold_1=<s> warm_1=<s> ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 2048
QUESTIONS = [
    "List the discharge medications with their doses.",
    "What follow-up appointments were arranged?",
    "Summarize the hospital course in two sentences.",
    "Which procedures were performed during the admission?",
    "What abbreviations in the note refer to laboratory tests, and what do they stand for?",
]


def tokenise_once(csv: str, tokenizer_dir: str, cache: str, out: str) -> None:
    """One process's (rank's) timed `encode_dataset`, appended to `out` as a JSON line."""
    from transformers import AutoTokenizer

    from asclepius_r.train.finetune import encode_dataset

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start, cpu = time.perf_counter(), time.process_time()
    examples, counts = encode_dataset(csv, tokenizer, MAX_LENGTH, cache, "note_middle")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    record = {"seconds": seconds, "cpu": cpu, "counts": counts, "tokens": sum(len(e.input_ids) for e in examples)}
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")


def build_inputs(workdir: Path, examples: int) -> tuple[Path, Path]:
    """LLaMA-1's tokenizer folder and a fine-tuning CSV of `examples` paper-shaped rows (made once)."""
    import sentencepiece as spm

    from asclepius_r.base_model.tiny import save_tokenizer_folder
    from support.gguf_vocab import build_llama_tokenizer
    from support.synthetic_notes import LongDischargeNotes, load_demo_notes

    tokenizer_dir = workdir / "llama-tokenizer"
    if not (tokenizer_dir / "tokenizer.model").exists():
        model = build_llama_tokenizer(workdir / "tokenizer.model")
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer_folder(tokenizer_dir, model.read_bytes())
    csv = workdir / f"sft-{examples}.csv"
    if not csv.exists():
        processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
        notes = LongDischargeNotes(load_demo_notes(), lambda text: len(processor.encode(text)), examples)
        rng = random.Random(0)
        rows = []
        # Only the discharge summaries are needed, not a whole NOTEEVENTS around them.
        for text in (notes._discharge_text("Report") for _ in range(examples)):
            lines = [line for line in text.split("\n") if len(line) > 30] or [text[:200]]
            answer = " ".join(rng.sample(lines, min(len(lines), rng.randint(2, 3))))
            rows.append({"note": text, "question": rng.choice(QUESTIONS), "answer": answer})
        pd.DataFrame(rows).to_csv(csv, index=False)
    return tokenizer_dir, csv


def run_case(csv: Path, tokenizer_dir: Path, caches: list[Path], out: Path) -> list[dict]:
    """One process per cache folder given, or two ranks sharing one cache when it is given twice."""
    out.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    arguments = [__file__, "--rank-of", str(csv), str(tokenizer_dir)]
    if len(caches) == 2 and caches[0] == caches[1]:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        commands = [torchrun + arguments + [str(caches[0]), str(out)]]
    else:
        commands = [[sys.executable, *arguments, str(cache), str(out)] for cache in caches]
    jobs = [
        subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    for job in jobs:
        if job.wait():
            raise RuntimeError(f"a tokenisation process failed: {job.stderr.read()[-3000:]}")
    return [json.loads(line) for line in out.read_text().splitlines()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=57000)
    parser.add_argument("--workdir", type=Path, help="keeps the tokenizer and CSV between runs (default: a temp dir)")
    parser.add_argument("--rank-of", nargs=4, metavar=("CSV", "TOKENIZER", "CACHE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_of:
        tokenise_once(*args.rank_of)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-tokenization-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer_dir, csv = build_inputs(workdir, args.examples)
    print(f"inputs ready in {time.perf_counter() - start:.0f} s: {csv}", file=sys.stderr)
    out = workdir / "ranks.jsonl"
    shared, own_0, own_1 = (workdir / name for name in ("cache-shared", "cache-rank0", "cache-rank1"))
    for folder in (shared, own_0, own_1):
        shutil.rmtree(folder, ignore_errors=True)
    cases = [
        ("1 process, cold cache", [workdir / "cache-one"]),
        ("1 process, warm cache", [workdir / "cache-one"]),
        ("2 ranks, each tokenising (before)", [own_0, own_1]),
        ("2 ranks, main_process_first, cold", [shared, shared]),
        ("2 ranks, main_process_first, warm", [shared, shared]),
    ]
    shutil.rmtree(workdir / "cache-one", ignore_errors=True)
    results = {}
    for name, caches in cases:
        ranks = run_case(csv, tokenizer_dir, caches, out)
        results[name] = (max(r["seconds"] for r in ranks), sum(r["cpu"] for r in ranks))
        counts, tokens = ranks[0]["counts"], ranks[0]["tokens"]
        print(f"{name}: {results[name][0]:.1f} s wall, {results[name][1]:.1f} s CPU", file=sys.stderr)
    load = os.getloadavg()[0]
    print(f"\n{counts['examples']} examples, {tokens} tokens kept, max_length {MAX_LENGTH}, load average {load:.1f}\n")
    print("| case | wall s (slowest rank) | CPU s (all ranks) |\n|---|---|---|")
    for name, (seconds, cpu) in results.items():
        print(f"| {name} | {seconds:.1f} | {cpu:.1f} |")
    share = {k: counts[k] / counts["examples"] for k in ("whole", "truncated", "dropped")}
    print(f"\ntruncation at {MAX_LENGTH} (note_middle): {json.dumps(counts)}; shares {json.dumps(share)}")
    print("RESULT " + " ".join(f"{k.replace(' ', '_').replace(',', '')}={v[0]:.1f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
