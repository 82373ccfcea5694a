"""The plan: what a run will cost, take and need, stage by stage, before its first job.

`make_plan(config, notes_dir)` reads the config and the notes stage's outputs (that stage is
cheap; `main` runs it first when its outputs are missing) and returns, per stage: jobs and GPUs;
LLM requests, prompt and completion tokens, dollars online and with the Batch API, hours at the
configured quotas; training tokens, optimizer steps and GPU-hours at a stated MFU; memory per GPU;
disk for checkpoints, exports and the release; and what is missing or unapproved. What cannot be
known before the run is an upper bound, and every assumption behind a figure is written into the
plan (`assumptions`). Without `compute`, the plan leaves out what needs the tokenizer and torch
(training tokens, steps, GPU-hours): that is the part the preflight (`preflight.py`) checks
inside Snakemake before the first job, where importing torch would cost seconds.

    python -m asclepius_r.plan.estimate --config config.yaml [--config demo/config.yaml] [--json results/plan/plan.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from asclepius_r import config as workflow_config
from asclepius_r.base_model.describe import TINY_BASES, base_dir, is_built_base, is_gguf_base, tiny_spec
from asclepius_r.base_model.gguf import gguf_file, gguf_missing, gguf_shape
from asclepius_r.files import write_json
from asclepius_r.instructions.generate import GenerationSettings
from asclepius_r.instructions.tasks import load_seed_questions
from asclepius_r.llm import LLMSettings
from asclepius_r.notes.stage import NotePolicy, SplitPolicy
from asclepius_r.prompts import render_answer_prompt, render_judge_prompt, render_question_prompt, render_released
from asclepius_r.train.settings import training_settings

log = logging.getLogger(__name__)

# LLM tokens are estimated from characters: the endpoint's own tokenizer is not available here.
# GPT-4o-class tokenizers average about 4 characters per token on English prose; the notes'
# numbers, abbreviations and [**...**] placeholders split finer, so 3 is taken as an upper bound.
LLM_CHARS_PER_TOKEN = 3.0
# Training tokens before the base tokenizer is there: LLaMA-1's tokenizer splits digits one by one
# and made 2.4 characters per token on synthetic MIMIC-style notes (BENCHMARKS.md, "Plan against use").
BASE_CHARS_PER_TOKEN = 2.4
# Characters of generated text per generated token (for archive and fine-tuning sizes).
GENERATED_CHARS_PER_TOKEN = 4.0
MESSAGE_TOKENS = 8  # per chat message, as the client's own estimate (llm.client.estimate_tokens)
ARCHIVE_RECORD_BYTES = 700  # JSON keys, usage, provider and times of one archive record
# Used when BENCHMARKS.md holds no measured MFU: between 2023's implied 15-23% on A100s and the
# 50-60% of tuned FSDP stacks (shared/reference/original-method.md).
DEFAULT_MFU = 0.35
ASSUMED_PEAK_TFLOPS = 312.0  # A100 bf16 dense, when neither the config nor a visible GPU names one
BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"
MEASURED_MFU = re.compile(r"RESULT tokens_per_s=\S+ mfu=(?P<mfu>[0-9]*\.?[0-9]+) device=(?P<device>\S+)")
# Bytes per parameter: a checkpoint holds fp32 weights and Adam's two fp32 moments (7B: 81 GB),
# and so does training (sharded over the job's devices under FSDP), plus the gradients
# (`gradient_bytes`). An export holds the weights in `save_dtype`.
CHECKPOINT_BYTES_PER_PARAM = 12
STATE_BYTES_PER_PARAM = 12
GRADIENT_BYTES_PER_PARAM = 4  # fp32, as accumulated and reduce-scattered (train.run.configure_fsdp)
# While a layer's backward runs under FSDP, its gradient is whole: bf16 as computed and fp32 as
# reduce-scattered; two layers are in flight when the reduce-scatter overlaps the next backward.
LAYER_GRADIENT_BYTES_PER_PARAM = 2 + 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAVE_TOTAL_LIMIT = 2  # TrainRun's default (train/run.py), when the config does not set it
# Activation memory per token and layer under memory-efficient attention (Korthikanti et al.
# 2022: 34 h bytes in 16-bit); with activation checkpointing each layer keeps only its 2 h-byte
# input and one layer at a time holds the full set.
ACTIVATION_BYTES_PER_HIDDEN = 34
GPU_OVERHEAD_BYTES = 3 * 2**30  # CUDA context, NCCL buffers, allocator slack
USABLE_MEMORY_FRACTION = 0.9
# LLaMA-1 shapes (Touvron et al. 2023), used for a size whose base folder is not there yet.
LLAMA1_SHAPES = {
    "7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "13B": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
}
LLAMA1_COMMON = {"vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}
GB = 1e9
GIB = 2**30


# -- inputs ----------------------------------------------------------------------------------
def note_lengths(path: str | Path) -> np.ndarray:
    """Characters of every note of a notes dataset (no text is copied out of Arrow)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return pc.utf8_length(pq.read_table(path, columns=["TEXT"]).column("TEXT")).to_numpy().astype(np.int64)


