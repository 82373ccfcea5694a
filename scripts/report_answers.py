"""Rule report_answers: the held-out answers of every model beside the reference answers."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.report.figures import answers_side_by_side

answers_side_by_side(
    snakemake.input.records, dict(zip(snakemake.params.models, snakemake.input.answers)), snakemake.output[0]
)
