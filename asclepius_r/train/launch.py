"""Start a training stage on the GPUs a rule was given, or on CPU processes without GPUs.

With CUDA, the job claims `gpus` devices (`asclepius_r.gpus`: per-GPU lock files, since
Snakemake never sets CUDA_VISIBLE_DEVICES) and runs `accelerate launch --num_processes <gpus>`
with the repository's accelerate config. Without CUDA it runs one process, or `cpu_processes`
gloo processes (torchrun); under ASCLEPIUS_FAKE_GPUS it claims fake devices first, so the
rehearsal sees which GPUs the job would have held.

Before starting, the checkpoint folder is checked against the run's fingerprint (settings
and input files): a rerun after a crash resumes, a run with anything changed starts afresh.

    python -m asclepius_r.train.launch {pretrain,finetune} RUN.json [--gpus N] [--cpu-processes N] [--prepare-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from ..gpus import claim_for_job
from ..logs import setup_logging
from .checkpoints import file_identity, prepare_checkpoint_dir
from .run import TrainRun

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")
# Where a run writes; moving them does not change what the checkpoints hold.
OUTPUT_PATHS = ("output_dir", "checkpoint_dir", "metrics_file", "truncation_file", "data_cache_dir")


def run_fingerprint(stage: str, run: TrainRun) -> dict:
    """What the checkpoints depend on: settings and input files, but not where outputs go."""
    settings = {k: v for k, v in asdict(run).items() if k not in OUTPUT_PATHS}
    return {
        "stage": stage,
        "settings": settings,
        "data": file_identity(run.data),
        "base_model": file_identity(run.base_model),
    }


def prepare_run(stage: str, run: TrainRun) -> Path:
    """Keep or clear the checkpoint folder for this run and write the run file the ranks read."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r} (expected one of {STAGES})")
    prepare_checkpoint_dir(run.checkpoint_dir, run_fingerprint(stage, run))
    run_file = Path(run.checkpoint_dir) / "run.json"
    run_file.write_text(json.dumps(asdict(run), indent=2) + "\n")
    return run_file


def launch(
    stage: str,
    run: TrainRun,
    gpus: int,
    accelerate_config: str | None = None,
    cpu_processes: int = 1,
    threads: int | None = None,
) -> None:
    """Run the stage's module for `run`, over `gpus` devices if CUDA is present, else on CPU."""
    run_file = prepare_run(stage, run)
    module = f"asclepius_r.train.{stage}"
    env = dict(os.environ)
    with claim_for_job(f"{stage}-{Path(run.output_dir).name}", gpus) as claim:
        if claim:
            env["CUDA_VISIBLE_DEVICES"] = claim.cuda_visible_devices
        if claim and not claim.fake:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus)]
            if accelerate_config:
                command += ["--config_file", accelerate_config]
            command += ["-m", module, str(run_file)]
            log.info("GPUs %s: %s", env["CUDA_VISIBLE_DEVICES"], " ".join(command))
        else:
            command = cpu_command(module, run_file, cpu_processes)
            if threads:
                env["OMP_NUM_THREADS"] = str(max(1, threads // cpu_processes))
            log.info("no GPU: %s", " ".join(command))
        subprocess.run(command, env=env, check=True)


def cpu_command(module: str, run_file: Path, cpu_processes: int) -> list[str]:
    if cpu_processes == 1:
        return [sys.executable, "-m", module, str(run_file)]
    # `accelerate launch --cpu --num_processes N` starts a single process in accelerate 1.15
    # (its simple launcher only fans out through mpirun); torchrun starts N, and accelerate
    # turns its RANK/WORLD_SIZE variables into a gloo process group.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(cpu_processes),
        "-m",
        module,
        str(run_file),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("run_file", help="a TrainRun as JSON")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--accelerate-config")
    parser.add_argument("--cpu-processes", type=int, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="only check the checkpoints and write the run file (multi-node launches)",
    )
    args = parser.parse_args(argv)
    if args.prepare_only:
        print(prepare_run(args.stage, TrainRun.from_json(args.run_file)))
        return
    launch(
        args.stage,
        TrainRun.from_json(args.run_file),
        args.gpus,
        args.accelerate_config,
        args.cpu_processes,
        args.threads,
    )


if __name__ == "__main__":
    setup_logging()
    main()
