"""The workflow through a real SLURM (support/slurm_cluster.py): the steps of profiles/slurm/README.md.

1. The embedded demo through `snakemake --profile profiles/slurm`: every job is a SLURM job in
   `sacct`, GPU rules get `gres/gpu` from `resources.gpu` and CPU rules none, logs land where the
   README says, and after the pretraining job is cancelled with `scancel` mid-training, the
   rerun resumes it from its checkpoint.
2. One training job across the two nodes (the README's sbatch script): one rank per node meets
   at the first node's address and trains with gloo on CPU.

Skipped, with the reason, when SLURM is not installed (`make slurm`) or cannot start here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from asclepius_r.train.checkpoints import last_complete_checkpoint
from support.slurm_cluster import ACCOUNT, NODES, PARTITION, SlurmCluster, free_port, unavailable_reason, wait_until
from support.train_fixtures import build_fixture_data, launch_env, write_run
from tests.conftest import SNAKEMAKE, copy_workflow

REASON = unavailable_reason()
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

# The rules that declare `gpu` in resources (rules/pretrain.smk, finetune.smk, evaluate.smk).
GPU_RULES = {"pretrain", "finetune", "answer_heldout", "heldout_losses"}
# Pretraining long enough to be cancelled between checkpoints.
LONGER_PRETRAINING = "pretrain:\n  max_steps: 150\n  save_steps: 20\n  max_length: 64\n  logging_steps: 5\n"
UNFINISHED = {"PENDING", "RUNNING", "COMPLETING", "REQUEUED"}
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


@pytest.fixture(scope="module")
def cluster():
    # Not under pytest's tmp_path: munged wants every folder above its socket open to all.
    root = Path(tempfile.mkdtemp(prefix="asclepius-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except (RuntimeError, OSError) as error:
        cluster.stop()
        pytest.skip(f"SLURM could not start here: {error}")
    yield cluster
    cluster.stop()
    shutil.rmtree(root)


def configure_profile(workdir) -> None:
    """README step: set the cluster's partition and account in profiles/slurm/profile.yaml."""
    profile = workdir / "profiles/slurm/profile.yaml"
    text = profile.read_text()
    text = text.replace('slurm_partition: "CHANGE-ME"', f'slurm_partition: "{PARTITION}"')
    text = text.replace('slurm_account: "CHANGE-ME"', f'slurm_account: "{ACCOUNT}"')
    assert "CHANGE-ME" not in text
    profile.write_text(text)


def sacct(cluster, job_ids) -> dict[str, dict[str, str]]:
    """The accounting records of finished jobs (slurmctld sends them to slurmdbd a moment later)."""
    fields = ["JobID", "JobName", "State", "AllocTRES", "NNodes", "NodeList"]
    query = ["sacct", "-X", "-n", "-P", "--format=" + ",".join(fields), "--jobs", ",".join(job_ids)]

    def records():
        lines = cluster.command(*query).stdout.splitlines()
        return {job["JobID"]: job for job in (dict(zip(fields, line.split("|"))) for line in lines)}

    wait_until(
        lambda: set(records()) == set(job_ids) and not any(j["State"] in UNFINISHED for j in records().values()),
        "sacct records",
        cluster.log_dir / "slurmdbd.log",
    )
    return records()


