"""What both training stages share: the run settings, the Trainer, resume and the final save.

Intermediate checkpoints live in `checkpoint_dir`, outside the rule's declared output, so a
rerun after a crash resumes from the last one; the declared `output_dir` is written last and
atomically (rename), with safetensors weights and the base model's `tokenizer.model`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..base_model import copy_tokenizer_model
from ..files import atomic_path

log = logging.getLogger(__name__)


@dataclass
class TrainRun:
    """One training job, resolved from config.yaml by the rule (see the schema for meanings)."""

    base_model: str
    data: str
    output_dir: str
    checkpoint_dir: str
    metrics_file: str
    seed: int = 42
    epochs: float = 1.0
    max_steps: int = -1
    max_length: int = 2048
    per_device_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    learning_rate: float = 2e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    bf16: bool = True
    tf32: bool = True
    gradient_checkpointing: bool = True
    save_steps: int = 200
    save_total_limit: int = 2
    logging_steps: int = 10
    save_dtype: str = "bfloat16"
    peak_tflops_per_device: float = 989.0
    fsdp: str = ""
    fsdp_config: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainRun":
        values = json.loads(Path(path).read_text())
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown training setting(s) {sorted(unknown)}")
        return cls(**values)


def training_arguments(run: TrainRun) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=run.checkpoint_dir,
        per_device_train_batch_size=run.per_device_batch_size,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        num_train_epochs=run.epochs,
        max_steps=run.max_steps,
        learning_rate=run.learning_rate,
        lr_scheduler_type=run.lr_scheduler,
        warmup_steps=run.warmup_ratio,  # a float below 1 is a ratio in transformers 5
        weight_decay=run.weight_decay,
        bf16=run.bf16 and cuda,
        tf32=run.tf32 and cuda,
        gradient_checkpointing=run.gradient_checkpointing and cuda,
        save_strategy="steps",
        save_steps=run.save_steps,
        save_total_limit=run.save_total_limit,
        logging_steps=run.logging_steps,
        seed=run.seed,
        data_seed=run.seed,
        report_to=[],
        use_cpu=not cuda,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        fsdp=run.fsdp or "",
        fsdp_config=run.fsdp_config or None,
        disable_tqdm=False,
    )


def load_model_and_tokenizer(run: TrainRun):
    tokenizer = AutoTokenizer.from_pretrained(run.base_model, padding_side="right")
    # fp32 master weights; bf16 autocast does the fast math on GPUs.
    model = AutoModelForCausalLM.from_pretrained(run.base_model, dtype=torch.float32)
    model.config.use_cache = False
    return model, tokenizer


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12*L*d*S for attention scores and values."""
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len


class MetricsCallback(TrainerCallback):
    """Appends loss, learning rate, tokens/s, real-token fraction and MFU to a JSONL file."""

    def __init__(self, path: str, flops_token: float, peak_tflops: float, positions_per_token: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flops_token, self.peak = flops_token, peak_tflops
        self.last_time, self.last_tokens = None, 0
        self.positions_per_token = positions_per_token

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        record = {"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"],
                  "learning_rate": logs.get("learning_rate"), "tokens_seen": tokens}
        if self.last_time is not None and now > self.last_time:
            rate = (tokens - self.last_tokens) / (now - self.last_time)
            devices = max(1, args.world_size)
            record["tokens_per_s"] = rate
            record["mfu"] = rate * self.flops_token / (self.peak * 1e12 * devices)
        record["real_token_fraction"] = 1.0 / self.positions_per_token
        self.last_time, self.last_tokens = now, tokens
        with open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")


def train_and_save(run: TrainRun, model, tokenizer, dataset, collator, positions_per_token: float = 1.0) -> None:
    """Train (resuming from the newest checkpoint if one exists), then save the output atomically."""
    Path(run.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    args = training_arguments(run)
    seq_len = run.max_length
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      processing_class=tokenizer,
                      callbacks=[MetricsCallback(run.metrics_file, flops_per_token(model, seq_len),
                                                 run.peak_tflops_per_device, positions_per_token)])
    last = get_last_checkpoint(run.checkpoint_dir) if Path(run.checkpoint_dir).exists() else None
    if last:
        log.info("resuming from %s", last)
    else:
        Path(run.metrics_file).unlink(missing_ok=True)
    trainer.train(resume_from_checkpoint=last)
    if trainer.is_world_process_zero():
        with atomic_path(run.output_dir, is_dir=True) as tmp:
            trainer.save_model(str(tmp))
            model_dtype = getattr(torch, run.save_dtype)
            if model_dtype != torch.float32:
                reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model_dtype)
                for stale in tmp.glob("model*.safetensors*"):
                    stale.unlink()
                reloaded.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            copy_tokenizer_model(run.base_model, tmp)
            (tmp / "training_run.json").write_text(json.dumps(asdict(run), indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()
