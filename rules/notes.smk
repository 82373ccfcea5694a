# Stage 1: NOTEEVENTS.csv -> discharge summaries for training + held-out notes for evaluation.


rule synthesize_demo_noteevents:
    output:
        "results/demo/NOTEEVENTS.csv",
    log:
        "logs/notes/synthesize_demo_noteevents.log",
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/synthesize_demo_noteevents.py"


# The rehearsal's notes: discharge summaries as long as MIMIC-III's, in the tiny LLaMA's tokens.
rule synthesize_long_noteevents:
    input:
        tokenizer=long_notes_tokenizer,
    output:
        "results/rehearsal/NOTEEVENTS.csv",
    log:
        "logs/notes/synthesize_long_noteevents.log",
    params:
        notes=config["synthetic_notes"],
        seed=config["seed"],
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/synthesize_long_noteevents.py"


# One compiled pass over the memory-mapped file (asclepius_r/record_scanner.c), then the kept notes'
# texts read back into the outputs: 5x faster than pandas, memory under 1 GB at any input size
# (bench/notes_filter.py). Scan workers: threads + 1.
rule filter_notes:
    input:
        noteevents=noteevents_path,
        exclude_row_ids=config["notes"]["exclude_row_ids"] or [],
    output:
        # Parquet datasets: folders of part files that the stage writes in parallel
        train=directory("results/notes/discharge.parquet"),
        heldout=directory("results/notes/heldout.parquet"),
        heldout_ids="results/notes/heldout_row_ids.txt",
        stats="results/notes/stats.json",
    log:
        "logs/notes/filter_notes.log",
    params:
        notes=config["notes"],
        seed=config["seed"],
    threads: 4
    resources:
        mem_mb=1500,
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/filter_notes.py"
