# Config validation (first, before any job), cross-stage paths and the target list.
# Scripts import the package through scripts/asclepius_r (a link to ../asclepius_r), since
# Snakemake puts the script's folder on sys.path; that also holds inside conda envs.
import re
import sys

sys.path.insert(0, workflow.basedir)

from asclepius_r import config as workflow_config

try:
    workflow_config.resolve(config)
except workflow_config.ConfigError as error:
    raise WorkflowError(str(error)) from None

SIZES = sorted(config["models"])


wildcard_constraints:
    size="|".join(re.escape(s) for s in SIZES),
    split="discharge|heldout",


def base_model_dir(wildcards):
    base = config["models"][wildcards.size]["base"]
    return f"results/base_models/{wildcards.size}" if base == "tiny" else base


def replayed_archive(wildcards):
    """In replay mode the archive is an input: a changed archive reruns generation."""
    llm = config["llm"]
    return [llm["archive"]] if llm["backend"] == "replay" else []


def pretrained_dir(size):
    return f"results/models/Asclepius-R-{size}-Pretrained-Only"


def finetuned_dir(size):
    return f"results/models/Asclepius-R-{size}"


def evaluated_models():
    """Model name -> checkpoint folder for every model the evaluation compares."""
    models = {}
    for size in SIZES:
        base = config["models"][size]["base"]
        models[f"LLaMA-{size}"] = (
            f"results/base_models/{size}" if base == "tiny" else base
        )
        models[f"Asclepius-R-{size}-Pretrained-Only"] = pretrained_dir(size)
        models[f"Asclepius-R-{size}"] = finetuned_dir(size)
    models.update(config["evaluate"]["extra_models"])
    return models


def training_params(stage):
    return lambda wildcards: workflow_config.training_settings(
        config, stage, wildcards.size
    )


def final_outputs():
    return ["release", "results/evaluation/summary.json", *REPORT_ITEMS]
