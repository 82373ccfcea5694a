"""What the LLM stages will cost: the instruction stage's and the judge's rows of the plan.

Per stage: requests, prompt and completion tokens (completions at their `max_tokens` cap, an
upper bound), dollars online and with the Batch API at the client's own prices, hours at the
configured quotas, and the bytes of its archive (`instruction_row`, `judge_row`). LLM tokens are
estimated from characters: the endpoint's own tokenizer is not available here. `llm_problems`
says what would stop these stages: settings that do not fit, an unapproved endpoint, no key, no
price.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from asclepius_r import config as workflow_config
from asclepius_r.instructions.generate import GenerationSettings
from asclepius_r.instructions.tasks import load_seed_questions
from asclepius_r.llm import LLMSettings
from asclepius_r.prompts import render_answer_prompt, render_judge_prompt, render_question_prompt

# GPT-4o-class tokenizers average about 4 characters per token on English prose; the notes'
# numbers, abbreviations and [**...**] placeholders split finer, so 3 is taken as an upper bound.
LLM_CHARS_PER_TOKEN = 3.0
# Characters of generated text per generated token (for archive, dataset and answer sizes).
GENERATED_CHARS_PER_TOKEN = 4.0
MESSAGE_TOKENS = 8  # per chat message, as the client's own estimate (llm.client.estimate_tokens)
ARCHIVE_RECORD_BYTES = 700  # JSON keys, usage, provider and times of one archive record


def _llm_row(stage: str, settings, jobs: int, requests: int, prompt_chars: float, messages: int, paid: bool) -> dict:
    """Requests, tokens, dollars and hours of one LLM stage; completions at their `max_tokens` cap."""
    from asclepius_r.llm.client import RateLimiter

    prompt = math.ceil(prompt_chars / LLM_CHARS_PER_TOKEN) + MESSAGE_TOKENS * messages
    completion = requests * settings.max_tokens
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    minutes = max(
        requests / (settings.requests_per_minute * RateLimiter.HEADROOM),
        (prompt + completion) / (settings.tokens_per_minute * RateLimiter.HEADROOM),
    )
    priced = settings.model in settings.prices_per_million
    return {
        "stage": stage,
        "jobs": jobs,
        "gpus": 0,
        "model": settings.model,
        "mode": settings.mode,
        "paid": paid,
        "requests": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "usd_online": round(settings.price(usage), 2) if paid and priced else None,
        "usd_batch": round(settings.price(usage, batch=True), 2) if paid and priced else None,
        "hours_online": minutes / 60,
        "archive_bytes": int(prompt_chars + completion * GENERATED_CHARS_PER_TOKEN + ARCHIVE_RECORD_BYTES * requests),
    }


def longest_seed_question(config: dict) -> str:
    """The longest seed question: what a generated question is counted as, before it exists."""
    seeds = load_seed_questions(GenerationSettings.from_config(config).seed_questions)
    return max((q for qs in seeds.values() for q in qs), key=len)


def instruction_row(config: dict, train_chars: np.ndarray, heldout_chars: np.ndarray) -> dict:
    """Both splits: a question and an answer request per note.

    The question prompt shows 3 seed questions and up to 2 generated ones, unknown before the
    run: counted as the task's 5 longest seeds, for the task whose prompt is longest. The answer
    prompt holds the generated question: counted as the longest seed question.
    """
    settings = LLMSettings.from_config(config["llm"])
    generation = GenerationSettings.from_config(config)
    seeds = load_seed_questions(generation.seed_questions)
    shown = generation.seeds_per_prompt + generation.pool_per_prompt
    question_frame = max(len(render_question_prompt(t, "", sorted(qs, key=len)[-shown:])) for t, qs in seeds.items())
    answer_frame = len(render_answer_prompt("", longest_seed_question(config)))
    notes = len(train_chars) + len(heldout_chars)
    chars = int(train_chars.sum() + heldout_chars.sum())
    row = _llm_row(
        "instructions",
        settings,
        jobs=2,
        requests=2 * notes,
        prompt_chars=2 * chars + notes * (question_frame + answer_frame),
        messages=2 * notes,
        paid=settings.backend != "replay",
    )
    # mimiciii_discharge.csv: the training notes again, with a question and an answer each.
    row["disk_bytes"] = int(train_chars.sum() + len(train_chars) * settings.max_tokens * 2 * GENERATED_CHARS_PER_TOKEN)
    return row


def judge_row(config: dict, heldout_chars: np.ndarray) -> dict:
    """One judge request per held-out question (at most one per held-out note) holding every
    model's answer at `evaluate.max_new_tokens`; replies that cannot be parsed are asked again
    (up to `judge.max_parse_attempts`), not counted here."""
    from asclepius_r.evaluate.judge import judge_llm_settings

    settings = judge_llm_settings(config)
    models = len(workflow_config.evaluated_models(config))
    frame = len(render_judge_prompt("", longest_seed_question(config), [""] * models))
    items = len(heldout_chars)
    answer_chars = models * config["evaluate"]["max_new_tokens"] * GENERATED_CHARS_PER_TOKEN
    return _llm_row(
        "judge",
        settings,
        jobs=1,
        requests=items,
        prompt_chars=float(heldout_chars.sum()) + items * (frame + answer_chars),
        messages=items,
        paid=config["judge"]["backend"] == "llm" and settings.backend != "replay",
    )


def llm_problems(config: dict) -> list[str]:
    """What stops the LLM stages: settings that do not fit, an unapproved endpoint, no key, no price."""
    from asclepius_r.evaluate.judge import judge_llm_settings
    from asclepius_r.llm.guard import UnapprovedEndpointError, check_endpoint, endpoint_identity

    problems = []
    sections = [("llm", LLMSettings.from_config(config["llm"]))]
    if config["judge"]["backend"] == "llm":
        sections.append(("judge", judge_llm_settings(config)))
    for name, settings in sections:
        try:
            settings.check()
        except ValueError as error:
            problems.append(f"{name}: {error}")
            continue
        if settings.backend == "replay":
            if not Path(settings.archive).exists():
                problems.append(f"{name}: replay needs the archive {settings.archive}, which does not exist")
            continue
        try:
            check_endpoint(settings)
        except UnapprovedEndpointError:
            problems.append(
                f"{name}: unapproved endpoint {endpoint_identity(settings)!r}; list it in llm.approved_endpoints "
                "once it is confirmed to keep no data, not train on it and have no human review"
            )
        if not os.environ.get(settings.api_key_env):
            problems.append(f"{name}: the environment variable {settings.api_key_env} (llm.api_key_env) is not set")
        if settings.model not in settings.prices_per_million:
            problems.append(
                f"{name}: llm.prices_per_million has no price for {settings.model}: its dollars are not "
                "counted and llm.budget_usd cannot stop its spending"
            )
    return problems
