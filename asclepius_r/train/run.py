"""What both training stages share: the run settings, the Trainer, metrics, resume and the final save.

Intermediate checkpoints live in `checkpoint_dir`, outside the rule's declared output, and a
run resumes from the newest complete one (see `checkpoints`). The Trainer always saves at its
last step; the declared outputs are made from that checkpoint last and atomically: first the
metrics file, then the model folder (safetensors in `save_dtype`, tokenizer, the base's own
tokenizer files, `training_run.json`). BOS, EOS and the context are the base's own (`describe_base`),
whichever its tokenizer family. Under FSDP the checkpoint holds per-rank shards (SHARDED_STATE_DICT, so
no rank gathers the whole model) and every rank writes its part of the export on CPU.

The global batch is the run's `global_batch_size` whatever the number of processes: gradient
accumulation is what changes (`gradient_accumulation`). The process group is started in
`training_arguments`, before any collective, so its timeout is the run's `ddp_timeout_s`; the
export after training waits on files, never on that timeout.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from accelerate import PartialState, init_empty_weights
from asclepius_r.base_model.describe import check_base_model, describe_base
from asclepius_r.errors import InputError
from asclepius_r.files import atomic_path, read_jsonl
from asclepius_r.prompts import check_bos
from asclepius_r.train.checkpoints import (
    KeepTokenizerModel,
    export_checkpoint,
    last_complete_checkpoint,
    prepare_export,
)
from asclepius_r.train.settings import training_settings
from asclepius_r.train.throughput import FlopModel, Window, batch_counts, peak_tflops_of

log = logging.getLogger(__name__)


@dataclass
class TrainRun:
    """One training job: where its files are and the stage's settings, every one from the resolved
    config (`from_config`; the schema holds the defaults and meanings)."""

    base_model: str
    data: str
    output_dir: str
    checkpoint_dir: str
    metrics_file: str
    truncation_file: str | None
    data_cache_dir: str | None
    seed: int
    epochs: float
    max_steps: int
    max_length: int
    global_batch_size: int  # sequences per optimizer step over all processes
    per_device_batch_size: int | None  # pretraining's; fine-tuning trains one pack per micro-batch
    learning_rate: float
    lr_scheduler: str
    warmup_ratio: float
    weight_decay: float
    bf16: bool
    tf32: bool
    gradient_checkpointing: bool
    attn_implementation: str
    save_steps: int
    save_total_limit: int
    logging_steps: int
    save_dtype: str
    note_attention: str | None  # pretraining only
    peak_tflops_per_device: float | None  # None: from the device's name (throughput.peak_tflops_of)
    truncation: str | None  # fine-tuning only
    ddp_timeout_s: int  # the process group's timeout, from the launch section

    @classmethod
    def from_config(cls, config: dict, stage: str, name: str, **files) -> TrainRun:
        """Model `name`'s `stage` run of the resolved `config`; `files` are the run's paths (base_model,
        data, output_dir, checkpoint_dir, metrics_file, truncation_file, data_cache_dir)."""
        settings = training_settings(config, stage, name)
        return cls(**files, **settings, ddp_timeout_s=config["launch"]["ddp_timeout_s"])

    @classmethod
    def from_json(cls, path: str | Path) -> TrainRun:
        values = json.loads(Path(path).read_text())
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"{path}: unknown training setting(s) {sorted(unknown)}")
        return cls(**values)

    @property
    def running_metrics(self) -> Path:
        """The metrics log while training (kept across a resume), copied to `metrics_file` at the end."""
        return Path(self.checkpoint_dir) / "metrics.jsonl"


def launched_with_fsdp() -> bool:
    """`accelerate launch` with an FSDP config exports its settings as ACCELERATE_USE_FSDP and FSDP_* variables."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def loads_weights_on_rank_0_only() -> bool:
    """FSDP with `fsdp_cpu_ram_efficient_loading`: global rank 0 reads the weights, the others get them by broadcast."""
    return (
        launched_with_fsdp()
        and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true"
        and int(os.environ.get("RANK", "0")) != 0
    )


