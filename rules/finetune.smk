# Stage 5: instruction fine-tuning from the pretrained-only checkpoint -> Asclepius-R-{size}.


rule finetune:
    input:
        data="results/mimiciii_discharge.csv",
        base="results/models/Asclepius-R-{size}-Pretrained-Only",
    output:
        model=directory("results/models/Asclepius-R-{size}"),
        metrics="results/metrics/finetune-{size}.jsonl",
    log:
        "logs/finetune/{size}.log",
    conda:
        "../envs/train.yaml"
    threads: config["launch"]["threads"]
    resources:
        gpu=lambda wildcards: config["models"][wildcards.size]["gpus"],
    params:
        settings=training_params("finetune"),
        launch=config["launch"],
        checkpoints="results/checkpoints/finetune-{size}",
    script:
        "../scripts/train.py"