def ensure_notes(config: dict, notes_dir: str | Path) -> Path | None:
    """The notes outputs in `notes_dir`, running the notes stage first if they are missing;
    None when NOTEEVENTS is not there either (it may be made by a rule, as in the demo)."""
    from asclepius_r.notes.stage import run_notes_stage, stage_outputs

    outputs = stage_outputs(notes_dir)
    if all(path.exists() for path in outputs.values()):
        return Path(notes_dir)
    if not config["noteevents"] or not Path(config["noteevents"]).exists():
        return None
    log.info("plan: the notes stage's outputs are missing; running it into %s", notes_dir)
    run_notes_stage(
        config["noteevents"],
        **outputs,
        policy=NotePolicy.from_config(config["notes"]),
        split=SplitPolicy.from_config(config),
    )
    return Path(notes_dir)


def model_shape(config: dict, size: str) -> tuple[dict, str]:
    """The LLaMA shape of a model and where it came from: the base folder's config.json, the
    demo's `tiny_model` section (with the model's overrides), or LLaMA-1's published shape."""
    base = config["models"][size]["base"]
    if base in TINY_BASES:
        return {**tiny_spec(config, size), "tie_word_embeddings": False}, "tiny_model"
    if is_gguf_base(base):
        if not gguf_file(base).is_file():
            raise workflow_config.ConfigError(f"config key models.{size}.base: {gguf_missing(base)}")
        return gguf_shape(gguf_file(base)), str(gguf_file(base))
    if base and (Path(base) / "config.json").exists():
        return json.loads((Path(base) / "config.json").read_text()), f"{base}/config.json"
    if size in LLAMA1_SHAPES:
        return {**LLAMA1_COMMON, **LLAMA1_SHAPES[size]}, f"LLaMA-1 {size} (published shape; base folder not read)"
    raise workflow_config.ConfigError(f"config key models.{size}.base: no config.json to read the model's shape from")


