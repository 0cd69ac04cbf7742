"""Prompts built from long text (the eval tasks and the retrieval probe use them): needles (numbers) hidden at
chosen depths of a haystack.

- `needle_prompt`: one number, essays as haystack, chat formatted (the LightTransfer-Test benchmark's prompt).
- `niah_prompt`: RULER's niah_single / niah_multikey: keyed needles ("One of the special magic numbers for
  {key} is: {value}."), one key asked, the others distractors.
- `passkey_prompt`: the classic passkey retrieval (Mohtashami & Jaggi 2023): repeated filler sentences, plain
  completion, no chat template.
"""
from __future__ import annotations

import re

import numpy as np

NEEDLE = "The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."
ANSWER_PREFIX = "The special magic number is"  # opens the assistant's turn (as RULER does), so the number comes next

KEYED_NEEDLE = "One of the special magic numbers for {key} is: {value}."
KEYED_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
KEYED_ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
# Keys are adjective-noun pairs, as RULER's word keys; a fixed list keeps this dependency-free and reproducible.
ADJECTIVES = ("quiet silver brave hollow gentle crimson rapid ancient narrow bitter frozen golden humble "
              "lucky noisy patient rural sharp tidy vivid").split()
NOUNS = ("harbor lantern meadow falcon pepper canyon ribbon walnut glacier orchard compass thimble violin "
         "marble saddle beacon pebble cactus kettle anchor").split()

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def haystack_prompt(model, haystack_ids: list[int], length: int, needles: list[tuple[float, str]], question: str,
                    answer_prefix: str) -> list[int]:
    """Chat-formatted prompt of at most `length` tokens (a few less where re-tokenizing the joins merges tokens):
    haystack text with each needle sentence inserted after the fraction `depth` of it (at a token boundary), then
    the question, then the answer's opening words (which open the assistant's turn). `haystack_ids` must be long
    enough."""
    prefix = model.tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
    budget = length - len(model.chat_ids(" ".join(s for _, s in needles) + f"\n\n{question}")) - len(prefix)
    if len(haystack_ids) < budget:
        raise ValueError(f"haystack of {len(haystack_ids)} tokens is too short for a {length}-token prompt.")
    for _ in range(32):  # the joins can re-tokenize into a token or two more: shorten the haystack by the excess
        # (each cut moves with the body, so the excess can recur: 4 tries were too few for 4 needles at 8K)
        body = haystack_ids[:budget]
        cuts = sorted((int(round(depth * len(body))), sentence) for depth, sentence in needles)
        parts, start = [], 0
        for cut, sentence in cuts:
            parts += [model.decode(body[start:cut]), sentence]
            start = cut
        parts.append(model.decode(body[start:]))
        ids = model.chat_ids(" ".join(p for p in parts if p) + f"\n\n{question}") + prefix
        if len(ids) <= length:
            return ids
        budget -= len(ids) - length
    raise ValueError(f"cannot fit the needles into {length} tokens.")


def needle_prompt(model, haystack_ids: list[int], length: int, depth: float, number: int) -> list[int]:
    """One unkeyed needle (`NEEDLE`) at `depth`; see `haystack_prompt`."""
    return haystack_prompt(model, haystack_ids, length, [(depth, NEEDLE.format(number=number))], QUESTION,
                           ANSWER_PREFIX)


def niah_prompt(model, haystack_ids: list[int], length: int, depth: float, rng: np.random.Generator,
                keys: int = 1) -> tuple[list[int], str]:
    """RULER-style keyed needle: `keys` needles with distinct keys and 7-digit values, the asked one at `depth`,
    the distractors at depths drawn from `rng`. Returns (prompt ids, the asked value)."""
    pairs = rng.choice(len(ADJECTIVES) * len(NOUNS), keys, replace=False)
    names = [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}" for i in pairs]
    values = [str(v) for v in rng.integers(1_000_000, 10_000_000, keys)]
    depths = [depth] + [float(d) for d in rng.uniform(0, 1, keys - 1)]
    needles = [(d, KEYED_NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, names, values)]
    ids = haystack_prompt(model, haystack_ids, length, needles, KEYED_QUESTION.format(key=names[0]),
                          KEYED_ANSWER_PREFIX.format(key=names[0]))
    return ids, values[0]


def passkey_prompt(model, length: int, depth: float, passkey: int) -> list[int]:
    """Plain-text prompt of at most `length` tokens (whole filler sentences, so within one filler's length of the
    target): the task line, filler, the pass key line after the fraction `depth` of the filler, filler, question."""
    filler = len(model.tokenizer(" " + PASSKEY_FILLER, add_special_tokens=False)["input_ids"])
    line = PASSKEY_LINE.format(key=passkey)
    overhead = len(model.encode(f"{PASSKEY_TASK} {line} {PASSKEY_QUESTION}"))
    repeats = max(0, (length - overhead) // filler)
    while True:  # at most `length`: drop a filler sentence while the joins cost a token more than counted
        before = int(round(depth * repeats))
        ids = model.encode(" ".join([PASSKEY_TASK] + [PASSKEY_FILLER] * before + [line]
                                    + [PASSKEY_FILLER] * (repeats - before) + [PASSKEY_QUESTION]))
        if len(ids) <= length or repeats == 0:
            return ids
        repeats -= 1


def first_number(answer: str) -> str | None:
    match = re.search(r"\d+", answer.replace(",", ""))
    return match.group(0) if match else None
