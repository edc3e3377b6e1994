"""Experts as data: rendering an (expert, question) pair into the model's chat format.

Training and generation share these functions, so the tokens the policy is trained on
are exactly the tokens it was sampled from.
"""

from __future__ import annotations

from meml.core.config import ExpertConfig
from meml.core.types import Example, Expert


def experts_from_config(experts: list[ExpertConfig]) -> list[Expert]:
    return [Expert(e.name, e.system_prompt, e.trace_source) for e in experts]


def user_message(example: Example, format_instruction: str) -> str:
    return f"{example.question}\n\n{format_instruction}" if format_instruction else example.question


def render_prompt(tokenizer, expert: Expert, example: Example, format_instruction: str) -> str:
    """Chat-formatted prompt text ending where the assistant's answer starts."""
    messages = [
        {"role": "system", "content": expert.system_prompt},
        {"role": "user", "content": user_message(example, format_instruction)},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, expert: Expert, example: Example, format_instruction: str) -> list[int]:
    text = render_prompt(tokenizer, expert, example, format_instruction)
    # The template already holds any BOS/special tokens; adding them again would shift
    # training tokens away from what was sampled.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_ids(tokenizer, response: str) -> list[int]:
    """Token ids of a target response (SFT, HSFT), ending with the end-of-turn token."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]
