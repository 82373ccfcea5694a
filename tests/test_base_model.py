"""Base model folders: the tiny LLaMA of each tokenizer family, what `describe_base` reads from a
folder, and its refusal of folders the workflow cannot use (each naming what is missing)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asclepius_r.base_model.describe import BaseModelError, check_base_model, copy_tokenizer_model, describe_base
from asclepius_r.base_model.tiny import (
    LLAMA3_BOS,
    TINY_LLAMA3_SPECIAL_TOKENS,
    TinyLlamaSpec,
    build_tiny_llama_from_texts,
    llama3_special_tokens,
    tiny_llama_tokenizer,
)
from asclepius_r.train.checkpoints import export_checkpoint, prepare_export
from support.default_settings import tiny_spec
from support.train_fixtures import demo_texts
from tests.conftest import copy_workflow, run_snakemake

FAMILIES = {"llama1": "sentencepiece", "llama3": "bpe"}
CONTEXT = 1024


def small_spec(family: str) -> TinyLlamaSpec:
    return tiny_spec(
        vocab_size=600,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=CONTEXT,
        family=family,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny model folder of each family, built once for the module."""
    built = {}
    for family in FAMILIES:
        built[family] = tmp_path_factory.mktemp(family) / "base"
        build_tiny_llama_from_texts(demo_texts(), built[family], small_spec(family))
    return built


@pytest.fixture(params=sorted(FAMILIES))
def tiny(request, folders):
    return request.param, folders[request.param]


