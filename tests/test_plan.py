"""The plan and the preflight: the plan's figures against what the demo run used, the command
line, and the preflight refusing a run (too little disk, over budget, GPUs too small or too few,
an incomplete base folder) before any job, saying what to change."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import yaml

from asclepius_r import config as workflow_config
from asclepius_r import preflight
from asclepius_r.plan import GIB, LLAMA1_COMMON, LLAMA1_SHAPES, make_plan
from asclepius_r.train.finetune import first_fit_decreasing
from asclepius_r.train.run import TrainRun
from tests.conftest import REPO
from tests.notes_support import note, write_noteevents

PAPER = REPO / "config.yaml"


def paper_config(**models) -> dict:
    config = workflow_config.load_layers([PAPER])
    for size, base in models.items():
        config["models"][size]["base"] = base
    return config


def test_first_fit_decreasing_puts_each_item_in_the_first_bin_with_room():
    rng = random.Random(7)
    for _ in range(200):
        capacity = rng.randint(5, 60)
        sizes = [rng.randint(1, capacity) for _ in range(rng.randint(0, 80))]
        bins, room = [], []
        for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
            target = next((b for b, free in enumerate(room) if free >= sizes[i]), len(bins))
            if target == len(bins):
                bins.append([])
                room.append(capacity)
            bins[target].append(i)
            room[target] -= sizes[i]
        assert first_fit_decreasing(sizes, capacity) == bins


def test_the_plan_knows_the_trainers_default_checkpoint_limit():
    from asclepius_r.plan import SAVE_TOTAL_LIMIT

    assert TrainRun.__dataclass_fields__["save_total_limit"].default == SAVE_TOTAL_LIMIT


def test_paper_checkpoints_and_memory_follow_the_published_shapes():
    plan = make_plan(paper_config(), None, compute=False, gpus=[])
    rows = {(r["stage"], r.get("size")): r for r in plan["stages"]}
    checkpoint_7b = rows["pretrain", "7B"]["checkpoint_bytes"] / 3  # save_total_limit 2, plus the one being written
    assert 80e9 < checkpoint_7b < 82e9  # 6.74B parameters x 12 bytes
    assert 20 * GIB < rows["pretrain", "13B"]["memory_per_gpu_bytes"] < 40 * GIB  # 13B FSDP over 8
    assert any("models.7B.base is not set" in m for m in plan["missing"])
    assert any("llm.azure_endpoint" in m for m in plan["missing"])  # the paper config names no endpoint yet


def test_plan_command_runs_the_notes_stage_and_writes_json(tmp_path):
    noteevents = write_noteevents(
        tmp_path / "NOTEEVENTS.csv", [note(i, "x " * (50 + i), subject=i % 9) for i in range(1, 40)]
    )
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({"noteevents": str(noteevents), "notes": {"heldout_notes": 4}}))
    out = tmp_path / "plan.json"
    command = [
        sys.executable,
        "-m",
        "asclepius_r.plan",
        "--config",
        str(PAPER),
        "--config",
        str(tmp_path / "small.yaml"),
    ]
    result = subprocess.run(
        command + ["--notes", str(tmp_path / "notes"), "--json", str(out)], capture_output=True, text=True, check=True
    )
    plan = json.loads(out.read_text())
    assert (tmp_path / "notes/stats.json").exists()
    instructions = next(r for r in plan["stages"] if r["stage"] == "instructions")
    assert instructions["requests"] == 2 * (plan["notes"]["train"] + plan["notes"]["heldout"]) == 2 * 39
    assert instructions["usd_online"] > 0 and instructions["usd_batch"] == pytest.approx(
        instructions["usd_online"] / 2, abs=0.01
    )
    assert "instructions" in result.stdout and "missing or unapproved" in result.stdout
    assert "models.13B.base is not set" in result.stdout


def test_preflight_money_check_passes_within_budget_and_counts_archived_responses(tmp_path):
    config = paper_config(**{"7B": "tiny", "13B": "tiny"})
    config["llm"].update(backend="replay", archive=str(tmp_path / "none.jsonl"))
    assert preflight.paid_rules(config) == set()  # replay costs nothing: not checked
    plan = {"stages": [{"stage": "instructions", "usd_online": 50.0, "usd_batch": 25.0, "requests": 10}], "missing": []}
    config["llm"].update(backend="openai", budget_usd=60)
    assert (
        preflight._money_problems(config, plan, [preflight.Job("generate_instructions", {"split": "discharge"})]) == []
    )
    config["llm"]["budget_usd"] = 40
    problems = preflight._money_problems(config, plan, [preflight.Job("generate_instructions", {"split": "discharge"})])
    assert len(problems) == 1 and "$50.00" in problems[0]


@pytest.mark.parametrize(
    "size, given, gpus, complaint",
    [
        ("13B", 8, [80] * 8, None),
        ("13B", 8, [24] * 8, "GPU memory: pretrain 13B needs about"),
        ("7B", 1, [80], "GPU memory: pretrain 7B needs about"),  # no sharding: 16 bytes x 6.7B
        ("7B", 8, [80] * 2, "is given 8 GPU(s) but 2 are visible"),
        ("7B", 8, [], "none is visible"),
    ],
)
def test_preflight_checks_gpus_against_the_model_and_batch(size, given, gpus, complaint):
    config = paper_config()
    visible = [{"name": "NVIDIA A100-SXM4-80GB", "memory_bytes": gib * GIB} for gib in gpus]
    plan = make_plan(config, None, compute=False, gpus=visible)
    problems = preflight._gpu_problems(config, plan, [preflight.Job("pretrain", {"size": size}, given)], visible)
    if complaint is None:
        assert problems == []
    else:
        assert any(complaint in p for p in problems), problems


def test_preflight_finds_an_incomplete_base_folder(tmp_path):
    base = tmp_path / "llama-7b"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "tokenizer.model").write_bytes(b"sp")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    (base / "model-00001-of-00002.safetensors").write_bytes(b"0" * 10)
    shape = {**LLAMA1_COMMON, **LLAMA1_SHAPES["7B"]}
    problems = preflight.base_folder_problems("7B", base, shape)
    assert problems and "missing model-00002-of-00002.safetensors" in problems[0]
    (base / "model-00002-of-00002.safetensors").write_bytes(b"0" * 10)
    problems = preflight.base_folder_problems("7B", base, shape)
    assert problems and "interrupted download" in problems[0]
