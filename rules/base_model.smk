# Stage 3: the base model. Paper: a Hugging Face folder per model from config. Demo: a tiny LLaMA
# made here, LLaMA-1-style (`base: tiny`) or Llama-3-style (`base: tiny-llama3`).


rule build_tiny_llama:
    input:
        notes="results/notes/discharge.parquet",
        tokenizer=lambda wildcards: tiny_spec(config, wildcards.size)["tokenizer_model"] or [],
    output:
        directory("results/base_models/{size}"),
    log:
        "logs/base_model/{size}.log",
    conda:
        "../envs/train.yaml"
    params:
        spec=lambda wildcards: tiny_spec(config, wildcards.size),
        seed=config["seed"],
        family=lambda wildcards: TINY_BASES[config["models"][wildcards.size]["base"]],
    script:
        "../scripts/build_tiny_llama.py"
