"""The embedded demo end to end through Snakemake: every stage's files, checkpoints that load
and generate, and the release folder's checksums."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asclepius_r.evaluate.generation import fit_prompts, generate_answers, load_for_generation, prompt_budget
from asclepius_r.instructions.tasks import TASKS
from support.default_settings import decoding

pytestmark = pytest.mark.slow

SIZES = ("7B", "13B")


def test_notes_stage_outputs(demo_run):
    stats = json.loads((demo_run / "results/notes/stats.json").read_text())
    assert stats["dropped"]["iserror"] == 1 and stats["dropped"]["duplicate_text"] == 1
    assert stats["near_miss_category"] == 1
    assert stats["kept_train"] + stats["kept_heldout"] == 48
    train = pd.read_parquet(demo_run / "results/notes/discharge.parquet")
    heldout = pd.read_parquet(demo_run / "results/notes/heldout.parquet")
    assert not set(train.SUBJECT_ID) & set(heldout.SUBJECT_ID), "a patient is in both splits"
    listed = [int(x) for x in (demo_run / "results/notes/heldout_row_ids.txt").read_text().split()]
    assert sorted(listed) == sorted(heldout.ROW_ID)


def test_dataset_has_one_row_per_training_note_and_every_task(demo_run):
    with open(demo_run / "results/mimiciii_discharge.csv", newline="", encoding="utf-8") as rows:
        dataset = list(csv.DictReader(rows))
    train = pd.read_parquet(demo_run / "results/notes/discharge.parquet")
    assert list(dataset[0]) == ["note", "question", "answer", "task"]
    assert len(dataset) == len(train)
    assert {row["note"] for row in dataset} == set(train.TEXT), "notes must survive byte for byte"
    assert {row["task"] for row in dataset} == set(TASKS), "all eight tasks appear in the demo"
    assert all(row["question"] and row["answer"] for row in dataset)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("stage", ["Asclepius-R-{}-Pretrained-Only", "Asclepius-R-{}"])
def test_checkpoints_load_and_generate(demo_run, stage, size):
    folder = demo_run / "results/models" / stage.format(size)
    started_from = (
        "results/base_models/{}" if "Pretrained" in stage else "results/models/Asclepius-R-{}-Pretrained-Only"
    )
    assert (folder / "tokenizer.model").exists(), "every checkpoint keeps the SentencePiece model"
    assert list(folder.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model, loading = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], "every weight comes from the checkpoint"
    start = AutoModelForCausalLM.from_pretrained(demo_run / started_from.format(size)).state_dict()
    assert any(not torch.equal(value, start[name]) for name, value in model.state_dict().items()), (
        "training changed the weights it started from"
    )
    inputs = tokenizer("Discharge Diagnosis:", return_tensors="pt")
    logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    # Greedy generation follows the model's own most likely next token.
    assert output[0, inputs["input_ids"].shape[1]] == logits[0, -1].argmax()


def test_training_metrics_recorded(demo_run):
    for stage in ("pretrain", "finetune"):
        for size in SIZES:
            lines = (demo_run / f"results/metrics/{stage}-{size}.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            steps = [r["step"] for r in records]
            assert len(records) >= 2 and steps == sorted(set(steps)), f"{stage}-{size}: one record per logged step"
            assert all(math.isfinite(r["loss"]) and r["real_tokens"] > 0 for r in records)
    pretrain = [json.loads(x) for x in (demo_run / "results/metrics/pretrain-7B.jsonl").read_text().splitlines()]
    assert pretrain[-1]["loss"] < pretrain[0]["loss"], "pretraining should lower the loss on the demo notes"


def test_evaluation_scores_every_model(demo_run):
    summary = json.loads((demo_run / "results/evaluation/summary.json").read_text())
    records = [json.loads(line) for line in (demo_run / "results/instructions/heldout.jsonl").read_text().splitlines()]
    questions = sum(r["status"] == "ok" for r in records)
    assert questions > 0
    for size in SIZES:
        for name in (f"Base-{size}", f"Asclepius-R-{size}-Pretrained-Only", f"Asclepius-R-{size}"):
            scores = summary[name]
            assert scores["n"] == questions, f"{name} answered every held-out question"
            assert scores["judge_scored"] + scores["judge_failed"] == questions
            assert sum(scores["judge_distribution"].values()) == scores["judge_scored"]
            assert scores["judge_scored"] == 0 or 1 <= scores["judge_score"] <= 4


def test_release_checksums_verify(demo_run):
    release = demo_run / "release"
    for size in SIZES:
        assert (release / f"Asclepius-R-{size}" / "config.json").exists()
        assert (release / f"Asclepius-R-{size}-Pretrained-Only" / "config.json").exists()
    assert (release / "mimiciii_discharge.csv").exists()
    check = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=release, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_ask_answers_with_a_demo_checkpoint(demo_run, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("Discharge Diagnosis: community-acquired pneumonia.")
    model_dir = demo_run / "results/models/Asclepius-R-7B"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asclepius_r.evaluate.ask",
            "--model",
            str(model_dir),
            "--note",
            str(note),
            "--question",
            "What is the diagnosis?",
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    model, tokenizer = load_for_generation(str(model_dir))
    (prompt,) = fit_prompts(
        tokenizer, [(note.read_text(), "What is the diagnosis?")], prompt_budget(model, 8), "note_middle"
    )
    expected = generate_answers(model, tokenizer, [prompt.text], decoding(max_new_tokens=8), batch_size=1)[0]
    assert result.stdout == expected + "\n", "the CLI answers as the evaluation does (released template, greedy)"