def gradient_accumulation(run: TrainRun, processes: int) -> int:
    """Micro-batches each process accumulates per optimizer step so that the step holds the run's
    `global_batch_size` over `processes` processes (the next multiple above it, said so, when it
    does not divide)."""
    per_pass = processes * run.per_device_batch_size
    steps = max(1, math.ceil(run.global_batch_size / per_pass))
    if steps * per_pass != run.global_batch_size:
        log.warning(
            "global_batch_size %d is not a multiple of %d process(es) x %d per device: the global batch is %d",
            run.global_batch_size,
            processes,
            run.per_device_batch_size,
            steps * per_pass,
        )
    log.info(
        "global batch %d = %d process(es) x %d per device x %d accumulated micro-batch(es)",
        steps * per_pass,
        processes,
        run.per_device_batch_size,
        steps,
    )
    return steps


def training_arguments(run: TrainRun) -> TrainingArguments:
    """The Trainer's arguments, after starting the process group with the run's timeout: every
    process calls this before any collective (the first start decides the timeout for good)."""
    cuda = torch.cuda.is_available()
    # transformers hands ddp_timeout to the process group on GPUs only; started here, the run's
    # timeout holds on any device, and TrainingArguments then finds the group already started.
    PartialState(cpu=not cuda, timeout=timedelta(seconds=run.ddp_timeout_s))
    fsdp = launched_with_fsdp()
    # Under FSDP, FSDP's own activation checkpointing does it instead (set from the same setting
    # in MeasuredTrainer; both at once is an error in the Trainer and a redundant all-gather).
    checkpoint_activations = run.gradient_checkpointing and not fsdp
    return TrainingArguments(
        output_dir=run.checkpoint_dir,
        per_device_train_batch_size=run.per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation(run, int(os.environ.get("WORLD_SIZE", "1"))),
        num_train_epochs=run.epochs,
        max_steps=run.max_steps,
        learning_rate=run.learning_rate,
        lr_scheduler_type=run.lr_scheduler,
        warmup_steps=0,  # set from warmup_ratio once the steps are known (MeasuredTrainer.create_scheduler)
        weight_decay=run.weight_decay,
        bf16=run.bf16 and cuda,
        tf32=run.tf32 and cuda,
        activation_checkpointing=checkpoint_activations,
        save_strategy="steps",
        save_steps=run.save_steps,
        save_total_limit=run.save_total_limit,
        logging_steps=run.logging_steps,
        seed=run.seed,
        data_seed=run.seed,
        report_to=[],
        use_cpu=not cuda,
        ddp_timeout=run.ddp_timeout_s,
        # Under FSDP2 a micro-batch whose gradients are not synchronised leaves every parameter's
        # gradient unsharded in fp32 on every rank until the step (a whole model's fp32 gradients
        # per GPU: 52 GB for 13B). Reduce-scattering after each micro-batch keeps only the shard;
        # the extra reduce-scatters overlap the backward pass. DDP holds whole gradients anyway,
        # so there the sync waits for the last micro-batch.
        accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": fsdp}},
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LLaMA weight is used; the search costs a graph walk
        remove_unused_columns=False,
        disable_tqdm=False,
    )


def unfilled_model(run: TrainRun):
    """The run's model with real buffers and parameters whose storage is allocated but never written.

    transformers 5.23 reads the whole checkpoint on every rank even under FSDP's
    cpu_ram_efficient_loading (13B in fp32: 52 GB of host RAM per rank). accelerate instead
    broadcasts rank 0's weights into the shards, so the other ranks need only the parameters'
    shapes. They cannot stay on the meta device: accelerate finds the optimizer's parameters
    again by data_ptr(), which is 0 for every meta tensor, and the optimizer would then hold
    one parameter many times. Untouched storage costs no memory (the kernel maps pages on first
    write), and accelerate moves these parameters to the meta device before it shards. The
    buffers are built for real: the non-persistent ones (rotary frequencies) are not broadcast.
    """
    config = AutoConfig.from_pretrained(run.base_model)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=run.attn_implementation
        )
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            unfilled = torch.empty_like(param, device="cpu")
            setattr(module, name, torch.nn.Parameter(unfilled, requires_grad=param.requires_grad))
    model.tie_weights()
    return model


