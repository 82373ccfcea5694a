"""Models keyed by name, each on its own base: name validation, max_length from the base's context
under the config's cap, release and evaluation names, the released template byte for byte and
chat-free on both tokenizer families, the base's own EOS after each answer, and the preflight
refusing a base it cannot handle."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from asclepius_r import config as workflow_config
from asclepius_r.base_model.describe import check_tiny_specs
from asclepius_r.base_model.tiny import build_tiny_llama_from_texts
from asclepius_r.errors import InputError
from asclepius_r.plan import preflight
from asclepius_r.prompts import check_bos, cut_note, encode_prompts, render_released
from asclepius_r.train.finetune import encode_example
from asclepius_r.train.settings import training_settings
from support.default_settings import tiny_spec
from tests.conftest import REPO

PAPER = yaml.safe_load((REPO / "config.yaml").read_text())
DEMO = yaml.safe_load((REPO / "demo/config.yaml").read_text())
NOTES = [
    "Admission Date: [**2150-3-1**]\nChief Complaint: dyspnea. Pt is a 67 y/o M w/ CHF (EF 25%).\n"
    "Discharge Medications: furosemide 40 mg PO BID; lisinopril 5 mg daily.\nFollow-up: cardiology in 2 weeks.",
    "Brief Hospital Course: admitted for pneumonia, treated with ceftriaxone 1 g IV q24h, then "
    "cefpodoxime; afebrile since day 2. Discharge Condition: stable. Ünïcode µg and tabs\tkept.",
] * 8


def with_models(models: dict, **sections) -> dict:
    """The demo config (over the paper's) with exactly `models`, resolved."""
    config = workflow_config.merge(copy.deepcopy(PAPER), copy.deepcopy(DEMO))
    config["models"] = models
    return workflow_config.resolve(workflow_config.merge(config, sections))


@pytest.mark.parametrize("name", ["7B", "llama3-8B", "Llama-3_1-8B", "mistral-7b-v0_1"])
def test_a_model_may_have_any_name_safe_for_paths(name):
    config = with_models({name: {"base": "tiny"}})
    assert workflow_config.release_names(name) == (f"Asclepius-R-{name}-Pretrained-Only", f"Asclepius-R-{name}")
    assert workflow_config.evaluated_models(config) == [
        f"Base-{name}",
        f"Asclepius-R-{name}-Pretrained-Only",
        f"Asclepius-R-{name}",
    ]


@pytest.mark.parametrize(
    "name", ["llama/8B", "Llama-3.1-8B", "-8B", "8B-", "a--b", "my model", "{size}", "x-Pretrained-Only", "é"]
)
def test_a_model_name_unsafe_for_paths_is_refused_by_key(name):
    with pytest.raises(workflow_config.ConfigError, match=rf"config key models: model name {name!r} is not allowed"):
        with_models({name: {"base": "tiny"}})


def test_max_length_defaults_to_the_bases_context_under_the_configs_cap():
    config = with_models(
        {
            "llama1": {"base": "tiny"},
            "llama3": {"base": "tiny-llama3", "tiny_model": {"max_position_embeddings": 8192}},
            "capped": {"base": "tiny-llama3", "tiny_model": {"max_position_embeddings": 8192}},
        },
        pretrain={"max_length": None},
        finetune={"max_length": 4096},
    )
    config["models"]["capped"]["finetune"] = {"max_length": 1024}
    lengths = {
        (name, stage): training_settings(config, stage, name)["max_length"]
        for name in config["models"]
        for stage in ("pretrain", "finetune")
    }
    assert lengths == {
        ("llama1", "pretrain"): 2048,  # no cap: the base's context
        ("llama1", "finetune"): 2048,  # under the cap of 4096
        ("llama3", "pretrain"): 8192,
        ("llama3", "finetune"): 4096,  # the stage's cap
        ("capped", "pretrain"): 8192,
        ("capped", "finetune"): 1024,  # the model's own cap
    }


def test_the_paper_config_keeps_2048_for_llama1_and_gives_a_llama3_base_8192(tmp_path):
    base = tmp_path / "Meta-Llama-3.1-8B"
    build_tiny_llama_from_texts(NOTES, base, tiny_spec(vocab_size=400, family="llama3"))
    described = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**described, "max_position_embeddings": 131072}))
    config = workflow_config.resolve(
        workflow_config.merge(copy.deepcopy(PAPER), {"models": {"llama3-8B": {"base": str(base)}}}), require_data=False
    )
    lengths = {
        name: training_settings(config, "finetune", name, context)["max_length"]
        for name, context in (("7B", 2048), ("llama3-8B", None))
    }
    assert lengths == {"7B": 2048, "llama3-8B": 8192}


def test_the_plan_takes_both_tiny_bases_for_built_ones():
    from asclepius_r.plan.inputs import missing_inputs

    config = with_models({"7B": {"base": "tiny"}, "llama3": {"base": "tiny-llama3"}, "real": {"base": "/nowhere"}})
    assert [p for p in missing_inputs(config) if p.startswith("models.")] == [
        "models.real.base: /nowhere does not exist"
    ]


