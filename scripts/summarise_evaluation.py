"""Rule summarise_evaluation: scores per model and per task."""
from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.evaluate import summarise

summarise(dict(zip(snakemake.params.models, snakemake.input)), snakemake.output[0])