def load_model_and_tokenizer(run: TrainRun):
    """The base's model and tokenizer: BOS, EOS and context are the base's own, whatever its family."""
    context = check_base_model(run.base_model).context_length
    if run.max_length > context:
        raise InputError(f"{run.base_model}: max_length {run.max_length} exceeds the model's {context} positions")
    tokenizer = AutoTokenizer.from_pretrained(run.base_model, padding_side="right")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.bos_token_id:
        raise InputError(f"{run.base_model}: the pad token is BOS (the 2023 defect); fix its tokenizer_config.json")
    check_bos(tokenizer, run.base_model)
    # fp32 master weights; the bf16 math comes from autocast, or under FSDP from its mixed-precision policy.
    if loads_weights_on_rank_0_only():
        model = unfilled_model(run)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            run.base_model, dtype=torch.float32, attn_implementation=run.attn_implementation
        )
    model.config.use_cache = False  # with a KV cache, packed examples would attend to each other
    return model, tokenizer


def configure_fsdp(plugin, mixed_precision: str, run: TrainRun) -> None:
    """What the run decides in accelerate's FSDP plugin, before the Trainer wraps the model.

    accelerate turns `mixed_precision: bf16` into FSDP2's MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=bf16, output_dtype=bf16): gradients are reduce-scattered in bf16 and, between the
    micro-batches of an accumulation (no gradient sync), summed in bf16. With reduce_dtype fp32,
    FSDP2 upcasts each micro-batch's gradient and accumulates and reduces in fp32; the forward and
    backward still run on bf16 weights. output_dtype stays unset, so the loss is not cast to bf16.
    Activation checkpointing follows the run's `gradient_checkpointing`, whatever the accelerate
    config says.
    """
    if plugin.fsdp_version != 2:
        raise ValueError(f"the accelerate config must set fsdp_version: 2 (FSDP2), not {plugin.fsdp_version}")
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if compute is not None:
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    plugin.activation_checkpointing = run.gradient_checkpointing


def mfu_peak(run: TrainRun, device_name: str) -> float | None:
    """The peak MFU divides by: the run's setting, else the one known for the device's name, else None."""
    if run.peak_tflops_per_device is not None:
        return run.peak_tflops_per_device
    peak = peak_tflops_of(device_name)
    if peak is None:
        log.warning(
            "MFU unknown: no bf16 dense peak is known for device %r; set peak_tflops_per_device "
            "(TFLOP/s per device) in the pretrain/finetune section of the config to record it",
            device_name,
        )
    return peak


