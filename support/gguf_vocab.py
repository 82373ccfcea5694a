"""The real LLaMA-1 and Llama-3 tokenizers, rebuilt from the vocabularies that llama.cpp ships as GGUF.

llama.cpp keeps vocabulary-only GGUF files (`models/ggml-vocab-<name>.gguf`) with reference
tokenizations beside them (`.gguf.inp`: texts separated by `__ggml_vocab_test__` lines,
`.gguf.out`: one line of token ids per text), and the PyPI source distribution of
`llama-cpp-python` vendors them. This module fetches that sdist once with pip (cached outside the
repository, never committed), reads a vocabulary's GGUF metadata, writes it as the tokenizer files
its family uses, and checks the result against every reference tokenization, so the rehearsal's
tiny models have the exact vocabularies without any model download:
- `llama1` (`ggml-vocab-llama-spm.gguf`, tokenizer model `llama`): LLaMA-1's SentencePiece
  `tokenizer.model`, 32,000 pieces;
- `llama3` (`ggml-vocab-llama-bpe.gguf`, model `gpt2`, pre-tokenizer `llama-bpe`): a Hugging Face
  folder (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) with Llama-3's
  byte-level BPE, 128,000 regular tokens and 256 special ones, BOS `<|begin_of_text|>`.

    python -m support.gguf_vocab [--family llama1] OUT/tokenizer.model [--cache DIR]
    python -m support.gguf_vocab --family llama3 OUT_FOLDER [--cache DIR]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asclepius_r.files import atomic_path, cache_dir

log = logging.getLogger(__name__)

# The sdist is pinned so that the vocabulary and its reference tokenizations never change under us.
LLAMA_CPP_PYTHON = ("llama-cpp-python", "0.3.36")
VOCAB_DIR_IN_SDIST = "vendor/llama.cpp/models"
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"
# The llama.cpp vocabulary of each tokenizer family.
FAMILY_VOCABS = {"llama1": "llama-spm", "llama3": "llama-bpe"}
# llama.cpp's token types (its llama_token_type): regular tokens, and the special ones a BPE
# tokenizer adds after them (control and user-defined).
_NORMAL, _SPECIAL = 1, (3, 4)


class VocabUnavailable(RuntimeError):
    """The llama-cpp-python sdist could not be fetched (no package index, or pip failed)."""


def fetch_sdist(cache: Path | None = None) -> Path:
    """The pinned llama-cpp-python sdist, downloaded by pip on first use into `cache`/sdist."""
    name, version = LLAMA_CPP_PYTHON
    folder = (cache or cache_dir()) / "sdist"
    target = folder / f"{name.replace('-', '_')}-{version}.tar.gz"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        # --no-binary for this package only: its build requirements still come as wheels, which pip
        # needs to read the sdist's metadata (--no-binary :all: builds them from source, minutes).
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        command += ["--no-binary", name, "--dest", tmp, f"{name}=={version}"]
        log.info("fetching %s %s from the package index (once; cached in %s)", name, version, folder)
        done = subprocess.run(command, capture_output=True, text=True)
        fetched = Path(tmp) / target.name
        if done.returncode or not fetched.exists():
            raise VocabUnavailable(
                f"pip could not download the {name}=={version} source distribution "
                f"(exit {done.returncode}): {done.stderr.strip()[-600:]}"
            )
        fetched.replace(target)
    return target


def extract_vocab(name: str, cache: Path | None = None) -> Path:
    """`ggml-vocab-<name>.gguf` with its `.inp`/`.out` references, extracted once into `cache`/vocab."""
    cache = cache or cache_dir()
    folder = cache / "vocab" / f"{LLAMA_CPP_PYTHON[0]}-{LLAMA_CPP_PYTHON[1]}"
    gguf = folder / f"ggml-vocab-{name}.gguf"
    files = [gguf, gguf.with_name(gguf.name + ".inp"), gguf.with_name(gguf.name + ".out")]
    if all(f.exists() for f in files):
        return gguf
    sdist = fetch_sdist(cache)
    root = sdist.name.removesuffix(".tar.gz")
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as archive:
        for path in files:
            member = f"{root}/{VOCAB_DIR_IN_SDIST}/{path.name}"
            try:
                source = archive.extractfile(member)
            except KeyError:
                raise FileNotFoundError(f"{sdist}: no {member} (is {name!r} a llama.cpp vocabulary?)") from None
            with atomic_path(path) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(source, out)
    return gguf


# GGUF metadata value types (ggml's gguf.h): scalar struct formats, 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str | Path) -> dict:
    """The key/value metadata of a GGUF file (version 2 or 3); tensors are not read."""
    data = Path(path).read_bytes()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {data[:4]!r})")
    version, _tensors, n_values = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version}, expected 2 or 3")
    offset = 24

    def string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", data, at)
        return data[at + 8 : at + 8 + length].decode("utf-8"), at + 8 + length

    def value(kind: int, at: int):
        if kind in _SCALARS:
            return struct.unpack_from(_SCALARS[kind], data, at)[0], at + struct.calcsize(_SCALARS[kind])
        if kind == _STRING:
            return string(at)
        if kind == _ARRAY:
            item_kind, count = struct.unpack_from("<IQ", data, at)
            at += 12
            if item_kind in _SCALARS:
                fmt = _SCALARS[item_kind]
                items = list(struct.unpack_from(f"<{count}{fmt[1]}", data, at))
                return items, at + count * struct.calcsize(fmt)
            items = []
            for _ in range(count):
                item, at = value(item_kind, at)
                items.append(item)
            return items, at
        raise ValueError(f"{path}: unknown GGUF value type {kind} at byte {at}")

    metadata = {}
    for _ in range(n_values):
        key, offset = string(offset)
        (kind,) = struct.unpack_from("<I", data, offset)
        metadata[key], offset = value(kind, offset + 4)
    return metadata


@dataclass(frozen=True)
class GgufVocab:
    """A tokenizer as llama.cpp stores it (the `tokenizer.ggml.*` keys)."""

    model: str  # "llama": SentencePiece; "gpt2": byte-level BPE (merges)
    pre: str | None  # the BPE pre-tokenizer's name ("llama-bpe": Llama-3's)
    context_length: int | None  # the model's, from `<architecture>.context_length`
    tokens: list[str]
    scores: list[float]
    token_types: list[int]  # llama.cpp's types equal SentencePiece's piece types (1 normal .. 6 byte)
    bos_id: int
    eos_id: int
    unk_id: int
    add_space_prefix: bool
    merges: list[str]

    @classmethod
    def from_gguf(cls, path: str | Path) -> GgufVocab:
        meta = read_gguf_metadata(path)
        try:
            tokens = meta["tokenizer.ggml.tokens"]
            return cls(
                model=meta["tokenizer.ggml.model"],
                pre=meta.get("tokenizer.ggml.pre"),
                context_length=meta.get(f"{meta.get('general.architecture')}.context_length"),
                tokens=tokens,
                scores=meta.get("tokenizer.ggml.scores", [0.0] * len(tokens)),
                token_types=meta.get("tokenizer.ggml.token_type", [1] * len(tokens)),
                bos_id=meta["tokenizer.ggml.bos_token_id"],
                eos_id=meta["tokenizer.ggml.eos_token_id"],
                unk_id=meta.get("tokenizer.ggml.unknown_token_id", -1),
                add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
                merges=meta.get("tokenizer.ggml.merges", []),
            )
        except KeyError as error:
            raise ValueError(f"{path}: GGUF metadata has no {error.args[0]} (not a vocabulary file?)") from None


def sentencepiece_model(vocab: GgufVocab) -> bytes:
    """The serialized SentencePiece ModelProto of a `llama` vocabulary, laid out as LLaMA-1's own
    tokenizer.model: BPE with byte fallback and split digits, identity normalisation, a dummy
    prefix and no whitespace folding."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    if vocab.model != "llama":
        raise ValueError(f"a {vocab.model!r} vocabulary is not SentencePiece; only 'llama' is")
    proto = spm_pb2.ModelProto()
    for token, score, kind in zip(vocab.tokens, vocab.scores, vocab.token_types, strict=True):
        proto.pieces.add(piece=token, score=score, type=kind)
    trainer = proto.trainer_spec
    trainer.model_type = spm_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(vocab.tokens)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = vocab.unk_id, vocab.bos_id, vocab.eos_id, -1
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece = (
        vocab.tokens[vocab.unk_id],
        vocab.tokens[vocab.bos_id],
        vocab.tokens[vocab.eos_id],
    )
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = vocab.add_space_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def reference_tokenizations(gguf: str | Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's reference cases beside a vocabulary: (text, token ids without BOS) pairs."""
    gguf = Path(gguf)
    inp = gguf.with_name(gguf.name + ".inp").read_text(encoding="utf-8")
    out = gguf.with_name(gguf.name + ".out").read_text(encoding="utf-8")
    texts = inp.removesuffix(TEST_SEPARATOR).split(TEST_SEPARATOR)
    ids = [[int(i) for i in line.split()] for line in out.splitlines()]
    if len(texts) != len(ids):
        raise ValueError(f"{gguf}: {len(texts)} reference texts but {len(ids)} tokenizations")
    return list(zip(texts, ids, strict=True))


def bpe_tokenizer(vocab: GgufVocab):
    """Llama-3's tokenizer (a `tokenizers.Tokenizer`) from a `gpt2` vocabulary with the `llama-bpe`
    pre-tokenizer: regular tokens and merges as stored, the special tokens after them."""
    from asclepius_r.base_model.tiny import llama3_tokenizer

    if (vocab.model, vocab.pre) != ("gpt2", "llama-bpe"):
        raise ValueError(f"a {vocab.model!r} vocabulary with pre-tokenizer {vocab.pre!r}: only 'gpt2' with 'llama-bpe'")
    regular = [token for token, kind in zip(vocab.tokens, vocab.token_types, strict=True) if kind == _NORMAL]
    special = [token for token, kind in zip(vocab.tokens, vocab.token_types, strict=True) if kind in _SPECIAL]
    if vocab.tokens != regular + special:
        raise ValueError("the vocabulary's special tokens do not all follow its regular ones")
    merges = [tuple(merge.split(" ")) for merge in vocab.merges]
    return llama3_tokenizer({token: i for i, token in enumerate(regular)}, merges, special)


def reference_mismatches(
    encode: Callable[[str], list[int]], gguf: str | Path
) -> list[tuple[str, list[int], list[int]]]:
    """(text, expected, got) for every reference case that `encode` (text -> ids, no BOS) tokenizes differently."""
    return [(text, ids, got) for text, ids in reference_tokenizations(gguf) if (got := encode(text)) != ids]


def _check_references(encode: Callable[[str], list[int]], gguf: Path) -> None:
    mismatches = reference_mismatches(encode, gguf)
    if mismatches:
        text, expected, got = mismatches[0]
        raise ValueError(
            f"{gguf}: the rebuilt tokenizer differs on {len(mismatches)} reference cases, "
            f"first {text!r}: expected {expected}, got {got}"
        )


def build_llama_tokenizer(out: str | Path, cache: Path | None = None) -> Path:
    """Write LLaMA-1's tokenizer.model to `out`, after checking every llama.cpp reference case."""
    import sentencepiece as spm

    gguf = extract_vocab(FAMILY_VOCABS["llama1"], cache)
    model = sentencepiece_model(GgufVocab.from_gguf(gguf))
    _check_references(spm.SentencePieceProcessor(model_proto=model).encode, gguf)
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(model)
    log.info("%s: LLaMA-1 tokenizer (32000 pieces) from %s, reference tokenizations reproduced", out, gguf.name)
    return Path(out)


def build_llama3_tokenizer(out: str | Path, cache: Path | None = None) -> Path:
    """Write Llama-3's tokenizer folder to `out`, after checking every llama.cpp reference case."""
    from asclepius_r.base_model.tiny import save_llama3_tokenizer_folder

    gguf = extract_vocab(FAMILY_VOCABS["llama3"], cache)
    vocab = GgufVocab.from_gguf(gguf)
    tokenizer = bpe_tokenizer(vocab)
    _check_references(lambda text: tokenizer.encode(text, add_special_tokens=False).ids, gguf)
    with atomic_path(out, is_dir=True) as tmp:
        save_llama3_tokenizer_folder(tmp, tokenizer, vocab.context_length)
    log.info(
        "%s: Llama-3 tokenizer (%d tokens) from %s, reference tokenizations reproduced",
        out,
        tokenizer.get_vocab_size(with_added_tokens=True),
        gguf.name,
    )
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="where to write tokenizer.model (llama1) or the tokenizer folder (llama3)")
    parser.add_argument("--family", choices=sorted(FAMILY_VOCABS), default="llama1", help="default: llama1")
    parser.add_argument("--cache", type=Path, help="cache folder (default $ASCLEPIUS_CACHE or ~/.cache/asclepius-r)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = build_llama_tokenizer if args.family == "llama1" else build_llama3_tokenizer
    build(out, args.cache)


if __name__ == "__main__":
    main()
