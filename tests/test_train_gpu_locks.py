"""GPU claims: concurrent jobs on one machine never get the same device."""

from __future__ import annotations

import multiprocessing
import time

from asclepius_r.train.launch import claim_gpus, visible_devices


def hold(count, devices, lock_dir, seconds, results):
    import os

    os.environ["ASCLEPIUS_GPU_LOCK_DIR"] = lock_dir
    with claim_gpus(count, devices, poll_s=0.05) as claimed:
        start = time.monotonic()
        time.sleep(seconds)
        results.put((tuple(claimed), start, time.monotonic()))


def test_concurrent_claims_never_share_a_gpu(tmp_path):
    context = multiprocessing.get_context("fork")  # no re-import in the children
    results = context.Queue()
    devices = ["0", "1", "2", "3"]
    # Three jobs of 2 GPUs on a 4-GPU machine: two run at once, the third waits for one of them.
    jobs = [context.Process(target=hold, args=(2, devices, str(tmp_path), 1.5, results)) for _ in range(3)]
    for job in jobs:
        job.start()
    claims = [results.get(timeout=120) for _ in jobs]
    for job in jobs:
        job.join()
    for i, (gpus_a, start_a, end_a) in enumerate(claims):
        assert len(set(gpus_a)) == 2
        for gpus_b, start_b, end_b in claims[i + 1 :]:
            overlap = start_a < end_b and start_b < end_a
            assert not (overlap and set(gpus_a) & set(gpus_b)), (gpus_a, gpus_b)
    assert sum(start_b >= end_a - 0.01 for _, _, end_a in claims for _, start_b, _ in claims) >= 1, (
        "the third claim had to wait"
    )


def test_devices_follow_an_inherited_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert visible_devices(2) == ["4", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_devices(3) == ["0", "1", "2"]
