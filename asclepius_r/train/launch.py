"""Start a training module on the GPUs a rule was given, or on one CPU process without GPUs.

With CUDA, the job claims `gpus` devices through per-GPU lock files (Snakemake never sets
CUDA_VISIBLE_DEVICES, so two GPU jobs on one machine would otherwise share GPU 0) and runs
`accelerate launch --num_processes <gpus>` with the repository's accelerate config.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .run import TrainRun

log = logging.getLogger(__name__)

LOCK_DIR = Path(os.environ.get("ASCLEPIUS_GPU_LOCK_DIR", Path(tempfile.gettempdir()) / "asclepius-gpu-locks"))


@contextlib.contextmanager
def claim_gpus(count: int, total: int, poll_s: float = 5.0):
    """Hold exclusive locks on `count` of the machine's `total` GPUs; yield their indices."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    if count > total:
        raise RuntimeError(f"the rule asks for {count} GPUs but this machine has {total}")
    while True:
        held = []
        for index in range(total):
            handle = open(LOCK_DIR / f"gpu{index}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append((index, handle))
            except BlockingIOError:
                handle.close()
            if len(held) == count:
                break
        if len(held) == count:
            try:
                yield [index for index, _ in held]
            finally:
                for _, handle in held:
                    handle.close()
            return
        for _, handle in held:
            handle.close()
        time.sleep(poll_s)


def launch(module: str, run: TrainRun, gpus: int, accelerate_config: str | None = None,
           cpu_processes: int = 1) -> None:
    """Run `python -m module RUN.json` for `run`, distributed over `gpus` devices if CUDA is present."""
    import torch

    Path(run.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    run_file = Path(run.checkpoint_dir) / "run.json"
    run_file.write_text(json.dumps(asdict(run), indent=2) + "\n")
    available = torch.cuda.device_count()
    # The children import this package from where it is, also inside a conda env.
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    if available and gpus > 0:
        with claim_gpus(gpus, available) as devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
            command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus)]
            if accelerate_config:
                command += ["--config_file", accelerate_config]
            command += ["-m", module, str(run_file)]
            log.info("GPUs %s: %s", env["CUDA_VISIBLE_DEVICES"], " ".join(command))
            subprocess.run(command, env=env, check=True)
        return
    if cpu_processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes",
                   str(cpu_processes), "-m", module, str(run_file)]
    else:
        command = [sys.executable, "-m", module, str(run_file)]
    log.info("no GPU: %s", " ".join(command))
    subprocess.run(command, env=env, check=True)
