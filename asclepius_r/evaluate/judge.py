"""The paper's judge: every model's answer to one held-out question in one prompt, scored 1-4.

For each held-out (note, question) the candidate answers go into a single prompt as Agent A,
B, ... in an order shuffled with a fixed seed per note, so no model profits from a position.
The judge's first line must hold exactly one score per agent; anything else is a parse failure.
A failed parse is retried by continuing the conversation with the reply and a correction (a new
request, so temperature 0 and the archive cannot hand back the same unreadable reply), and
after `max_parse_attempts` it is recorded as `parse_failed`, never scored 0 as in 2023.

Requests go through the project's LLM client: the archive (no request paid twice, replay), the
PHI guard (notes only to approved endpoints) and the rate limits all apply as for the dataset.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from asclepius_r.files import read_jsonl, write_json, write_jsonl
from asclepius_r.llm import ChatRequest, LLMClient, LLMSettings
from asclepius_r.prompts import agent_labels, render_judge_prompt, render_judge_retry

log = logging.getLogger(__name__)

SCORES = (1, 2, 3, 4)
_SCORE_LINE = re.compile(r"[1-4](?:[ ,]+[1-4])*")


class JudgeParseError(ValueError):
    pass


@dataclass(frozen=True)
class JudgeSettings:
    """The `judge` section of the config that is not about the endpoint."""

    seed: int
    max_parse_attempts: int

    @classmethod
    def from_config(cls, config: dict) -> JudgeSettings:
        """`judge.max_parse_attempts` and the workflow's `seed`."""
        return cls(seed=config["seed"], max_parse_attempts=config["judge"]["max_parse_attempts"])


def agent_order(models: list[str], row_id: int, seed: int) -> list[str]:
    """The models in agent order for one note: a shuffle fixed by (seed, ROW_ID) alone."""
    order = sorted(models)
    random.Random(f"judge:{seed}:{row_id}").shuffle(order)
    return order


def parse_scores(reply: str, count: int) -> list[int]:
    """The scores on the reply's first line; exactly `count` of them, each 1-4, nothing else."""
    lines = reply.strip().splitlines()
    first = lines[0].strip() if lines else ""
    if not _SCORE_LINE.fullmatch(first):
        raise JudgeParseError(f"first line is not only scores 1-4: {first[:80]!r}")
    scores = [int(s) for s in re.findall(r"[1-4]", first)]
    if len(scores) != count:
        raise JudgeParseError(f"{len(scores)} scores for {count} agents: {first!r}")
    return scores


@dataclass
class _Case:
    """One held-out question being judged: its agents and the replies that could not be parsed."""

    item: dict
    order: list[str]
    unreadable: list[str] = field(default_factory=list)
    verdict: dict | None = None


def judge_request(case: _Case, answers: dict[str, dict[int, str]], settings: LLMSettings) -> ChatRequest:
    """Attempt k: the judge prompt, then each earlier unreadable reply followed by a correction."""
    item = case.item
    prompt = render_judge_prompt(
        item["note"], item["question"], [answers[model][item["row_id"]] for model in case.order]
    )
    messages = [("user", prompt)]
    for reply in case.unreadable:
        messages += [("assistant", reply), ("user", render_judge_retry(len(case.order)))]
    return ChatRequest(
        model=settings.model,
        messages=tuple(messages),
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,
        meta={"row_id": item["row_id"], "phase": "judge", "task": item["task"], "attempt": len(case.unreadable) + 1},
    )


def judge(
    items: list[dict], answers: dict[str, dict[int, str]], client: LLMClient, settings: JudgeSettings
) -> list[dict]:
    """One verdict per item, in order: `ok` with a score per model, `parse_failed` or `llm_failed`."""
    models = sorted(answers)
    agent_labels(len(models))  # fail before any request if there are too many candidates
    cases = [_Case(item, agent_order(models, item["row_id"], settings.seed)) for item in items]
    last_error: dict[int, str] = {}
    for attempt in range(1, settings.max_parse_attempts + 1):
        pending = [case for case in cases if case.verdict is None]
        if not pending:
            break
        log.info("judge, attempt %d: %d question(s)", attempt, len(pending))
        results = client.run([judge_request(case, answers, client.settings) for case in pending], desc="judge")
        for case, result in zip(pending, results):
            if not result.ok:
                case.verdict = {"status": "llm_failed", "error": result.error}
                continue
            try:
                scores = parse_scores(result.text, len(case.order))
            except JudgeParseError as err:
                case.unreadable.append(result.text)
                last_error[id(case)] = str(err)
                continue
            case.verdict = {"status": "ok", "scores": dict(zip(case.order, scores)), "reply": result.text}
    verdicts = []
    for case in cases:
        verdict = case.verdict or {"status": "parse_failed", "error": last_error[id(case)]}
        verdicts.append(
            {
                "row_id": case.item["row_id"],
                "task": case.item["task"],
                "agents": dict(zip(agent_labels(len(case.order)), case.order)),
                "attempts": len(case.unreadable) + (case.verdict is not None),
                "unreadable_replies": case.unreadable,
                **verdict,
            }
        )
    return verdicts


def judge_llm_settings(config: dict) -> LLMSettings:
    """The llm section (endpoint, approvals, limits, budget) with the judge's own model and archive."""
    section = config["judge"]
    overrides = {key: section[key] for key in ("model", "temperature", "max_tokens", "archive")}
    # A bigger judge model usually sits behind its own deployment or server; the guard checks it too.
    overrides.update({key: section[key] for key in ("azure_deployment", "base_url") if section[key]})
    if section["backend"] == "heuristic":
        overrides["backend"] = "replay"  # nothing may leave the process: the guard has nothing to allow
    return LLMSettings.from_config({**config["llm"], **overrides})


def judge_client(config: dict, references: dict[int, str]) -> LLMClient:
    """The LLM client for the judge; `judge.backend: heuristic` answers with the demo's rubric judge."""
    settings = judge_llm_settings(config)
    if config["judge"]["backend"] == "heuristic":
        from asclepius_r.evaluate.rubric_judge import ReferenceRubricJudge

        return LLMClient(settings, backend=ReferenceRubricJudge(references))
    return LLMClient(settings)


def run_judge_stage(
    items: list[dict], answer_files: dict[str, str], verdicts_out, stats_out, client: LLMClient, settings: JudgeSettings
) -> dict:
    """Judge every held-out item with every model's answer; write verdicts and their counts."""
    answers = {}
    for model, path in answer_files.items():
        answers[model] = {row["row_id"]: row["answer"] for row in read_jsonl(path)}
        missing = [i["row_id"] for i in items if i["row_id"] not in answers[model]]
        if missing:
            raise ValueError(f"{path}: no answer of {model} for held-out ROW_ID(s) {missing[:5]}")
    verdicts = judge(items, answers, client, settings)
    outcomes = Counter(v["status"] for v in verdicts)
    stats = {
        "items": len(items),
        "models": sorted(answers),
        "outcomes": dict(outcomes),
        "attempts": dict(Counter(v["attempts"] for v in verdicts)),
        "judge_model": client.settings.model,
        "client": dict(client.stats),
    }
    write_jsonl(verdicts_out, verdicts)
    write_json(stats_out, stats)
    log.info("judge: %d held-out questions, %s", len(items), dict(outcomes))
    return stats
