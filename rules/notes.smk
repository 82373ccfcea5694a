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
    conda:
        "../envs/train.yaml"
    params:
        notes=config["synthetic_notes"],
        seed=config["seed"],
    script:
        "../scripts/synthesize_long_noteevents.py"


# One streaming pass over the file (pyarrow's CSV reader, on `threads` threads), the kept notes spilled to disk until
# the held-out patients are known: memory stays flat at any input size (BENCHMARKS.md, notes stage).
rule filter_notes:
    input:
        noteevents=noteevents_path,
        exclude_row_ids=config["notes"]["exclude_row_ids"] or [],
    output:
        # Parquet datasets: folders of part files
        train=directory("results/notes/discharge.parquet"),
        heldout=directory("results/notes/heldout.parquet"),
        heldout_ids="results/notes/heldout_row_ids.txt",
        stats="results/notes/stats.json",
    log:
        "logs/notes/filter_notes.log",
    conda:
        "../envs/data.yaml"
    threads: 4
    resources:
        mem_mb=1500,
    params:
        notes=config["notes"],
        seed=config["seed"],
    script:
        "../scripts/filter_notes.py"
