"""A tiny LLaMA built on the spot for the demo and the rehearsal, in either tokenizer family.

- `llama1` (LLaMA-1/2): a SentencePiece `tokenizer.model` (BPE with byte fallback and split
  digits, unk/bos/eos = 0/1/2); `models.NAME.base: tiny`.
- `llama3` (Llama-3.x): a byte-level BPE `tokenizer.json` with Llama-3's pre-tokenizer, its special
  tokens after the regular vocabulary and `<|begin_of_text|>` added as BOS by the post-processor;
  `models.NAME.base: tiny-llama3`.

The tiny model's tokenizer is trained here on the training notes (or is a given real vocabulary,
`tiny_model.tokenizer_model`), and its weights are a randomly initialised LlamaForCausalLM, saved
in Hugging Face format.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from asclepius_r.base_model.describe import TINY_BASES
from asclepius_r.files import atomic_path

log = logging.getLogger(__name__)

# Llama-3's pre-tokenizer split (as in its tokenizer.json): contractions, letters with one leading
# non-letter, numbers of 1-3 digits, punctuation runs, newlines, then other whitespace.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"
# A tiny Llama-3-style model keeps the first 16 of Llama-3's 256 special tokens (every named one):
# at a demo-sized vocabulary of a few hundred, all 256 would leave almost no room for merges.
TINY_LLAMA3_SPECIAL_TOKENS = 16


@dataclass(frozen=True)
class TinyLlamaSpec:
    """A tiny base: the `tiny_model` section (`describe.tiny_spec`, with the model's overrides),
    the seed of its random weights, and its family."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    # A real vocabulary instead of one trained on the notes: a SentencePiece tokenizer.model
    # (llama1), or a tokenizer.json or the folder holding it (llama3).
    tokenizer_model: str | None
    seed: int
    family: str  # a value of TINY_BASES


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


def llama3_special_tokens(count: int = 256) -> list[str]:
    """The first `count` of Llama-3's special tokens, in the order of their ids after the regular vocabulary."""
    named = {0: LLAMA3_BOS, 1: LLAMA3_EOS, 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "<|eot_id|>"}
    reserved = (f"<|reserved_special_token_{i}|>" for i in range(count))
    return [named[i] if i in named else next(reserved) for i in range(count)]


def llama3_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


def llama3_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: list[str]):
    """A `tokenizers.Tokenizer` with Llama-3's pipeline over a byte-level BPE vocabulary and its merges;
    the special tokens take the ids after the vocabulary, and BOS is prepended to every text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    # ignore_merges: a pre-token that is itself in the vocabulary stays one token, as in tiktoken
    # and llama.cpp; applying the merges can split it otherwise (llama.cpp's case 'Cửa Việt').
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = llama3_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    bos = tokenizer.token_to_id(LLAMA3_BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA3_BOS} $A", pair=f"{LLAMA3_BOS} $A {LLAMA3_BOS}:1 $B:1", special_tokens=[(LLAMA3_BOS, bos)]
    )
    return tokenizer


def train_llama3_style_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with Llama-3's pipeline and special-token layout, trained on `texts`:
    `vocab_size` ids in all, the last TINY_LLAMA3_SPECIAL_TOKENS of them special."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    regular = vocab_size - TINY_LLAMA3_SPECIAL_TOKENS
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = llama3_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=regular, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bare.train_from_iterator(texts, trainer)
    model = json.loads(bare.to_str())["model"]
    if len(model["vocab"]) != regular:
        raise ValueError(
            f"config key tiny_model.vocab_size: {vocab_size} asks for {regular} regular tokens and "
            f"{TINY_LLAMA3_SPECIAL_TOKENS} special ones, but the notes give {len(model['vocab'])} regular tokens "
            "(at least 256, the bytes)"
        )
    merges = [tuple(merge) for merge in model["merges"]]
    return llama3_tokenizer(model["vocab"], merges, llama3_special_tokens(TINY_LLAMA3_SPECIAL_TOKENS))


def save_llama3_tokenizer_folder(folder: Path, tokenizer, context_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json as a Llama-3 base ships them,
    without a chat template."""
    special = {"bos_token": LLAMA3_BOS, "eos_token": LLAMA3_EOS}
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def build_tiny_llama(notes_path: str | Path, out_dir: str | Path, spec: TinyLlamaSpec) -> None:
    """Train the tokenizer on the notes file and save a random-init LLaMA in HF format."""
    from asclepius_r.notes.stage import read_notes

    build_tiny_llama_from_texts([n["text"] for n in read_notes(notes_path)], out_dir, spec)


def _given_tokenizer(spec: TinyLlamaSpec):
    """The real vocabulary at tiny_model.tokenizer_model, in the spec's family."""
    path = Path(spec.tokenizer_model)
    if spec.family == "llama1":
        return path.read_bytes()
    from tokenizers import Tokenizer

    path = path / "tokenizer.json" if path.is_dir() else path
    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.token_to_id(LLAMA3_BOS) is None:
        raise ValueError(f"config key tiny_model.tokenizer_model: {path} has no {LLAMA3_BOS} (not a Llama-3 tokenizer)")
    return tokenizer


def tiny_llama_tokenizer(texts: list[str], spec: TinyLlamaSpec):
    """The spec's tokenizer (llama1: SentencePiece model bytes, llama3: a `tokenizers.Tokenizer`): the
    given real vocabulary, its size checked against vocab_size, or one trained on `texts`."""
    if spec.family not in TINY_BASES.values():
        raise ValueError(f"tiny model family {spec.family!r}: expected one of {', '.join(TINY_BASES.values())}")
    if not spec.tokenizer_model:
        train = train_llama1_style_tokenizer if spec.family == "llama1" else train_llama3_style_tokenizer
        return train(texts, spec.vocab_size)
    tokenizer = _given_tokenizer(spec)
    if spec.family == "llama1":
        import sentencepiece as spm

        size = spm.SentencePieceProcessor(model_proto=tokenizer).vocab_size()
    else:
        size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != spec.vocab_size:
        raise ValueError(
            f"config key tiny_model.vocab_size: {spec.vocab_size}, but tiny_model.tokenizer_model "
            f"{spec.tokenizer_model} has {size} pieces"
        )
    return tokenizer


def build_tiny_llama_from_texts(texts: list[str], out_dir: str | Path, spec: TinyLlamaSpec) -> None:
    """A random-init LLaMA in HF format with the spec's tokenizer (or one trained on `texts`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_llama_tokenizer(texts, spec)
    if spec.family == "llama1":
        bos_id, eos_id = 1, 2
    else:
        bos_id, eos_id = tokenizer.token_to_id(LLAMA3_BOS), tokenizer.token_to_id(LLAMA3_EOS)
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with atomic_path(out_dir, is_dir=True) as tmp:
        if spec.family == "llama1":
            save_tokenizer_folder(tmp, tokenizer)
        else:
            save_llama3_tokenizer_folder(tmp, tokenizer, spec.max_position_embeddings)
        model.save_pretrained(tmp)
    log.info(
        "tiny LLaMA (%s tokenizer): %d parameters, vocabulary %d, saved to %s",
        spec.family,
        sum(p.numel() for p in model.parameters()),
        spec.vocab_size,
        out_dir,
    )
