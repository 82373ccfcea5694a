"""LLaMA-1's tokenizer.model and Llama-3's tokenizer folder, rebuilt from llama.cpp's GGUF
vocabularies, reproduce their reference cases; tiny models use them.

The vocabulary comes from the pinned llama-cpp-python sdist, fetched by pip from the package index
on first use and cached outside the repository ($ASCLEPIUS_CACHE or ~/.cache/asclepius-r).
"""

from __future__ import annotations

import pytest

from asclepius_r.base_model.describe import describe_base
from asclepius_r.base_model.tiny import (
    LLAMA3_BOS,
    LLAMA3_EOS,
    build_tiny_llama_from_texts,
    llama3_special_tokens,
    tiny_llama_tokenizer,
)
from support.default_settings import tiny_spec
from support.gguf_vocab import (
    GgufVocab,
    VocabUnavailable,
    bpe_tokenizer,
    extract_vocab,
    main,
    read_gguf_metadata,
    reference_mismatches,
    reference_tokenizations,
    sentencepiece_model,
)


def _vocab(name: str):
    try:
        return extract_vocab(name)
    except VocabUnavailable as error:
        pytest.skip(f"the llama-cpp-python sdist ({name} vocabulary) could not be downloaded: {error}")


@pytest.fixture(scope="module")
def llama_spm():
    return _vocab("llama-spm")


@pytest.fixture(scope="module")
def llama_bpe():
    return _vocab("llama-bpe")


@pytest.fixture(scope="module")
def llama3_folder(llama_bpe, tmp_path_factory):
    """Llama-3's tokenizer folder, written by the CLI."""
    folder = tmp_path_factory.mktemp("llama3") / "tokenizer"
    main(["--family", "llama3", str(folder)])
    return folder


def test_rebuilt_tokenizer_reproduces_llama_cpp_references(llama_spm):
    vocab = GgufVocab.from_gguf(llama_spm)
    model = sentencepiece_model(vocab)
    cases = reference_tokenizations(llama_spm)
    assert len(cases) > 40 and any(text.startswith(" ") for text, _ in cases)
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model)
    assert reference_mismatches(processor.encode, llama_spm) == []
    assert processor.vocab_size() == 32000
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id(), processor.pad_id()) == (0, 1, 2, -1)
    assert processor.id_to_piece(3) == "<0x00>" and processor.is_byte(3)
    assert processor.encode("Hello world", add_bos=True) == [1, 15043, 3186]


def test_the_cli_writes_llama1_by_default(llama_spm, tmp_path):
    main([str(tmp_path / "tokenizer.model")])
    assert (tmp_path / "tokenizer.model").read_bytes() == sentencepiece_model(GgufVocab.from_gguf(llama_spm))


def test_transformers_reads_it_and_differs_only_on_a_leading_space(llama_spm, tmp_path):
    """transformers 5 converts tokenizer.model to a Rust tokenizer that drops the dummy prefix's
    extra '▁' before a leading space (platform notes); every other reference case agrees."""
    from transformers import AutoTokenizer

    from asclepius_r.base_model.tiny import save_tokenizer_folder

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
    from asclepius_r.base_model.tiny import tiny_llama_tokenizer

    model = tmp_path / "tokenizer.model"
    model.write_bytes(sentencepiece_model(GgufVocab.from_gguf(llama_spm)))
    assert tiny_llama_tokenizer([], tiny_spec(vocab_size=32000, tokenizer_model=str(model))) == model.read_bytes()
    with pytest.raises(ValueError, match=r"tiny_model.vocab_size: 600, but tiny_model.tokenizer_model .* 32000"):
        tiny_llama_tokenizer([], tiny_spec(vocab_size=600, tokenizer_model=str(model)))


def test_not_a_gguf_file_names_it(tmp_path):
    bad = tmp_path / "vocab.gguf"
    bad.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match=r"vocab\.gguf: not a GGUF file"):
        read_gguf_metadata(bad)


def test_rebuilt_llama3_tokenizer_reproduces_llama_cpp_references(llama_bpe):
    tokenizer = bpe_tokenizer(GgufVocab.from_gguf(llama_bpe))
    cases = reference_tokenizations(llama_bpe)
    assert len(cases) > 40 and any("\n" in text for text, _ in cases)
    assert reference_mismatches(lambda text: tokenizer.encode(text, add_special_tokens=False).ids, llama_bpe) == []
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 128256
    assert [tokenizer.id_to_token(i) for i in range(128000, 128256)] == llama3_special_tokens(256)
    assert tokenizer.encode("Hello world").ids == [128000, 9906, 1917]


def test_transformers_reads_the_llama3_folder_exactly(llama_bpe, llama3_folder):
    """Unlike LLaMA-1's SentencePiece model, Llama-3's tokenizer.json loads in transformers 5 as it is:
    every reference case agrees, and BOS is added once."""
    from transformers import AutoTokenizer

    assert sorted(p.name for p in llama3_folder.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    tokenizer = AutoTokenizer.from_pretrained(llama3_folder)
    assert len(tokenizer) == 128256 and tokenizer.model_max_length == 8192
    assert (tokenizer.bos_token, tokenizer.bos_token_id, tokenizer.eos_token, tokenizer.eos_token_id) == (
        LLAMA3_BOS,
        128000,
        LLAMA3_EOS,
        128001,
    )
    assert tokenizer.pad_token is None and tokenizer.chat_template is None
    for text, ids in reference_tokenizations(llama_bpe):
        assert tokenizer(text)["input_ids"] == [128000, *ids], text
        assert tokenizer.decode(ids) == text


def test_tiny_llama3_with_the_real_vocabulary(llama3_folder, tmp_path):
    spec = tiny_spec(
        vocab_size=128256,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8192,
        tokenizer_model=str(llama3_folder),
        family="llama3",
    )
    build_tiny_llama_from_texts([], tmp_path / "base", spec)
    info = describe_base(tmp_path / "base")
    assert (info.family, info.vocab_size, info.context_length) == ("bpe", 128256, 8192)
    assert (info.bos_id, info.eos_id, info.pad_id) == (128000, 128001, None)
    assert (tmp_path / "base/tokenizer.json").read_text() == (llama3_folder / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match=r"tiny_model.vocab_size: 600, but tiny_model.tokenizer_model .* 128256"):
        tiny_llama_tokenizer(
            [], tiny_spec(vocab_size=600, tokenizer_model=str(llama3_folder / "tokenizer.json"), family="llama3")
        )


def test_a_sentencepiece_vocabulary_is_not_llama3(llama_spm):
    with pytest.raises(ValueError, match=r"a 'llama' vocabulary .* only 'gpt2' with 'llama-bpe'"):
        bpe_tokenizer(GgufVocab.from_gguf(llama_spm))