def parameter_counts(shape: dict) -> tuple[int, int]:
    """(all parameters, matmul parameters) of a LLaMA; as train.throughput.FlopModel counts them,
    the input embedding is a lookup, not a matmul, and a tied output still costs one."""
    h, inner, layers, vocab = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_hidden_layers"],
        shape["vocab_size"],
    )
    heads = shape["num_attention_heads"]
    kv_width = shape.get("num_key_value_heads", heads) * (h // heads)
    layer = 2 * h * h + 2 * h * kv_width + 3 * h * inner + 2 * h
    tied = shape.get("tie_word_embeddings", False)
    total = vocab * h * (1 if tied else 2) + layers * layer + h
    return total, total - (0 if tied else vocab * h)


def measured_mfu(benchmarks: Path = BENCHMARKS) -> tuple[float, str] | None:
    """The last MFU that BENCHMARKS.md records from bench/gpu_mfu.py, with its device."""
    found = MEASURED_MFU.findall(benchmarks.read_text()) if benchmarks.exists() else []
    if not found:
        return None
    mfu, device = found[-1]
    return float(mfu), device


def visible_gpus() -> list[dict]:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES respected), by nvidia-smi: name and memory.

    Asked of nvidia-smi rather than torch, so that Snakemake's own process never holds a CUDA
    context (hundreds of MB on GPU 0 for the whole run). Fake GPUs (`ASCLEPIUS_FAKE_GPUS`, see
    gpus.py) count as devices whose work runs on CPU: their memory is None.
    """
    from asclepius_r.gpus import fake_devices

    if fake_devices():
        return [
            {"index": d, "uuid": d, "name": f"fake GPU {d} (work on CPU)", "memory_bytes": None} for d in fake_devices()
        ]
    if not shutil.which("nvidia-smi"):
        return []
    query = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]
    try:
        lines = subprocess.run(query, capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    except (subprocess.SubprocessError, OSError) as error:
        log.warning("nvidia-smi failed (%s): no GPU counted", error)
        return []
    gpus = []
    for line in lines:
        index, uuid, name, memory = (part.strip() for part in line.split(","))
        gpus.append({"index": index, "uuid": uuid, "name": name, "memory_bytes": int(float(memory)) * 2**20})
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus
    wanted = [d.strip() for d in visible.split(",") if d.strip()]
    return [g for d in wanted for g in gpus if d in (g["index"], g["uuid"])]


# -- LLM stages ------------------------------------------------------------------------------
def _llm_tokens(chars: float) -> int:
    return math.ceil(chars / LLM_CHARS_PER_TOKEN)


def _llm_row(stage: str, settings, jobs: int, requests: int, prompt_chars: float, messages: int, paid: bool) -> dict:
    """Requests, tokens, dollars and hours of one LLM stage; completions at their `max_tokens` cap."""
    from asclepius_r.llm.client import RateLimiter

    prompt = _llm_tokens(prompt_chars) + MESSAGE_TOKENS * messages
    completion = requests * settings.max_tokens
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    minutes = max(
        requests / (settings.requests_per_minute * RateLimiter.HEADROOM),
        (prompt + completion) / (settings.tokens_per_minute * RateLimiter.HEADROOM),
    )
    priced = settings.model in settings.prices_per_million
    return {
        "stage": stage,
        "jobs": jobs,
        "gpus": 0,
        "model": settings.model,
        "mode": settings.mode,
        "paid": paid,
        "requests": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "usd_online": round(settings.price(usage), 2) if paid and priced else None,
        "usd_batch": round(settings.price(usage, batch=True), 2) if paid and priced else None,
        "hours_online": minutes / 60,
        "archive_bytes": int(prompt_chars + completion * GENERATED_CHARS_PER_TOKEN + ARCHIVE_RECORD_BYTES * requests),
    }


def instruction_row(config: dict, train_chars: np.ndarray, heldout_chars: np.ndarray) -> dict:
    """Both splits: a question and an answer request per note.

    The question prompt shows 3 seed questions and up to 2 generated ones, unknown before the
    run: counted as the task's 5 longest seeds, for the task whose prompt is longest. The answer
    prompt holds the generated question: counted as the longest seed question.
    """
    settings = LLMSettings.from_config(config["llm"])
    generation = GenerationSettings.from_config(config)
    seeds = load_seed_questions(generation.seed_questions)
    shown = generation.seeds_per_prompt + generation.pool_per_prompt
    question_frame = max(len(render_question_prompt(t, "", sorted(qs, key=len)[-shown:])) for t, qs in seeds.items())
    longest_question = max((q for qs in seeds.values() for q in qs), key=len)
    answer_frame = len(render_answer_prompt("", longest_question))
    notes = len(train_chars) + len(heldout_chars)
    chars = int(train_chars.sum() + heldout_chars.sum())
    row = _llm_row(
        "instructions",
        settings,
        jobs=2,
        requests=2 * notes,
        prompt_chars=2 * chars + notes * (question_frame + answer_frame),
        messages=2 * notes,
        paid=settings.backend != "replay",
    )
    # mimiciii_discharge.csv: the training notes again, with a question and an answer each.
    row["disk_bytes"] = int(train_chars.sum() + len(train_chars) * settings.max_tokens * 2 * GENERATED_CHARS_PER_TOKEN)
    return row


def evaluated_model_count(config: dict) -> int:
    return len(workflow_config.evaluated_models(config))


def judge_row(config: dict, heldout_chars: np.ndarray) -> dict:
    """One judge request per held-out question (at most one per held-out note) holding every
    model's answer at `evaluate.max_new_tokens`; replies that cannot be parsed are asked again
    (up to `judge.max_parse_attempts`), not counted here."""
    from asclepius_r.evaluate.judge import judge_llm_settings

    settings = judge_llm_settings(config)
    seeds = load_seed_questions(GenerationSettings.from_config(config).seed_questions)
    longest_question = max((q for qs in seeds.values() for q in qs), key=len)
    models = evaluated_model_count(config)
    frame = len(render_judge_prompt("", longest_question, [""] * models))
    items = len(heldout_chars)
    answer_chars = models * config["evaluate"]["max_new_tokens"] * GENERATED_CHARS_PER_TOKEN
    return _llm_row(
        "judge",
        settings,
        jobs=1,
        requests=items,
        prompt_chars=float(heldout_chars.sum()) + items * (frame + answer_chars),
        messages=items,
        paid=config["judge"]["backend"] == "llm" and settings.backend != "replay",
    )


# -- GPU stages ------------------------------------------------------------------------------
def gradient_bytes(shape: dict, params: int, devices: int, sharded: bool) -> int:
    """Gradient memory of one training process between and during micro-batches.

    Under FSDP the training code reduce-scatters every micro-batch's gradients
    (`sync_each_batch`), so a process keeps its fp32 shard of the accumulated gradients plus the
    whole gradients of the layers whose backward is in flight. Without that sync FSDP2 keeps every
    parameter's fp32 gradient whole on every rank until the step (4 bytes per parameter per GPU,
    what made 13B run out of memory). Without FSDP each process holds the whole fp32 gradients.
    """
    if not sharded:
        return GRADIENT_BYTES_PER_PARAM * params
    layer = (params - 2 * shape["vocab_size"] * shape["hidden_size"]) / shape["num_hidden_layers"]
    return int(GRADIENT_BYTES_PER_PARAM * params / devices + 2 * LAYER_GRADIENT_BYTES_PER_PARAM * layer)


def training_memory_bytes(shape: dict, params: int, settings: dict, stage: str, devices: int, sharded: bool) -> int:
    """Memory one training process needs: weights and optimizer state (sharded over `devices`
    under FSDP), gradients (`gradient_bytes`), activations of one micro-batch, fp32 logits and
    their gradient, FSDP's gathered layers, overhead."""
    h, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    # Fine-tuning trains one pack of at most max_length tokens per micro-batch.
    tokens = settings["max_length"] * (per_device_batch_size(settings) if stage == "pretrain" else 1)
    state = STATE_BYTES_PER_PARAM * params / (devices if sharded else 1)
    state += gradient_bytes(shape, params, devices, sharded)
    layer_set = ACTIVATION_BYTES_PER_HIDDEN * h * tokens
    if settings.get("gradient_checkpointing", True):
        activations = 2 * h * tokens * layers + layer_set
    else:
        activations = layer_set * layers
    logits = 8 * vocab * tokens
    gathered = 2 * 2 * (params - 2 * vocab * h) / layers if sharded else 0  # two bf16 layers in flight
    return int(state + activations + logits + gathered + GPU_OVERHEAD_BYTES)


