"""Rule build_tiny_llama: a tokenizer of the model's family (trained on the notes) and a random-init tiny LLaMA."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.base_model.tiny import TinyLlamaSpec, build_tiny_llama

spec = TinyLlamaSpec(**snakemake.params.spec, seed=snakemake.params.seed, family=snakemake.params.family)
build_tiny_llama(snakemake.input.notes, snakemake.output[0], spec)
