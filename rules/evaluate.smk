# Stage 6: answers for the held-out questions from every model, the judge's 1-4 scores for all
# answers to a question at once, and cheap metrics beside them.


rule answer_heldout:
    input:
        model=evaluated_model_dir,
        notes="results/notes/heldout.parquet",
        records="results/instructions/heldout.jsonl",
    output:
        "results/evaluation/answers/{model}.jsonl",
    log:
        "logs/evaluate/answer_{model}.log",
    params:
        evaluate=config["evaluate"],
        truncation=workflow_config.truncation_policy(config),
        seed=config["seed"],
    threads: config["launch"]["threads"]
    resources:
        gpu=1,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/answer_heldout.py"


rule judge_heldout:
    input:
        answers=expand(
            "results/evaluation/answers/{model}.jsonl", model=evaluated_models()
        ),
        notes="results/notes/heldout.parquet",
        records="results/instructions/heldout.jsonl",
        # Replaying a recorded judge run: its archive is an input, like the dataset's.
        archive=lambda wildcards: (
            [config["judge"]["archive"]]
            if config["judge"]["backend"] == "llm" and config["llm"]["backend"] == "replay"
            else []
        ),
    output:
        verdicts="results/evaluation/judge/verdicts.jsonl",
        stats="results/evaluation/judge/stats.json",
    log:
        "logs/evaluate/judge.log",
    params:
        models=evaluated_models(),
        judge=config["judge"],
        llm=config["llm"],
        seed=config["seed"],
    conda:
        "../envs/llm.yaml"
    script:
        "../scripts/judge_heldout.py"


rule summarise_evaluation:
    input:
        answers=expand(
            "results/evaluation/answers/{model}.jsonl", model=evaluated_models()
        ),
        verdicts="results/evaluation/judge/verdicts.jsonl",
    output:
        summary="results/evaluation/summary.json",
        per_model="results/evaluation/scores_per_model.tsv",
        per_task="results/evaluation/scores_per_task.tsv",
    log:
        "logs/evaluate/summary.log",
    params:
        models=evaluated_models(),
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/summarise_evaluation.py"
