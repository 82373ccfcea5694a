"""Rule report_plan: the plan beside what the run used, with the margin."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

import json
from pathlib import Path

from asclepius_r.plan.table import write_plan_report
from asclepius_r.plan.usage import compare, used_by_run

inputs, params = snakemake.input, snakemake.params
plan = json.loads(Path(inputs.plan).read_text())
used = used_by_run(
    inputs.records,
    inputs.instruction_stats,
    params.llm_archive,
    inputs.judge_stats,
    params.judge_archive,
    models=dict(zip(params.names, inputs.models)),
    metrics=dict(zip(params.names, inputs.metrics)),
)
write_plan_report(plan, compare(plan, used), used, snakemake.output[0])
