"""Training data and accounting: packed fine-tuning, truncation, pretraining blocks, FLOPs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from asclepius_r.base_model.describe import BaseModelError, copy_tokenizer_model
from asclepius_r.prompts import CUT_MARK, render_released
from asclepius_r.train.finetune import (
    IGNORE_INDEX,
    Example,
    collate_packed,
    encode_dataset,
    encode_example,
    pack_examples,
)
from asclepius_r.train.pretrain import encode_notes, pack_notes
from asclepius_r.train.run import (
    MeasuredTrainer,
    gradient_accumulation,
    load_model_and_tokenizer,
    training_arguments,
)
from asclepius_r.train.throughput import FlopModel, batch_counts
from support.default_settings import train_run
from support.train_fixtures import build_fixture_data, demo_texts, launch_env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_fixture_data(tmp_path_factory.mktemp("train-data"))


@pytest.fixture(scope="module")
def tokenizer(data):
    return AutoTokenizer.from_pretrained(data["model"], padding_side="right")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logits_equal_separate_runs(data, tokenizer, attn_implementation):
    # Loaded as training loads it (no KV cache: with one, the packed examples would mix).
    run = train_run(base_model=str(data["model"]), attn_implementation=attn_implementation)
    model = load_model_and_tokenizer(run)[0].eval()
    texts = demo_texts()[:3]
    examples = [
        encode_example(tokenizer, text[: 100 * (i + 1)], "List the medications.", "None.", 1024, "drop")[0]
        for i, text in enumerate(texts)
    ]
    assert len({len(e.input_ids) for e in examples}) == 3, "examples of different lengths"
    batch = collate_packed([examples])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        separate = torch.cat([model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples])
    assert packed.shape == separate.shape
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-4)
    # Without the restarting positions the second example would see the first: the test can fail.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"]).logits[0]
    assert not torch.allclose(leaky, separate, atol=1e-3)


def test_loss_only_on_answer_and_eos(tokenizer):
    answer = "Aspirin and metoprolol."
    example, status = encode_example(tokenizer, "Short note.", "List the medications.", answer, 512, "drop")
    assert status == "whole"
    prompt = tokenizer(render_released("Short note.", "List the medications."))["input_ids"]
    assert example.input_ids[: len(prompt)] == prompt and example.input_ids[0] == tokenizer.bos_token_id
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt)])
    trained = [t for t in example.labels if t != IGNORE_INDEX]
    assert trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained[:-1]).strip() == answer


LONG_ANSWER = "The patient went home on aspirin."


@pytest.fixture
def long_rows(tmp_path):
    """A note far over 512 tokens, a short one, and an answer that alone exceeds 512 tokens."""
    rows = [
        {"note": " ".join(demo_texts()), "question": "What medication?", "answer": LONG_ANSWER},
        {"note": "Brief note.", "question": "What medication?", "answer": LONG_ANSWER},
        {"note": "Brief note.", "question": "What medication?", "answer": "word " * 400},
    ]
    csv = tmp_path / "sft.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


@pytest.mark.parametrize(
    "policy,whole,truncated,dropped", [("note_middle", 1, 1, 1), ("note_tail", 1, 1, 1), ("drop", 1, 0, 2)]
)
def test_long_note_is_counted_and_cut_or_dropped_by_the_policy(
    tmp_path, tokenizer, long_rows, policy, whole, truncated, dropped
):
    examples, counts = encode_dataset(str(long_rows), tokenizer, 512, str(tmp_path / "cache"), policy)
    assert counts == {
        "policy": policy,
        "max_length": 512,
        "examples": 3,
        "whole": whole,
        "truncated": truncated,
        "dropped": dropped,
    }
    assert len(examples) == whole + truncated
    for example in examples:
        assert len(example.input_ids) <= 512
        trained = [t for t in example.labels if t != IGNORE_INDEX]
        assert tokenizer.decode(trained[:-1]).strip() == LONG_ANSWER
        prompt = tokenizer.decode(example.input_ids[: example.prompt_tokens])
        assert prompt.rstrip().endswith("What medication?\n[Instruction End]"), "the question is never cut"
    if truncated:
        cut = max(examples, key=lambda e: len(e.input_ids))
        shown = tokenizer.decode(cut.input_ids)
        note = " ".join(demo_texts())
        assert note[:60] in shown and CUT_MARK in shown
        assert (note.rstrip()[-60:] in shown) == (policy == "note_middle"), "note_middle keeps the note's end"


def test_tokenised_examples_are_cached_on_disk(tmp_path, tokenizer, long_rows):
    cache = tmp_path / "cache"
    first = encode_dataset(str(long_rows), tokenizer, 512, str(cache), "note_middle")
    assert first[0][0].input_ids.dtype == np.int32, "views into the tokenised dataset, not lists of Python ints"
    arrow = sorted(p.name for p in cache.rglob("cache-*.arrow"))
    assert arrow, "the map's result is an Arrow file in the cache folder"
    again = encode_dataset(str(long_rows), tokenizer, 512, str(cache), "note_middle")
    assert again[1] == first[1] and [list(e.input_ids) for e in again[0]] == [list(e.input_ids) for e in first[0]]
    assert sorted(p.name for p in cache.rglob("cache-*.arrow")) == arrow, "read back, not redone"
    encode_dataset(str(long_rows), tokenizer, 512, str(cache), "note_tail")
    assert len(list(cache.rglob("cache-*.arrow"))) == len(arrow) + 1, "another policy is another cache entry"


def test_first_fit_decreasing_packs_every_example_once():
    sizes = [700, 300, 1000, 24, 500, 512, 1024, 1, 400, 600]
    examples = [Example([i] * n, 0) for i, n in enumerate(sizes)]
    packs = pack_examples(examples, 1024, seed=1)
    assert sorted(e.input_ids[0] for pack in packs for e in pack) == list(range(len(sizes)))
    assert all(sum(len(e.input_ids) for e in pack) <= 1024 for pack in packs)
    assert len(packs) == -(-sum(sizes) // 1024)  # these sizes fit in the minimum number of packs
    assert pack_examples(examples, 1024, seed=1) == packs, "the pack order is seeded"


def test_packs_have_no_padding_and_no_pad_bos(data, tokenizer):
    examples = [encode_example(tokenizer, t[:400], "Summarize.", "Stable.", 1024, "drop")[0] for t in demo_texts()[:4]]
    batch = collate_packed([examples])
    assert "attention_mask" not in batch
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    bos = (batch["input_ids"][0] == tokenizer.bos_token_id).nonzero().flatten().tolist()
    assert bos == starts and len(starts) == 4, "BOS opens each example and is never padding"
    assert tokenizer.pad_token_id is None or tokenizer.pad_token_id != tokenizer.bos_token_id
    real, positions, _ = batch_counts(batch).tolist()
    assert real == positions == batch["input_ids"].numel()


def test_pad_token_bos_is_refused(data, tmp_path):
    broken = tmp_path / "pad-is-bos"
    tokenizer = AutoTokenizer.from_pretrained(data["model"])
    tokenizer.pad_token = tokenizer.bos_token
    tokenizer.save_pretrained(broken)
    AutoModelForCausalLM.from_pretrained(data["model"]).save_pretrained(broken)
    copy_tokenizer_model(data["model"], broken)
    run = train_run(base_model=str(broken))
    with pytest.raises(ValueError, match="pad token is BOS"):
        load_model_and_tokenizer(run)


def test_pretraining_blocks_frame_each_note_once(data, tokenizer, tmp_path):
    notes = encode_notes(data["notes"], tokenizer, str(tmp_path / "cache"))[:6]
    texts = demo_texts()[:6]  # the fixture's notes, in ROW_ID order
    assert [n.tolist() for n in notes] == tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks, counts = pack_notes(notes, tokenizer, 128, seed=3)
    stream = blocks.flatten().tolist()
    assert blocks.shape[1] == 128 and counts["blocks"] == len(blocks)
    assert stream.count(tokenizer.bos_token_id) >= 5 and "11" not in "".join(
        "1" if t == tokenizer.bos_token_id else "." for t in stream
    ), "never two BOS in a row"
    assert counts["tokens"] == sum(len(n) + 2 for n in notes)
    again, _ = pack_notes(notes, tokenizer, 128, seed=3)
    other, _ = pack_notes(notes, tokenizer, 128, seed=4)
    assert (again == blocks).all() and not (other == blocks).all()


ENCODE_NOTES = """
import json, logging, sys
import datasets
from accelerate import PartialState
from transformers import AutoTokenizer
from asclepius_r.train.pretrain import encode_notes