def _interruptible() -> None:
    """Ctrl-C reaches Snakemake even when the tests were started in the background, whose
    non-interactive shell ignores SIGINT in everything it starts (Python then installs no
    KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_demo_through_the_slurm_profile(cluster, tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    configure_profile(workdir)
    (workdir / "crash.yaml").write_text(LONGER_PRETRAINING)
    command = SNAKEMAKE + [
        "--profile",
        "profiles/slurm",
        "--configfile",
        "demo/config.yaml",
        "crash.yaml",
        "--slurm-init-seconds-before-status-checks",
        "5",
        "--set-threads",
        "pretrain=2",
        "finetune=2",
    ]
    env = {**cluster.env, "PYTHONPATH": str(workdir)}
    first, second = tmp_path / "first.out", tmp_path / "second.out"
    with open(first, "w") as out:
        run = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, preexec_fn=_interruptible
        )
        # Cancel the 7B pretraining job once it has a checkpoint.
        checkpoints = workdir / "results/checkpoints/pretrain-7B"
        while not (checkpoints.exists() and last_complete_checkpoint(checkpoints)):
            assert run.poll() is None, f"the run ended before pretraining checkpointed:\n{first.read_text()[-4000:]}"
            time.sleep(0.5)
        (first_log,) = (workdir / "logs/slurm/rule_pretrain/7B").glob("*.log")
        cancelled = first_log.stem
        cluster.command("scancel", cancelled)
        # The plugin does not notice a cancelled job (README), so stop Snakemake as a user would
        # (Ctrl-C: it cancels its other jobs and releases its lock), then rerun the same command.
        sacct(cluster, [cancelled])
        run.send_signal(signal.SIGINT)
        run.wait()
    with open(second, "w") as out:
        rerun = subprocess.run(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    assert rerun.returncode == 0, second.read_text()[-6000:]
    before, after = dict(SUBMITTED.findall(first.read_text())), dict(SUBMITTED.findall(second.read_text()))

    # Every job ran under SLURM; only the target rule `all` (no code) is local.
    assert re.findall(r"^localrule (\w+):", second.read_text(), re.M) == ["all"]
    jobs = sacct(cluster, [*before, *after])
    assert jobs[cancelled]["State"].startswith("CANCELLED")
    assert {jobs[job_id]["State"].split()[0] for job_id in before} <= {"COMPLETED", "CANCELLED"}
    assert {jobs[job_id]["State"] for job_id in after} == {"COMPLETED"}

    ran = set()
    for job_id, log_path in {**before, **after}.items():
        # Logs where the profile README says: logs/slurm/rule_<rule>/<wildcards>/<jobid>.log.
        relative = os.path.relpath(log_path, workdir)
        assert relative.startswith("logs/slurm/rule_") and relative.endswith(f"/{job_id}.log")
        if not jobs[job_id]["AllocTRES"]:
            # Still pending when the Ctrl-C cancelled it: it never started, so it has no log and no
            # allocation (on a fast machine the held-out answers of the base models get that far).
            assert job_id in before and jobs[job_id]["State"].startswith("CANCELLED"), (job_id, jobs[job_id])
            continue
        assert (workdir / relative).exists()
        rule = relative.split("/")[2].removeprefix("rule_")
        ran.add(rule)
        if rule in GPU_RULES:
            assert "gres/gpu=1" in jobs[job_id]["AllocTRES"], (rule, jobs[job_id])
        else:
            assert "gres/gpu" not in jobs[job_id]["AllocTRES"], (rule, jobs[job_id])
    assert GPU_RULES <= ran

    # The rerun's 7B pretraining resumed from the cancelled job's checkpoint.
    summary = json.loads((workdir / "results/models/Asclepius-R-7B-Pretrained-Only/training_run.json").read_text())
    assert summary["resumed_from"] is not None and summary["global_step"] == 150
    assert "resuming from" in (workdir / "logs/pretrain/7B.log").read_text()
    assert len(list((workdir / "logs/slurm/rule_pretrain/7B").glob("*.log"))) == 2
    assert (workdir / "release/SHA256SUMS").exists()


def test_one_training_job_across_two_nodes(cluster, tmp_path):
    data = build_fixture_data(tmp_path)
    run_file = write_run(tmp_path / "run", "finetune", data, max_steps=4, per_device_batch_size=1)
    # README step 1: check the checkpoints and write the run file, once.
    prepared = subprocess.run(
        [sys.executable, "-m", "asclepius_r.train.launch", "finetune", str(run_file), "--prepare-only"],
        env=launch_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # README step 2: the sbatch script, one task per node; without CUDA each node runs one gloo rank.
    port = free_port()
    script = tmp_path / "multinode.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8\n"
        f"srun {sys.executable} -m asclepius_r.train.launch finetune {prepared} --slurm-nodes --gpus 8 \\\n"
        f"    --accelerate-config accelerate/fsdp_full_shard_multinode.yaml --port {port}\n"
    )
    out = tmp_path / "multinode.out"
    submitted = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--account={ACCOUNT}", f"--output={out}", str(script)],
        env={**launch_env(), "SLURM_CONF": str(cluster.conf)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    job = sacct(cluster, [submitted])[submitted]
    assert job["State"] == "COMPLETED" and job["NNodes"] == "2" and job["NodeList"] == f"n[1-{len(NODES)}]"
    assert "gres/gpu=16" in job["AllocTRES"]
    log = out.read_text()
    for rank in range(2):
        assert re.search(
            rf"node {rank} of 2: \S+ -m torch.distributed.run --nnodes 2 --node_rank {rank} --nproc_per_node 1 "
            rf"--rdzv_backend c10d --rdzv_endpoint 127.0.0.1:{port} --rdzv_id {submitted} ",
            log,
        ), log[-4000:]
    summary = json.loads((tmp_path / "run/out/finetune/training_run.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 4