def inference_memory_bytes(shape: dict, params: int, config: dict, on_gpu: bool) -> int:
    """Weights (bf16 on a GPU, fp32 on CPU), the KV cache of one batch (times its beams) at full
    length, overhead."""
    evaluate = config["evaluate"]
    context = shape.get("max_position_embeddings", 2048)
    length = (
        min(context, evaluate["max_prompt_tokens"] + evaluate["max_new_tokens"])
        if evaluate["max_prompt_tokens"]
        else context
    )
    weights = (2 if on_gpu else 4) * params
    sequences = evaluate["batch_size"] * evaluate.get("num_beams", 1)
    cache = sequences * length * shape["num_hidden_layers"] * 2 * shape["hidden_size"] * 2
    return int(weights + cache + GPU_OVERHEAD_BYTES)


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
            limit = settings.get("save_total_limit", SAVE_TOTAL_LIMIT)
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
                    # The Trainer writes a new checkpoint before it deletes the oldest one.
                    "checkpoint_bytes": (limit + 1) * CHECKPOINT_BYTES_PER_PARAM * params,
                    "disk_bytes": DTYPE_BYTES[settings.get("save_dtype", "bfloat16")] * params
                    + _side_files(config, size),
                }
            )
    return rows


def _side_files(config: dict, size: str) -> int:
    """Bytes of what an export copies from the base folder besides weights (tokenizer, configs)."""
    base = config["models"][size]["base"]
    folder = Path(base_dir(config, size) or "")
    weights = (".safetensors", ".bin", ".pt", ".index.json")
    if not base or not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and not f.name.endswith(weights))


