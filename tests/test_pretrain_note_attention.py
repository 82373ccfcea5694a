"""Pretraining's note boundaries: `within_note` isolates the notes of a block, `across_notes` (2023) does not.

The check is on a real tiny LLaMA, loaded as training loads it: the logits of a note are compared
between two blocks whose preceding notes differ (in text and in length).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, default_data_collator

from asclepius_r.config import ConfigError, defaults, load
from asclepius_r.train.pretrain import BlockDataset, note_position_ids, pack_notes, pretraining_dataset, tokenize_notes
from asclepius_r.train.run import TrainRun, load_model_and_tokenizer
from asclepius_r.train.settings import training_settings
from support.default_settings import train_run
from support.train_fixtures import REPO, build_fixture_data, demo_texts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_fixture_data(tmp_path_factory.mktemp("note-attention"))["model"]


def run_for(model_dir, note_attention: str, max_length: int = 128) -> TrainRun:
    return train_run(base_model=str(model_dir), max_length=max_length, note_attention=note_attention)


def framed(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


@pytest.mark.parametrize("note_attention,isolated", [("within_note", True), ("across_notes", False)])
def test_a_notes_logits_depend_on_the_note_before_it_only_across_notes(model_dir, note_attention, isolated):
    model, tokenizer = load_model_and_tokenizer(run_for(model_dir, note_attention))
    model.eval()
    texts = demo_texts()
    first_a, first_b, note = (
        framed(tokenizer, texts[0][:300]),
        framed(tokenizer, texts[1][:500]),
        framed(tokenizer, texts[2]),
    )
    length = max(len(first_a), len(first_b)) + 100
    blocks = np.array([(first_a + note)[:length], (first_b + note)[:length]], dtype=np.int32)
    dataset = BlockDataset(blocks, tokenizer.bos_token_id if note_attention == "within_note" else None)
    batch = default_data_collator([dataset[0], dataset[1]])  # both blocks in one batch, as the Trainer feeds them
    assert ("position_ids" in batch) == isolated and "attention_mask" not in batch
    shared = length - max(len(first_a), len(first_b))  # the note's tokens present in both blocks
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
        alone = model(input_ids=torch.tensor([note[:shared]])).logits[0]
    in_a = logits[0, len(first_a) : len(first_a) + shared]
    in_b = logits[1, len(first_b) : len(first_b) + shared]
    if isolated:
        torch.testing.assert_close(in_a, in_b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(in_a, alone, atol=1e-5, rtol=1e-4)
    else:
        assert not torch.allclose(in_a, in_b, atol=1e-3), "across notes, the note sees the one before it"


def test_positions_restart_at_each_note_and_at_the_block_start(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = demo_texts()[:6]
    notes = tokenize_notes({"TEXT": texts}, tokenizer)["input_ids"]
    dataset, counts = pretraining_dataset(run_for(model_dir, "within_note"), tokenizer, notes)
    assert counts["note_attention"] == "within_note" and len(dataset) == counts["blocks"] > 2
    for i in range(len(dataset)):
        ids, positions = dataset[i]["input_ids"].numpy(), dataset[i]["position_ids"].numpy()
        starts = np.flatnonzero(positions == 0).tolist()
        assert starts == sorted({0, *np.flatnonzero(ids == tokenizer.bos_token_id).tolist()})
        assert (positions[1:][np.diff(positions) != 1] == 0).all(), "positions step by one or restart at 0"
    across, _ = pretraining_dataset(run_for(model_dir, "across_notes"), tokenizer, notes)
    assert "position_ids" not in across[0]
    assert (across.blocks == dataset.blocks).all(), "the choice changes the attention, not the data"
    assert note_position_ids(np.array([5, 1, 7, 8, 2, 1, 9]), bos_token_id=1).tolist() == [0, 0, 1, 2, 3, 0, 1]


def test_special_token_strings_in_a_note_do_not_frame_notes(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [text + " <s> </s> " for text in demo_texts()[:3]]
    notes = tokenize_notes({"TEXT": texts}, tokenizer)["input_ids"]
    blocks, _ = pack_notes(notes, tokenizer, 1, seed=0)  # blocks of one token: the whole stream, nothing dropped
    stream = blocks.flatten()
    assert (stream == tokenizer.bos_token_id).sum() == (stream == tokenizer.eos_token_id).sum() == len(texts)


def test_the_choice_is_a_pretraining_setting_with_the_learning_checks_choice_as_default(tmp_path):
    config = load(REPO / "config.yaml", require_data=False)
    assert config["pretrain"]["note_attention"] == "within_note"
    assert defaults("pretrain")["note_attention"] == "within_note"
    assert "note_attention" not in defaults("finetune"), "the schema writes it under pretrain only"
    config["finetune"]["note_attention"] = "within_note"
    with pytest.raises(ConfigError, match="finetune.note_attention: a pretrain setting only"):
        training_settings(config, "finetune", "7B")
    with pytest.raises(ValueError, match="note_attention"):
        pretraining_dataset(run_for(tmp_path, "per_note"), None, [])
