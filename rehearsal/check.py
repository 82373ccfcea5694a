"""What the paper run needs, checked on the rehearsal's results (the last step of `make rehearsal`).

Each check reads the files the workflow wrote and recomputes what it can independently:
- each tiny base model carries the real tokenizer of its family: LLaMA-1's (32000 pieces, the
  rebuilt tokenizer.model) or Llama-3's (128256, the rebuilt tokenizer.json);
- the discharge summaries have MIMIC-III's token lengths (median near 1,800, 10-20% over 3,000);
- fine-tuning examples are whole, truncated or dropped exactly as the truncation policy says: the
  counts in results/metrics/finetune-{name}-truncation.json agree with a recount here, per model,
  at each model's own max_length (its base's context under the config's cap);
- every evaluation prompt ends with the question and `[Instruction End] `, has the recorded
  length, and fits the model's context with max_new_tokens;
- every GPU job claimed its devices from the fake list, and no two jobs that ran at the same time
  shared a device (results/rehearsal/gpu-locks/claims.jsonl);
- the exported checkpoints (release/) load and answer with the released template;
- the LLM client got through the server's faults and the judge scored every question.

The rehearsal runs in its own working folder, rehearsal/workdir/ (its results/, release/ and
logs/, apart from the demo's); paths here are relative to it. Results go to
results/rehearsal/checks.json there (and the log); `python -m rehearsal.check` reruns them on an
existing run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import statistics
import sys
from pathlib import Path

import yaml

from asclepius_r.base_model.describe import TINY_BASES, base_dir, tiny_spec
from asclepius_r.config import BASE_PREFIX, evaluated_models, resolve
from asclepius_r.evaluate.heldout import truncation_policy
from asclepius_r.files import read_jsonl
from asclepius_r.prompts import RELEASED_TEMPLATE, render_released
from asclepius_r.train.settings import training_settings

log = logging.getLogger("rehearsal.check")

OUT = Path("results/rehearsal")
# What follows the question in the released template: "\n[Instruction End] \n".
TEMPLATE_END = RELEASED_TEMPLATE.split("{question}")[1]


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def check_tokenizer(config: dict, sizes: list[str]) -> str:
    lines = []
    for size in sizes:
        spec = tiny_spec(config, size)
        folder, source = Path(base_dir(config, size)), Path(spec["tokenizer_model"])
        tokenizer = _tokenizer(folder)
        assert len(tokenizer) == spec["vocab_size"], (
            f"{folder}: vocabulary of {len(tokenizer)}, not {spec['vocab_size']}"
        )
        family = TINY_BASES[config["models"][size]["base"]]
        if family == "llama1":
            assert (folder / "tokenizer.model").read_bytes() == source.read_bytes(), f"{folder}: not {source}"
        else:
            sample = "Pt. is a 67 y/o M w/ CHF (EF 25%), admitted 2150-03-01 for SOB; discharged on Lasix 40mg PO BID."
            rebuilt = _tokenizer(source.parent if source.is_file() else source)(sample)["input_ids"]
            assert tokenizer(sample)["input_ids"] == rebuilt, f"{folder}: tokenizes unlike {source}"
        lines.append(f"{size}: {family} ({len(tokenizer)} tokens)")
    return "base models carry their family's real tokenizer: " + ", ".join(lines)


def report_lengths(config: dict) -> list[int]:
    """LLaMA token lengths of the synthetic discharge summaries (reports) in NOTEEVENTS.csv."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=config["tiny_model"]["tokenizer_model"])
    csv.field_size_limit(1 << 30)
    with open(config["noteevents"], newline="", encoding="utf-8") as rows:
        return [
            len(processor.encode(row["TEXT"]))
            for row in csv.DictReader(rows)
            if row["CATEGORY"] == "Discharge summary" and row["DESCRIPTION"] == "Report"
        ]


