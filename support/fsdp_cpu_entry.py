"""Run a training stage under FSDP on CPU processes (gloo), and report what the job really did.

accelerate 1.15 never turns a CPU job into FSDP: `AcceleratorState.__init__` promotes the
distributed type to FSDP only from MULTI_GPU/MLU/SDAA/MUSA/NPU/XPU/HPU/NEURON, and a CPU process
group is MULTI_CPU, so an FSDP config (or ACCELERATE_USE_FSDP, or TrainingArguments.fsdp) is
silently dropped and the Trainer runs DDP. torch's FSDP2 (`fully_shard`) itself works on CPU with
gloo. This entry lifts exactly that gate: it starts the gloo group as accelerate does for CPU
(MULTI_CPU, device cpu) and then relabels the process group MULTI_GPU, so that the Accelerator
the Trainer builds takes the FSDP plugin from the FSDP_* variables of `accelerate launch`.
Everything else (sharding, sharded checkpoints, resume, the merge) is the real code path.

    accelerate launch --config_file CPU_FSDP.yaml support/fsdp_cpu_entry.py MODULE RUN.json PROBE_DIR [CRASH_AFTER_STEP]
        [SLOW_EXPORT_S]

Each rank writes PROBE_DIR/rank-<r>.json: how much its resident memory grew while it loaded the
model (current and peak RSS, from /proc and getrusage), the distributed type, whether the Trainer saw FSDP, the
parameter types and shard shapes, whether decoder layers are checkpoint-wrapped, each sharded
parameter's mixed-precision dtypes as FSDP2 applies them, the gradients held between
micro-batches of an accumulation (bytes unsharded and sharded, the most seen, and their dtypes)
and the dtypes of every gradient reduce-scatter, the process group's timeout, and the files of
every checkpoint just after it was saved. At the end of training rank 0 also writes
PROBE_DIR/gathered.pt, the full parameters all-gathered from the shards (the reference for the
merged model). With CRASH_AFTER_STEP, every rank dies (os._exit) right after that step's
checkpoint is on disk, as a job killed between checkpoints would. With SLOW_EXPORT_S, rank 0
takes that many seconds longer over its part of the export (a slow file system, a 13B model).
With PROBE_UNSYNCED_ACCUMULATION=1 in the environment, micro-batches accumulate without a gradient
sync as the Trainer does by default (bench/gradient_memory.py's baseline).
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback

import asclepius_r.train.checkpoints as train_checkpoints
import asclepius_r.train.run as train_run
from accelerate import PartialState

CRASH_EXIT_CODE = 17


def resident_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def fsdp_params(model: torch.nn.Module) -> list:
    """FSDP2's per-parameter state (torch internals: what the collectives really use)."""
    groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)]
    return [param for group in groups if group is not None for param in group.fsdp_params]


