"""Benchmark: what one training sequence costs on a CPU with Llama-3's 128,256-token vocabulary.

A tiny random LlamaForCausalLM at the rehearsal's layer sizes (hidden 64, 2 layers) does one
forward and backward pass with labels over one sequence of each length; the logits (length x
vocabulary, fp32) and their gradients dominate. Peak RSS and seconds per pass decide the
rehearsal's per-model max_length caps for its Llama-3-style model.

    python bench/vocab_logits_memory.py 2048 4096 8192     (one process per length: peak RSS)
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time

VOCAB = 128256


def one_pass(length: int) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one forward and backward pass over `length` tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=8192,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, VOCAB, (1, length))
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main(lengths: list[str]) -> None:
    if len(lengths) == 2 and lengths[0] == "--one":
        print(*one_pass(int(lengths[1])))
        return
    print("| tokens | forward+backward s | peak RSS GB |\n|---:|---:|---:|")
    for length in lengths:
        out = subprocess.run([sys.executable, __file__, "--one", length], capture_output=True, text=True, check=True)
        seconds, peak = (float(x) for x in out.stdout.split())
        print(f"| {int(length):,} | {seconds:.1f} | {peak:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
