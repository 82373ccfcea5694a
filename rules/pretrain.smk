# Stage 4: causal-LM pretraining on the notes -> Asclepius-R-{size}-Pretrained-Only.


rule pretrain:
    input:
        data="results/notes/discharge.parquet",
        base=base_model_dir,
    output:
        model=directory("results/models/Asclepius-R-{size}-Pretrained-Only"),
        metrics="results/metrics/pretrain-{size}.jsonl",
    log:
        "logs/pretrain/{size}.log",
    conda:
        "../envs/train.yaml"
    threads: config["launch"]["threads"]
    resources:
        gpu=lambda wildcards: config["models"][wildcards.size]["gpus"],
    params:
        settings=training_params("pretrain"),
        checkpoints="results/checkpoints/pretrain-{size}",
        # Tokenised notes (datasets' Arrow cache), kept across reruns and shared by sizes.
        data_cache="results/cache/pretrain-data",
    script:
        "../scripts/train.py"