def evaluation_row(config: dict, shapes: dict[str, tuple[dict, str]], heldout: int | None) -> dict:
    models = evaluated_model_count(config)
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


def per_device_batch_size(settings: dict) -> int:
    """Sequences per micro-batch: the setting (pretraining), TrainRun's default where unset."""
    from asclepius_r.train.run import TrainRun

    return settings.get("per_device_batch_size", TrainRun.per_device_batch_size)


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
    from asclepius_r.train.run import TrainRun
    from asclepius_r.train.throughput import FlopModel

    seeds = load_seed_questions(GenerationSettings.from_config(config).seed_questions)
    longest_question = max((q for qs in seeds.values() for q in qs), key=len)
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
        global_batch = settings.get("global_batch_size", TrainRun.global_batch_size)
        max_steps = settings.get("max_steps", -1)
        if stage == "pretrain":
            items = int((tokens + 2).sum()) // length
            batch = per_device_batch_size(settings)
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


# -- the plan --------------------------------------------------------------------------------
def _llm_problems(config: dict) -> list[str]:
    """What stops the LLM stages: settings that do not fit, an unapproved endpoint, no key, no price."""
    from asclepius_r.evaluate.judge import judge_llm_settings
    from asclepius_r.llm.guard import UnapprovedEndpointError, check_endpoint, endpoint_identity

    problems = []
    sections = [("llm", LLMSettings.from_config(config["llm"]))]
    if config["judge"]["backend"] == "llm":
        sections.append(("judge", judge_llm_settings(config)))
    for name, settings in sections:
        try:
            settings.check()
        except ValueError as error:
            problems.append(f"{name}: {error}")
            continue
        if settings.backend == "replay":
            if not Path(settings.archive).exists():
                problems.append(f"{name}: replay needs the archive {settings.archive}, which does not exist")
            continue
        try:
            check_endpoint(settings)
        except UnapprovedEndpointError:
            problems.append(
                f"{name}: unapproved endpoint {endpoint_identity(settings)!r}; list it in llm.approved_endpoints "
                "once it is confirmed to keep no data, not train on it and have no human review"
            )
        if not os.environ.get(settings.api_key_env):
            problems.append(f"{name}: the environment variable {settings.api_key_env} (llm.api_key_env) is not set")
        if settings.model not in settings.prices_per_million:
            problems.append(
                f"{name}: llm.prices_per_million has no price for {settings.model}: its dollars are not "
                "counted and llm.budget_usd cannot stop its spending"
            )
    return problems


def _missing_inputs(config: dict) -> list[str]:
    problems = []
    for key in workflow_config.data_paths(config):
        value = workflow_config.config_value(config, key)
        if not value:
            problems.append(f"{key} is not set")
        elif is_gguf_base(value) and key != "noteevents":
            if not gguf_file(value).is_file():
                problems.append(f"{key}: {gguf_missing(value)}")
        elif not is_built_base(value) and not Path(value).exists():
            problems.append(f"{key}: {value} does not exist")
    return problems


