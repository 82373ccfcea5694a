"""Rule report_models: every configured model side by side (base, max_length, truncation counts)."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.report.figures import models_table

inputs = snakemake.input
models_table(dict(zip(snakemake.params.sizes, zip(inputs.pretrained, inputs.finetuned))), snakemake.output[0])
