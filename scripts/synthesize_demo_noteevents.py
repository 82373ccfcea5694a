"""Rule synthesize_demo_noteevents: the demo's synthetic NOTEEVENTS.csv."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from support.synthetic_notes import demo_rows, load_demo_notes, write_noteevents

write_noteevents(snakemake.output[0], demo_rows(load_demo_notes()))
