"""Every prompt text of the project: the released inference template, the question and answer
generation prompts and the judge prompt. Prompts are data; changing one changes archive keys.

A released-template prompt that does not fit a token budget is shaped by a truncation policy
(`fit_prompt`), the same for fine-tuning examples and evaluation prompts: the template, the
question and `[Instruction End] ` are always kept whole and only the note is cut.
"""

from __future__ import annotations

from dataclasses import dataclass

from asclepius_r.errors import InputError

# The released Asclepius-R template, byte for byte: the "languge" typo and the space after
# "[Instruction End]" are part of the interface the published checkpoints were used with.
RELEASED_TEMPLATE = """You are an intelligent clinical languge model.
Below is a snippet of patient's discharge summary and a following instruction from healthcare professional.
Write a response that appropriately completes the instruction.
The response should provide the accurate answer to the instruction, while being concise.

[Discharge Summary Begin]
{note}
[Discharge Summary End]

[Instruction Begin]
{question}
[Instruction End] 
"""


def render_released(note: str, question: str) -> str:
    """The model input for a note and a question, exactly as the release documents it."""
    return RELEASED_TEMPLATE.format(note=note, question=question)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS before a text by itself (LLaMA-1/2, Llama-3) or not (SmolLM2)."""
    return tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]


def check_bos(tokenizer, where: str) -> None:
    """Prompts are plain text, never a chat template, and start with the base's BOS once
    (`encode_prompts`): the tokenizer must have a BOS token, and add neither an EOS nor a BOS after
    a text's start."""
    ids = tokenizer("x")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or bos in ids[1:] or (eos is not None and eos in ids):
        raise InputError(
            f"{where}: its tokenizer must have a BOS token ({tokenizer.bos_token!r}) and add, at most, that BOS "
            f"once at the start of a text and no EOS; it encodes 'x' as {ids} (check add_bos_token/add_eos_token "
            "in tokenizer_config.json or the post-processor in tokenizer.json)"
        )


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """The token ids of prompt texts, each led by the base's BOS once: the tokenizer's own where it
    adds one, prepended here where it does not. The one place a model input is tokenised, for
    fine-tuning, evaluation and the held-out losses alike."""
    encoded = tokenizer(texts)["input_ids"]
    if adds_bos(tokenizer):
        return encoded
    return [[tokenizer.bos_token_id, *ids] for ids in encoded]


# drop: leave the example out (what 2023 effectively did when its answer was cut off);
# note_middle: keep the note's start and end; note_tail: keep its start (cut the end).
TRUNCATION_POLICIES = ("drop", "note_middle", "note_tail")
# Stands where note text was cut, so a model can tell an omission from a note that says nothing.
REPLACEMENT_CHARACTER = "\ufffd"
CUT_MARK = "[...]"


@dataclass(frozen=True)
class FittedPrompt:
    text: str
    input_ids: list[int]
    truncated: bool


def _decode_whole_characters(tokenizer, ids: list[int], side: str) -> str:
    """`ids` decoded, less the tokens at the cut `side` ("end" or "start") that hold only part of a
    character's bytes: byte-level BPE (Llama-3) and byte fallback (LLaMA-1) split a multi-byte
    character over tokens, and decoding half of one gives U+FFFD, which the note never had."""
    start, stop = 0, len(ids)
    while start < stop:
        text = tokenizer.decode(ids[start:stop])
        if side == "end" and text.endswith(REPLACEMENT_CHARACTER):
            stop -= 1
        elif side == "start" and text.startswith(REPLACEMENT_CHARACTER):
            start += 1
        else:
            return text
    return ""


def cut_note(tokenizer, note_ids: list[int], keep: int, policy: str) -> str:
    """The note shown when only `keep` of its tokens fit: its start, or its start and end, cut
    between whole characters."""
    if policy == "note_tail":
        return f"{_decode_whole_characters(tokenizer, note_ids[:keep], 'end')}\n{CUT_MARK}"
    if policy == "note_middle":
        tail = keep // 2
        head = _decode_whole_characters(tokenizer, note_ids[: keep - tail], "end")
        end = _decode_whole_characters(tokenizer, note_ids[len(note_ids) - tail :], "start") if tail else ""
        return f"{head}\n{CUT_MARK}\n{end}"
    raise ValueError(f"truncation policy {policy!r} cuts no note (expected note_middle or note_tail)")


