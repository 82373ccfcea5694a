# Stage 2: one LLM-generated question and answer per note -> mimiciii_discharge.csv.


rule generate_instructions:
    input:
        notes="results/notes/{split}.parquet",
        archive=replayed_archive,
    output:
        records="results/instructions/{split}.jsonl",
        stats="results/instructions/{split}.stats.json",
    log:
        "logs/instructions/{split}.log",
    conda:
        "../envs/llm.yaml"
    # What determines the dataset; the client's operational settings come from the config.
    params:
        instructions=config["instructions"],
        llm=determining("llm"),
        seed=config["seed"],
    script:
        "../scripts/generate_instructions.py"


rule write_dataset:
    input:
        notes="results/notes/discharge.parquet",
        records="results/instructions/discharge.jsonl",
    output:
        "results/mimiciii_discharge.csv",
    log:
        "logs/instructions/write_dataset.log",
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/write_dataset.py"
