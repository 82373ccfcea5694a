"""Rule report_training: loss, throughput and MFU curves of one training stage."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.report.figures import training_curves

training_curves(snakemake.wildcards.stage, dict(zip(snakemake.params.sizes, snakemake.input)), snakemake.output[0])