def test_describe_base_agrees_with_transformers(tiny):
    family, folder = tiny
    info = describe_base(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert info.family == FAMILIES[family] and info.architecture == "LlamaForCausalLM"
    assert (info.bos_id, info.bos_token) == (tokenizer.bos_token_id, tokenizer.bos_token)
    assert (info.eos_id, info.eos_token) == (tokenizer.eos_token_id, tokenizer.eos_token)
    assert info.pad_id is None and tokenizer.pad_token_id is None
    assert info.vocab_size == len(tokenizer) == 600 and info.context_length == CONTEXT
    assert info.tokenizer_files == (
        ("tokenizer.model",)
        if family == "llama1"
        else ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    )
    assert check_base_model(folder) == info


def test_tiny_model_loads_and_its_tokenizer_adds_bos_once(tiny):
    family, folder = tiny
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.bos_token_id == tokenizer.bos_token_id and model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("Discharge diagnosis: pneumonia.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids
    assert tokenizer("Discharge diagnosis: pneumonia.", add_special_tokens=False)["input_ids"] == ids[1:]
    assert tokenizer.decode(ids[1:]) == "Discharge diagnosis: pneumonia."
    assert model(input_ids=torch.tensor([ids])).logits.shape[-1] == 600


def test_a_tiny_model_is_rebuilt_byte_for_byte(tiny, tmp_path):
    family, folder = tiny
    build_tiny_llama_from_texts(demo_texts(), tmp_path / "again", small_spec(family))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (tmp_path / "again").iterdir())
    assert all(p.read_bytes() == (tmp_path / "again" / p.name).read_bytes() for p in folder.iterdir())


def test_llama3_tiny_has_llama3_special_token_layout(folders):
    folder = folders["llama3"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    first = 600 - TINY_LLAMA3_SPECIAL_TOKENS
    assert tokenizer.convert_ids_to_tokens(list(range(first, 600))) == llama3_special_tokens(TINY_LLAMA3_SPECIAL_TOKENS)
    assert tokenizer.bos_token == LLAMA3_BOS and tokenizer.convert_ids_to_tokens(first + 9) == "<|eot_id|>"
    assert tokenizer.chat_template is None
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast" and settings["model_max_length"] == CONTEXT


def test_copy_tokenizer_model_carries_the_base_files(tiny, tmp_path):
    _, folder = tiny
    copy_tokenizer_model(folder, tmp_path)
    names = describe_base(folder).tokenizer_files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert all((tmp_path / name).read_bytes() == (folder / name).read_bytes() for name in names)


def test_an_exported_checkpoint_carries_the_base_tokenizer_files(tiny, tmp_path):
    _, folder = tiny
    prepare_export(tmp_path / "out")
    export_checkpoint(folder, folder, tmp_path / "out", "float32")
    info = describe_base(tmp_path / "out")
    assert info == replace(describe_base(folder), folder=str(tmp_path / "out"))
    assert all((tmp_path / "out" / name).read_bytes() == (folder / name).read_bytes() for name in info.tokenizer_files)


def _edit_json(path, **changes):
    settings = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    path.write_text(json.dumps(settings))


def _remove(folder, *names):
    for name in names:
        (folder / name).unlink(missing_ok=True)


BROKEN = {
    "no config": (lambda f: _remove(f, "config.json"), r"no config\.json"),
    "no tokenizer": (
        lambda f: _remove(f, "tokenizer.model", "tokenizer.json", "tokenizer_config.json"),
        r"no tokenizer it can handle: neither a SentencePiece tokenizer\.model nor a BPE tokenizer\.json",
    ),
    "architecture": (
        lambda f: _edit_json(f / "config.json", architectures=["MistralForCausalLM"], model_type="mistral"),
        r"architecture MistralForCausalLM is not LlamaForCausalLM-compatible",
    ),
    "embedding size": (
        lambda f: _edit_json(f / "config.json", vocab_size=500),
        r"the tokenizer has 600 tokens but the model's embedding only 500 \(config\.json vocab_size\)",
    ),
    "context length": (
        lambda f: (
            _edit_json(f / "config.json", max_position_embeddings=None),
            _edit_json(f / "tokenizer_config.json", model_max_length=None),
        ),
        r"no context length \(config\.json max_position_embeddings\)",
    ),
    "bos not in vocabulary": (
        lambda f: _edit_json(f / "tokenizer_config.json", bos_token="<nope>"),
        r"BOS token '<nope>' is not in the tokenizer's vocabulary",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_describe_base_refuses_a_broken_folder_naming_what_is_missing(tiny, tmp_path, case):
    _, folder = tiny
    broken = tmp_path / "base"
    shutil.copytree(folder, broken)
    damage, message = BROKEN[case]
    damage(broken)
    with pytest.raises(BaseModelError, match=rf"base model {broken}: .*{message}"):
        describe_base(broken)


def test_an_embedding_padded_beyond_the_tokenizer_is_accepted(tiny, tmp_path):
    _, folder = tiny
    padded = tmp_path / "base"
    shutil.copytree(folder, padded)
    _edit_json(padded / "config.json", vocab_size=640)
    assert describe_base(padded).vocab_size == 600


def test_a_tokenizer_json_that_is_not_bpe_and_a_missing_folder_are_refused(tmp_path):
    from tokenizers import Tokenizer, models

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 1}))
    Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(BaseModelError, match=r"tokenizer\.json is a WordPiece tokenizer"):
        describe_base(tmp_path)
    with pytest.raises(BaseModelError, match=r"base model .*missing: not a folder"):
        describe_base(tmp_path / "missing")


def test_check_base_model_wants_weights(tiny, tmp_path):
    _, folder = tiny
    shutil.copytree(folder, tmp_path / "base")
    _remove(tmp_path / "base", "model.safetensors")
    with pytest.raises(BaseModelError, match=r"no weights \(none of model\.safetensors"):
        check_base_model(tmp_path / "base")


def test_a_llama3_vocabulary_too_small_for_the_bytes_is_refused():
    with pytest.raises(ValueError, match=r"tiny_model\.vocab_size: 200 asks for 184 regular tokens"):
        tiny_llama_tokenizer(demo_texts()[:2], tiny_spec(vocab_size=200, family="llama3"))


def test_snakemake_builds_the_base_of_a_tiny_llama3_model(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "llama3.yaml").write_text("models:\n  llama3-8B: {base: tiny-llama3, gpus: 1}\n")
    run_snakemake(
        workdir, "--configfile", "demo/config.yaml", "llama3.yaml", "--", "results/base_models/llama3-8B", demo=False
    )
    folder = workdir / "results/base_models/llama3-8B"
    info = describe_base(folder)
    assert (info.family, info.bos_token, info.vocab_size) == ("bpe", LLAMA3_BOS, 600)
    assert AutoTokenizer.from_pretrained(folder)("Discharged home.")["input_ids"][0] == info.bos_id
