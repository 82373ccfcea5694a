"""Base models: a tiny LLaMA built on the spot for the demo, or a real LLaMA folder checked.

The tiny model has LLaMA-1's tokenizer layout (a SentencePiece BPE model with unk/bos/eos =
0/1/2, byte fallback and split digits, trained here on the training notes) and a randomly
initialised LlamaForCausalLM, saved in Hugging Face format with `tokenizer.model` beside it.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyLlamaSpec:
    vocab_size: int = 600
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 2048
    seed: int = 0
    tokenizer_model: str | None = None  # a SentencePiece file to use instead of training one


def train_llama1_style_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model with LLaMA-1's special-token layout; returns the model bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        max_sentence_length=1 << 20,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def save_tokenizer_folder(folder: Path, sentencepiece_model: bytes) -> None:
    """Write tokenizer.model and the HF tokenizer files converted from it."""
    from transformers import AutoTokenizer

    (folder / "tokenizer.model").write_bytes(sentencepiece_model)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
            }
        )
    )
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)


def build_tiny_llama(notes_path: str | Path, out_dir: str | Path, spec: TinyLlamaSpec) -> None:
    """Train the tokenizer on the notes file and save a random-init LLaMA in HF format."""
    from .notes import read_notes

    build_tiny_llama_from_texts([n["text"] for n in read_notes(notes_path)], out_dir, spec)


def tiny_llama_tokenizer(texts: list[str], spec: TinyLlamaSpec) -> bytes:
    """The spec's SentencePiece model (its size checked against vocab_size), or one trained on `texts`."""
    if not spec.tokenizer_model:
        return train_llama1_style_tokenizer(texts, spec.vocab_size)
    import sentencepiece as spm

    model = Path(spec.tokenizer_model).read_bytes()
    size = spm.SentencePieceProcessor(model_proto=model).vocab_size()
    if size != spec.vocab_size:
        raise ValueError(
            f"config key tiny_model.vocab_size: {spec.vocab_size}, but tiny_model.tokenizer_model "
            f"{spec.tokenizer_model} has {size} pieces"
        )
    return model


def build_tiny_llama_from_texts(texts: list[str], out_dir: str | Path, spec: TinyLlamaSpec) -> None:
    """A random-init LLaMA in HF format with the spec's tokenizer (or one trained on `texts`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    tokenizer = tiny_llama_tokenizer(texts, spec)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_tokenizer_folder(tmp, tokenizer)
        model.save_pretrained(tmp)
    log.info(
        "tiny LLaMA: %d parameters, vocabulary %d, saved to %s",
        sum(p.numel() for p in model.parameters()),
        spec.vocab_size,
        out_dir,
    )


def check_base_model(folder: str | Path) -> None:
    """A real base model must be a HF LLaMA folder with the original `tokenizer.model`."""
    folder = Path(folder)
    missing = [name for name in ("config.json", "tokenizer.model") if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"base model {folder}: missing {', '.join(missing)} "
            "(expected a Hugging Face LLaMA folder with its SentencePiece tokenizer.model)"
        )


def copy_tokenizer_model(base: str | Path, out: str | Path) -> None:
    """Every checkpoint keeps the base model's original SentencePiece file (transformers 5 drops it)."""
    source = Path(base) / "tokenizer.model"
    if source.exists():
        # Atomic, so a job killed mid-copy never leaves a truncated file in a checkpoint.
        with atomic_path(Path(out) / "tokenizer.model") as tmp:
            shutil.copy2(source, tmp)
