"""Rule write_dataset: accepted records -> mimiciii_discharge.csv."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.instructions.generate import write_dataset

write_dataset(snakemake.input.notes, snakemake.input.records, snakemake.output[0])
