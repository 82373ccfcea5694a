"""GPU claims: concurrent jobs on one machine never get the same device, answer jobs included; a job
that asks for GPUs where torch sees none stops at once unless the CPU is allowed."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asclepius_r.evaluate.heldout import answer_heldout
from asclepius_r.gpus import CLAIMS_FILE, NoGPUError, claim_for_job, claim_gpus, visible_devices
from asclepius_r.train.launch import launch
from asclepius_r.train.run import TrainRun
from support.default_settings import decoding
from support.train_fixtures import REPO, build_fixture_data, demo_texts, launch_env, run_launch, write_run


def hold(count, devices, lock_dir, claims, first_two, results):
    import os
    import threading

    os.environ["ASCLEPIUS_GPU_LOCK_DIR"] = lock_dir
    with claim_gpus("hold", count, devices, poll_s=0.05) as claim:
        start = time.monotonic()
        with claims.get_lock():
            claims.value += 1
            order = claims.value
        together = True
        if order <= 2:  # the first two claims fit on the machine at once: each waits here for the other
            try:
                first_two.wait(timeout=60)
            except threading.BrokenBarrierError:
                together = False
        results.put((order, tuple(claim.devices), start, time.monotonic(), together))


def assert_no_shared_device(claims):
    """claims: (devices, start, end) of each job."""
    for i, (gpus_a, start_a, end_a) in enumerate(claims):
        for gpus_b, start_b, end_b in claims[i + 1 :]:
            overlap = start_a < end_b and start_b < end_a
            assert not (overlap and set(gpus_a) & set(gpus_b)), (gpus_a, gpus_b)


def read_claims(lock_dir):
    return [json.loads(line) for line in (lock_dir / CLAIMS_FILE).read_text().splitlines()]


def test_concurrent_claims_never_share_a_gpu(tmp_path):
    context = multiprocessing.get_context("fork")  # no re-import in the children
    results, claims, first_two = context.Queue(), context.Value("i", 0), context.Barrier(2)
    devices = ["0", "1", "2", "3"]
    # Three jobs of 2 GPUs on a 4-GPU machine: two hold their GPUs at once, the third waits for one of them.
    jobs = [
        context.Process(target=hold, args=(2, devices, str(tmp_path), claims, first_two, results)) for _ in range(3)
    ]
    for job in jobs:
        job.start()
    done = sorted(results.get(timeout=120) for _ in jobs)
    for job in jobs:
        job.join()
    (_, gpus_a, _, end_a, together_a), (_, gpus_b, _, end_b, together_b), (_, gpus_c, start_c, _, _) = done
    assert together_a and together_b, "two 2-GPU jobs fit on 4 GPUs and must run at the same time"
    assert all(len(set(gpus)) == 2 for gpus in (gpus_a, gpus_b, gpus_c))
    assert_no_shared_device([(gpus, start, end) for _, gpus, start, end, _ in done])
    assert start_c >= min(end_a, end_b), "the third claim waited for one of the first two to finish"
    recorded = read_claims(tmp_path)
    assert sorted(tuple(r["devices"]) for r in recorded) == sorted(gpus for _, gpus, _, _, _ in done)
    assert all(r["job"] == "hold" and r["start"] <= r["end"] for r in recorded)


def test_devices_follow_an_inherited_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert visible_devices(2) == ["4", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_devices(3) == ["0", "1", "2"]


def test_fake_gpus_are_claimed_and_run_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("ASCLEPIUS_FAKE_GPUS", "5, 7")
    monkeypatch.setenv("ASCLEPIUS_GPU_LOCK_DIR", str(tmp_path))
    with claim_for_job("answer_heldout-x", 1) as claim:
        assert claim.fake and claim.devices == ["5"] and claim.torch_device() == "cpu"
        with claim_for_job("answer_heldout-y", 1) as other:
            assert other.devices == ["7"]
    with pytest.raises(RuntimeError, match="asks for 3 GPUs but this machine shows 2"):
        with claim_for_job("pretrain-z", 3):
            pass
    assert [(r["job"], r["devices"]) for r in read_claims(tmp_path)] == [
        ("answer_heldout-y", ["7"]),
        ("answer_heldout-x", ["5"]),
    ]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    data = build_fixture_data(root)
    texts = demo_texts()[:3]
    pq.write_table(pa.table({"ROW_ID": [1, 2, 3], "SUBJECT_ID": [1, 2, 3], "TEXT": texts}), root / "heldout.parquet")
    records = [
        {"row_id": i + 1, "task": "Summarization", "question": "Summarize.", "answer": "Stable.", "status": "ok"}
        for i in range(3)
    ]
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {**data, "notes": root / "heldout.parquet", "records": root / "heldout.jsonl"}


ANSWER_JOB = """
import sys
from asclepius_r.evaluate.heldout import answer_heldout
from support.default_settings import decoding
answer_heldout(*sys.argv[1:5], decoding(max_new_tokens=4), 8, None, "note_middle", job=sys.argv[5])
"""


def test_answer_jobs_on_two_fake_gpus_never_share_one(tmp_path, heldout):
    env = {**launch_env(), "ASCLEPIUS_FAKE_GPUS": "0,1", "ASCLEPIUS_GPU_LOCK_DIR": str(tmp_path / "locks")}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", ANSWER_JOB, str(heldout["model"]), str(heldout["notes"]), str(heldout["records"])]
            + [str(tmp_path / f"answers-{i}.jsonl"), f"answer_heldout-model{i}"],
            env=env,
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for job in jobs:
        assert job.wait() == 0, job.stderr.read()[-4000:]
    claims = read_claims(tmp_path / "locks")
    assert sorted(c["job"] for c in claims) == [f"answer_heldout-model{i}" for i in range(3)]
    assert all(len(c["devices"]) == 1 and c["devices"][0] in ("0", "1") for c in claims)
    assert_no_shared_device([(c["devices"], c["start"], c["end"]) for c in claims])
    assert all(len((tmp_path / f"answers-{i}.jsonl").read_text().splitlines()) == 3 for i in range(3))


def test_training_launch_claims_its_gpus(tmp_path, heldout, monkeypatch):
    run_file = write_run(tmp_path, "finetune", heldout, max_steps=1, max_length=256)
    monkeypatch.setenv("ASCLEPIUS_FAKE_GPUS", "2,3,4")
    monkeypatch.setenv("ASCLEPIUS_GPU_LOCK_DIR", str(tmp_path / "locks"))
    run_launch("finetune", run_file, "--gpus", "2")
    [claim] = read_claims(tmp_path / "locks")
    assert claim["job"] == "finetune-finetune" and claim["devices"] == ["2", "3"]


def test_a_gpu_job_without_a_gpu_stops_at_once_saying_what_to_do(tmp_path, heldout, monkeypatch):
    """This machine's torch sees no CUDA device (the CI's CPU build): without fake devices or
    launch.cpu_fallback, training and answer jobs stop before any work, naming the way out."""
    monkeypatch.delenv("ASCLEPIUS_FAKE_GPUS", raising=False)
    monkeypatch.setenv("ASCLEPIUS_GPU_LOCK_DIR", str(tmp_path / "locks"))
    run = TrainRun.from_json(write_run(tmp_path, "finetune", heldout, max_steps=1, max_length=256))
    with pytest.raises(NoGPUError, match=r"finetune-finetune: the rule asks for 8 GPU\(s\) but torch .*cpu_fallback"):
        launch("finetune", run, gpus=8)
    assert not (tmp_path / "checkpoints").exists(), "nothing was prepared"
    with pytest.raises(NoGPUError, match=r"answer_heldout-tiny: the rule asks for 1 GPU\(s\)"):
        answer_heldout(
            heldout["model"],
            heldout["notes"],
            heldout["records"],
            tmp_path / "answers.jsonl",
            decoding(),
            8,
            None,
            "drop",
        )
    assert not (tmp_path / "answers.jsonl").exists()
    with claim_for_job("answer_heldout-tiny", 1, cpu_fallback=True) as claim:
        assert claim is None, "allowed: the job runs on the CPU"
    with claim_for_job("pretrain-x", 0) as claim:
        assert claim is None, "a job that asks for no GPU runs on the CPU"
    assert not (tmp_path / "locks").exists()
