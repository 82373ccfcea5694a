"""Every config key is classed, and the class is what Snakemake does with it.

The schema marks each key `x-operational: true` (how a run goes: endpoints, quotas, timeouts,
retries, budget, devices, threads, logging) or `false` (what it makes). The test walks every key
the schema knows (`config.config_keys`: a new key that is not classed fails here), changes it in
the demo's config (laid over config.yaml, with the rehearsal's notes rule in the DAG) and asks
Snakemake, through its own API, which jobs would rerun for it: the jobs whose params or inputs
differ from the unchanged config's, as Snakemake records and compares them (its `params` and
`input` rerun triggers; jobs added or removed count too).
- Changing every operational key at once reruns no job (a failure names the keys that do).
- Changing a key that determines outputs reruns at least one job, and only jobs of its stage or
  of what follows it in the DAG, or the plan and the release (which hold the whole determining config).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asclepius_r import config as workflow_config
from asclepius_r.train.settings import STAGE_ONLY_KEYS
from tests.conftest import REPO, copy_workflow

pytestmark = pytest.mark.slow

MODEL = "7B"  # the demo's model whose per-model keys (models.7B.*) are changed

TRIGGERS = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

workdir, variants, targets = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
configfiles = [workdir / "config.yaml", workdir / "demo/config.yaml"]


def triggers(overrides):
    # Per job: what Snakemake compares to decide a rerun (params and input), and the job graph.
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=configfiles, config=overrides),
            snakefile=workdir / "Snakefile",
            workdir=workdir,
        ).dag(DAGSettings(targets=set(targets))).workflow_api._workflow
        workflow._prepare_dag(forceall=False, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        jobs = {}
        for job in workflow.dag.jobs:
            name = job.rule.name + json.dumps(dict(job.wildcards_dict), sort_keys=True)
            jobs[name] = {
                "rule": job.rule.name,
                "triggers": [workflow.persistence._params(job), workflow.persistence._input(job)],
                "needs": sorted({d.rule.name for d in workflow.dag.dependencies[job]}),
            }
        return jobs


base = triggers(variants.pop("base"))
changed = {}
for key, overrides in variants.items():
    jobs = triggers(overrides)
    changed[key] = sorted(
        {jobs[n]["rule"] if n in jobs else base[n]["rule"] for n in set(jobs) | set(base)
         if n not in jobs or n not in base or jobs[n]["triggers"] != base[n]["triggers"]}
    )
graph = {}
for job in base.values():
    graph.setdefault(job["rule"], set()).update(job["needs"])
print(json.dumps({"changed": changed, "needs": {rule: sorted(needs) for rule, needs in graph.items()}}))
"""

# The rules a key's stage makes directly (by the key's prefix); what follows them may rerun too.
STAGES = {
    "noteevents": {"filter_notes", "synthesize_demo_noteevents"},
    "notes.": {"filter_notes"},
    "instructions.": {"generate_instructions"},
    "llm.": {"generate_instructions", "judge_heldout"},
    "models.*.base": {"build_tiny_llama", "pretrain", "answer_heldout"},
    "models.*.pretrain.": {"pretrain"},
    "models.*.finetune.": {"finetune", "answer_heldout"},  # truncation also cuts evaluation prompts
    "models.*.tiny_model.": {"build_tiny_llama"},
    "tiny_model.": {"build_tiny_llama", "synthesize_long_noteevents"},
    "synthetic_notes.": {"synthesize_long_noteevents"},
    "pretrain.": {"pretrain"},
    "finetune.": {"finetune", "answer_heldout"},
    "evaluate.": {"answer_heldout", "heldout_losses", "judge_heldout", "summarise_evaluation"},
    "judge.": {"judge_heldout"},
}
# The plan and the release hold the whole determining config (the release records it in its
# manifest): they are remade for any such key, also of a stage the demo does not run (cheap jobs).
ALWAYS_ALLOWED = {"plan", "release"}


def changed_value(key: str, schema: dict, current, files: Path):
    """A valid value of `key` other than `current`."""
    special = {
        "noteevents": str(files / "NOTEEVENTS.csv"),
        "notes.exclude_row_ids": str(files / "exclude.txt"),
        "instructions.seed_questions": str(files / "seeds.tsv"),
        "llm.archive": str(files / "archive.jsonl"),
        "tiny_model.tokenizer_model": str(files / "other-tokenizer.model"),
        "models.*.tiny_model.tokenizer_model": str(files / "other-tokenizer.model"),
        "models.*.base": "tiny-llama3",
        "evaluate.extra_models": {"Other": str(files / "other-model")},
        "llm.prices_per_million": {"some-model": {"input": 1.0, "output": 2.0}},
    }
    if key in special:
        return special[key]
    if "enum" in schema or "enum" in schema.get("items", {}):
        choices = schema.get("enum") or schema["items"]["enum"]
        if schema.get("type") == "array":
            return [c for c in choices if c not in (current or [])][:1] or choices[:1]
        return next(c for c in choices if c != current)
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else [k for k in kinds if k != "null"]
    kind = kinds[0]
    if kind == "boolean":
        return not current
    if kind == "integer":
        value = (current or schema.get("minimum", 1)) + 1
        return value if value <= schema.get("maximum", value) else current - 1
    if kind == "number":
        return (current or 1.0) * 0.5
    if kind == "string":
        return f"{current or 'value'}-changed"
    if kind == "array":
        return [*(current or []), "http://changed.invalid"]
    raise AssertionError(f"{key}: no changed value for type {kind}")


