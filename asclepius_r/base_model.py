"""Base models: what a base folder offers the workflow (`describe_base`), and a tiny LLaMA built on
the spot for the demo and the rehearsal, in either tokenizer family.

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
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .files import atomic_path

log = logging.getLogger(__name__)

# `models.NAME.base` values that build a tiny model, and the tokenizer family each gets.
TINY_BASES = {"tiny": "llama1", "tiny-llama3": "llama3"}

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
# The files of a BPE tokenizer that a derived checkpoint copies from its base.
BPE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# transformers' model_max_length when a tokenizer sets none (int(1e30)); anything this large is no context length.
_NO_MAX_LENGTH = 10**18


class BaseModelError(InputError):
    """A base model folder the workflow cannot use; the message names the folder and what is missing."""


@dataclass(frozen=True)
class BaseInfo:
    """What the workflow takes from a base model folder (see `describe_base`)."""

    folder: str
    family: str  # "sentencepiece" (tokenizer.model, LLaMA-1/2) or "bpe" (tokenizer.json, Llama-3.x)
    tokenizer_files: tuple[str, ...]  # copied unchanged into every checkpoint derived from it
    bos_id: int
    bos_token: str
    eos_id: int
    eos_token: str
    pad_id: int | None
    pad_token: str | None
    context_length: int
    vocab_size: int
    architecture: str


def _special_token(value) -> str | None:
    """A tokenizer_config.json special-token entry: a string, or transformers 4's AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path, problems: list[str]) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        problems.append(f"{path.name} unreadable ({error})")
        return {}


