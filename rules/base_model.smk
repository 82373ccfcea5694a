# Stage 3: the base model. Paper: a Hugging Face folder per model from config. Demo: a tiny LLaMA
# made here, LLaMA-1-style (`base: tiny`) or Llama-3-style (`base: tiny-llama3`). A GGUF file
# (`base: some.gguf`, or `smollm2` for the pinned SmolLM2) is converted here into a base folder.


rule build_tiny_llama:
    input:
        notes="results/notes/discharge.parquet",
        tokenizer=lambda wildcards: tiny_spec(config, wildcards.size)["tokenizer_model"] or [],
    output:
        directory("results/base_models/{size}"),
    log:
        "logs/base_model/{size}.log",
    wildcard_constraints:
        size=models_whose_base(lambda base: base in TINY_BASES),
    conda:
        "../envs/train.yaml"
    params:
        spec=lambda wildcards: tiny_spec(config, wildcards.size),
        seed=config["seed"],
        family=lambda wildcards: TINY_BASES[config["models"][wildcards.size]["base"]],
    script:
        "../scripts/build_tiny_llama.py"


# Dequantized once into an ordinary HF base folder (fp32 safetensors, config.json, tokenizer).
rule convert_gguf_base:
    input:
        gguf_base_file,
    output:
        directory("results/base_models/{size}"),
    log:
        "logs/base_model/{size}.log",
    wildcard_constraints:
        size=models_whose_base(is_gguf_base),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/convert_gguf_base.py"
