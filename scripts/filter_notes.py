"""Rule filter_notes: NOTEEVENTS.csv -> discharge and held-out notes."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.notes.stage import NotePolicy, SplitPolicy, run_notes_stage

settings = {"notes": snakemake.params.notes, "seed": snakemake.params.seed}
run_notes_stage(
    snakemake.input.noteevents,
    discharge_out=snakemake.output.train,
    heldout_out=snakemake.output.heldout,
    heldout_ids_out=snakemake.output.heldout_ids,
    stats_out=snakemake.output.stats,
    policy=NotePolicy.from_config(settings["notes"]),
    split=SplitPolicy.from_config(settings),
    threads=snakemake.threads,
)
