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
    conda:
        "../envs/train.yaml"
    threads: config["launch"]["threads"]
    resources:
        gpu=1,
    params:
        evaluate=determining("evaluate"),
        truncation=finetune_truncation,
        seed=config["seed"],
    script:
        "../scripts/answer_heldout.py"


# What pretraining and fine-tuning optimise, on what neither trained on: held-out note perplexity
# and the teacher-forced loss of the reference answers (asclepius_r/evaluate/losses.py).
rule heldout_losses:
    input:
        model=evaluated_model_dir,
        notes="results/notes/heldout.parquet",
        records="results/instructions/heldout.jsonl",
    output:
        "results/evaluation/losses/{model}.json",
    log:
        "logs/evaluate/losses_{model}.log",
    conda:
        "../envs/train.yaml"
    threads: config["launch"]["threads"]
    resources:
        gpu=1,
    params:
        max_length=config["evaluate"]["loss_max_length"],
        truncation=finetune_truncation,
    script:
        "../scripts/heldout_losses.py"


rule judge_heldout:
    input:
        answers=expand("results/evaluation/answers/{model}.jsonl", model=workflow_config.evaluated_models(config)),
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
    conda:
        "../envs/llm.yaml"
    params:
        models=workflow_config.evaluated_models(config),
        judge=determining("judge"),
        llm=determining("llm"),
        seed=config["seed"],
    script:
        "../scripts/judge_heldout.py"


rule summarise_evaluation:
    input:
        answers=expand("results/evaluation/answers/{model}.jsonl", model=workflow_config.evaluated_models(config)),
        losses=expand("results/evaluation/losses/{model}.json", model=workflow_config.evaluated_models(config)),
        verdicts="results/evaluation/judge/verdicts.jsonl",
    output:
        summary="results/evaluation/summary.json",
        per_model="results/evaluation/scores_per_model.tsv",
        per_task="results/evaluation/scores_per_task.tsv",
    log:
        "logs/evaluate/summary.log",
    conda:
        "../envs/data.yaml"
    params:
        models=workflow_config.evaluated_models(config),
    script:
        "../scripts/summarise_evaluation.py"
