"""Rule plan: the run's plan from the config, the notes and the base tokenizers."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from pathlib import Path

from asclepius_r.files import write_json
from asclepius_r.plan.estimate import make_plan

write_json(snakemake.output[0], make_plan(snakemake.params.config, Path(snakemake.input.notes).parent))