def tokenizer_files(folder: str | Path) -> tuple[str, ...]:
    """The base's own tokenizer files: `tokenizer.model` when there is one (the original SentencePiece
    model is authoritative; transformers 5 drops it and 4.x cannot read what 5 writes), otherwise
    the BPE `tokenizer.json` with its config files; () when there is neither."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        return ("tokenizer.model",)
    if (folder / "tokenizer.json").is_file():
        return tuple(name for name in BPE_TOKENIZER_FILES if (folder / name).is_file())
    return ()


def _vocabulary(folder: Path, files: tuple[str, ...], settings: dict, problems: list[str]) -> tuple[str, dict, dict]:
    """(family, token -> id, the tokenizer's own special tokens) of a base folder's tokenizer."""
    if files == ("tokenizer.model",):
        import sentencepiece as spm

        try:
            processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        except (OSError, RuntimeError) as error:
            problems.append(f"tokenizer.model is not a SentencePiece model ({error})")
            return "sentencepiece", {}, {}
        vocab = {processor.id_to_piece(i): i for i in range(processor.vocab_size())}
        # Tokens that transformers 4 added on top of the SentencePiece model (e.g. a pad token).
        for index, token in settings.get("added_tokens_decoder", {}).items():
            vocab.setdefault(token["content"], int(index))
        own = {
            kind: processor.id_to_piece(index)
            for kind, index in (("bos", processor.bos_id()), ("eos", processor.eos_id()))
            if index >= 0
        }
        return "sentencepiece", vocab, own
    path = folder / "tokenizer.json"
    try:
        data = json.loads(path.read_text())
        kind = data["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        problems.append(f"tokenizer.json unreadable ({error!r})")
        return "bpe", {}, {}
    if kind != "BPE":
        problems.append(f"tokenizer.json is a {kind} tokenizer; only SentencePiece or BPE ones are handled")
        return "bpe", {}, {}
    # Read as JSON rather than loaded by `tokenizers`, which would also build every merge (BENCHMARKS.md).
    return "bpe", data["model"]["vocab"] | {token["content"]: token["id"] for token in data.get("added_tokens", [])}, {}


def describe_base(folder: str | Path) -> BaseInfo:
    """What a Hugging Face base model folder gives the workflow, read from its own files: the
    tokenizer family and files, BOS/EOS/pad, the context length (config.json's
    max_position_embeddings, else the tokenizer's model_max_length), the vocabulary size and the
    architecture. Raises BaseModelError naming the folder and everything missing: config.json, a
    tokenizer it can handle, a LlamaForCausalLM-compatible architecture, special tokens in the
    vocabulary, an embedding with a row for every token (it may have more: padded embeddings are
    common and harmless)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BaseModelError(f"base model {folder}: not a folder")
    problems: list[str] = []
    config = {}
    if (folder / "config.json").is_file():
        config = _read_json(folder / "config.json", problems)
    else:
        problems.append("no config.json")
    files = tokenizer_files(folder)
    if not files:
        problems.append("no tokenizer it can handle: neither a SentencePiece tokenizer.model nor a BPE tokenizer.json")
    if problems:
        raise BaseModelError(f"base model {folder}: {'; '.join(problems)}")

    architectures = config.get("architectures") or []
    if "LlamaForCausalLM" in architectures or (not architectures and config.get("model_type") == "llama"):
        architecture = "LlamaForCausalLM"
    else:
        architecture = ", ".join(architectures) or f"model_type {config.get('model_type')!r}"
        problems.append(f"config.json architecture {architecture} is not LlamaForCausalLM-compatible")

    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config file wins, as in transformers
        if (folder / name).is_file():
            settings |= _read_json(folder / name, problems)
    family, vocab, own = _vocabulary(folder, files, settings, problems)
    special = {kind: _special_token(settings.get(f"{kind}_token")) or own.get(kind) for kind in ("bos", "eos", "pad")}
    for kind in ("bos", "eos"):
        if not special[kind]:
            problems.append(f"no {kind.upper()} token (tokenizer_config.json {kind}_token)")
    for kind, token in special.items():
        if token and vocab and token not in vocab:
            problems.append(f"{kind.upper()} token {token!r} is not in the tokenizer's vocabulary")

    context = config.get("max_position_embeddings") or settings.get("model_max_length")
    if not isinstance(context, int) or not 0 < context < _NO_MAX_LENGTH:
        problems.append("no context length (config.json max_position_embeddings)")
    size = max(vocab.values()) + 1 if vocab else 0
    embedding = config.get("vocab_size")
    if not isinstance(embedding, int):
        problems.append("no vocab_size in config.json")
    elif vocab and size > embedding:
        problems.append(
            f"the tokenizer has {size} tokens but the model's embedding only {embedding} (config.json vocab_size)"
        )
    if problems:
        raise BaseModelError(f"base model {folder}: {'; '.join(problems)}")
    return BaseInfo(
        folder=str(folder),
        family=family,
        tokenizer_files=files,
        bos_id=vocab[special["bos"]],
        bos_token=special["bos"],
        eos_id=vocab[special["eos"]],
        eos_token=special["eos"],
        pad_id=vocab[special["pad"]] if special["pad"] else None,
        pad_token=special["pad"],
        context_length=context,
        vocab_size=size,
        architecture=architecture,
    )


def check_base_model(folder: str | Path) -> BaseInfo:
    """A base model the training can start from: `describe_base`'s checks, and weights to load."""
    info = describe_base(folder)
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((Path(folder) / name).is_file() for name in weights):
        raise BaseModelError(f"base model {folder}: no weights (none of {', '.join(weights)})")
    return info


def copy_tokenizer_model(base: str | Path, out: str | Path) -> None:
    """Every checkpoint carries its base's own tokenizer files unchanged, whichever the family
    (`tokenizer_files`): what transformers 5 writes is neither the original nor readable by 4.x."""
    for name in tokenizer_files(base):
        # Atomic, so a job killed mid-copy never leaves a truncated file in a checkpoint.
        with atomic_path(Path(out) / name) as tmp:
            shutil.copy2(Path(base) / name, tmp)


@dataclass(frozen=True)
class TinyLlamaSpec:
    vocab_size: int = 600
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 2048
    seed: int = 0
    # A real vocabulary instead of one trained on the notes: a SentencePiece tokenizer.model
    # (llama1), or a tokenizer.json or the folder holding it (llama3).
    tokenizer_model: str | None = None
    family: str = "llama1"  # a value of TINY_BASES


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
    from .notes import read_notes

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