def fit_prompt(
    tokenizer, note: str, question: str, max_tokens: int, policy: str, prompt_ids: list[int] | None = None
) -> FittedPrompt | None:
    """The released prompt in at most `max_tokens` tokens (BOS included), cut by `policy`.

    None when it does not fit and the policy is `drop`, or when even an empty note does not fit.
    `prompt_ids` are the untruncated prompt's ids when the caller has them already.
    """
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation policy {policy!r} (expected one of {TRUNCATION_POLICIES})")
    text = render_released(note, question)
    ids = encode_prompts(tokenizer, [text])[0] if prompt_ids is None else prompt_ids
    if len(ids) <= max_tokens:
        return FittedPrompt(text, ids, False)
    if policy == "drop":
        return None
    note_ids = tokenizer(note, add_special_tokens=False)["input_ids"]
    # Room for the cut mark, and for the token or two that decoding and re-tokenising a cut note
    # can shift at the seams, so that the first cut usually fits.
    slack = 2 + len(tokenizer(f"\n{CUT_MARK}\n", add_special_tokens=False)["input_ids"])
    keep = len(note_ids)
    while keep > 0:
        keep = max(0, keep - (len(ids) - max_tokens) - slack)
        text = render_released(cut_note(tokenizer, note_ids, keep, policy), question)
        ids = encode_prompts(tokenizer, [text])[0]
        if len(ids) <= max_tokens:
            return FittedPrompt(text, ids, True)
    return None


def fit_released_prompt(tokenizer, note: str, question: str, max_prompt_tokens: int, policy: str) -> str | None:
    """The text of `fit_prompt`: what a model is given for this note and question under `policy`."""
    fitted = fit_prompt(tokenizer, note, question, max_prompt_tokens, policy)
    return None if fitted is None else fitted.text


QUESTION_PROMPT = """You are a healthcare professional who uses a clinical language model to work with patients' discharge summaries.
Your task type is: {task}.

[Discharge Summary Begin]
{note}
[Discharge Summary End]

Here are instructions that colleagues wrote for this task type on other notes:
[Example Questions Begin]
{examples}
[Example Questions End]

Write one new instruction of the task type "{task}" about the discharge summary above.
Rules:
- It must differ from the examples; do not reuse their opening verbs or sentence structure.
- It must be answerable from this discharge summary alone.
- Keep it as short as the task allows.
- Reply with the instruction only, with no numbering, quotes or explanation."""

ANSWER_PROMPT = """[Discharge Summary Begin]
{note}
[Discharge Summary End]

[Instruction Begin]
{question}
[Instruction End]

Respond to the instruction above using only the discharge summary.
Rules:
- Be accurate and concise.
- If the discharge summary does not contain what is needed, say so and explain what is missing.
- Do not describe yourself or mention being an AI.
- Do not ask questions back and do not restate the instruction.
Response:"""


def render_question_prompt(task: str, note: str, examples: list[str]) -> str:
    return QUESTION_PROMPT.format(task=task, note=note, examples="\n".join(f"- {q}" for q in examples))


def render_answer_prompt(note: str, question: str) -> str:
    return ANSWER_PROMPT.format(note=note, question=question)


# The judge of the paper's evaluation: every candidate answer to one (note, instruction) in one
# prompt, as Agent A, B, ... in shuffled order, scored on a 1-4 rubric; the first line of the
# reply carries only the scores, so it can be parsed strictly.
JUDGE_PROMPT = """You are an expert clinician reviewing answers that clinical language models gave to an instruction about a patient's discharge summary.

[Discharge Summary Begin]
{note}
[Discharge Summary End]

[Instruction Begin]
{question}
[Instruction End]

{answers}

Score each agent's answer with this rubric:
1 (Unacceptable): anything in it is wrong or irrelevant, or it fails to notice that the instruction cannot be answered from the discharge summary.
2 (Poor): nothing in it is wrong, but it leaves out significant information.
3 (Satisfactory): nothing in it is wrong and it leaves out only minor details.
4 (Excellent): it is correct and complete, or it correctly says that the discharge summary does not contain the answer.

On the first line, write only the {count} scores, for {agents} in that order, separated by single spaces (for example: {example}).
From the second line on, explain each score briefly."""

JUDGE_RETRY_PROMPT = """Your reply could not be read: the first line must hold exactly {count} scores from 1 to 4, for {agents} in that order, separated by single spaces, and nothing else.
Reply again in that format."""


def render_judge_prompt(note: str, question: str, answers: list[str]) -> str:
    """The judge prompt for answers already in agent order (A first)."""
    labels = agent_labels(len(answers))
    blocks = "\n\n".join(
        f"[Agent {label}'s Answer Begin]\n{answer}\n[Agent {label}'s Answer End]"
        for label, answer in zip(labels, answers)
    )
    return JUDGE_PROMPT.format(
        note=note,
        question=question,
        answers=blocks,
        count=len(answers),
        agents=_agent_list(labels),
        example=" ".join("3" for _ in labels),
    )


def render_judge_retry(count: int) -> str:
    return JUDGE_RETRY_PROMPT.format(count=count, agents=_agent_list(agent_labels(count)))


def agent_labels(count: int) -> list[str]:
    if not 1 <= count <= 26:
        raise ValueError(f"the judge compares 1 to 26 answers at once, not {count}")
    return [chr(ord("A") + i) for i in range(count)]


def _agent_list(labels: list[str]) -> str:
    names = [f"Agent {label}" for label in labels]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
