"""Start a training stage on the GPUs a rule was given, or on CPU processes without GPUs.

With CUDA, the job claims `gpus` devices (`asclepius_r.gpus`: per-GPU lock files, since
Snakemake never sets CUDA_VISIBLE_DEVICES) and runs `accelerate launch --num_processes <gpus>`
with the repository's accelerate config. Without CUDA it runs one process, or `cpu_processes`
gloo processes (torchrun), but only where that is allowed (`cpu_fallback`, or a run that asks for
no GPU): a job that asks for GPUs that torch does not see stops at once (`gpus.NoGPUError`).
Under ASCLEPIUS_FAKE_GPUS it claims fake devices first, so the rehearsal sees which GPUs the job
would have held.

Across the nodes of a SLURM step (`srun` with one task per node, `--slurm-nodes`), each node
runs its share with the step's node count, its node rank and the first node's address as the
c10d rendezvous: accelerate over its GPUs, or torchrun over CPU processes (gloo) without CUDA.

Before starting, the checkpoint folder is checked against the run's fingerprint (settings
and input files): a rerun after a crash resumes, a run with anything changed starts afresh
(except settings that only say how the run is watched or waited for, `RESUME_NEUTRAL`: a job
that died of its process-group timeout resumes under a longer one).

    python -m asclepius_r.train.launch {pretrain,finetune} RUN.json [--gpus N] [--cpu-processes N]
        [--cpu-fallback] [--prepare-only | --slurm-nodes [--port P]]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from asclepius_r.errors import UserError
from asclepius_r.gpus import claim_for_job
from asclepius_r.logs import setup_logging
from asclepius_r.train.checkpoints import file_identity, prepare_checkpoint_dir
from asclepius_r.train.run import TrainRun

log = logging.getLogger(__name__)


class TrainingProcessError(UserError, RuntimeError):
    """The training process failed; it has logged its own error (a message, or a traceback for a bug),
    so the launcher adds one line instead of a second traceback."""


STAGES = ("pretrain", "finetune")
# Where a run writes; moving them does not change what the checkpoints hold.
OUTPUT_PATHS = ("output_dir", "checkpoint_dir", "metrics_file", "truncation_file", "data_cache_dir")
# How the run is watched, saved or waited for: a resume under other values continues the same training.
RESUME_NEUTRAL = ("ddp_timeout_s", "logging_steps", "save_steps", "save_total_limit", "peak_tflops_per_device")


def run_fingerprint(stage: str, run: TrainRun) -> dict:
    """What the checkpoints depend on: settings and input files, but not where outputs go."""
    settings = {k: v for k, v in asdict(run).items() if k not in OUTPUT_PATHS + RESUME_NEUTRAL}
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


@dataclass(frozen=True)
class Rendezvous:
    """Where the processes of one training job spread over several nodes meet."""

    nodes: int
    node_rank: int
    host: str
    port: int
    job_id: str


def slurm_rendezvous(port: int) -> Rendezvous:
    """The rendezvous of a SLURM step with one task per node: its first node's address (NodeAddr) and port."""
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    head = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    node = subprocess.run(["scontrol", "show", "node", "-o", head], capture_output=True, text=True, check=True).stdout
    address = dict(field.split("=", 1) for field in node.split() if "=" in field).get("NodeAddr", head)
    return Rendezvous(
        nodes=int(os.environ["SLURM_NNODES"]),
        node_rank=int(os.environ["SLURM_NODEID"]),
        host=address,
        port=port,
        job_id=os.environ["SLURM_JOB_ID"],
    )


