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
from asclepius_r.base_model.tiny import build_tiny_llama_from_texts
from asclepius_r.llm import Archive, ChatRequest, ChatResult
from asclepius_r.plan import preflight
from asclepius_r.plan.estimate import make_plan
from asclepius_r.plan.table import GIB
from asclepius_r.plan.usage import compare, used_by_run
from asclepius_r.train.finetune import first_fit_decreasing
from support.default_settings import tiny_spec
from tests.conftest import REPO, copy_workflow, run_snakemake
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


def test_paper_checkpoints_and_memory_follow_the_published_shapes():
    plan = make_plan(paper_config(), None, compute=False, gpus=[])
    rows = {(r["stage"], r.get("size")): r for r in plan["stages"]}
    checkpoint_7b = rows["pretrain", "7B"]["checkpoint_bytes"] / 3  # save_total_limit 2, plus the one being written
    assert 80e9 < checkpoint_7b < 82e9  # 6.74B parameters x 12 bytes
    assert 20 * GIB < rows["pretrain", "13B"]["memory_per_gpu_bytes"] < 40 * GIB  # 13B FSDP over 8
    assert any("models.7B.base is not set" in m for m in plan["missing"])
    assert any("llm.azure_endpoint" in m for m in plan["missing"])  # the paper config names no endpoint yet


def test_the_plan_counts_gradients_as_fsdp_holds_them_through_the_accumulation():
    """Reduce-scattered after every micro-batch: a GPU keeps a 4-byte shard per parameter and two
    layers' whole gradients in flight, not every parameter's fp32 gradient (13B: 48 GiB more)."""
    plan = make_plan(paper_config(), None, compute=False, gpus=[])
    row = next(r for r in plan["stages"] if (r["stage"], r.get("size")) == ("pretrain", "13B"))
    shard = 4 * row["params"] / 8
    assert shard < row["gradient_per_gpu_bytes"] < shard + 4 * GIB
    assert (
        row["memory_per_gpu_bytes"]
        < 0.9 * 80e9
        < row["memory_per_gpu_bytes"] - row["gradient_per_gpu_bytes"] + 4 * row["params"]
    )


