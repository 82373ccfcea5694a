"""Rule judge_heldout: every model's answer to a held-out question in one judge prompt, scored 1-4.

The rule's params hold what determines the verdicts; endpoint, quotas and retries come from the config.
"""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.evaluate.heldout import heldout_items
from asclepius_r.evaluate.judge import JudgeSettings, judge_client, run_judge_stage

config = snakemake.config
items = heldout_items(snakemake.input.notes, snakemake.input.records)
with judge_client(config, {i["row_id"]: i["reference"] for i in items}) as client:
    run_judge_stage(
        items,
        dict(zip(snakemake.params.models, snakemake.input.answers)),
        snakemake.output.verdicts,
        snakemake.output.stats,
        client=client,
        settings=JudgeSettings.from_config(config),
    )
