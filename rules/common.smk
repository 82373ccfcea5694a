# Config validation (first, before any job), cross-stage paths and the target list.
import os
import re
import sys

sys.path.insert(0, workflow.basedir)
# Jobs (scripts and `python -m` commands) import the package from this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (workflow.basedir, os.environ.get("PYTHONPATH")) if p
)

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
    return ["release", "results/evaluation/summary.json"]