def make_plan(config: dict, notes_dir: str | Path | None, compute: bool = True, gpus: list[dict] | None = None) -> dict:
    """The plan of a run of `config` from the notes in `notes_dir` (None: not there yet)."""
    notes_dir = Path(notes_dir) if notes_dir else None
    shapes = {size: model_shape(config, size) for size in config["models"]}
    rows: list[dict] = []
    notes = None
    if notes_dir is not None:
        train, heldout = note_lengths(notes_dir / "discharge.parquet"), note_lengths(notes_dir / "heldout.parquet")
        notes = {
            "train": len(train),
            "heldout": len(heldout),
            "train_chars": int(train.sum()),
            "heldout_chars": int(heldout.sum()),
            "folder": str(notes_dir),
        }
        stored = sum(f.stat().st_size for f in notes_dir.rglob("*") if f.is_file())
        rows.append({"stage": "notes", "jobs": 1, "gpus": 0, "disk_bytes": stored})
        rows.append(instruction_row(config, train, heldout))
    training = training_rows(config, shapes)
    rows += training
    rows.append(evaluation_row(config, shapes, notes["heldout"] if notes else None))
    if notes is not None:
        rows.append(judge_row(config, heldout))
    exports = sum(r["disk_bytes"] for r in training)
    archives = sum(r.get("archive_bytes", 0) for r in rows)
    dataset = rows[1]["disk_bytes"] if notes else 0
    rows.append({"stage": "release", "jobs": 1, "gpus": 0, "disk_bytes": int(exports + archives + dataset)})
    gpus = visible_gpus() if gpus is None else gpus
    assumptions = {
        "llm_tokens": f"characters / {LLM_CHARS_PER_TOKEN:g} plus {MESSAGE_TOKENS} per message (an upper bound "
        "for GPT-4o-class tokenizers, about 4 characters per token on English)",
        "completion_tokens": "every request at its max_tokens cap (an upper bound)",
        "requests": "one attempt per request; retries, billed `length` responses and judge parse retries add to it",
        "instructions_prompts": "question prompts with the task's 5 longest seed questions as examples, answer "
        "prompts with the longest seed question",
        "hours_online": "requests and tokens paced at 98% of llm.requests_per_minute and llm.tokens_per_minute",
        "batch": "Batch API at llm.batch_discount; each batch may take up to 24 h",
        "checkpoints": f"save_total_limit + 1 checkpoints of {CHECKPOINT_BYTES_PER_PARAM} bytes per parameter "
        "(fp32 weights and Adam moments) per training job while it runs; deleted once it has exported",
        "memory_per_gpu": f"{STATE_BYTES_PER_PARAM} bytes per parameter of weights and Adam state (sharded over "
        f"the job's devices under FSDP); fp32 gradients: under FSDP a {GRADIENT_BYTES_PER_PARAM}-byte shard per "
        "parameter (reduce-scattered every micro-batch) plus two layers' whole gradients in flight, without FSDP "
        f"{GRADIENT_BYTES_PER_PARAM} bytes per parameter; activations with checkpointing, fp32 logits, 3 GiB overhead",
        "models": {size: source for size, (_, source) in shapes.items()},
    }
    if compute and notes_dir is not None:
        mfu = measured_mfu()
        peak, peak_source = _peak(config, gpus)
        assumptions["mfu"] = (
            f"{mfu[0]:g} measured on {mfu[1]} (BENCHMARKS.md)"
            if mfu
            else f"{DEFAULT_MFU:g} assumed (BENCHMARKS.md has no measured MFU)"
        )
        assumptions["peak_tflops_per_device"] = f"{peak:g} ({peak_source})"
        add_training_compute(config, training, shapes, notes_dir, peak, mfu[0] if mfu else DEFAULT_MFU)
    return {
        "notes": notes,
        "stages": rows,
        "totals": _totals(config, rows),
        "assumptions": assumptions,
        "missing": _missing_inputs(config) + _llm_problems(config) + ([] if notes else ["notes: not there yet"]),
        "budget_usd": config["llm"]["budget_usd"],
        "gpus_visible": gpus,
    }


def _peak(config: dict, gpus: list[dict]) -> tuple[float, str]:
    from asclepius_r.train.throughput import peak_tflops_of

    configured = {config["pretrain"].get("peak_tflops_per_device"), config["finetune"].get("peak_tflops_per_device")}
    configured.discard(None)
    if configured:
        return max(configured), "peak_tflops_per_device in the config"
    for gpu in gpus:
        peak = peak_tflops_of(gpu["name"])
        if peak:
            return peak, f"bf16 dense peak of the visible {gpu['name']}"
    return ASSUMED_PEAK_TFLOPS, "A100 assumed: no GPU visible here and peak_tflops_per_device is null"


def _totals(config: dict, rows: list[dict]) -> dict:
    def total(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) if values else None

    checkpoint = max((r.get("checkpoint_bytes", 0) for r in rows), default=0)
    disk = sum(r.get("disk_bytes", 0) + r.get("archive_bytes", 0) for r in rows)
    return {
        "requests": total("requests"),
        "usd": total("usd_batch" if config["llm"]["mode"] == "batch" else "usd_online"),
        "usd_online": total("usd_online"),
        "usd_batch": total("usd_batch"),
        "gpu_hours": total("gpu_hours"),
        "disk_bytes": disk,
        # One training job's checkpoints at a time beside everything the run keeps.
        "disk_peak_bytes": disk + checkpoint,
    }


