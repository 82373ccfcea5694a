"""Benchmark: tokens/s and MFU of our training step on one GPU (pending: no GPU in CI).

The step is the workflow's: the MeasuredTrainer of asclepius_r.train.run with its
TrainingArguments (bf16 autocast over fp32 master weights, tf32, activation checkpointing,
AdamW, the configured attention kernel) on 2048-token pretraining blocks, and MFU counted as
the workflow counts it (6N without the input embedding, plus 12*L*d*S attention FLOPs, over
the peak of the device). The model is LLaMA-shaped with random weights: `--size 1b` (about
1.2B parameters: 20 layers of width 2048) fits one H100 with fp32 master weights and
AdamW states; `--size llama3-1b` has Llama-3's layout (128,256-token vocabulary, grouped-query
attention, 8,192-token context) at Llama-3.2-1B's width and depth, for `--seq 8192`. The
reference is 2023's implied 15-23% MFU (8x A100, original-method.md); the goal is 45% on one H100.

    python bench/gpu_mfu.py [--size 1b] [--steps 30] [--peak-tflops T]      (about 3 minutes on an H100)
    python bench/gpu_mfu.py --size llama3-1b --seq 8192 --batch 1
    python bench/gpu_mfu.py --tiny --device cpu                              (smoke test, seconds)
Last line: RESULT tokens_per_s=<f> mfu=<f> device=<name>
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, default_data_collator

from asclepius_r.base_model.tiny import TinyLlamaSpec, build_tiny_llama_from_texts
from asclepius_r.config import defaults
from asclepius_r.train.pretrain import BlockDataset
from asclepius_r.train.run import MeasuredTrainer, TrainRun, load_model_and_tokenizer, training_arguments

LLAMA1 = dict(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
# Llama-3's layout: a 128,256-token vocabulary, grouped-query attention (8 key/value heads), an
# 8,192-token context and rope_theta 500,000; the width and depth are Llama-3.2-1B's.
LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, num_key_value_heads=8, rope_theta=500000.0)
SHAPES = {
    "1b": dict(LLAMA1, hidden_size=2048, intermediate_size=5504, num_hidden_layers=20, num_attention_heads=16),
    "3b": dict(LLAMA1, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32),
    "llama3-1b": dict(
        LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        tie_word_embeddings=True,
    ),
}
REPO = Path(__file__).resolve().parents[1]


def build_model(folder: Path, size: str | None) -> None:
    """A random LLaMA of `size` (or the demo's tiny one) with the demo tokenizer, saved in HF format."""
    texts = [p.read_text() for p in sorted((REPO / "demo" / "discharge_summaries").glob("*.txt"))]
    build_tiny_llama_from_texts(texts, folder, TinyLlamaSpec(**defaults("tiny_model"), seed=0, family="llama1"))
    if size:
        config = LlamaConfig(bos_token_id=1, eos_token_id=2, **SHAPES[size])
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny model (smoke test)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2, help="per-device batch (2023: 2)")
    parser.add_argument(
        "--accumulation", type=int, default=8, help="micro-batches per optimizer step and device (2023: 8)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (TrainingArguments)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--peak-tflops", type=float, help="bf16 dense peak of the device (default: from its name, as in training)"
    )
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument(
        "--no-gradient-checkpointing",
        action="store_true",
        help="keep every activation (the workflow checkpoints them by default)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu on a CUDA machine: hide the GPUs with CUDA_VISIBLE_DEVICES=''")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --tiny --device cpu for the smoke test")
    seq = min(args.seq, 128) if args.tiny else args.seq
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        build_model(model_dir, None if args.tiny else args.size)
        files = dict(base_model=str(model_dir), data="", output_dir=str(Path(scratch) / "out"), metrics_file="")
        files.update(checkpoint_dir=str(Path(scratch) / "checkpoints"), truncation_file=None, data_cache_dir=None)
        config = defaults(models={"bench": {"base": "tiny"}})
        run = replace(
            TrainRun.from_config(config, "pretrain", "bench", **files),
            max_length=seq,
            per_device_batch_size=args.batch,
            global_batch_size=args.batch * args.accumulation,  # one process
            max_steps=args.steps,
            warmup_ratio=0.0,
            logging_steps=max(1, args.steps // 3),
            save_steps=10**9,
            attn_implementation=args.attn,
            peak_tflops_per_device=args.peak_tflops,
            gradient_checkpointing=not args.no_gradient_checkpointing,
        )
        Path(run.checkpoint_dir).mkdir(parents=True)
        model, tokenizer = load_model_and_tokenizer(run)
        vocab = model.config.vocab_size
        blocks = np.random.default_rng(0).integers(
            3, vocab, size=(args.batch * args.accumulation * (args.steps + 1), seq), dtype=np.int32
        )
        args_train = training_arguments(run)
        args_train.save_strategy = "no"
        if args.compile:  # after __post_init__, which would have filled in the backend
            args_train.torch_compile, args_train.torch_compile_backend = True, "inductor"
        trainer = MeasuredTrainer(
            model=model,
            args=args_train,
            train_dataset=BlockDataset(blocks),
            data_collator=default_data_collator,
            processing_class=tokenizer,
            run=run,
        )
        trainer.train()
        records = [json.loads(line) for line in run.running_metrics.read_text().splitlines()]
    steady = records[1:] or records  # the first window holds start-up and compilation
    tokens_per_s = float(np.mean([r["tokens_per_s"] for r in steady]))
    mfu = float(np.mean([r["mfu"] for r in steady])) if trainer.peak_tflops else float("nan")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    params = trainer.flop_model.matmul_params
    print(
        f"model: {params / 1e9:.2f}B matmul parameters, seq {seq}, batch {args.batch} x {args.accumulation}, "
        f"{args.steps} steps, compiled {args.compile}, "
        f"attention {args.attn}, activation checkpointing {run.gradient_checkpointing}, "
        f"peak {trainer.peak_tflops} TFLOP/s ({trainer.device_name})"
    )
    for r in records:
        mfu_text = "unknown" if r["mfu"] is None else f"{r['mfu']:.3f}"
        print(f"step {r['step']}: loss {r['loss']:.3f}, {r['tokens_per_s']:,.0f} tokens/s, MFU {mfu_text}")
    if args.device == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"RESULT tokens_per_s={tokens_per_s:.1f} mfu={mfu:.4f} device={device.replace(' ', '_')}")


if __name__ == "__main__":
    main()
