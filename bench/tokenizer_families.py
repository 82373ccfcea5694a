"""Benchmark: the two tokenizer families, LLaMA-1's SentencePiece and Llama-3's byte-level BPE.

Times rebuilding each real vocabulary from llama.cpp's GGUF (`gguf_vocab`, sdist cached), building
the tiny base models (`base: tiny` and `base: tiny-llama3` on the demo notes, and a Llama-3 one
with the real 128,256-token vocabulary at the rehearsal's layer sizes) and `describe_base` on
each (best of 3). Then counts note tokens in both real vocabularies: the 44 demo discharge
summaries and the rehearsal's synthetic ones (the "Discharge summary" rows, log-normal lengths in
LLaMA-1 tokens, median 1,800, sigma 0.5, as rehearsal/config.yaml), with the notes longer than
2,048 and 8,192 tokens.

    python bench/tokenizer_families.py [--long-notes 200]
Prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
from transformers import AutoTokenizer

from asclepius_r.base_model.describe import describe_base
from asclepius_r.base_model.tiny import TinyLlamaSpec, build_tiny_llama_from_texts, save_tokenizer_folder
from asclepius_r.config import defaults
from support.gguf_vocab import build_llama3_tokenizer, build_llama_tokenizer
from support.synthetic_notes import load_demo_notes, write_long_noteevents

# The rehearsal's tiny layers (rehearsal/config.yaml's tiny_model).
REHEARSAL_LAYERS = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4)


def timed(function, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir()) / 1e6


def token_counts(tokenizer, texts: list[str]) -> str:
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    chars = sum(len(t) for t in texts) / sum(counts)
    over = [sum(c > limit for c in counts) for limit in (2048, 8192)]
    return f"{statistics.median(counts):,.0f} | {chars:.2f} | {over[0]} | {over[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long-notes", type=int, default=200, help="synthetic discharge summaries to count")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        spm, spm_s = timed(build_llama_tokenizer, scratch / "llama1" / "tokenizer.model")
        save_tokenizer_folder(scratch / "llama1", spm.read_bytes())
        _, bpe_s = timed(build_llama3_tokenizer, scratch / "llama3")
        demo = [note.text for note in load_demo_notes() if note.amends is None]  # not the addenda

        print("| step | wall |\n|---|---|")
        print(f"| LLaMA-1 `tokenizer.model` from the GGUF, 46 references checked | {spm_s:.1f} s |")
        print(f"| Llama-3 tokenizer folder from the GGUF, 46 references checked | {bpe_s:.1f} s |")
        bases = {
            "tiny (LLaMA-1 style, 600 tokens trained on the demo notes)": TinyLlamaSpec(
                **defaults("tiny_model"), seed=0, family="llama1"
            ),
            "tiny-llama3 (600 tokens trained on the demo notes)": TinyLlamaSpec(
                **defaults("tiny_model"), seed=0, family="llama3"
            ),
            "tiny-llama3, real 128,256-token vocabulary, rehearsal layers": TinyLlamaSpec(
                **{
                    **defaults("tiny_model"),
                    "vocab_size": 128256,
                    "max_position_embeddings": 8192,
                    "tokenizer_model": str(scratch / "llama3"),
                    **REHEARSAL_LAYERS,
                },
                seed=0,
                family="llama3",
            ),
        }
        for i, (name, spec) in enumerate(bases.items()):
            folder = scratch / f"base-{i}"
            _, build_s = timed(build_tiny_llama_from_texts, demo, folder, spec)
            describe_s = min(timed(describe_base, folder)[1] for _ in range(3))
            print(
                f"| build {name} ({folder_mb(folder):.1f} MB) / describe_base | {build_s:.1f} s / {describe_s:.2f} s |"
            )

        csv = scratch / "NOTEEVENTS.csv"
        write_long_noteevents(csv, scratch / "llama1" / "tokenizer.model", args.long_notes, 1800, 0.5, seed=0)
        notes = pd.read_csv(csv)
        long = notes.loc[notes["CATEGORY"] == "Discharge summary", "TEXT"].tolist()
        print("\n| notes | tokenizer | median tokens | characters per token | over 2,048 | over 8,192 |")
        print("|---|---|---|---|---|---|")
        for label, texts in (
            (f"{len(demo)} demo discharge summaries", demo),
            (f"{len(long)} synthetic discharge summaries", long),
        ):
            for family in ("llama1", "llama3"):
                tokenizer = AutoTokenizer.from_pretrained(scratch / family)
                print(f"| {label} | {family} | {token_counts(tokenizer, texts)} |")


if __name__ == "__main__":
    main()