# -- what the run then used -------------------------------------------------------------------
def _archive_usage(archive: str | Path, keys: set[str] | None) -> dict:
    """Requests and reported tokens of an archive's answered records (of `keys`; None: all)."""
    from asclepius_r.llm.archive import Archive

    results = [r for k, r in Archive(archive).results() if r["status"] == "ok" and (keys is None or k in keys)]
    reported = [r["usage"] for r in results if r.get("usage")]
    return {
        "responses": len(results),
        "prompt_tokens": sum(u.get("prompt_tokens", 0) for u in reported) if reported else None,
        "completion_tokens": sum(u.get("completion_tokens", 0) for u in reported) if reported else None,
    }


def _folder_bytes(folder: str | Path) -> int:
    folder = Path(folder)
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else folder.stat().st_size


def used_by_run(
    instruction_records: list[str],
    instruction_stats: list[str],
    llm_archive: str,
    judge_stats: str,
    judge_archive: str,
    models: dict[str, str],
    metrics: dict[str, str],
) -> dict:
    """What the run used, keyed like the plan's stages: LLM requests and the tokens the endpoint
    reported for the responses the outputs are made of (archived ones included) and the dollars
    this run paid; per training job its optimizer steps, real tokens, device-hours (from the
    metrics' per-window rates) and export size. `models` and `metrics` are keyed "stage size"."""
    from asclepius_r.files import read_jsonl

    keys = {
        r[k]
        for path in instruction_records
        for r in read_jsonl(path)
        for k in ("question_key", "answer_key")
        if r.get(k)
    }
    stats = [json.loads(Path(path).read_text())["llm"] for path in instruction_stats]
    judged = json.loads(Path(judge_stats).read_text())["client"]
    used = {
        "instructions": {
            "requests": sum(s["requests"] for s in stats),
            "usd_paid": round(sum(s["cost_usd"] for s in stats), 4),
            **_archive_usage(llm_archive, keys),
            "archive_bytes": _folder_bytes(llm_archive),
        },
        "judge": {
            "requests": judged["requests"],
            "usd_paid": judged["cost_usd"],
            **(_archive_usage(judge_archive, None) if Path(judge_archive).exists() else {}),
        },
    }
    for name, folder in models.items():
        summary = json.loads((Path(folder) / "training_run.json").read_text())
        records = read_jsonl(metrics[name])
        seconds = sum(r["real_tokens"] / r["tokens_per_s"] for r in records if r.get("tokens_per_s"))
        used[name] = {
            "steps": summary["global_step"],
            "train_tokens": sum(r["real_tokens"] for r in records),
            "gpu_hours": seconds * summary["world_size"] / 3600,
            "disk_bytes": _folder_bytes(folder),
        }
    return used


COMPARED = ("requests", "prompt_tokens", "completion_tokens", "steps", "train_tokens", "gpu_hours", "disk_bytes")


def compare(plan: dict, used: dict) -> list[dict]:
    """Planned against used, per stage and quantity; margin = planned / used - 1 (positive:
    the plan was above what the run used)."""
    out = []
    for row in plan["stages"]:
        name = row["stage"] + (f" {row['size']}" if row.get("size") else "")
        for quantity in COMPARED:
            planned, actual = row.get(quantity), used.get(name, {}).get(quantity)
            if planned is None or actual is None:
                continue
            margin = planned / actual - 1 if actual else None
            out.append({"stage": name, "quantity": quantity, "planned": planned, "used": actual, "margin": margin})
    return out


