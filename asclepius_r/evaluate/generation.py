"""Answer generation with a trained checkpoint and the released template (batched).

Prompts are fitted to the model's context first: prompt + `max_new_tokens` never exceeds
`max_position_embeddings` (or a smaller configured `max_prompt_tokens`), and a long note is cut
by the truncation policy so the question and `[Instruction End] ` always stay in the prompt.
Decoding follows `evaluate` in config: greedy by default, 2023's 5-beam sampling as an option.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asclepius_r.prompts import FittedPrompt, check_bos, encode_prompts, fit_prompt


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded (config `evaluate`); 2023 used num_beams 5, do_sample, temperature 1."""

    max_new_tokens: int
    num_beams: int
    do_sample: bool
    temperature: float

    @classmethod
    def from_config(cls, section: dict) -> Decoding:
        """The `evaluate` section's decoding settings."""
        return cls(
            max_new_tokens=section["max_new_tokens"],
            num_beams=section["num_beams"],
            do_sample=section["do_sample"],
            temperature=section["temperature"],
        )

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": self.do_sample}
        # transformers warns about a temperature that greedy or beam decoding ignores.
        return {**kwargs, "temperature": self.temperature} if self.do_sample else kwargs


def load_for_generation(model_dir: str, device: str | None = None):
    """The model on `device` (default: the first CUDA device if any, else CPU) and its tokenizer."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    check_bos(tokenizer, model_dir)
    if tokenizer.pad_token is None:
        # Batching needs a pad id (masked, left of the prompt); BOS would be wrong. LLaMA-1 has
        # <unk>; Llama-3 has none, and its EOS, where generation stops anyway, serves.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.to(device).eval()
    return model, tokenizer


def prompt_budget(model, max_new_tokens: int, max_prompt_tokens: int | None = None) -> int:
    """Tokens a prompt may use so that it and `max_new_tokens` fit the model's positions."""
    context = model.config.max_position_embeddings
    budget = context - max_new_tokens
    if budget < 1:
        raise ValueError(
            f"config key evaluate.max_new_tokens: {max_new_tokens} leaves no room for a prompt "
            f"in the model's {context} positions"
        )
    return budget if max_prompt_tokens is None else min(budget, max_prompt_tokens)


def fit_prompts(tokenizer, pairs: list[tuple[str, str]], budget: int, policy: str) -> list[FittedPrompt]:
    """Each (note, question) as a released prompt of at most `budget` tokens, the note cut by `policy`.

    Nothing is dropped at evaluation (every model must answer every question the judge compares),
    so `drop`, which has no cut to make, shows long notes as `note_middle` does.
    """
    cut = "note_middle" if policy == "drop" else policy
    fitted = []
    for i, (note, question) in enumerate(pairs):
        prompt = fit_prompt(tokenizer, note, question, budget, cut)
        if prompt is None:
            raise ValueError(f"prompt {i}: the template and question alone exceed the {budget}-token prompt budget")
        fitted.append(prompt)
    return fitted


@torch.inference_mode()
def generate_answers(
    model, tokenizer, prompts: list[str], decoding: Decoding, batch_size: int, seed: int = 0
) -> list[str]:
    """Answers to already fitted prompt texts, in order; sampling is seeded per batch."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        ids = encode_prompts(tokenizer, prompts[start : start + batch_size])
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
        torch.manual_seed(seed + start)
        output = model.generate(
            **batch,
            **decoding.generate_kwargs(),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]