notes, model, cache, out = sys.argv[1:]
state = PartialState(cpu=True)
messages = []
handler = logging.Handler()
handler.emit = lambda record: messages.append(record.getMessage())
datasets.logging.set_verbosity_info()
datasets.logging.get_logger().addHandler(handler)
tokens = encode_notes(notes, AutoTokenizer.from_pretrained(model), cache)
json.dump(
    {"tokens": [t.tolist() for t in tokens], "cached": any("Loading cached processed dataset" in m for m in messages)},
    open(f"{out}/rank-{state.process_index}.json", "w"),
)
"""


@pytest.mark.slow
def test_pretraining_notes_are_tokenized_once_for_all_ranks_and_cached(data, tokenizer, tmp_path):
    """Two gloo ranks: rank 0 tokenizes into the datasets cache, rank 1 reads it (as fine-tuning)."""
    script = tmp_path / "encode_notes.py"
    script.write_text(ENCODE_NOTES)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    command += [str(data["notes"]), str(data["model"]), str(tmp_path / "cache"), str(tmp_path)]
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["cached"] for r in ranks] == [False, True], "rank 0 tokenizes, rank 1 loads its cache"
    expected = tokenizer(demo_texts(), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == expected, "every note, in ROW_ID order"


@pytest.mark.parametrize("layers,hidden,ffn,expected", [(32, 4096, 11008, 42.9e9), (40, 5120, 13824, 82.2e9)])
def test_flops_per_token_match_llama_anchors(layers, hidden, ffn, expected):
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert FlopModel.of(model).flops_per_token(2048) == pytest.approx(expected, rel=2e-3)


def test_batch_counts_real_tokens_and_attention_of_padded_and_packed_batches():
    padded = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    }
    assert batch_counts(padded).tolist() == [8, 10, 3**2 + 5**2]
    packed = {"input_ids": torch.zeros(1, 6, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])}
    assert batch_counts(packed).tolist() == [6, 6, 2 * 3**2]


def test_a_base_model_folder_without_tokenizer_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    run = train_run(base_model=str(tmp_path))
    with pytest.raises(BaseModelError, match="tokenizer.model"):
        load_model_and_tokenizer(run)


def test_the_global_batch_holds_whatever_the_process_count(caplog):
    run = train_run(per_device_batch_size=2)
    assert run.global_batch_size == 128
    assert [gradient_accumulation(run, processes) for processes in (8, 4, 16, 1)] == [8, 16, 4, 64]
    with caplog.at_level(logging.INFO):
        assert gradient_accumulation(run, 6) == 11
    assert "not a multiple of 6 process(es) x 2 per device: the global batch is 132" in caplog.text
    assert "global batch 132 = 6 process(es) x 2 per device x 11 accumulated micro-batch(es)" in caplog.text


@pytest.mark.parametrize("ratio, warmup", [(0.03, 1), (0.5, 5), (1.0, 10)])
def test_warmup_ratio_is_a_share_of_the_steps_up_to_all_of_them(data, tmp_path, ratio, warmup):
    """transformers 5 reads a float warmup_steps of 1.0 as one step; the run's ratio means the share."""
    run = train_run(
        base_model=str(data["model"]),
        checkpoint_dir=str(tmp_path),
        warmup_ratio=ratio,
        max_steps=10,
        lr_scheduler="linear",
    )
    model, tokenizer = load_model_and_tokenizer(run)
    trainer = MeasuredTrainer(model=model, args=training_arguments(run), processing_class=tokenizer, run=run)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert trainer.args.warmup_steps == warmup
    rates = []
    for _ in range(10):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates[:warmup] == sorted(rates[:warmup]) and rates[warmup - 1] < run.learning_rate
