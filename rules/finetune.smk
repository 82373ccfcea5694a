# Stage 5: instruction fine-tuning from the pretrained-only checkpoint -> Asclepius-R-{size}.


rule finetune:
    input:
        data="results/mimiciii_discharge.csv",
        base="results/models/Asclepius-R-{size}-Pretrained-Only",
    output:
        model=directory("results/models/Asclepius-R-{size}"),
        metrics="results/metrics/finetune-{size}.jsonl",
        truncation="results/metrics/finetune-{size}-truncation.json",
    log:
        "logs/finetune/{size}.log",
    conda:
        "../envs/train.yaml"
    threads: config["launch"]["threads"]
    resources:
        gpu=lambda wildcards: config["models"][wildcards.size]["gpus"],
    params:
        settings=training_params("finetune"),
        checkpoints="results/checkpoints/finetune-{size}",
        # Tokenised examples (datasets' Arrow cache), kept across reruns and shared by sizes.
        data_cache="results/cache/finetune-data",
    script:
        "../scripts/train.py"
