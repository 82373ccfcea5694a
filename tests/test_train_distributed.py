"""Two CPU processes (gloo) train like one process at the same global batch.

Tolerance: the logged losses agree to 1e-4 (relative) at every step. Both runs see the same
packs in the same order and the same token-weighted loss; only the order of float additions
differs (the gradient all-reduce), which moves fp32 losses by about 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.train_fixtures import build_fixture_data, run_launch, write_run

TOLERANCE = 1e-4


def losses(root: Path) -> list[tuple[int, float]]:
    lines = (root / "metrics" / "finetune.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    data = build_fixture_data(tmp_path)
    settings = dict(max_steps=6, max_length=1024, learning_rate=3e-3)
    # finetune trains one pack per micro-batch and keeps the global batch whatever the processes:
    # 2 processes x 1 pack == 1 process x 2 packs accumulated == 2 packs per optimizer step.
    two = write_run(tmp_path / "two", "finetune", data, global_batch_size=2, **settings)
    one = write_run(tmp_path / "one", "finetune", data, global_batch_size=2, **settings)
    run_launch("finetune", two, "--cpu-processes", "2")
    run_launch("finetune", one)
    summary = json.loads((tmp_path / "two" / "out" / "finetune" / "training_run.json").read_text())
    assert summary["world_size"] == 2, "the distributed path really ran"
    assert summary["gradient_accumulation_steps"] == 1 and summary["global_batch_size"] == 2
    curve_two, curve_one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert [s for s, _ in curve_two] == [s for s, _ in curve_one] == list(range(1, 7))
    assert curve_one[-1][1] < curve_one[0][1], "the loss moves, so matching curves mean something"
    for (step, a), (_, b) in zip(curve_two, curve_one):
        assert a == pytest.approx(b, rel=TOLERANCE), f"step {step}"
    tokens_two = [
        json.loads(x)["real_tokens"] for x in (tmp_path / "two/metrics/finetune.jsonl").read_text().splitlines()
    ]
    tokens_one = [
        json.loads(x)["real_tokens"] for x in (tmp_path / "one/metrics/finetune.jsonl").read_text().splitlines()
    ]
    assert tokens_two == tokens_one, "token counts are summed over processes"
