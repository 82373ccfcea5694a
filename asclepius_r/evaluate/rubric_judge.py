"""The demo's judge: a deterministic heuristic in place of GPT-4, with no model and no network.

The demo's tiny models answer with noise and the demo may not reach any service, so its judge
verdicts come from this rule instead: each agent's answer gets the paper's 1-4 score from its
ROUGE-L F1 against the reference answer (>= 0.5: 4, >= 0.3: 3, >= 0.1: 2, else 1). It is a
backend of the real LLM client (`judge.backend: heuristic`), so the demo's judge prompts, agent
shuffling, strict parsing and archive are the paper run's; only the reply is computed here.
Its scores say nothing about clinical quality, and docs/evaluation.md says so.
"""

from __future__ import annotations

import re
import time

from asclepius_r.llm import ChatRequest, ChatResult
from asclepius_r.rouge import rouge_l

THRESHOLDS = ((0.5, 4), (0.3, 3), (0.1, 2))
_AGENT_ANSWER = re.compile(r"\[Agent ([A-Z])'s Answer Begin\]\n(.*?)\n\[Agent \1's Answer End\]", re.DOTALL)


def rubric_score(answer: str, reference: str) -> int:
    overlap = rouge_l(answer, reference)
    return next((score for threshold, score in THRESHOLDS if overlap >= threshold), 1)


class ReferenceRubricJudge:
    """Replies to a judge prompt with one heuristic score per agent on its first line."""

    def __init__(self, references: dict[int, str]):
        self.references = references

    async def send(self, request: ChatRequest) -> tuple[ChatResult, dict]:
        row_id = request.meta["row_id"]
        if row_id not in self.references:
            raise LookupError(f"no reference answer for held-out ROW_ID {row_id}")
        answers = _AGENT_ANSWER.findall(request.messages[0][1])
        scores = [rubric_score(answer, self.references[row_id]) for _, answer in answers]
        text = (
            " ".join(str(s) for s in scores)
            + "\n"
            + "Demo heuristic, not a language model: scores from ROUGE-L F1 against the reference answer."
        )
        now = time.time()
        return ChatResult(
            key=request.key,
            status="ok",
            text=text,
            finish_reason="stop",
            provider={"model": "reference-rubric heuristic (demo)"},
            started=now,
            finished=now,
        ), {}
