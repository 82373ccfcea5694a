"""Rule report_evaluation: judge and ROUGE-L plots per task and model, and the score tables."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.report.figures import evaluation_plots, evaluation_tables

inputs, outputs = snakemake.input, snakemake.output
evaluation_plots(inputs.summary, outputs.judge, outputs.rouge)
evaluation_tables(inputs.per_model, inputs.per_task, inputs.judge_stats, outputs.tables)
