"""Rule plan: the run's plan from the config, the notes and the base tokenizers.

Remade when what determines the outputs changes (the rule's params); its operational figures
(hours at the quotas, the budget) are those of the config it was made with: `make plan` and the
preflight at every run's start recompute them.
"""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from pathlib import Path

from asclepius_r.files import write_json
from asclepius_r.plan.estimate import make_plan

write_json(snakemake.output[0], make_plan(snakemake.config, Path(snakemake.input.notes).parent))
