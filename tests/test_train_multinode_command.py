"""The multi-node launch on GPUs, which no machine here can run: its command, as accelerate reads it.

`launch_command` for one node of a 2 x 8 GPU job is parsed by accelerate's own `launch` parser
and validation, and turned into the torchrun configuration its multi-GPU launcher would start
(nodes, processes per node, c10d rendezvous at the first node) and the environment its ranks
would get (FSDP settings from accelerate/fsdp_full_shard_multinode.yaml). The CPU side of the
same launch runs for real across two SLURM nodes in tests/test_slurm.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed.run as torchrun
from accelerate.commands.launch import _filter_args, _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env

from asclepius_r.train.launch import Rendezvous, launch_command

CONFIG = "accelerate/fsdp_full_shard_multinode.yaml"
NODE_1_OF_2 = Rendezvous(nodes=2, node_rank=1, host="10.1.2.3", port=29500, job_id="4242")


def test_command_for_one_node_of_two():
    assert launch_command("pretrain", Path("ckpt/run.json"), 8, CONFIG, rendezvous=NODE_1_OF_2) == [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        CONFIG,
        "--num_machines",
        "2",
        "--num_processes",
        "16",
        "--machine_rank",
        "1",
        "--main_process_ip",
        "10.1.2.3",
        "--main_process_port",
        "29500",
        "--rdzv_backend",
        "c10d",
        "-m",
        "asclepius_r.train.pretrain",
        "ckpt/run.json",
    ]


def test_accelerate_starts_8_fsdp_ranks_per_node_meeting_at_the_first_node():
    command = launch_command("pretrain", Path("ckpt/run.json"), 8, CONFIG, rendezvous=NODE_1_OF_2)
    args = launch_command_parser().parse_args(command[3:])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp and not args.cpu
    env = prepare_multi_gpu_env(args)  # also sets the torchrun arguments on `args`
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert (int(args.nnodes), int(args.node_rank), int(args.nproc_per_node)) == (2, 1, 8)
    config, program, program_args = torchrun.config_from_args(
        _filter_args(args, torchrun.get_args_parser(), ["--training_script", args.training_script])
    )
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)
    assert (config.rdzv_backend, config.rdzv_endpoint) == ("c10d", "10.1.2.3:29500")
    assert program == sys.executable
    assert program_args == ["-u", "-m", "asclepius_r.train.pretrain", "ckpt/run.json"]


def test_cpu_command_for_one_node_of_two():
    assert launch_command("finetune", Path("run.json"), 0, CONFIG, cpu_processes=2, rendezvous=NODE_1_OF_2) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--node_rank",
        "1",
        "--nproc_per_node",
        "2",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "10.1.2.3:29500",
        "--rdzv_id",
        "4242",
        "-m",
        "asclepius_r.train.finetune",
        "run.json",
    ]
