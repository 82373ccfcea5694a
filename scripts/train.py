"""Rules pretrain and finetune: launch the stage's training module on the job's GPUs or CPU."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.train.launch import launch
from asclepius_r.train.run import TrainRun

run = TrainRun(
    base_model=snakemake.input.base,
    data=snakemake.input.data,
    output_dir=snakemake.output.model,
    checkpoint_dir=snakemake.params.checkpoints,
    metrics_file=snakemake.output.metrics,
    truncation_file=snakemake.output.get("truncation"),
    data_cache_dir=snakemake.params.get("data_cache"),
    **snakemake.params.settings,
)
launch(
    snakemake.rule,
    run,
    gpus=snakemake.resources.gpu,
    accelerate_config=snakemake.params.launch["accelerate_config"],
    cpu_processes=snakemake.params.launch["cpu_processes"],
    threads=snakemake.threads,
)
