"""Held-out losses (asclepius_r/evaluate/losses.py): the answer loss is the fine-tuning loss of the
example fine-tuning builds, over the answer and EOS only; the note perplexity is the pretraining
loss of a note framed as pretraining frames it."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asclepius_r.base_model.tiny import build_tiny_llama_from_texts
from asclepius_r.evaluate.losses import answer_loss, note_loss
from asclepius_r.train.finetune import encode_example
from support.default_settings import tiny_spec
from support.train_fixtures import demo_texts

NOTES = demo_texts()[:3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "base"
    build_tiny_llama_from_texts(NOTES, folder, tiny_spec(vocab_size=400, hidden_size=16, intermediate_size=32))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def test_the_answer_loss_is_fine_tunings_loss_over_the_answer_and_eos_only(tiny):
    model, tokenizer = tiny
    item = {"row_id": 1, "note": NOTES[0], "question": "What was the diagnosis?", "reference": "Pneumonia."}
    mean, tokens, left_out = answer_loss(model, tokenizer, [item], 4096, "drop")
    assert left_out == 0
    assert tokens == len(tokenizer("Pneumonia.", add_special_tokens=False)["input_ids"]) + 1
    example, _ = encode_example(tokenizer, item["note"], item["question"], item["reference"], 4096, "note_middle")
    with torch.inference_mode():
        expected = model(torch.tensor([list(example.input_ids)]), labels=torch.tensor([example.labels])).loss
    assert mean == pytest.approx(expected.item(), rel=1e-5)


def test_a_note_is_scored_framed_by_bos_and_eos_over_its_first_max_length_tokens(tiny):
    model, tokenizer = tiny
    mean, tokens = note_loss(model, tokenizer, ["Discharged home on aspirin."], 4096)
    ids = [tokenizer.bos_token_id, *tokenizer("Discharged home on aspirin.", add_special_tokens=False)["input_ids"]]
    ids.append(tokenizer.eos_token_id)
    assert tokens == len(ids) - 1
    with torch.inference_mode():
        expected = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert mean == pytest.approx(expected, rel=1e-5) and math.isfinite(math.exp(mean))
    assert note_loss(model, tokenizer, [NOTES[1]], 64)[1] == 63


def test_an_answer_too_long_to_fit_is_left_out_and_counted(tiny):
    model, tokenizer = tiny
    fits = {"row_id": 1, "note": NOTES[0], "question": "What was the diagnosis?", "reference": "Pneumonia."}
    too_long = {**fits, "row_id": 2, "reference": "Pneumonia. " * 600}
    mean, tokens, left_out = answer_loss(model, tokenizer, [fits, too_long], 1024, "note_middle")
    assert left_out == 1 and mean == answer_loss(model, tokenizer, [fits], 1024, "note_middle")[0]
    assert answer_loss(model, tokenizer, [too_long], 1024, "note_middle") == (None, 0, 1)
