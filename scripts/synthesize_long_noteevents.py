"""Rule synthesize_long_noteevents: the rehearsal's NOTEEVENTS.csv, with paper-shaped note lengths."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from support.synthetic_notes import write_long_noteevents

write_long_noteevents(
    snakemake.output[0],
    snakemake.input.tokenizer,
    snakemake.params.notes["discharge_summaries"],
    snakemake.params.notes["median_tokens"],
    snakemake.params.notes["sigma"],
    snakemake.params.seed,
)
