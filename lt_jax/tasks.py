"""Evaluation prompts built from long text: needle-in-a-haystack (a number hidden at a chosen depth)."""
from __future__ import annotations

import re

NEEDLE = "The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."
ANSWER_PREFIX = "The special magic number is"  # opens the assistant's turn (as RULER does), so the number comes next


def needle_prompt(model, haystack_ids: list[int], length: int, depth: float, number: int) -> list[int]:
    """Chat-formatted prompt of about `length` tokens: haystack text with the needle sentence inserted after the
    fraction `depth` of it (at a token boundary), then the question, then the answer's opening words.
    `haystack_ids` must be long enough."""
    prefix = model.tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    overhead = len(model.chat_ids(f"{NEEDLE.format(number=number)}\n\n{QUESTION}")) + len(prefix)
    body = haystack_ids[:length - overhead]
    if len(body) < length - overhead:
        raise ValueError(f"haystack of {len(haystack_ids)} tokens is too short for a {length}-token prompt.")
    cut = int(round(depth * len(body)))
    text = (f"{model.decode(body[:cut])} {NEEDLE.format(number=number)} {model.decode(body[cut:])}"
            f"\n\n{QUESTION}")
    return model.chat_ids(text) + prefix


def first_number(answer: str) -> str | None:
    match = re.search(r"\d+", answer.replace(",", ""))
    return match.group(0) if match else None
