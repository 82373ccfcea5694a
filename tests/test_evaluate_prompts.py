"""Evaluation prompts fit the model's context with the question kept; decoding follows config."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from asclepius_r.base_model.tiny import build_tiny_llama_from_texts
from asclepius_r.evaluate.generation import generate_answers, load_for_generation, prompt_budget
from asclepius_r.evaluate.heldout import answer_heldout
from asclepius_r.files import read_jsonl
from asclepius_r.prompts import CUT_MARK, fit_released_prompt, render_released
from support.default_settings import decoding, tiny_spec
from support.train_fixtures import demo_texts

CONTEXT = 320
QUESTION = "Which medications was the patient discharged on, and at what doses?"
ENDING = f"[Instruction Begin]\n{QUESTION}\n[Instruction End] \n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "tiny"
    spec = tiny_spec(vocab_size=800, hidden_size=32, intermediate_size=64, max_position_embeddings=CONTEXT)
    build_tiny_llama_from_texts(demo_texts(), folder, spec)
    return folder


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("policy", ["note_middle", "note_tail"])
def test_a_prompt_over_the_limit_keeps_the_question_and_instruction_end(tokenizer, policy):
    note = demo_texts()[0]
    assert len(tokenizer(render_released(note, QUESTION))["input_ids"]) > 300
    text = fit_released_prompt(tokenizer, note, QUESTION, 300, policy)
    assert text.endswith(ENDING) and CUT_MARK in text
    assert len(tokenizer(text)["input_ids"]) <= 300
    assert note[:60] in text, "the note's start is kept"
    kept_end = note.rstrip()[-40:] in text
    assert kept_end == (policy == "note_middle")


def test_a_prompt_that_fits_is_the_released_template_unchanged(tokenizer):
    assert fit_released_prompt(tokenizer, "Short note.", QUESTION, 300, "note_middle") == render_released(
        "Short note.", QUESTION
    )
    assert fit_released_prompt(tokenizer, demo_texts()[0], QUESTION, 300, "drop") is None
    assert fit_released_prompt(tokenizer, "Short note.", QUESTION, 20, "note_tail") is None, "template alone too long"


def test_prompt_budget_is_the_context_minus_new_tokens(model_dir):
    model, _ = load_for_generation(str(model_dir), "cpu")
    assert prompt_budget(model, 64) == CONTEXT - 64
    assert prompt_budget(model, 64, max_prompt_tokens=100) == 100
    with pytest.raises(ValueError, match="evaluate.max_new_tokens"):
        prompt_budget(model, CONTEXT)


def test_held_out_answers_fit_the_context_and_say_whether_the_note_was_cut(tmp_path, model_dir, tokenizer):
    texts = [demo_texts()[1], "Brief note: discharged home on aspirin 81 mg daily."]
    pq.write_table(pa.table({"ROW_ID": [1, 2], "SUBJECT_ID": [1, 2], "TEXT": texts}), tmp_path / "notes.parquet")
    records = [
        {"row_id": i, "task": "Question Answering", "question": QUESTION, "answer": "Aspirin.", "status": "ok"}
        for i in (1, 2)
    ]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    short = decoding(max_new_tokens=24)
    # "drop" drops nothing at evaluation: every model answers every question the judge compares.
    answer_heldout(
        model_dir,
        tmp_path / "notes.parquet",
        tmp_path / "records.jsonl",
        tmp_path / "a.jsonl",
        short,
        batch_size=8,
        max_prompt_tokens=None,
        truncation="drop",
        cpu_fallback=True,
    )
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert [r["prompt_truncated"] for r in rows] == [True, False]
    assert all(r["prompt_tokens"] + short.max_new_tokens <= CONTEXT for r in rows)
    assert rows[1]["prompt_tokens"] == len(tokenizer(render_released(texts[1], QUESTION))["input_ids"])


def test_2023_beam_sampling_is_seeded(model_dir):
    model, tokenizer = load_for_generation(str(model_dir), "cpu")
    prompts = [render_released("Brief note.", QUESTION)] * 2
    beams = decoding(max_new_tokens=8, num_beams=5, do_sample=True, temperature=1.0)
    first = generate_answers(model, tokenizer, prompts, beams, batch_size=2, seed=3)
    assert generate_answers(model, tokenizer, prompts, beams, batch_size=2, seed=3) == first
    assert len(first) == 2