def test_a_missing_base_and_no_cap_say_what_to_set():
    config = with_models({"llama3-8B": {"base": "/nowhere/llama3"}}, finetune={"max_length": None})
    with pytest.raises(workflow_config.ConfigError, match=r"models\.llama3-8B\.finetune\.max_length"):
        training_settings(config, "finetune", "llama3-8B")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"layers": 2}, r"models\.llama3\.tiny_model: unknown key\(s\) layers"),
        ({"vocab_size": "large"}, r"models\.llama3\.tiny_model\.vocab_size: 'large' is not of type 'integer'"),
    ],
)
def test_a_wrong_tiny_model_override_is_named(override, message):
    with pytest.raises(workflow_config.ConfigError, match=message):
        check_tiny_specs(with_models({"llama3": {"base": "tiny-llama3", "tiny_model": override}}))


@pytest.fixture(scope="module", params=["llama1", "llama3"])
def tiny_base(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / f"base-{request.param}"
    build_tiny_llama_from_texts(NOTES, folder, tiny_spec(vocab_size=400, family=request.param))
    return folder


def test_the_released_template_reaches_the_model_byte_for_byte_and_chat_free(tiny_base):
    """BOS once, then the template's own tokens, which decode to it byte for byte; a chat template
    in the tokenizer changes nothing, since prompts are never rendered through it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    check_bos(tokenizer, str(tiny_base))
    text = render_released(NOTES[0], "What was the ejection fraction?")
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
    assert ids[1:] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[1:]) == text
    tokenizer.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
    assert tokenizer(text)["input_ids"] == ids


def test_a_fine_tuning_example_ends_with_the_bases_own_eos(tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    eos = {"base-llama1": "</s>", "base-llama3": "<|end_of_text|>"}[tiny_base.name]
    example, status = encode_example(
        tokenizer, NOTES[1], "What antibiotic?", "Ceftriaxone, then cefpodoxime.", 4096, "drop"
    )
    assert status == "whole" and example.input_ids[-1] == tokenizer.convert_tokens_to_ids(eos)
    assert tokenizer.decode(example.input_ids[example.prompt_tokens : -1]) == "Ceftriaxone, then cefpodoxime."


@pytest.mark.parametrize("policy", ["note_tail", "note_middle"])
def test_a_cut_note_splits_no_character(tiny_base, policy):
    """Multi-byte characters the tiny vocabulary spells in byte tokens: wherever the cut falls,
    the note shown holds only whole characters of the note."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    note = "Dose: 25 µg → 12.5 µg; Ünïcode ✓ résumé 🩺 ok. " * 3
    note_ids = tokenizer(note, add_special_tokens=False)["input_ids"]
    assert "\ufffd" in "".join(tokenizer.decode(note_ids[:keep]) for keep in range(len(note_ids)))
    for keep in range(1, len(note_ids)):
        shown = cut_note(tokenizer, note_ids, keep, policy)
        assert "\ufffd" not in shown, (keep, shown)


def test_a_tokenizer_that_adds_no_bos_gets_it_prepended_once(tiny_base):
    """SmolLM2's tokenizer adds no BOS: every prompt is led by the base's BOS all the same, the
    same ids as a tokenizer that adds it itself."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    texts = [render_released(NOTES[0], "What was the ejection fraction?"), "x"]
    expected = encode_prompts(tokenizer, texts)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A", special_tokens=[])
    check_bos(tokenizer, "a base")
    assert tokenizer(texts)["input_ids"] != expected
    assert encode_prompts(tokenizer, texts) == expected


def test_a_tokenizer_that_adds_an_eos_is_refused(tiny_base):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    eos = (tokenizer.eos_token, tokenizer.eos_token_id)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"$A {eos[0]}", special_tokens=[eos])
    with pytest.raises(InputError, match="and no EOS"):
        check_bos(tokenizer, "a base")


@pytest.mark.parametrize(
    "damage, missing",
    [
        (lambda base: (base / "config.json").unlink(), "no config.json"),
        (
            lambda base: [(base / n).unlink() for n in ("tokenizer.model", "tokenizer.json") if (base / n).exists()],
            "no tokenizer it can handle",
        ),
        (
            lambda base: _edit_config(base, architectures=["MistralForCausalLM"], model_type="mistral"),
            "MistralForCausalLM is not LlamaForCausalLM-compatible",
        ),
    ],
)
def test_the_preflight_refuses_a_base_it_cannot_handle_naming_key_folder_and_what(tiny_base, tmp_path, damage, missing):
    import shutil

    base = tmp_path / "my-base"
    shutil.copytree(tiny_base, base)
    damage(base)
    problems = preflight.base_folder_problems("llama3-8B", base)
    assert len(problems) == 1 and problems[0].startswith(f"models.llama3-8B.base ({base}) cannot be used:")
    assert missing in problems[0]


def _edit_config(base, **changes):
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **changes}))