class Observed:
    """What a rank saw outside the Trainer's callbacks: the loaded weights and the reduce-scatters."""

    load_memory: dict[str, int] = {}
    reduce_scatter_dtypes: set[str] = set()

    @classmethod
    def install(cls, slow_export_s: float | None = None) -> None:
        load = train_run.load_model_and_tokenizer

        def load_and_measure(run):
            rss, peak = resident_bytes(), peak_resident_bytes()
            model, tokenizer = load(run)
            cls.load_memory = {
                "rss_growth": resident_bytes() - rss,
                "peak_rss_growth": peak_resident_bytes() - peak,
                "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            }
            return model, tokenizer

        train_run.load_model_and_tokenizer = load_and_measure
        reduce_scatter = dist.reduce_scatter_single  # what FSDP2's default reduce-scatter calls

        def reduce_scatter_and_record(*args, **kwargs):
            cls.reduce_scatter_dtypes.add(str(kwargs.get("input", args[1] if len(args) > 1 else None).dtype))
            return reduce_scatter(*args, **kwargs)

        dist.reduce_scatter_single = reduce_scatter_and_record
        if slow_export_s:
            write_part = train_checkpoints.write_weights_part

            def write_part_slowly(*args, **kwargs):
                if dist.get_rank() == 0:
                    time.sleep(slow_export_s)
                return write_part(*args, **kwargs)

            train_checkpoints.write_weights_part = write_part_slowly


class Probe(TrainerCallback):
    """Records, per rank, what the Trainer actually trains and saves."""

    def __init__(self, trainer: Trainer, probe_dir: Path, crash_after_step: int | None):
        self.trainer = trainer
        self.probe_dir = probe_dir
        self.crash_after_step = crash_after_step
        self.rank = dist.get_rank()
        self.record = {
            "rank": self.rank,
            "world_size": dist.get_world_size(),
            "load_memory": Observed.load_memory,
            "process_group_timeout_s": process_group_timeout_s(),
            "accumulated_grad_dtypes": [],
            "accumulated_grad_bytes": {"unsharded": 0, "sharded": 0},
            "saves": {},
        }

    def write(self) -> None:
        (self.probe_dir / f"rank-{self.rank}.json").write_text(json.dumps(self.record, indent=1))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        wrapped = self.trainer.model_wrapped
        self.record.update(
            distributed_type=str(self.trainer.accelerator.distributed_type),
            is_fsdp_enabled=self.trainer.is_fsdp_enabled,
            fsdp_version=self.trainer.accelerator.state.fsdp_plugin.fsdp_version,
            state_dict_type=str(self.trainer.accelerator.state.fsdp_plugin.state_dict_type),
            wrapped_class=type(wrapped).__name__,
            checkpoint_wrapped_layers=sum(isinstance(m, CheckpointWrapper) for m in wrapped.modules()),
            parameters={
                name: {
                    "dtensor": isinstance(p, DTensor),
                    "local_shape": list((p.to_local() if isinstance(p, DTensor) else p).shape),
                    "shape": list(p.shape),
                }
                for name, p in wrapped.named_parameters()
            },
        )
        self.write()

    def on_substep_end(self, args, state, control, **kwargs):
        """Between the micro-batches of an accumulation: the gradients FSDP2 holds, unsharded (the
        whole parameter's, as without a sync) and sharded (this rank's part, after a reduce-scatter)."""
        held, unsharded, sharded = set(), 0, 0
        for param in fsdp_params(self.trainer.model_wrapped):
            grad = param.unsharded_accumulated_grad
            grad = grad if grad is not None else param._unsharded_param.grad
            if grad is not None:
                held.add(str(grad.dtype))
                unsharded += grad.numel() * grad.element_size()
            if param.sharded_param.grad is not None:
                local = param.sharded_param.grad.to_local()
                held.add(str(local.dtype))
                sharded += local.numel() * local.element_size()
        self.record["accumulated_grad_dtypes"] = sorted(set(self.record["accumulated_grad_dtypes"]) | held)
        most = self.record["accumulated_grad_bytes"]
        if unsharded + sharded > most["unsharded"] + most["sharded"]:
            self.record["accumulated_grad_bytes"] = {"unsharded": unsharded, "sharded": sharded}

    def on_step_end(self, args, state, control, **kwargs):
        # FSDP2 settles each parameter's dtypes at its first forward.
        self.record["mixed_precision"] = sorted(
            {
                (str(p.orig_dtype), str(p.param_dtype), str(p.reduce_dtype))
                for p in fsdp_params(self.trainer.model_wrapped)
            }
        )
        self.record["reduce_scatter_dtypes"] = sorted(Observed.reduce_scatter_dtypes)
        self.write()

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        dist.barrier()  # every rank has returned from the (collective) save
        self.record["saves"][checkpoint.name] = sorted(
            str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()
        )
        self.write()
        if state.global_step == self.crash_after_step:
            dist.barrier()
            os._exit(CRASH_EXIT_CODE)

    def on_train_end(self, args, state, control, **kwargs):
        gathered = {
            name: p.full_tensor() if isinstance(p, DTensor) else p.detach()
            for name, p in self.trainer.model_wrapped.named_parameters()
        }  # collective
        if self.rank == 0:
            torch.save({name: t.detach().clone() for name, t in gathered.items()}, self.probe_dir / "gathered.pt")


def process_group_timeout_s() -> float:
    """The timeout the default process group (gloo here, NCCL on GPUs) applies to its collectives."""
    group = dist.distributed_c10d._get_default_group()
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def lift_cpu_fsdp_gate() -> None:
    """Relabel accelerate's CPU process group MULTI_GPU whenever it is (re)initialised.

    TrainingArguments resets and rebuilds the process state, so the relabelling follows every
    PartialState initialisation; the group, its gloo backend and the cpu device stay as built.
    """
    initialise = PartialState.__init__

    def initialise_then_relabel(state, *args, **kwargs):
        initialise(state, *args, **kwargs)
        if state.distributed_type == DistributedType.MULTI_CPU:
            state.distributed_type = DistributedType.MULTI_GPU

    PartialState.__init__ = initialise_then_relabel


def accumulate_unsynced() -> None:
    """The Trainer's default accumulation: no gradient sync until the last micro-batch of a step."""
    make_arguments = train_run.training_arguments

    def arguments_without_sync(run):
        args = make_arguments(run)
        args.accelerator_config.gradient_accumulation_kwargs = {"sync_each_batch": False}
        return args

    train_run.training_arguments = arguments_without_sync


def main(
    module: str, run_file: str, probe_dir: str, crash_after_step: str | None = None, slow_export_s: str | None = None
) -> None:
    lift_cpu_fsdp_gate()
    if os.environ.get("PROBE_UNSYNCED_ACCUMULATION") == "1":
        accumulate_unsynced()
    Observed.install(float(slow_export_s) if slow_export_s else None)
    crash = int(crash_after_step) if crash_after_step and int(crash_after_step) else None
    original_train = Trainer.train

    def train_with_probe(trainer, *args, **kwargs):
        trainer.add_callback(Probe(trainer, Path(probe_dir), crash))
        return original_train(trainer, *args, **kwargs)

    Trainer.train = train_with_probe
    sys.argv = [module, run_file]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
