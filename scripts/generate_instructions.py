"""Rule generate_instructions: one question and answer per note through the LLM client."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r import config
from asclepius_r.instructions import run_instruction_stage
from asclepius_r.llm import LLMClient

settings = {k: snakemake.params[k] for k in ("instructions", "llm", "seed")}
with LLMClient(config.llm_settings(settings)) as client:
    run_instruction_stage(
        snakemake.input.notes,
        records_out=snakemake.output.records,
        stats_out=snakemake.output.stats,
        client=client,
        settings=config.generation_settings(settings),
    )
