"""LLaMA-1's tokenizer.model rebuilt from llama.cpp's GGUF vocabulary reproduces its reference cases.

The vocabulary comes from the pinned llama-cpp-python sdist, fetched by pip from the package index
on first use and cached outside the repository ($ASCLEPIUS_CACHE or ~/.cache/asclepius-r).
"""

from __future__ import annotations

import pytest

from asclepius_r.gguf_vocab import (
    GgufVocab,
    VocabUnavailable,
    extract_vocab,
    read_gguf_metadata,
    reference_mismatches,
    reference_tokenizations,
    sentencepiece_model,
)


@pytest.fixture(scope="module")
def llama_spm():
    try:
        return extract_vocab("llama-spm")
    except VocabUnavailable as error:
        pytest.skip(f"the llama-cpp-python sdist (LLaMA-1 vocabulary) could not be downloaded: {error}")


def test_rebuilt_tokenizer_reproduces_llama_cpp_references(llama_spm):
    vocab = GgufVocab.from_gguf(llama_spm)
    model = sentencepiece_model(vocab)
    cases = reference_tokenizations(llama_spm)
    assert len(cases) > 40 and any(text.startswith(" ") for text, _ in cases)
    assert reference_mismatches(model, llama_spm) == []

    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model)
    assert processor.vocab_size() == 32000
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id(), processor.pad_id()) == (0, 1, 2, -1)
    assert processor.id_to_piece(3) == "<0x00>" and processor.is_byte(3)
    assert processor.encode("Hello world", add_bos=True) == [1, 15043, 3186]


def test_transformers_reads_it_and_differs_only_on_a_leading_space(llama_spm, tmp_path):
    """transformers 5 converts tokenizer.model to a Rust tokenizer that drops the dummy prefix's
    extra '▁' before a leading space (platform notes); every other reference case agrees."""
    from transformers import AutoTokenizer

    from asclepius_r.base_model import save_tokenizer_folder

    save_tokenizer_folder(tmp_path, sentencepiece_model(GgufVocab.from_gguf(llama_spm)))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 32000
    differing = [
        text
        for text, ids in reference_tokenizations(llama_spm)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != ids
    ]
    assert differing and all(text.startswith(" ") for text in differing)


def test_tiny_llama_refuses_a_tokenizer_of_another_size(llama_spm, tmp_path):
    from asclepius_r.base_model import TinyLlamaSpec, tiny_llama_tokenizer

    model = tmp_path / "tokenizer.model"
    model.write_bytes(sentencepiece_model(GgufVocab.from_gguf(llama_spm)))
    assert tiny_llama_tokenizer([], TinyLlamaSpec(vocab_size=32000, tokenizer_model=str(model))) == model.read_bytes()
    with pytest.raises(ValueError, match=r"tiny_model.vocab_size: 600, but tiny_model.tokenizer_model .* 32000"):
        tiny_llama_tokenizer([], TinyLlamaSpec(vocab_size=600, tokenizer_model=str(model)))


def test_not_a_gguf_file_names_it(tmp_path):
    bad = tmp_path / "vocab.gguf"
    bad.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match=r"vocab\.gguf: not a GGUF file"):
        read_gguf_metadata(bad)
