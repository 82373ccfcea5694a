"""Rule report_dataset: note-length histograms and the dataset statistics table."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.report.figures import dataset_statistics, note_length_histogram

inputs = snakemake.input
note_length_histogram({"training": inputs.discharge, "held out": inputs.heldout}, snakemake.output.lengths)
dataset_statistics(
    inputs.notes_stats, {"discharge": inputs.discharge_stats, "heldout": inputs.heldout_stats}, snakemake.output.table
)
