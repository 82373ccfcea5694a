# Stage 3: the base model. Paper: a LLaMA folder from config. Demo: a tiny LLaMA made here.


rule build_tiny_llama:
    input:
        notes="results/notes/discharge.parquet",
        tokenizer=config["tiny_model"]["tokenizer_model"] or [],
    output:
        directory("results/base_models/{size}"),
    log:
        "logs/base_model/{size}.log",
    conda:
        "../envs/train.yaml"
    params:
        spec=config["tiny_model"],
        seed=config["seed"],
        family=lambda wildcards: TINY_BASES[config["models"][wildcards.size]["base"]],
    script:
        "../scripts/build_tiny_llama.py"
