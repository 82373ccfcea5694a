"""GPU claims: concurrent jobs on one machine never get the same device."""

from __future__ import annotations

import multiprocessing
import time

from asclepius_r.train.launch import claim_gpus, visible_devices


def hold(count, devices, lock_dir, claims, first_two, results):
    import os
    import threading

    os.environ["ASCLEPIUS_GPU_LOCK_DIR"] = lock_dir
    with claim_gpus(count, devices, poll_s=0.05) as claimed:
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
        results.put((order, tuple(claimed), start, time.monotonic(), together))


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
    assert len(set(gpus_a)) == len(set(gpus_b)) == len(set(gpus_c)) == 2
    assert not set(gpus_a) & set(gpus_b), (gpus_a, gpus_b)
    assert start_c >= min(end_a, end_b), "the third claim waited for one of the first two to finish"
    for gpus, end in ((gpus_a, end_a), (gpus_b, end_b)):
        assert end < start_c or not set(gpus_c) & set(gpus), (gpus, gpus_c)


def test_devices_follow_an_inherited_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert visible_devices(2) == ["4", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_devices(3) == ["0", "1", "2"]
