"""Rule convert_gguf_base: a LLaMA GGUF file dequantized into an HF base folder."""

from asclepius_r.logs import setup_logging

setup_logging(snakemake.log[0])

from asclepius_r.base_model.gguf import convert_gguf

convert_gguf(snakemake.input[0], snakemake.output[0])
