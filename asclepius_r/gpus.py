"""Exclusive GPU claims shared by every GPU rule (training launches and held-out answer jobs).

Snakemake's `gpu=N` resource is only a counter and never sets CUDA_VISIBLE_DEVICES, so two GPU
jobs on one machine would otherwise both start on GPU 0. A job claims devices through per-GPU
lock files in `ASCLEPIUS_GPU_LOCK_DIR` (default: a folder in the system temp dir). Locks are
named by the physical device (the entries of an inherited CUDA_VISIBLE_DEVICES, e.g. from SLURM,
or the index), so jobs that see different devices never block each other. flock locks vanish
with their process, so a killed job never leaves a GPU claimed.

`ASCLEPIUS_FAKE_GPUS` (a comma list of device names, e.g. `0,1,2,3`) makes a machine without
GPUs claim as if CUDA showed those devices (same locks, waiting and CUDA_VISIBLE_DEVICES) while
the work runs on CPU: the rehearsal and the tests see which device each job would have used.
Every claim appends one line to `<lock dir>/claims.jsonl` when it is released:
`{"job", "devices", "start", "end", "pid"}` (unix times), so overlapping claims can be checked.

A job that asks for GPUs on a machine where torch sees none (a CPU-only torch in the job's
environment, a node without GPUs) stops at once, saying why and what to do, unless the config
allows the CPU on purpose (`launch.cpu_fallback`, the demo's) or fake devices are given.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from asclepius_r.errors import UserError

log = logging.getLogger(__name__)

FAKE_GPUS_ENV = "ASCLEPIUS_FAKE_GPUS"
LOCK_DIR_ENV = "ASCLEPIUS_GPU_LOCK_DIR"
CLAIMS_FILE = "claims.jsonl"


def gpu_lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV, Path(tempfile.gettempdir()) / "asclepius-gpu-locks"))


def fake_devices() -> list[str]:
    """The device names of ASCLEPIUS_FAKE_GPUS, or [] when it is unset or empty."""
    return [d.strip() for d in os.environ.get(FAKE_GPUS_ENV, "").split(",") if d.strip()]


def visible_devices(count: int) -> list[str]:
    """Names of the devices this process can use: the inherited CUDA_VISIBLE_DEVICES, or 0..count-1."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited:
        return [d.strip() for d in inherited.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


@dataclass(frozen=True)
class Claim:
    """Devices held by a job: their names, and whether they are real CUDA devices or fake ones."""

    devices: list[str]
    ordinals: list[int]
    fake: bool

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.devices)

    def torch_device(self) -> str:
        """Where in-process work of a one-device job runs (fake claims run on CPU).

        The ordinal indexes the devices this process already sees, so it stays right whether or
        not CUDA was initialised before the claim (CUDA reads CUDA_VISIBLE_DEVICES only once).
        """
        return "cpu" if self.fake else f"cuda:{self.ordinals[0]}"


def available_devices() -> tuple[list[str], bool]:
    """(device names to claim from, fake?): ASCLEPIUS_FAKE_GPUS if set, else the CUDA devices seen."""
    fake = fake_devices()
    if fake:
        return fake, True
    import torch

    return visible_devices(torch.cuda.device_count()), False


def _record(lock_dir: Path, entry: dict) -> None:
    # One short line per write under an exclusive lock: concurrent jobs never interleave lines.
    with open(lock_dir / CLAIMS_FILE, "a") as out:
        fcntl.flock(out, fcntl.LOCK_EX)
        out.write(json.dumps(entry) + "\n")
        out.flush()
        os.fsync(out.fileno())


@contextlib.contextmanager
def claim_gpus(job: str, count: int, devices: list[str], fake: bool = False, poll_s: float = 5.0) -> Iterator[Claim]:
    """Hold exclusive locks on `count` of `devices` for `job` until the block exits."""
    if count > len(devices):
        raise RuntimeError(f"{job}: the rule asks for {count} GPUs but this machine shows {len(devices)} ({devices})")
    lock_dir = gpu_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        held = []
        for ordinal, device in enumerate(devices):
            handle = open(lock_dir / f"gpu-{device}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append((ordinal, device, handle))
            except BlockingIOError:
                handle.close()
            if len(held) == count:
                break
        if len(held) == count:
            break
        # Release partial claims, so two waiting jobs cannot deadlock each holding half.
        for _, _, handle in held:
            handle.close()
        if not waited:
            log.info("%s: waiting for %d free GPU(s) among %s (locks in %s)", job, count, devices, lock_dir)
            waited = True
        time.sleep(poll_s)
    claim = Claim([d for _, d, _ in held], [o for o, _, _ in held], fake)
    start = time.time()
    log.info("%s: claimed %sGPU(s) %s", job, "fake " if fake else "", claim.cuda_visible_devices)
    try:
        yield claim
    finally:
        _record(
            lock_dir, {"job": job, "devices": claim.devices, "start": start, "end": time.time(), "pid": os.getpid()}
        )
        for _, _, handle in held:
            handle.close()


class NoGPUError(UserError, RuntimeError):
    """A job asks for GPUs that torch does not see, and the config does not allow the CPU instead."""


def no_gpu_message(job: str, count: int) -> str:
    import torch

    if torch.version.cuda is None:
        why = f"torch {torch.__version__} here is a CPU-only build"
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device"
            + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
            + ": not a GPU node, or its driver is not loaded"
        )
    return (
        f"{job}: the rule asks for {count} GPU(s) but {why}. Run it where torch sees the GPUs (a GPU node, with "
        "a CUDA build of torch in the job's environment, envs/train.yaml); to run GPU jobs on the CPU on purpose "
        "(tiny models only, as the demo does), set launch.cpu_fallback: true; models.NAME.gpus: 0 trains that "
        "model on the CPU."
    )


@contextlib.contextmanager
def claim_for_job(job: str, count: int, poll_s: float = 5.0, cpu_fallback: bool = False) -> Iterator[Claim | None]:
    """Claim `count` devices for `job` if this machine has GPUs (real or fake); yield None (CPU) for a
    job that asks for none, or, with `cpu_fallback`, on a machine without them. Without them and
    without `cpu_fallback`, raise NoGPUError at once."""
    if count < 1:
        yield None
        return
    devices, fake = available_devices()
    if not devices:
        if not cpu_fallback:
            raise NoGPUError(no_gpu_message(job, count))
        log.warning("%s: no CUDA device here; running on the CPU (launch.cpu_fallback)", job)
        yield None
        return
    with claim_gpus(job, count, devices, fake, poll_s) as claim:
        yield claim