def check_note_lengths(config: dict) -> str:
    lengths = report_lengths(config)
    median, over = statistics.median(lengths), sum(n > 3000 for n in lengths) / len(lengths)
    assert 1600 <= median <= 2000, f"median discharge summary is {median:.0f} tokens, expected near 1,800"
    assert 0.10 <= over <= 0.20, f"{over:.0%} of discharge summaries over 3,000 tokens, expected 10-20%"
    return f"{len(lengths)} discharge summaries: median {median:.0f} tokens, {over:.0%} over 3,000"


def example_lengths(tokenizer, path="results/mimiciii_discharge.csv") -> list[tuple[int, int]]:
    """(whole example, note) token lengths of each fine-tuning example: the released prompt, the
    answer and EOS, as fine-tuning sees them."""
    with open(path, newline="", encoding="utf-8") as rows:
        examples = list(csv.DictReader(rows))
    result = []
    for row in examples:
        prompt = len(tokenizer(render_released(row["note"], row["question"]))["input_ids"])
        answer = len(tokenizer(row["answer"], add_special_tokens=False)["input_ids"]) + 1
        result.append((prompt + answer, len(tokenizer(row["note"], add_special_tokens=False)["input_ids"])))
    return result


def policy_counts(lengths: list[tuple[int, int]], max_length: int) -> dict[str, dict]:
    """What each policy does to the examples: every over-long example is dropped (`drop`) or has
    its note cut (`note_middle`, `note_tail`), unless even an empty note would not fit."""
    over = [(whole, note) for whole, note in lengths if whole > max_length]
    unfittable = sum(whole - note > max_length for whole, note in over)
    counts = {"drop": {"whole": len(lengths) - len(over), "truncated": 0, "dropped": len(over)}}
    for policy in ("note_middle", "note_tail"):
        counts[policy] = {
            "whole": len(lengths) - len(over),
            "truncated": len(over) - unfittable,
            "dropped": unfittable,
        }
    lost = [(whole - max_length) / note for whole, note in over if whole - note <= max_length]
    for policy in counts.values():
        policy["examples"] = len(lengths)
        policy["median_note_share_cut"] = round(statistics.median(lost), 3) if lost else 0.0
    return counts


def check_truncation(config: dict, sizes: list[str]) -> str:
    lines, shares = [], {}
    for size in sizes:
        path = Path(f"results/metrics/finetune-{size}-truncation.json")
        assert path.exists(), f"{path} missing: fine-tuning does not count truncation (finetune.truncation)"
        counts = json.loads(path.read_text())
        settings = training_settings(config, "finetune", size)
        assert counts["max_length"] == settings["max_length"], f"{path}: max_length {counts['max_length']}"
        assert counts["examples"] == counts["whole"] + counts["truncated"] + counts["dropped"], f"{path}: {counts}"
        expected = policy_counts(example_lengths(_tokenizer(base_dir(config, size))), counts["max_length"])
        shares[size] = policy_shares(expected, counts["max_length"])
        want = expected[counts["policy"]]
        got = {key: counts[key] for key in ("examples", "whole", "truncated", "dropped")}
        assert got == {key: want[key] for key in got}, f"{path}: {got}, a recount under {counts['policy']!r}: {want}"
        lines.append(f"{size} (max_length {counts['max_length']}, {counts['policy']}): {got}")
    (OUT / "truncation-by-policy.json").write_text(json.dumps(shares, indent=1) + "\n")
    return "; ".join(lines)


def policy_shares(counts: dict, max_length: int) -> dict:
    """The share of a model's fine-tuning examples truncated or dropped under each policy (for BENCHMARKS.md)."""
    return {
        "max_length": max_length,
        **{
            policy: {
                **c,
                "truncated_share": round(c["truncated"] / c["examples"], 3),
                "dropped_share": round(c["dropped"] / c["examples"], 3),
            }
            for policy, c in counts.items()
        },
    }


