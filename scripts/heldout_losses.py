"""Rule heldout_losses: one model's held-out note perplexity and reference-answer loss, on a claimed GPU."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.evaluate.losses import heldout_losses

heldout_losses(
    snakemake.input.model,
    snakemake.input.notes,
    snakemake.input.records,
    snakemake.output[0],
    max_length=snakemake.params.max_length,
    truncation=snakemake.params.truncation,
    job=f"{snakemake.rule}-{snakemake.wildcards.model}",
    gpus=snakemake.resources.gpu,
    cpu_fallback=snakemake.config["launch"]["cpu_fallback"],
)