def launch_command(
    stage: str,
    run_file: Path,
    gpus: int,
    accelerate_config: str | None = None,
    cpu_processes: int = 1,
    rendezvous: Rendezvous | None = None,
) -> list[str]:
    """The command that starts this node's processes: `gpus` GPUs if gpus > 0, else CPU processes.

    With a rendezvous, every node runs this with its own node_rank and all meet at the same
    host:port (c10d), as one job of nodes x (gpus or cpu_processes) ranks.
    """
    module = ["-m", f"asclepius_r.train.{stage}", str(run_file)]
    if gpus > 0:
        command = [sys.executable, "-m", "accelerate.commands.launch"]
        if accelerate_config:
            command += ["--config_file", accelerate_config]
        if rendezvous:
            command += [
                "--num_machines",
                str(rendezvous.nodes),
                "--num_processes",
                str(gpus * rendezvous.nodes),
                "--machine_rank",
                str(rendezvous.node_rank),
                "--main_process_ip",
                rendezvous.host,
                "--main_process_port",
                str(rendezvous.port),
                "--rdzv_backend",
                "c10d",
            ]
        else:
            command += ["--num_processes", str(gpus)]
        return command + module
    if rendezvous:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(rendezvous.nodes),
            "--node_rank",
            str(rendezvous.node_rank),
            "--nproc_per_node",
            str(cpu_processes),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"{rendezvous.host}:{rendezvous.port}",
            "--rdzv_id",
            rendezvous.job_id,
            *module,
        ]
    if cpu_processes > 1:
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
            *module,
        ]
    return [sys.executable] + module


def launch(
    stage: str,
    run: TrainRun,
    gpus: int,
    accelerate_config: str | None = None,
    cpu_processes: int = 1,
    threads: int | None = None,
    cpu_fallback: bool = False,
) -> None:
    """Run the stage's module for `run`, over `gpus` devices if CUDA is present, else on CPU where
    allowed (`cpu_fallback`; see `gpus.claim_for_job`)."""
    env = dict(os.environ)
    with claim_for_job(f"{stage}-{Path(run.output_dir).name}", gpus, cpu_fallback=cpu_fallback) as claim:
        run_file = prepare_run(stage, run)
        if claim:
            env["CUDA_VISIBLE_DEVICES"] = claim.cuda_visible_devices
        if claim and not claim.fake:
            command = launch_command(stage, run_file, gpus, accelerate_config)
            log.info("GPUs %s: %s", env["CUDA_VISIBLE_DEVICES"], " ".join(command))
        else:
            command = launch_command(stage, run_file, 0, cpu_processes=cpu_processes)
            if threads:
                env["OMP_NUM_THREADS"] = str(max(1, threads // cpu_processes))
            log.info("no GPU: %s", " ".join(command))
        status = subprocess.run(command, env=env).returncode
    if status:
        raise TrainingProcessError(
            f"{stage} for {run.output_dir}: the training process exited with status {status}; "
            "its own error is above in this log"
        )


def launch_node(stage: str, run_file: Path, gpus: int, accelerate_config: str | None, cpu_processes: int, port: int):
    """This node's share of one job across the nodes of a SLURM step (`srun`, one task per node).

    The run file was written beforehand by `--prepare-only` (once, not by every node at the same
    time); the node's GPUs are the ones SLURM gave the step, so no GPU locks are taken.
    """
    import torch

    rendezvous = slurm_rendezvous(port)
    command = launch_command(
        stage, run_file, gpus if torch.cuda.device_count() else 0, accelerate_config, cpu_processes, rendezvous
    )
    log.info("node %d of %d: %s", rendezvous.node_rank, rendezvous.nodes, " ".join(command))
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("run_file", help="a TrainRun as JSON")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--accelerate-config")
    parser.add_argument("--cpu-processes", type=int, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--cpu-fallback", action="store_true", help="run on the CPU when torch sees no GPU (else stop, saying why)"
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="only check the checkpoints and write the run file (multi-node launches)",
    )
    parser.add_argument(
        "--slurm-nodes",
        action="store_true",
        help="one task of a SLURM step across nodes: run RUN_FILE (from --prepare-only) on this node's GPUs",
    )
    parser.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node (--slurm-nodes)")
    args = parser.parse_args(argv)
    if args.prepare_only:
        print(prepare_run(args.stage, TrainRun.from_json(args.run_file)))
        return
    if args.slurm_nodes:
        launch_node(args.stage, Path(args.run_file), args.gpus, args.accelerate_config, args.cpu_processes, args.port)
        return
    launch(
        args.stage,
        TrainRun.from_json(args.run_file),
        args.gpus,
        args.accelerate_config,
        args.cpu_processes,
        args.threads,
        args.cpu_fallback,
    )


if __name__ == "__main__":
    setup_logging()
    main()
