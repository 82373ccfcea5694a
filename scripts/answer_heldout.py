"""Rule answer_heldout: one model's answers to the held-out questions, with ROUGE-L, on a claimed GPU.

The rule's params hold what determines the answers; the batch size and the CPU fallback come from the config.
"""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.evaluate.generation import Decoding
from asclepius_r.evaluate.heldout import answer_heldout

options = snakemake.config["evaluate"]
answer_heldout(
    snakemake.input.model,
    snakemake.input.notes,
    snakemake.input.records,
    snakemake.output[0],
    decoding=Decoding.from_config(options),
    batch_size=options["batch_size"],
    max_prompt_tokens=options["max_prompt_tokens"],
    truncation=snakemake.params.truncation,
    job=f"{snakemake.rule}-{snakemake.wildcards.model}",
    gpus=snakemake.resources.gpu,
    seed=snakemake.params.seed,
    cpu_fallback=snakemake.config["launch"]["cpu_fallback"],
)
