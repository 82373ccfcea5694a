"""Every prompt text of the project: the released inference template, the question and answer
generation prompts and the judge prompt. Prompts are data; changing one changes archive keys.
"""

from __future__ import annotations

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
