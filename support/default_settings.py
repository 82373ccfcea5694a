"""Settings objects of the schema's defaults with a test's values laid over them.

The schema is the one place a default is written: a test takes the defaults from it
(`config.defaults`) through the class's own `from_config`, never from a copy of its numbers.
"""

from __future__ import annotations

from dataclasses import replace

from asclepius_r.base_model.tiny import TinyLlamaSpec
from asclepius_r.config import defaults
from asclepius_r.evaluate.generation import Decoding
from asclepius_r.evaluate.judge import JudgeSettings
from asclepius_r.instructions.generate import GenerationSettings
from asclepius_r.llm import LLMSettings
from asclepius_r.notes.stage import NotePolicy, SplitPolicy
from asclepius_r.train.run import TrainRun

# The tests' tiny models keep the seed of their random weights they were written with.
TINY_SEED = 0


def llm_settings(**values) -> LLMSettings:
    # The schema's archive is the workflow's results/llm/archive.jsonl; a test names its own or none.
    return LLMSettings.from_config(defaults("llm", **{"archive": None, **values}))


def note_policy(**values) -> NotePolicy:
    return replace(NotePolicy.from_config(defaults("notes")), **values)


def split_policy(**values) -> SplitPolicy:
    return replace(SplitPolicy.from_config(defaults()), **values)


def generation_settings(**values) -> GenerationSettings:
    return replace(GenerationSettings.from_config(defaults()), **values)


def decoding(**values) -> Decoding:
    return Decoding.from_config(defaults("evaluate", **values))


def judge_settings(**values) -> JudgeSettings:
    return replace(JudgeSettings.from_config(defaults()), **values)


def tiny_spec(**values) -> TinyLlamaSpec:
    return TinyLlamaSpec(**{**defaults("tiny_model"), "seed": TINY_SEED, "family": "llama1", **values})


def train_run(stage: str = "pretrain", **values) -> TrainRun:
    """A `stage` run of a tiny base (context 2048) with no files, the schema's settings, `values` over them."""
    config = defaults(models={"tiny": {"base": "tiny"}})
    files = dict(base_model="", data="", output_dir="", checkpoint_dir="", metrics_file="")
    files.update(truncation_file=None, data_cache_dir=None)
    return replace(TrainRun.from_config(config, stage, "tiny", **files), **values)