def write_plan_report(plan: dict, comparison: list[dict], used: dict, out_html) -> None:
    """The report page: the plan's table, then planned against used with the margin."""
    from asclepius_r.report.figures import _table, _write_html

    header, rows = table_rows(plan)
    checks = [
        [
            c["stage"],
            c["quantity"],
            _cell(c["planned"]),
            _cell(c["used"]),
            "-" if c["margin"] is None else f"{c['margin']:+.0%}",
        ]
        for c in comparison
    ]
    spent = [[stage, _cell(used[stage]["usd_paid"])] for stage in ("instructions", "judge")]
    notes = [
        [key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)]
        for key, value in plan["assumptions"].items()
    ]
    _write_html(
        out_html,
        "Plan and use",
        [
            _table("The plan, per stage (results/plan/plan.json)", header, rows),
            _table(
                "Planned against used (margin: planned / used - 1)",
                ["stage", "quantity", "planned", "used", "margin"],
                checks,
            ),
            _table("Dollars this run paid (responses already archived cost nothing)", ["stage", "USD"], spent),
            _table("Assumptions of the plan", ["what", "assumed"], notes),
            _table("Missing or unapproved when planned", ["item"], [[m] for m in plan["missing"]] or [["nothing"]]),
        ],
    )


# -- output ----------------------------------------------------------------------------------
COLUMNS = (
    ("stage", "stage", lambda r: r["stage"] + (f" {r['size']}" if r.get("size") else "")),
    ("jobs", "jobs", lambda r: r.get("jobs")),
    ("gpus", "GPUs/job", lambda r: r.get("gpus")),
    ("requests", "requests", lambda r: r.get("requests")),
    ("prompt", "prompt tok", lambda r: r.get("prompt_tokens")),
    ("completion", "compl. tok (max)", lambda r: r.get("completion_tokens")),
    ("usd_online", "$ online", lambda r: r.get("usd_online")),
    ("usd_batch", "$ batch", lambda r: r.get("usd_batch")),
    ("hours_online", "h at quota", lambda r: r.get("hours_online")),
    ("train_tokens", "train tok", lambda r: r.get("train_tokens")),
    ("steps", "steps", lambda r: r.get("steps")),
    ("gpu_hours", "GPU-h", lambda r: r.get("gpu_hours")),
    ("memory", "GiB/GPU", lambda r: r.get("memory_per_gpu_bytes") and r["memory_per_gpu_bytes"] / GIB),
    ("checkpoints", "checkpoints", lambda r: r.get("checkpoint_bytes") and size_text(r["checkpoint_bytes"])),
    ("disk", "disk", lambda r: size_text(r.get("disk_bytes", 0) + r.get("archive_bytes", 0))),
)


def size_text(size: float) -> str:
    """Bytes as GB (10^9) above 1 GB, else MB, to three figures."""
    return f"{size / GB:,.1f} GB" if size >= GB else f"{size / 1e6:.3g} MB"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table_rows(plan: dict) -> tuple[list[str], list[list[str]]]:
    """The plan's stages as a header and rows of text cells (for the terminal and the report)."""
    return [title for _, title, _ in COLUMNS], [[_cell(get(row)) for _, _, get in COLUMNS] for row in plan["stages"]]


def format_plan(plan: dict) -> str:
    header, rows = table_rows(plan)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in [header, *rows]
    ]
    totals = plan["totals"]
    lines += [
        "",
        f"total: {_cell(totals['requests'])} LLM requests, ${_cell(totals['usd'])} in the configured mode "
        f"(online ${_cell(totals['usd_online'])}, batch ${_cell(totals['usd_batch'])}; llm.budget_usd "
        f"{_cell(plan['budget_usd'])}), {_cell(totals['gpu_hours'])} GPU-hours, disk "
        f"{size_text(totals['disk_bytes'])} kept and {size_text(totals['disk_peak_bytes'])} at the peak",
        "assumptions:",
        *(f"  {key}: {value}" for key, value in plan["assumptions"].items()),
    ]
    lines += ["missing or unapproved:", *(f"  - {item}" for item in plan["missing"])] if plan["missing"] else []
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python -m asclepius_r.plan.estimate --config config.yaml`: print the plan and write it as JSON."""
    from asclepius_r.logs import setup_logging

    parser = argparse.ArgumentParser(description="What a run will cost, take and need, per stage, before it starts.")
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help="config file; repeat to lay one over another (like snakemake --configfile)",
    )
    parser.add_argument("--notes", default="results/notes", help="the notes stage's folder; run into it if missing")
    parser.add_argument("--json", default="results/plan/plan.json", help="where to write the plan as JSON")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = workflow_config.load_layers(args.config)
        notes = ensure_notes(config, args.notes)
        plan = make_plan(config, notes)
    except (workflow_config.ConfigError, ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    write_json(args.json, plan)
    print(format_plan(plan))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
