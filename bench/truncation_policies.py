"""Benchmark: what each fine-tuning truncation policy leaves the model to learn from.

The 48 demo notes with their hand-written questions and answers (`demo/responses/`), tokenised
with LLaMA-1's vocabulary (`gguf_vocab`), shaped by `finetune.encode_example` at a few
`max_length`s (the paper's 2048, and shorter ones so that more notes are cut, as with MIMIC's
long tail). For each policy: examples kept, examples cut, and for cut examples the share of the
answer's note words (words of 4+ letters that the answer shares with the whole note) that are
still in the note the model sees: below 1, the model is trained to state facts absent from its
context.

    python bench/truncation_policies.py [--lengths 2048 1536 1024]
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from statistics import mean

from transformers import AutoTokenizer

from asclepius_r.base_model.tiny import save_tokenizer_folder
from asclepius_r.prompts import TRUNCATION_POLICIES
from asclepius_r.train.finetune import encode_example
from support.gguf_vocab import build_llama_tokenizer

REPO = Path(__file__).resolve().parents[1]
NOTE_SECTION = re.compile(r"\[Discharge Summary Begin\]\n(.*)\n\[Discharge Summary End\]", re.S)


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 4}


def demo_examples() -> list[dict]:
    notes = {p.stem: p.read_text(encoding="utf-8") for p in (REPO / "demo/discharge_summaries").glob("*.txt")}
    rows = []
    for part in sorted((REPO / "demo/responses").glob("*.jsonl")):
        for line in part.read_text().splitlines():
            record = json.loads(line)
            rows.append({**record, "note": notes[record["note"]]})
    return rows


def llama_tokenizer(folder: Path):
    model = build_llama_tokenizer(folder / "tokenizer.model")
    save_tokenizer_folder(folder, model.read_bytes())
    return AutoTokenizer.from_pretrained(folder)


def measure(tokenizer, rows: list[dict], max_length: int, policy: str) -> dict:
    kept, cut, support = 0, 0, []
    for row in rows:
        example, status = encode_example(tokenizer, row["note"], row["question"], row["answer"], max_length, policy)
        if example is None:
            continue
        kept += 1
        if status == "truncated":
            cut += 1
            prompt = tokenizer.decode(example.input_ids[: example.prompt_tokens])
            shown = words(NOTE_SECTION.search(prompt).group(1))
            grounded = words(row["answer"]) & words(row["note"])
            support.append(len(grounded & shown) / len(grounded) if grounded else 1.0)
    return {"kept": kept, "cut": cut, "support": mean(support) if support else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 1536, 1024])
    args = parser.parse_args(argv)
    rows = demo_examples()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = llama_tokenizer(Path(folder))
        print(f"{len(rows)} demo examples\n")
        print("| max_length | policy | examples kept | of them cut | answer's note words still shown (cut examples) |")
        print("|---|---|---|---|---|")
        for max_length in args.lengths:
            for policy in TRUNCATION_POLICIES:
                m = measure(tokenizer, rows, max_length, policy)
                support = "-" if m["support"] is None else f"{100 * m['support']:.0f}%"
                print(f"| {max_length} | {policy} | {m['kept']} | {m['cut']} | {support} |")


if __name__ == "__main__":
    main()
