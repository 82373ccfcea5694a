"""The whole demo DAG with a LLaMA-1-style and a Llama-3-style model side by side, each trained at
its own max_length and released under its own name; and a base the workflow cannot handle
refused before any job."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from asclepius_r import config as workflow_config
from asclepius_r.files import read_jsonl
from support.default_settings import decoding
from tests.conftest import REPO, copy_workflow, run_snakemake

pytestmark = pytest.mark.slow

# A small model set (the demo's two LLaMA-1-style sizes become one) and a few optimizer steps keep
# the run short; the Llama-3-style base has a 512-token context, under the demo's 1024 cap.
MODELS = {
    "7B": {"base": "tiny", "gpus": 1},
    "llama3-tiny": {"base": "tiny-llama3", "gpus": 1, "tiny_model": {"max_position_embeddings": 512}},
}
SHORT = {"pretrain": {"max_steps": 4}, "finetune": {"max_steps": 4}}


def small_model_set(workdir):
    """The scratch copy's config.yaml: the demo's, with MODELS as its only models."""
    config = workflow_config.merge(
        yaml.safe_load((REPO / "config.yaml").read_text()), yaml.safe_load((REPO / "demo/config.yaml").read_text())
    )
    config = workflow_config.merge(config, SHORT)
    config["models"] = MODELS
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def models_run(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("models") / "workflow")
    small_model_set(workdir)
    run_snakemake(workdir, demo=False)
    return workdir


def test_each_model_trains_at_its_bases_context_under_the_cap(models_run):
    expected = {"7B": 1024, "llama3-tiny": 512}  # finetune.max_length 1024 caps; the Llama-3 base has 512
    for name, max_length in expected.items():
        counts = json.loads((models_run / f"results/metrics/finetune-{name}-truncation.json").read_text())
        assert counts["max_length"] == max_length
        assert counts["examples"] == counts["whole"] + counts["truncated"] + counts["dropped"]
        run = json.loads((models_run / f"results/models/Asclepius-R-{name}/training_run.json").read_text())
        assert run["settings"]["max_length"] == max_length
        assert run["data"]["truncated"] == counts["truncated"]
    llama3 = json.loads((models_run / "results/models/Asclepius-R-llama3-tiny/training_run.json").read_text())
    assert llama3["base"]["tokenizer"] == "bpe" and llama3["base"]["eos_token"] == "<|end_of_text|>"


def test_evaluation_prompts_fit_each_models_context(models_run):
    for name, context in (("Base-7B", 2048), ("Base-llama3-tiny", 512), ("Asclepius-R-llama3-tiny", 512)):
        rows = read_jsonl(models_run / f"results/evaluation/answers/{name}.jsonl")
        assert rows and all(r["prompt_tokens"] + 32 <= min(context, 1024 + 32) for r in rows), name


def test_the_evaluation_and_report_compare_every_model(models_run):
    names = workflow_config.evaluated_models({"models": MODELS, "evaluate": {"extra_models": {}}})
    assert len(names) == 6
    summary = json.loads((models_run / "results/evaluation/summary.json").read_text())
    assert sorted(summary) == sorted(names)
    with open(models_run / "results/evaluation/scores_per_model.tsv", newline="") as table:
        assert sorted(row["model"] for row in csv.DictReader(table, delimiter="\t")) == sorted(names)
    report = (models_run / "results/report/evaluation.html").read_text()
    assert all(name in report for name in names)
    models = (models_run / "results/report/models.html").read_text()
    # model, base, tokenizer, vocabulary, context, pretrain and finetune max_length (the demo's caps: 256, 1024)
    assert "<td>7B</td><td>7B</td><td>sentencepiece</td><td>600</td><td>2,048</td><td>256</td><td>1024</td>" in models
    assert (
        "<td>llama3-tiny</td><td>llama3-tiny</td><td>bpe</td><td>600</td><td>512</td><td>256</td><td>512</td>" in models
    )


def test_release_folders_and_cards_follow_the_model_names(models_run):
    release = models_run / "release"
    released = sorted(p.name for p in release.glob("Asclepius-R-*"))
    assert released == [
        "Asclepius-R-7B",
        "Asclepius-R-7B-Pretrained-Only",
        "Asclepius-R-llama3-tiny",
        "Asclepius-R-llama3-tiny-Pretrained-Only",
    ]
    # Each checkpoint carries its base's own tokenizer files.
    assert (release / "Asclepius-R-7B/tokenizer.model").exists()
    llama3 = release / "Asclepius-R-llama3-tiny"
    assert (llama3 / "tokenizer.json").exists() and not (llama3 / "tokenizer.model").exists()
    card = (release / "Asclepius-R-llama3-tiny-Pretrained-Only/README.md").read_text()
    assert "byte-level BPE vocabulary" in card and "512-token context" in card and "LLaMA" not in card.split("---")[1]


def test_a_released_llama3_checkpoint_answers_with_the_released_template(models_run):
    from asclepius_r.evaluate.generation import generate_answers, load_for_generation
    from asclepius_r.prompts import render_released

    model, tokenizer = load_for_generation(str(models_run / "release/Asclepius-R-llama3-tiny"), device="cpu")
    prompt = render_released("Discharge Medications: aspirin 81 mg daily.", "What is the aspirin dose?")
    assert tokenizer.decode(tokenizer(prompt)["input_ids"], skip_special_tokens=True) == prompt
    prompts = [prompt, prompt + " "]  # two lengths: the batch is left-padded with the base's EOS
    assert len(generate_answers(model, tokenizer, prompts, decoding(max_new_tokens=4), batch_size=2)) == 2


def test_a_base_without_a_usable_tokenizer_is_refused_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    broken = tmp_path / "Meta-Llama-3.1-8B"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 128256}))
    (workdir / "broken.yaml").write_text(f"models:\n  llama3-8B: {{base: {broken}, gpus: 1}}\n")
    target = "results/models/Asclepius-R-llama3-8B-Pretrained-Only"
    result = run_snakemake(workdir, target, "--configfile", "demo/config.yaml", "broken.yaml", demo=False, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"models.llama3-8B.base: base model {broken}: " in output
    assert "no tokenizer it can handle" in output
    assert not (workdir / "results/models").exists() and not (workdir / "results/notes").exists()