class MeasuredTrainer(Trainer):
    """A Trainer that counts real tokens and useful FLOPs and appends one metrics record per log.

    Every process counts its own micro-batches; at each log (which all processes reach) the
    counts are summed over processes, so tokens/s is global and MFU divides by the world size.
    """

    def __init__(self, *args, run: TrainRun, **kwargs):
        self.run = run  # read by create_accelerator_and_postprocess, which the Trainer's __init__ calls
        super().__init__(*args, **kwargs)
        device = self.args.device
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        self.peak_tflops = mfu_peak(run, self.device_name)
        self.flop_model = FlopModel.of(self.model)
        self.window_counts = torch.zeros(3, dtype=torch.float64, device=self.args.device)
        self.window_start = time.perf_counter()

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.is_fsdp_enabled:
            configure_fsdp(self.accelerator.state.fsdp_plugin, self.accelerator.mixed_precision, self.run)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # transformers 5 reads a float warmup_steps below 1 as a ratio and 1.0 as one step; the run's
        # ratio is turned into steps here, where their number is known (1.0: warm up all the way).
        self.args.warmup_steps = math.ceil(num_training_steps * self.run.warmup_ratio)
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.window_counts += batch_counts(inputs).to(self.window_counts.device)
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            real, positions, pairs = self.accelerator.reduce(self.window_counts, reduction="sum").tolist()
            window = Window(real, positions, pairs, now - self.window_start, self.accelerator.num_processes)
            record = {
                "step": self.state.global_step,
                "epoch": self.state.epoch,
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "real_tokens": int(real),
                **window.record(self.flop_model, self.peak_tflops),
                "device": self.device_name,
                "peak_tflops_per_device": self.peak_tflops,
            }
            logs = {**logs, "tokens_per_s": round(record["tokens_per_s"], 1)}
            if record["mfu"] is not None:
                logs["mfu"] = round(record["mfu"], 4)
            if self.is_world_process_zero():
                with open(self.run.running_metrics, "a") as out:
                    out.write(json.dumps(record) + "\n")
            self.window_counts.zero_()
            self.window_start = now
        super().log(logs, start_time)


def keep_metrics_up_to(path: Path, step: int) -> None:
    """After a resume, drop records of steps that are about to be trained again."""
    if path.exists():
        kept = [r for r in read_jsonl(path) if r["step"] <= step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))


def train_and_save(
    run: TrainRun, args: TrainingArguments, model, tokenizer, dataset, collator, data_summary: dict
) -> None:
    """Train (resuming from the newest complete checkpoint), then write the declared outputs.

    After training, every rank writes its part of the export (`export_checkpoint`) and rank 0
    finishes it; none of that waits in a collective, so an export that takes longer than the
    process group's timeout still ends well.
    """
    checkpoint_dir = Path(run.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    trainer = MeasuredTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[KeepTokenizerModel(run.base_model)],
        run=run,
    )
    resume = last_complete_checkpoint(checkpoint_dir)
    if trainer.is_world_process_zero():
        if resume:
            step = json.loads((resume / "trainer_state.json").read_text())["global_step"]
            log.info("resuming from %s (step %d)", resume, step)
            keep_metrics_up_to(run.running_metrics, step)
        else:
            run.running_metrics.unlink(missing_ok=True)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    accelerator = trainer.accelerator
    if trainer.is_world_process_zero():
        prepare_export(run.output_dir)
    accelerator.wait_for_everyone()  # the job's last collective: training is over, the staging folder is ready
    final = last_complete_checkpoint(checkpoint_dir)  # the Trainer saves at its last step
    summary = None
    if trainer.is_world_process_zero():
        base = describe_base(run.base_model)
        summary = {
            "settings": asdict(run),
            "base": {
                "folder": Path(run.base_model).name,
                "architecture": base.architecture,
                "tokenizer": base.family,
                "vocab_size": base.vocab_size,
                "context_length": base.context_length,
                "bos_token": base.bos_token,
                "eos_token": base.eos_token,
            },
            "data": data_summary,
            "global_step": trainer.state.global_step,
            "resumed_from": resume.name if resume else None,
            "world_size": accelerator.num_processes,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "global_batch_size": args.gradient_accumulation_steps
            * args.per_device_train_batch_size
            * accelerator.num_processes,
        }
        with atomic_path(run.metrics_file) as tmp:
            shutil.copyfile(run.running_metrics, tmp)
    export_checkpoint(
        final,
        run.base_model,
        run.output_dir,
        run.save_dtype,
        extra_files={"training_run.json": summary} if summary else None,
        rank=accelerator.process_index,
        processes=accelerator.num_processes,
    )
    if trainer.is_world_process_zero():
        shutil.rmtree(checkpoint_dir)
