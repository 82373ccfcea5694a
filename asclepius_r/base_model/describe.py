"""What a base model folder offers the workflow (`describe_base`): its tokenizer family, BOS/EOS,
context length and vocabulary, checked before any job trains on it; and where each configured
model's base lies (`base_dir`), a tiny one being built by the workflow (`tiny.py`) and a GGUF file
converted by it (`gguf.py`).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from asclepius_r.base_model.gguf_reader import gguf_file, gguf_shape, is_gguf_base
from asclepius_r.config import ConfigError, check_section
from asclepius_r.errors import BaseModelError, UserError
from asclepius_r.files import atomic_path

log = logging.getLogger(__name__)

# `models.NAME.base` values that build a tiny model, and the tokenizer family each gets.
TINY_BASES = {"tiny": "llama1", "tiny-llama3": "llama3"}

# The files of a BPE tokenizer that a derived checkpoint copies from its base.
BPE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# transformers' model_max_length when a tokenizer sets none (int(1e30)); anything this large is no context length.
_NO_MAX_LENGTH = 10**18


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


def is_built_base(base: str | None) -> bool:
    """Whether the workflow makes the base folder itself (a tiny model, or a converted GGUF file)."""
    return base in TINY_BASES or is_gguf_base(base)


def base_dir(config: dict, name: str) -> str | None:
    """The base model folder of model `name`: made under results/ for a tiny or GGUF base, else the configured one."""
    base = config["models"][name]["base"]
    return f"results/base_models/{name}" if is_built_base(base) else base


def tiny_spec(config: dict, name: str) -> dict:
    """The tiny base of model `name`: the tiny_model section with models.NAME.tiny_model over it
    (TinyLlamaSpec's fields; the family comes from `base`, TINY_BASES), checked against the schema."""
    spec = {**config["tiny_model"], **config["models"][name].get("tiny_model", {})}
    # The section itself passed `resolve`, so what fails here is the model's override.
    check_section(spec, "tiny_model", f"models.{name}.tiny_model")
    return spec


def check_tiny_specs(config: dict) -> None:
    """Every tiny base's merged spec, checked before the DAG (a wrong override is named there)."""
    for name, model in config["models"].items():
        if model["base"] in TINY_BASES:
            tiny_spec(config, name)


def base_context(config: dict, name: str) -> int | None:
    """Positions the base of model `name` has; None while a real base folder is not there yet."""
    base = config["models"][name]["base"]
    if base in TINY_BASES:
        return tiny_spec(config, name)["max_position_embeddings"]
    if is_gguf_base(base):
        path = gguf_file(base)
        return gguf_shape(path)["max_position_embeddings"] if path.is_file() else None
    if not base or not (Path(base) / "config.json").exists():
        return None
    try:
        return describe_base(base).context_length
    except UserError as error:
        raise ConfigError(f"config key models.{name}.base: {error}") from None
