"""Rule summarise_evaluation: judge scores and cheap metrics per model and per task."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.evaluate.heldout import summarise

summarise(
    dict(zip(snakemake.params.models, snakemake.input.answers)),
    snakemake.input.verdicts,
    snakemake.output.summary,
    snakemake.output.per_model,
    snakemake.output.per_task,
    dict(zip(snakemake.params.models, snakemake.input.losses)),
)
