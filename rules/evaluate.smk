# Stage 6: answers for the held-out questions from every model, scored against references.


rule answer_heldout:
    input:
        model=lambda wildcards: evaluated_models()[wildcards.model],
        notes="results/notes/heldout.parquet",
        records="results/instructions/heldout.jsonl",
    output:
        "results/evaluation/answers/{model}.jsonl",
    log:
        "logs/evaluate/answer_{model}.log",
    params:
        evaluate=config["evaluate"],
    threads: config["launch"]["threads"]
    resources:
        gpu=1,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/answer_heldout.py"


rule summarise_evaluation:
    input:
        expand("results/evaluation/answers/{model}.jsonl", model=evaluated_models()),
    output:
        "results/evaluation/summary.json",
    log:
        "logs/evaluate/summary.log",
    params:
        models=list(evaluated_models()),
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/summarise_evaluation.py"