def check_eval_prompts(config: dict, models: list[str]) -> str:
    from asclepius_r.evaluate.heldout import heldout_items
    from asclepius_r.prompts import fit_released_prompt

    items = {
        (i["row_id"], i["question"]): i
        for i in heldout_items("results/notes/heldout.parquet", "results/instructions/heldout.jsonl")
    }
    evaluate = config["evaluate"]
    cut = 0
    for model in models:
        # Evaluation drops nothing (every model answers every question): `drop` cuts as note_middle.
        policy = truncation_policy(config, model)
        policy = "note_middle" if policy == "drop" else policy
        folder = Path(
            base_dir(config, model.removeprefix(BASE_PREFIX))
            if model.startswith(BASE_PREFIX)
            else f"results/models/{model}"
        )
        tokenizer = _tokenizer(folder)
        context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
        budget = context - evaluate["max_new_tokens"]
        if evaluate["max_prompt_tokens"] is not None:
            budget = min(budget, evaluate["max_prompt_tokens"])
        rows = read_jsonl(f"results/evaluation/answers/{model}.jsonl")
        assert len(rows) == len(items), f"{model}: {len(rows)} answers for {len(items)} held-out questions"
        for row in rows:
            item = items[row["row_id"], row["question"]]
            prompt = fit_released_prompt(tokenizer, item["note"], item["question"], budget, policy)
            where = f"results/evaluation/answers/{model}.jsonl ROW_ID {row['row_id']}"
            assert prompt.endswith(item["question"] + TEMPLATE_END), (
                f"{where}: the prompt does not end with the question and {TEMPLATE_END!r}"
            )
            tokens = len(tokenizer(prompt)["input_ids"])
            assert tokens == row["prompt_tokens"], f"{where}: prompt_tokens {row['prompt_tokens']}, recount {tokens}"
            assert tokens + evaluate["max_new_tokens"] <= context, (
                f"{where}: {tokens} prompt tokens + {evaluate['max_new_tokens']} new > context {context}"
            )
            whole = prompt == render_released(item["note"], item["question"])
            assert row["prompt_truncated"] != whole, f"{where}: prompt_truncated {row['prompt_truncated']}"
            cut += row["prompt_truncated"]
    return f"{len(models)} models x {len(items)} prompts end with the question and fit the context ({cut} cut)"


def check_gpu_claims(config: dict, sizes: list[str], models: list[str], devices: list[str]) -> str:
    path = OUT / "gpu-locks" / "claims.jsonl"
    assert path.exists(), f"{path} missing: GPU rules did not claim devices (ASCLEPIUS_FAKE_GPUS)"
    # Claims of earlier runs stay in the file (their times cannot overlap this run's); the last
    # claim of each job is this run's.
    claims = read_jsonl(path)
    # Jobs are named <rule or stage>-<model>, as the models' folders are.
    expected = {f"pretrain-Asclepius-R-{size}-Pretrained-Only": config["models"][size]["gpus"] for size in sizes}
    expected |= {f"finetune-Asclepius-R-{size}": config["models"][size]["gpus"] for size in sizes}
    expected |= {f"{rule}-{model}": 1 for rule in ("answer_heldout", "heldout_losses") for model in models}
    by_job = {claim["job"]: claim for claim in claims}
    assert set(by_job) == set(expected), f"{path}: jobs {sorted(by_job)}, expected {sorted(expected)}"
    for job, count in expected.items():
        got = by_job[job]["devices"]
        assert len(set(got)) == len(got) == count, f"{path}: {job} claimed {got}, expected {count} device(s)"
        assert set(got) <= set(devices), f"{path}: {job} claimed {got}, not all in ASCLEPIUS_FAKE_GPUS"
    shared = [
        (a["job"], b["job"], sorted(set(a["devices"]) & set(b["devices"])))
        for i, a in enumerate(claims)
        for b in claims[i + 1 :]
        if a["start"] < b["end"] and b["start"] < a["end"] and set(a["devices"]) & set(b["devices"])
    ]
    assert not shared, f"{path}: concurrent jobs shared devices: {shared}"
    concurrent = max(sum(c["start"] <= a["start"] < c["end"] for c in claims) for a in claims)
    return f"{len(by_job)} GPU jobs, up to {concurrent} at once, never sharing a device"


