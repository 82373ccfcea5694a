"""Rules pretrain and finetune: launch the stage's training module on the job's GPUs or CPU.

The rule's params hold what determines the model (its rerun trigger); the run takes every
setting, operational ones (logging, saving, the process-group timeout) included, from the config.
"""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.train.launch import launch
from asclepius_r.train.run import TrainRun

config, stage = snakemake.config, snakemake.rule
launch_settings = config["launch"]
run = TrainRun.from_config(
    config,
    stage,
    snakemake.wildcards.size,
    base_model=snakemake.input.base,
    data=snakemake.input.data,
    output_dir=snakemake.output.model,
    checkpoint_dir=snakemake.params.checkpoints,
    metrics_file=snakemake.output.metrics,
    truncation_file=snakemake.output.get("truncation"),
    data_cache_dir=snakemake.params.data_cache,
)
launch(
    stage,
    run,
    gpus=snakemake.resources.gpu,
    accelerate_config=launch_settings["accelerate_config"],
    cpu_processes=launch_settings["cpu_processes"],
    threads=snakemake.threads,
    cpu_fallback=launch_settings["cpu_fallback"],
)