def nested(key: str, value) -> dict:
    """`llm.max_concurrency` -> {"llm": {"max_concurrency": value}} (`*` is MODEL)."""
    parts = [MODEL if part == "*" else part for part in key.split(".")]
    for part in reversed(parts):
        value = {part: value}
    return value


def merged(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        out = workflow_config.merge(out, layer)
    return out


def settable(key: str) -> bool:
    """False for a key of the other training stage (pretrain.truncation): refused, as tests/test_config.py checks."""
    *section, name = key.split(".")
    stage = section[-1] if section else None
    return stage not in ("pretrain", "finetune") or STAGE_ONLY_KEYS.get(name, stage) == stage


def current_value(config: dict, key: str):
    """The key's value in `config`; a per-model override that is not set has its section's value."""
    value = config
    for part in key.replace("*", MODEL).split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None and key.startswith("models.*.") and key.count(".") == 3:
        return current_value(config, key.removeprefix("models.*."))
    return value


def stage_of(key: str) -> set[str] | None:
    """The rules `key` determines directly; None for a key that determines every stage (seed)."""
    return next((rules for prefix, rules in STAGES.items() if key == prefix or key.startswith(prefix)), None)


def following(rules: set[str], needs: dict[str, list[str]]) -> set[str]:
    """`rules` and every rule that needs one of them, directly or not."""
    found = set(rules)
    while True:
        more = {rule for rule, wanted in needs.items() if found & set(wanted)} - found
        if not more:
            return found
        found |= more


def test_every_config_key_is_classed_and_reruns_what_its_class_says(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    files = tmp_path / "files"
    files.mkdir()
    for name in ("NOTEEVENTS.csv", "exclude.txt", "seeds.tsv", "archive.jsonl", "judge.jsonl", "tokenizer.model"):
        (files / name).write_text("")
    (files / "other-tokenizer.model").write_text("other")
    (files / "other-model").mkdir()
    # The rehearsal's notes rule joins the DAG once the tiny model names a tokenizer to count with.
    # A judge archive is there to replay should judge.backend become llm.
    base = {
        "tiny_model": {"tokenizer_model": str(files / "tokenizer.model")},
        "judge": {"archive": str(files / "judge.jsonl")},
    }
    targets = ["all", "results/rehearsal/NOTEEVENTS.csv"]
    config = workflow_config.resolve(
        merged(*(yaml.safe_load((REPO / f).read_text()) for f in ("config.yaml", "demo/config.yaml")), base),
        require_data=False,
    )
    keys = {key: schema for key, schema in workflow_config.config_keys() if settable(key)}
    operational = {key for key, schema in keys.items() if schema[workflow_config.OPERATIONAL]}
    determining = sorted(set(keys) - operational)
    assert len(keys) > 100 and {"llm.max_concurrency", "llm.budget_usd", "launch.threads"} <= operational
    assert {"llm.model", "llm.temperature", "instructions.pool_lag", "seed", "finetune.learning_rate"} <= set(
        determining
    )
    changes = {key: nested(key, changed_value(key, keys[key], current_value(config, key), files)) for key in keys}
    everything_operational = merged(base, *(changes[key] for key in sorted(operational)))
    variants = {"base": base, "operational": everything_operational}
    variants |= {key: merged(base, changes[key]) for key in determining}
    result = subprocess.run(
        [sys.executable, "-c", TRIGGERS, str(workdir), json.dumps(variants), json.dumps(targets)],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(workdir)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    changed, needs = report["changed"], report["needs"]
    assert {"filter_notes", "synthesize_long_noteevents", "pretrain", "finetune", "judge_heldout"} <= set(needs)
    if changed["operational"]:
        # Which operational keys rerun which jobs, one at a time, for the message.
        single = {key: merged(base, changes[key]) for key in sorted(operational)}
        again = subprocess.run(
            [sys.executable, "-c", TRIGGERS, str(workdir), json.dumps({"base": base, **single}), json.dumps(targets)],
            cwd=workdir,
            env={**os.environ, "PYTHONPATH": str(workdir)},
            capture_output=True,
            text=True,
        )
        culprits = {
            key: rules for key, rules in json.loads(again.stdout.strip().splitlines()[-1])["changed"].items() if rules
        }
        pytest.fail(f"operational keys rerun jobs: {culprits}")
    wrong = {}
    for key in determining:
        rules = set(changed[key])
        stage = stage_of(key)
        allowed = following(stage, needs) | ALWAYS_ALLOWED if stage is not None else set(needs)
        if not rules - ALWAYS_ALLOWED:
            wrong[key] = "reruns no job of its stage: mark it x-operational: true, or put it in the stage's params"
        elif rules - allowed:
            wrong[key] = f"reruns {sorted(rules - allowed)} besides its stage {sorted(stage)} and what follows"
    assert not wrong, json.dumps(wrong, indent=1)
