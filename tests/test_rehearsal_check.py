"""The rehearsal's checker (rehearsal/check.py) catches what it is there to catch.

`make rehearsal` runs the checks on a real run; here they see small hand-made results, so a check
that could never fail would show.
"""

from __future__ import annotations

import json

import pytest

from rehearsal.check import check_gpu_claims, check_llm, policy_counts

CONFIG = {"models": {"7B": {"gpus": 2}}}
MODELS = ["Base-7B"]


def write_claims(folder, claims):
    path = folder / "results" / "rehearsal" / "gpu-locks" / "claims.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"pid": 1, **claim}) + "\n" for claim in claims))


def claims(answer_devices, answer_start):
    return [
        {"job": "pretrain-Asclepius-R-7B-Pretrained-Only", "devices": ["0", "1"], "start": 0, "end": 10},
        {"job": "finetune-Asclepius-R-7B", "devices": ["0", "1"], "start": 10, "end": 20},
        {"job": "answer_heldout-Base-7B", "devices": answer_devices, "start": answer_start, "end": answer_start + 5},
        {"job": "heldout_losses-Base-7B", "devices": ["3"], "start": 40, "end": 45},
    ]


def test_gpu_claims_pass_when_concurrent_jobs_use_other_devices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_claims(tmp_path, claims(["2"], 12))
    assert "4 GPU jobs, up to 2 at once" in check_gpu_claims(CONFIG, ["7B"], MODELS, [str(i) for i in range(4)])


@pytest.mark.parametrize(
    ("devices", "start", "message"),
    [
        (["1"], 12, "shared devices"),  # runs during fine-tuning on its GPU 1
        (["7"], 30, "not all in ASCLEPIUS_FAKE_GPUS"),
        (["2", "3"], 30, r"expected 1 device"),
    ],
)
def test_gpu_claims_fail_on_shared_unknown_or_miscounted_devices(tmp_path, monkeypatch, devices, start, message):
    monkeypatch.chdir(tmp_path)
    write_claims(tmp_path, claims(devices, start))
    with pytest.raises(AssertionError, match=message):
        check_gpu_claims(CONFIG, ["7B"], MODELS, [str(i) for i in range(4)])


def test_policy_counts():
    # (whole example, note) tokens at max_length 100: one fits, two need their note cut, and one
    # would not fit even with an empty note.
    counts = policy_counts([(90, 50), (150, 100), (120, 40), (180, 60)], 100)
    assert counts["drop"] == {"whole": 1, "truncated": 0, "dropped": 3, "examples": 4, "median_note_share_cut": 0.5}
    for policy in ("note_middle", "note_tail"):
        assert {k: counts[policy][k] for k in ("whole", "truncated", "dropped")} == {
            "whole": 1,
            "truncated": 2,
            "dropped": 1,
        }


def write_llm_stats(folder, retries):
    for split in ("discharge", "heldout"):
        path = folder / "results" / "instructions" / f"{split}.stats.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"notes": 3, "outcomes": {"ok": 3}, "llm": {"retries": {"rate_limit": retries}}}))
    judge = folder / "results" / "evaluation" / "judge" / "stats.json"
    judge.parent.mkdir(parents=True, exist_ok=True)
    judge.write_text(json.dumps({"items": 2, "outcomes": {"ok": 2}, "attempts": 2}))


def test_a_second_rehearsal_that_sends_no_request_passes_on_the_first_runs_record(tmp_path, monkeypatch):
    """A second `make rehearsal` reruns nothing, so the server answers nothing: the faults are those
    the first run met, as its stats recorded them."""
    monkeypatch.chdir(tmp_path)
    write_llm_stats(tmp_path, retries=4)
    assert "no request this run" in check_llm({})
    assert "server faults" in check_llm({"ok": 10, "rate_limit": 2})
    with pytest.raises(AssertionError, match="the server injected no faults"):
        check_llm({"ok": 10})
    write_llm_stats(tmp_path, retries=0)
    with pytest.raises(AssertionError, match="recorded no retry"):
        check_llm({})
