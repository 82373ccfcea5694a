"""Rule generate_instructions: one question and answer per note through the LLM client.

The rule's params hold what determines the dataset; the client's operational settings (endpoint,
quotas, retries, budget) come from the config.
"""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.instructions.generate import GenerationSettings, run_instruction_stage
from asclepius_r.llm import LLMClient, LLMSettings

settings = snakemake.config
with LLMClient(LLMSettings.from_config(settings["llm"])) as client:
    run_instruction_stage(
        snakemake.input.notes,
        records_out=snakemake.output.records,
        stats_out=snakemake.output.stats,
        client=client,
        settings=GenerationSettings.from_config(settings),
    )
