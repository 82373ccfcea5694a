# Config validation (first, before any job), cross-stage paths, the target list and the preflight
# (run by the onstart hook in plan.smk).
# Scripts import the package through scripts/asclepius_r (a link to ../asclepius_r), since
# Snakemake puts the script's folder on sys.path; that also holds inside conda envs.
import re
import sys
from types import SimpleNamespace

sys.path.insert(0, workflow.basedir)

from snakemake.logging import logger

from asclepius_r import config as workflow_config
from asclepius_r.base_model.describe import TINY_BASES, base_dir, check_tiny_specs, tiny_spec
from asclepius_r.base_model.gguf_reader import gguf_file, gguf_missing, is_gguf_base
from asclepius_r.evaluate.heldout import truncation_policy
from asclepius_r.plan import preflight
from asclepius_r.train.settings import training_settings

try:
    workflow_config.resolve(config, require_data=False)
    check_tiny_specs(config)
except workflow_config.ConfigError as error:
    raise WorkflowError(str(error)) from None

# The configured models by name (7B, 13B, llama3-8B); the {size} wildcard is one of them.
SIZES = sorted(config["models"])


wildcard_constraints:
    size="|".join(re.escape(s) for s in SIZES),
    split="discharge|heldout",


def data_path(key):
    """The data path at a dotted config key; unset, it stops the DAG (dry runs too), saying
    what to set. Only the keys of the jobs in the DAG are asked for, so one stage runs alone
    (the notes stage needs no base model). Checked here rather than at parse time so that
    `snakemake --lint` works on config.yaml.
    """
    try:
        workflow_config.check_data_paths(config, [key])
    except workflow_config.ConfigError as error:
        raise WorkflowError(str(error)) from None
    return workflow_config.config_value(config, key)


def noteevents_path(wildcards):
    return data_path("noteevents")


def long_notes_tokenizer(wildcards):
    """The tokenizer the rehearsal's note lengths are counted in (rule synthesize_long_noteevents)."""
    tokenizer = config["tiny_model"]["tokenizer_model"]
    if not tokenizer:
        raise WorkflowError(
            "results/rehearsal/NOTEEVENTS.csv counts note lengths in tokens: set "
            "tiny_model.tokenizer_model (as rehearsal/config.yaml does)"
        )
    return tokenizer


def models_whose_base(made_by):
    """A {size} pattern of the models whose base `made_by(base)` says the workflow makes (none: matches nothing)."""
    names = [name for name in SIZES if made_by(config["models"][name]["base"])]
    return "|".join(re.escape(name) for name in names) or "(?!)"


def gguf_base_file(wildcards):
    """The GGUF file a model's base is converted from; stops the DAG, saying what to do, while it is not there."""
    base = config["models"][wildcards.size]["base"]
    if not gguf_file(base).is_file():
        raise WorkflowError(f"config key models.{wildcards.size}.base: {gguf_missing(base)}")
    return str(gguf_file(base))


def base_model_dir(wildcards):
    data_path(f"models.{wildcards.size}.base")
    return base_dir(config, wildcards.size)


def replayed_archive(wildcards):
    """In replay mode the archive is an input: a changed archive reruns generation."""
    llm = config["llm"]
    return [llm["archive"]] if llm["backend"] == "replay" else []


def pretrained_dir(size):
    return f"results/models/{workflow_config.release_names(size)[0]}"


def finetuned_dir(size):
    return f"results/models/{workflow_config.release_names(size)[1]}"


def evaluated_model_dir(wildcards):
    """The checkpoint folder of one evaluated model."""
    name = wildcards.model
    if name in config["evaluate"]["extra_models"]:
        return config["evaluate"]["extra_models"][name]
    if name.startswith(workflow_config.BASE_PREFIX):
        return base_model_dir(SimpleNamespace(size=name.removeprefix(workflow_config.BASE_PREFIX)))
    return f"results/models/{name}"


def training_params(stage):
    """What of the stage's settings for the job's model determines it (max_length capped by its
    base's context); the job reads the rest from the config."""

    def settings(wildcards):
        try:
            return workflow_config.determining(training_settings(config, stage, wildcards.size), "#/$defs/training")
        except workflow_config.ConfigError as error:
            raise WorkflowError(str(error)) from None

    return settings


def determining(key):
    """The part of config section `key` that determines outputs: what a rule's params hold, so
    that an operational key (endpoint, quota, retries, budget, batch size) reruns no job. Scripts
    read the whole section from snakemake.config."""
    return workflow_config.determining(config[key] if key else config, key)


def finetune_truncation(wildcards):
    """The truncation policy an evaluated model's prompts are cut by: its own model's
    finetune.truncation (per-model overrides included); extra models take the finetune section's."""
    return truncation_policy(config, wildcards.model)


def final_outputs():
    return ["release", "results/evaluation/summary.json", *REPORT_ITEMS]


def run_preflight():
    """Check the jobs about to run against the plan (disk, GPUs, base folders, budget)."""
    from snakemake_interface_executor_plugins.settings import ExecMode

    if workflow.touch or workflow.exec_mode != ExecMode.DEFAULT:
        return  # --touch starts no job; a remote job's own process is not the run's start
    limit = workflow.global_resources.get("gpu")
    jobs = [
        preflight.Job(job.rule.name, dict(job.wildcards_dict), int(job.resources.get("gpu", 0) or 0))
        for job in workflow.dag.needrun_jobs()
    ]
    try:
        checked = preflight.check(config, jobs, local=workflow.local_exec, gpu_limit=getattr(limit, "value", limit))
    except preflight.PreflightError as error:
        raise WorkflowError(str(error)) from None
    if checked:
        logger.info("preflight passed: " + "; ".join(checked["preflight"]["checked"]))
