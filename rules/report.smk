# The Snakemake HTML report (`snakemake --report report.html`): each figure and table is a rule's
# output drawn from files in results/, with a caption in report/.


report: "../report/workflow.rst"


rule report_dataset:
    input:
        discharge="results/notes/discharge.parquet",
        heldout="results/notes/heldout.parquet",
        notes_stats="results/notes/stats.json",
        discharge_stats="results/instructions/discharge.stats.json",
        heldout_stats="results/instructions/heldout.stats.json",
    output:
        lengths=report(
            "results/report/note_lengths.png",
            caption="../report/note_lengths.rst",
            category="1. Data",
        ),
        table=report(
            "results/report/dataset.html",
            caption="../report/dataset.rst",
            category="1. Data",
        ),
    log:
        "logs/report/dataset.log",
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/report_dataset.py"


rule report_training:
    input:
        lambda wildcards: expand("results/metrics/{stage}-{size}.jsonl", stage=wildcards.stage, size=SIZES),
    output:
        report(
            "results/report/training-{stage}.png",
            caption="../report/training.rst",
            category="2. Training",
            labels={"stage": "{stage}"},
        ),
    log:
        "logs/report/training-{stage}.log",
    wildcard_constraints:
        stage="pretrain|finetune",
    conda:
        "../envs/data.yaml"
    params:
        sizes=SIZES,
    script:
        "../scripts/report_training.py"


rule report_models:
    input:
        pretrained=[pretrained_dir(size) for size in SIZES],
        finetuned=[finetuned_dir(size) for size in SIZES],
    output:
        report(
            "results/report/models.html",
            caption="../report/models.rst",
            category="2. Training",
        ),
    log:
        "logs/report/models.log",
    conda:
        "../envs/data.yaml"
    params:
        sizes=SIZES,
    script:
        "../scripts/report_models.py"


rule report_evaluation:
    input:
        summary="results/evaluation/summary.json",
        per_model="results/evaluation/scores_per_model.tsv",
        per_task="results/evaluation/scores_per_task.tsv",
        judge_stats="results/evaluation/judge/stats.json",
    output:
        judge=report(
            "results/report/judge_scores.png",
            caption="../report/judge_scores.rst",
            category="3. Evaluation",
        ),
        rouge=report(
            "results/report/rouge_l.png",
            caption="../report/rouge_l.rst",
            category="3. Evaluation",
        ),
        tables=report(
            "results/report/evaluation.html",
            caption="../report/evaluation.rst",
            category="3. Evaluation",
        ),
    log:
        "logs/report/evaluation.log",
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/report_evaluation.py"


# Only where evaluate.report_answers asks for it: the answers are derived from the notes.
rule report_answers:
    input:
        records="results/instructions/heldout.jsonl",
        answers=expand("results/evaluation/answers/{model}.jsonl", model=workflow_config.evaluated_models(config)),
    output:
        report(
            "results/report/answers.html",
            caption="../report/answers.rst",
            category="3. Evaluation",
        ),
    log:
        "logs/report/answers.log",
    conda:
        "../envs/data.yaml"
    params:
        models=workflow_config.evaluated_models(config),
    script:
        "../scripts/report_answers.py"


REPORT_ITEMS = [
    "results/report/plan.html",
    "results/report/note_lengths.png",
    "results/report/dataset.html",
    *expand("results/report/training-{stage}.png", stage=["pretrain", "finetune"]),
    "results/report/models.html",
    "results/report/judge_scores.png",
    "results/report/rouge_l.png",
    "results/report/evaluation.html",
    *(["results/report/answers.html"] if config["evaluate"]["report_answers"] else []),
]
