"""A model's pretraining or fine-tuning settings: the stage's section with the model's overrides.

The Snakemake rules pass what of these determines the model to the training job as params
(`config.determining`), so such a changed setting reruns the stage and what follows, and an
operational one (logging, saving, micro-batch size) none; `max_length` is capped by the base's
context here, in one place.
"""

from __future__ import annotations

from asclepius_r.base_model.describe import base_context
from asclepius_r.config import ConfigError, schema

# Training keys that only one stage reads; elsewhere they are an error rather than silently unused.
STAGE_ONLY_KEYS = {"truncation": "finetune", "note_attention": "pretrain", "per_device_batch_size": "pretrain"}


def training_settings(config: dict, stage: str, name: str, context: int | None = None) -> dict:
    """The stage's settings (the resolved section, so every key is there) with model `name`'s
    overrides applied; unknown keys name their place.

    `max_length` is a cap: the model trains at the smaller of it and its base's context (given, or
    `base_context`), so LLaMA-1 keeps 2048 and Llama-3 gets its 8,192 under one config.
    """
    merged = {**config[stage], **config["models"][name].get(stage, {})}
    allowed = set(schema()["$defs"]["training"]["properties"])
    unknown = sorted(set(merged) - allowed)
    if unknown:
        raise ConfigError(f"config key models.{name}.{stage}: unknown key(s) {', '.join(unknown)}")
    for key in sorted(merged.keys() & STAGE_ONLY_KEYS.keys()):
        if STAGE_ONLY_KEYS[key] != stage:
            raise ConfigError(f"config key {stage}.{key}: a {STAGE_ONLY_KEYS[key]} setting only")
    context = context or base_context(config, name)
    lengths = [n for n in (merged.get("max_length"), context) if n is not None]
    if not lengths:
        raise ConfigError(
            f"config key models.{name}.{stage}.max_length: the base folder is not there to read its context "
            f"from; set {stage}.max_length"
        )
    # The other stage's keys are no setting of this one: None, so that every TrainRun field is given.
    elsewhere = {key: None for key, owner in STAGE_ONLY_KEYS.items() if owner != stage}
    return {"seed": config["seed"], **elsewhere, **merged, "max_length": min(lengths)}
