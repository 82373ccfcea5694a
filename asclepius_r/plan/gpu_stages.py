"""The GPU stages' rows of the plan: training jobs and the held-out answers.

`training_rows`: per pretraining and fine-tuning job its GPUs, memory per GPU, checkpoints and
export, from the config and the models' shapes alone. `add_training_compute` then fills in what
needs the notes and the base tokenizer (transformers, torch): training tokens and sequences,
optimizer steps as the Trainer counts them, FLOPs and GPU-hours at the MFU BENCHMARKS.md measured
(`measured_mfu`) and the devices' peak (`peak_tflops`). `evaluation_row`: the answer_heldout jobs,
one per evaluated model, with the largest model's memory.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from asclepius_r import config as workflow_config
from asclepius_r.base_model.describe import base_dir
from asclepius_r.plan.disk import checkpoint_bytes, export_bytes
from asclepius_r.plan.inputs import note_lengths, parameter_counts
from asclepius_r.plan.llm_stages import GENERATED_CHARS_PER_TOKEN, longest_seed_question
from asclepius_r.plan.memory import gradient_bytes, inference_memory_bytes, training_memory_bytes
from asclepius_r.prompts import render_released
from asclepius_r.train.settings import training_settings

# Training tokens before the base tokenizer is there: LLaMA-1's tokenizer splits digits one by one
# and made 2.4 characters per token on synthetic MIMIC-style notes (BENCHMARKS.md, "Plan against use").
BASE_CHARS_PER_TOKEN = 2.4
# Used when BENCHMARKS.md holds no measured MFU: between 2023's implied 15-23% on A100s and the
# 50-60% of tuned FSDP stacks (shared/reference/original-method.md).
DEFAULT_MFU = 0.35
ASSUMED_PEAK_TFLOPS = 312.0  # A100 bf16 dense, when neither the config nor a visible GPU names one
BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"
MEASURED_MFU = re.compile(r"RESULT tokens_per_s=\S+ mfu=(?P<mfu>[0-9]*\.?[0-9]+) device=(?P<device>\S+)(?P<rest>.*)")


def training_rows(config: dict, shapes: dict[str, tuple[dict, str]]) -> list[dict]:
    """Jobs, GPUs, memory per device and disk of each training job (no token counts yet)."""
    rows = []
    sharded_config = bool(config["launch"]["accelerate_config"])
    for stage in ("pretrain", "finetune"):
        for size, (shape, _) in shapes.items():
            settings = training_settings(config, stage, size, shape.get("max_position_embeddings"))
            params, _ = parameter_counts(shape)
            gpus = config["models"][size]["gpus"]
            devices = gpus or config["launch"]["cpu_processes"]
            rows.append(
                {
                    "stage": stage,
                    "size": size,
                    "jobs": 1,
                    "gpus": gpus,
                    "params": params,
                    "memory_per_gpu_bytes": training_memory_bytes(
                        shape, params, settings, stage, devices, sharded_config and devices > 1
                    ),
                    "gradient_per_gpu_bytes": gradient_bytes(shape, params, devices, sharded_config and devices > 1),
                    "checkpoint_bytes": checkpoint_bytes(params, settings),
                    "disk_bytes": export_bytes(config, size, params, settings),
                }
            )
    return rows


def evaluation_row(config: dict, shapes: dict[str, tuple[dict, str]], heldout: int | None) -> dict:
    """The answer_heldout jobs: one GPU each, the largest model's memory, answers at
    `evaluate.max_new_tokens` to every held-out note (`heldout`; None: not known yet)."""
    models = len(workflow_config.evaluated_models(config))
    largest = max(parameter_counts(shape)[0] for shape, _ in shapes.values())
    shape = next(s for s, _ in shapes.values() if parameter_counts(s)[0] == largest)
    return {
        "stage": "answer_heldout",
        "jobs": models,
        "gpus": 1,
        "params": largest,
        "memory_per_gpu_bytes": inference_memory_bytes(shape, largest, config, on_gpu=True),
        "generated_tokens": None if heldout is None else models * heldout * config["evaluate"]["max_new_tokens"],
        "disk_bytes": 0
        if heldout is None
        else int(models * heldout * config["evaluate"]["max_new_tokens"] * GENERATED_CHARS_PER_TOKEN),
    }


# -- training compute (tokenizer and torch) --------------------------------------------------
class NoteTokens:
    """Tokens of each training note with a base model's tokenizer, or estimated from characters."""

    def __init__(self, notes_path: Path, base: str | None):
        self.notes_path = notes_path
        self.tokenizer = None
        if base and any((Path(base) / name).exists() for name in ("tokenizer.model", "tokenizer.json")):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(base)
            self.method = f"counted with the base tokenizer ({base})"
        else:
            self.method = f"estimated as characters / {BASE_CHARS_PER_TOKEN:g} (base tokenizer not available yet)"

    def count(self, text: str, special: bool = False) -> int:
        if self.tokenizer is None:
            return math.ceil(len(text) / BASE_CHARS_PER_TOKEN)
        return len(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def notes(self) -> np.ndarray:
        if self.tokenizer is None:
            return np.ceil(note_lengths(self.notes_path) / BASE_CHARS_PER_TOKEN).astype(np.int64)
        import pyarrow.parquet as pq

        counts = []
        for batch in pq.read_table(self.notes_path, columns=["TEXT"]).to_batches(max_chunksize=512):
            texts = batch.column(0).to_pylist()
            counts += [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return np.array(counts, dtype=np.int64)


def measured_mfu(benchmarks: Path = BENCHMARKS) -> tuple[float, str] | None:
    """The last MFU that BENCHMARKS.md records from bench/gpu_mfu.py in eager mode, with its device.

    A line annotated `--compile` is left out: the workflow's training does not compile, and a
    compiled rate (BENCHMARKS.md, Training) would promise the plan too short a run.
    """
    text = benchmarks.read_text() if benchmarks.exists() else ""
    found = [m for m in MEASURED_MFU.finditer(text) if "--compile" not in m["rest"]]
    if not found:
        return None
    return float(found[-1]["mfu"]), found[-1]["device"]


def peak_tflops(config: dict, gpus: list[dict]) -> tuple[float, str]:
    """A device's bf16 dense peak and where it came from: the config, a visible GPU, or an A100."""
    from asclepius_r.train.throughput import peak_tflops_of

    configured = {config["pretrain"]["peak_tflops_per_device"], config["finetune"]["peak_tflops_per_device"]}
    configured.discard(None)
    if configured:
        return max(configured), "peak_tflops_per_device in the config"
    for gpu in gpus:
        peak = peak_tflops_of(gpu["name"])
        if peak:
            return peak, f"bf16 dense peak of the visible {gpu['name']}"
    return ASSUMED_PEAK_TFLOPS, "A100 assumed: no GPU visible here and peak_tflops_per_device is null"


def trainer_steps(items: int, batch: int, global_batch: int, devices: int, epochs: float, max_steps: int) -> int:
    """Optimizer steps as the Trainer counts them: each device's share of batches, per epoch,
    divided by the accumulation that keeps `global_batch` over `devices` (a last partial
    accumulation is a step too)."""
    if max_steps > 0:
        return max_steps
    accumulation = max(1, math.ceil(global_batch / (devices * batch)))
    per_device = math.ceil(math.ceil(items / batch) / devices)
    return math.ceil(epochs * max(math.ceil(per_device / accumulation), 1))


def add_training_compute(config: dict, rows: list[dict], shapes: dict, notes_dir: Path, peak: float, mfu: float):
    """Fill tokens, optimizer steps, FLOPs and GPU-hours into the training rows.

    Pretraining: every note framed by BOS and EOS, cut into `max_length` blocks (counted exactly
    with the base tokenizer). Fine-tuning: one example per training note (all accepted, an upper
    bound) of the template, the note, the longest seed question and an answer at the generator's
    `max_tokens`, cut at `max_length`, packed first-fit-decreasing as the training code packs.
    """
    from asclepius_r.gpus import fake_devices
    from asclepius_r.train.finetune import first_fit_decreasing
    from asclepius_r.train.throughput import FlopModel

    longest_question = longest_seed_question(config)
    answer_chars = config["llm"]["max_tokens"] * GENERATED_CHARS_PER_TOKEN
    counted: dict[str, tuple[NoteTokens, np.ndarray]] = {}
    for row in rows:
        size, stage = row["size"], row["stage"]
        shape = shapes[size][0]
        folder = base_dir(config, size)
        if folder not in counted:
            counter = NoteTokens(notes_dir / "discharge.parquet", folder)
            counted[folder] = (counter, counter.notes())
        counter, tokens = counted[folder]
        settings = training_settings(config, stage, size, shape.get("max_position_embeddings"))
        length = settings["max_length"]
        # Without GPUs (or with the rehearsal's fake ones) the launcher trains in cpu_processes processes.
        devices = config["launch"]["cpu_processes"] if not row["gpus"] or fake_devices() else row["gpus"]
        global_batch = settings["global_batch_size"]
        max_steps = settings["max_steps"]
        if stage == "pretrain":
            items = int((tokens + 2).sum()) // length
            batch = settings["per_device_batch_size"]
            steps = trainer_steps(items, batch, global_batch, devices, settings["epochs"], max_steps)
            lengths = np.full(items, length, dtype=np.int64)
        else:
            frame = counter.count(render_released("", longest_question), special=True)
            # The answer is not written yet: at the cap, in tokens at the notes' tokens per character.
            answer = math.ceil(answer_chars * tokens.sum() / max(1, note_lengths(counter.notes_path).sum()))
            lengths = np.minimum(tokens + frame + answer + 1, length)
            items = len(first_fit_decreasing(lengths.tolist(), length))
            steps = trainer_steps(items, 1, global_batch, devices, settings["epochs"], max_steps)
        epochs = settings["epochs"] if max_steps <= 0 else min(settings["epochs"], steps * global_batch / items)
        real = float(lengths.sum()) * epochs
        pairs = float((lengths.astype(np.float64) ** 2).sum()) * epochs
        _, matmul = parameter_counts(shape)
        flops = FlopModel(matmul, shape["num_hidden_layers"], shape["hidden_size"]).flops(real, pairs)
        gpu_hours = flops / (mfu * peak * 1e12) / 3600
        row.update(
            tokens_method=counter.method,
            sequences=items,
            train_tokens=int(real),
            steps=steps,
            flops=flops,
            gpu_hours=gpu_hours,
            hours=gpu_hours / devices,
        )
