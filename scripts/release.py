"""Rule release: the PhysioNet release folder."""
from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from pathlib import Path

from asclepius_r.release import build_release

checkpoints = snakemake.input.pretrained + snakemake.input.finetuned
build_release(
    snakemake.output[0],
    models={Path(folder).name: folder for folder in checkpoints},
    files={
        "mimiciii_discharge.csv": snakemake.input.dataset,
        "heldout_row_ids.txt": snakemake.input.heldout_ids,
    },
)