def check_checkpoints(config: dict, sizes: list[str]) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from asclepius_r.evaluate.heldout import heldout_items

    item = heldout_items("results/notes/heldout.parquet", "results/instructions/heldout.jsonl")[0]
    loaded = []
    for size in sizes:
        for name in (f"Asclepius-R-{size}", f"Asclepius-R-{size}-Pretrained-Only"):
            folder = Path("release") / name
            tokenizer = _tokenizer(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            prompt = render_released(item["note"][:2000], item["question"])
            batch = tokenizer(prompt, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            assert out.shape[1] > batch["input_ids"].shape[1], f"{folder}: no answer generated"
            vocab = tiny_spec(config, size)["vocab_size"]
            assert model.config.vocab_size == vocab, f"{folder}: vocab_size {model.config.vocab_size}, not {vocab}"
            loaded.append(name)
    return f"{len(loaded)} released checkpoints load and answer with the released template"


def check_llm(outcomes: dict | None) -> str:
    """Every note got its question and answer and every held-out question its verdict, through the
    server's faults: the instruction stats record the retries of the run that made them, and
    `outcomes` is what the server answered in this run (None when checking a finished run; empty
    when this run made no LLM job, its outputs being up to date)."""
    lines, retried = [], 0
    for split in ("discharge", "heldout"):
        stats = json.loads(Path(f"results/instructions/{split}.stats.json").read_text())
        assert stats["outcomes"] == {"ok": stats["notes"]}, f"instructions ({split}): {stats['outcomes']}"
        retries = sum(stats["llm"]["retries"].values())
        retried += retries
        lines.append(f"{split}: {stats['notes']} notes ok after {retries} retries")
    assert retried, "the instruction stage recorded no retry: it met none of the server's faults"
    judge = json.loads(Path("results/evaluation/judge/stats.json").read_text())
    assert judge["outcomes"] == {"ok": judge["items"]}, f"judge: {judge['outcomes']}"
    lines.append(f"judge: {judge['items']} questions scored, attempts {judge['attempts']}")
    if outcomes:
        faults = {kind: n for kind, n in outcomes.items() if kind not in ("ok", "pending")}
        assert faults, "the server injected no faults"
        lines.append(f"server faults {faults}")
    elif outcomes is not None:
        lines.append("no request this run (the LLM stages' outputs were up to date)")
    return "; ".join(lines)


REPO = Path(__file__).resolve().parents[1]
WORKDIR = REPO / "rehearsal" / "workdir"


def run_all(config: dict, devices: list[str], outcomes: dict | None = None) -> list[str]:
    """Run every check on the results in the working folder; returns the failures."""
    full = yaml.safe_load((REPO / "config.yaml").read_text())
    _merge(full, config)
    resolve(full, require_data=False)
    sizes = sorted(full["models"])
    models = evaluated_models(full)
    checks = {
        "tokenizer": lambda: check_tokenizer(full, sizes),
        "note lengths": lambda: check_note_lengths(full),
        "truncation": lambda: check_truncation(full, sizes),
        "evaluation prompts": lambda: check_eval_prompts(full, models),
        "GPU claims": lambda: check_gpu_claims(full, sizes, models, devices),
        "exported checkpoints": lambda: check_checkpoints(full, sizes),
        "LLM faults and judge": lambda: check_llm(outcomes),
    }
    results, failures = {}, []
    for name, check in checks.items():
        try:
            results[name] = {"ok": True, "detail": check()}
            log.info("PASS %s: %s", name, results[name]["detail"])
        except (AssertionError, ImportError, FileNotFoundError, KeyError) as error:
            results[name] = {"ok": False, "detail": f"{type(error).__name__}: {error}"}
            failures.append(name)
            log.error("FAIL %s: %s", name, results[name]["detail"])
    (OUT / "checks.json").write_text(json.dumps(results, indent=1) + "\n")
    return failures


def _merge(base: dict, overlay: dict) -> None:
    """Snakemake's way of reading a second config file over the first: nested keys replaced one by one."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overlay = yaml.safe_load((REPO / "rehearsal" / "config.yaml").read_text())
    os.chdir(WORKDIR)
    sys.exit(1 if run_all(overlay, [str(i) for i in range(8)]) else 0)