def test_plan_command_runs_the_notes_stage_and_writes_json(tmp_path):
    noteevents = write_noteevents(
        tmp_path / "NOTEEVENTS.csv", [note(i, "x " * (50 + i), subject=i % 9) for i in range(1, 40)]
    )
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({"noteevents": str(noteevents), "notes": {"heldout_notes": 4}}))
    out = tmp_path / "plan.json"
    command = [
        sys.executable,
        "-m",
        "asclepius_r.plan.estimate",
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


@pytest.mark.slow
def test_the_plan_bounds_what_the_demo_used(demo_run):
    plan = json.loads((demo_run / "results/plan/plan.json").read_text())
    names = [f"{stage} {size}" for size in ("7B", "13B") for stage in ("pretrain", "finetune")]
    folders = {
        n: demo_run / "results/models" / f"Asclepius-R-{n.split()[1]}{'-Pretrained-Only' * n.startswith('pre')}"
        for n in names
    }
    used = used_by_run(
        [demo_run / f"results/instructions/{s}.jsonl" for s in ("discharge", "heldout")],
        [demo_run / f"results/instructions/{s}.stats.json" for s in ("discharge", "heldout")],
        demo_run / "demo/llm_archive.jsonl",
        demo_run / "results/evaluation/judge/stats.json",
        demo_run / "results/llm/judge-archive.jsonl",
        models=folders,
        metrics={n: demo_run / f"results/metrics/{n.replace(' ', '-')}.jsonl" for n in names},
    )
    margins = {(c["stage"], c["quantity"]): c for c in compare(plan, used)}
    print(json.dumps({f"{s} {q}": (c["planned"], c["used"], c["margin"]) for (s, q), c in margins.items()}, indent=1))
    assert margins["instructions", "requests"]["margin"] == 0
    assert margins["judge", "requests"]["margin"] >= 0  # parse retries would add requests; the heuristic has none
    for quantity in ("prompt_tokens", "completion_tokens"):
        assert margins["instructions", quantity]["margin"] >= 0  # an upper bound
    for size in ("7B", "13B"):
        # Pretraining tokens and steps are counted exactly with the base tokenizer.
        assert margins[f"pretrain {size}", "steps"]["margin"] == 0
        assert margins[f"pretrain {size}", "train_tokens"]["margin"] == 0
        assert margins[f"finetune {size}", "steps"]["margin"] >= 0
        assert margins[f"finetune {size}", "train_tokens"]["margin"] >= 0
        assert abs(margins[f"finetune {size}", "disk_bytes"]["margin"]) < 0.5
    report = (demo_run / "results/report/plan.html").read_text()
    assert "Planned against used" in report and "margin" in report


def test_preflight_stops_a_run_without_the_disk_it_needs(tmp_path, monkeypatch):
    workdir = copy_workflow(tmp_path / "wf")
    monkeypatch.setenv(preflight.FREE_DISK_ENV, "0.0001")  # 100 kB free
    result = run_snakemake(workdir, "results/models/Asclepius-R-7B-Pretrained-Only", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "preflight stopped the run before any job" in output and "disk: the jobs to run need about" in output
    assert "save_total_limit" in output
    assert not (workdir / "results/demo").exists() and not (workdir / "logs").exists()  # no job ran


def test_preflight_stops_a_paid_run_over_budget(tmp_path, monkeypatch):
    workdir = copy_workflow(tmp_path / "wf")
    run_snakemake(workdir, "results/demo/NOTEEVENTS.csv")  # no GPU or paid job: no preflight
    paid = {
        "llm": {
            "backend": "openai",
            "base_url": "http://127.0.0.1:9/v1",
            "approved_endpoints": ["http://127.0.0.1:9/v1"],
            "api_key_env": "PLAN_TEST_KEY",
            "model": "gpt-4o-mini",
            "archive": "results/llm/archive.jsonl",
            "prices_per_million": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}},
            "budget_usd": 0.001,
        }
    }
    (workdir / "paid.yaml").write_text(yaml.safe_dump(paid))
    monkeypatch.setenv("PLAN_TEST_KEY", "sk-test")
    result = run_snakemake(
        workdir,
        "results/instructions/heldout.jsonl",
        "--configfile",
        "demo/config.yaml",
        "paid.yaml",
        demo=False,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "budget: instructions needs at most $" in output and "over llm.budget_usd $0.00" in output
    assert "llm.mode: batch would cost about" in output
    assert not (workdir / "results/llm/archive.jsonl").exists() and not (workdir / "results/notes").exists()


def test_preflight_money_check_passes_within_budget_and_counts_archived_responses(tmp_path):
    config = paper_config(**{"7B": "tiny", "13B": "tiny"})
    archive = tmp_path / "archive.jsonl"
    config["llm"].update(backend="replay", archive=str(archive))
    assert preflight.paid_rules(config) == set()  # replay costs nothing: not checked
    plan = {"stages": [{"stage": "instructions", "usd_online": 50.0, "usd_batch": 25.0, "requests": 10}], "missing": []}
    jobs = [preflight.Job("generate_instructions", {"split": "discharge"})]
    config["llm"].update(backend="openai", budget_usd=60)
    assert preflight._money_problems(config, plan, jobs, []) == []
    config["llm"]["budget_usd"] = 40
    problems = preflight._money_problems(config, plan, jobs, [])
    assert len(problems) == 1 and "$50.00" in problems[0] and "batch would cost about $25.00" in problems[0]
    # Half the requests already answered in the archive: a rerun pays for the other half only.
    store = Archive(archive)
    for i in range(5):
        request = ChatRequest(model="gpt-4o-mini", messages=(("user", f"prompt {i}"),))
        store.append(request, ChatResult(key=request.key, status="ok", text="x"))
    summary = []
    assert preflight._money_problems(config, plan, jobs, summary) == []
    assert "$25.00" in summary[0]


@pytest.mark.parametrize(
    "size, given, gpus, complaint",
    [
        ("13B", 8, [80] * 8, None),
        ("13B", 8, [24] * 8, "GPU memory: pretrain 13B needs about"),
        ("7B", 1, [80], "GPU memory: pretrain 7B needs about"),  # no sharding: 16 bytes x 6.7B
        ("7B", 8, [80] * 2, "is given 8 GPU(s) but 2 are visible"),
        ("7B", 8, [], "no real GPU is visible"),
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
    texts = ["Discharge Diagnosis: pneumonia. Discharge Medications: amoxicillin 500 mg PO TID."] * 20
    build_tiny_llama_from_texts(texts, base, tiny_spec(vocab_size=300))
    (base / "model.safetensors").unlink()
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    (base / "model-00001-of-00002.safetensors").write_bytes(b"0" * 10)
    problems = preflight.base_folder_problems("7B", base)
    assert problems and "missing model-00002-of-00002.safetensors" in problems[0]
    (base / "model-00002-of-00002.safetensors").write_bytes(b"0" * 10)
    problems = preflight.base_folder_problems("7B", base)
    assert problems and "interrupted download" in problems[0]


def test_the_plans_mfu_is_the_last_eager_measurement(tmp_path):
    from asclepius_r.plan.gpu_stages import measured_mfu

    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text(
        "    RESULT tokens_per_s=94.9 mfu=nan device=cpu\n"
        "    RESULT tokens_per_s=24712.5 mfu=0.1866 device=NVIDIA_H200      (1b, 2048 x 2 x 8)\n"
        "    RESULT tokens_per_s=42878.6 mfu=0.3238 device=NVIDIA_H200      (1b, --compile)\n"
    )
    assert measured_mfu(benchmarks) == (0.1866, "NVIDIA_H200")
    assert measured_mfu(REPO / "BENCHMARKS.md")[0] < 0.3  # the workflow trains eagerly
