"""Training data (docs/design.md §13): files -> labelled token sequences -> the batch of a given step.

Formats, told apart per file and per JSONL line:
- a plain text file (not .jsonl): tokenized whole, split into `seq_len` windows, every token labelled;
- JSONL `{"text"}`: the same per line; `{"prompt", "completion"}`: loss on the completion (and the EOS after it)
  only; `{"messages"}`: the tokenizer's chat template, loss on the assistant turns only; `{"ids"[, "labels"]}`:
  pre-tokenized (labels aligned with ids, -100 = not predicted; default: every token).

Each sequence is one row (left padded with position -1): attention never crosses documents. The order is a pure
function of (seed, step): the permutation of epoch e is drawn from (seed, e), and step s takes the next
`batch_size * grad_accum` sequences of that endless stream, so a resumed run sees exactly the batches an
uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from lt_jax.batching import bucket
from lt_jax.errors import LtJaxError
from lt_jax.files import numbered_jsonl, read_jsonl, read_text
from lt_jax.train.step import IGNORE


@dataclasses.dataclass
class Sequences:
    """Labelled sequences (int32 ids, int32 labels: the id, or IGNORE) and what reading dropped."""
    ids: list[np.ndarray]
    labels: list[np.ndarray]
    dropped: int = 0  # shorter than 2 tokens, or nothing left to predict
    truncated: int = 0  # prompt/completion or chat records longer than seq_len: their start cut

    def __len__(self):
        return len(self.ids)

    def fingerprint(self) -> str:
        """sha256 of every id and label in order: what `--resume` compares with the saved run."""
        h = hashlib.sha256()
        for ids, labels in zip(self.ids, self.labels):
            h.update(np.int64(len(ids)).tobytes() + ids.tobytes() + labels.tobytes())
        return h.hexdigest()[:16]

    @property
    def tokens(self) -> int:
        return int(sum(len(i) for i in self.ids))


def read_sequences(paths, model, seq_len: int) -> Sequences:
    """Reads and tokenizes every file (errors name the file and line), before any training."""
    if not paths:
        raise LtJaxError("no data files given.")
    out = Sequences([], [])
    vocab = model.config.vocab_size
    for path in paths:
        path = Path(path)
        if path.suffix != ".jsonl":
            _add_windows(out, _encode(model, read_text(path), f"text file {path}"), seq_len)
            continue
        for number, record in enumerate(read_jsonl(path), 1):
            where = f"{path} line {number}"
            try:
                _add_record(out, record, model, seq_len, vocab)
            except (TypeError, ValueError, KeyError) as e:
                raise LtJaxError(f"{where}: {e}") from None
            except LtJaxError as e:
                raise LtJaxError(f"{where}: {e}") from None
    if not out.ids:
        raise LtJaxError(f"no training sequence of at least 2 tokens with a labelled token in "
                         f"{', '.join(map(str, paths))}"
                         f" ({out.dropped} too short or without targets).")
    return out


def _encode(model, text: str, where: str, special: bool = True) -> list[int]:
    if model.tokenizer is None:
        raise LtJaxError(f"{where} holds text but the model has no tokenizer; give pre-tokenized JSONL "
                         f"({{\"ids\": [...]}}) instead.")
    return model.tokenizer(text, add_special_tokens=special)["input_ids"]


def _add(out: Sequences, ids, labels):
    ids, labels = np.asarray(ids, np.int32), np.asarray(labels, np.int32)
    if len(ids) < 2 or not np.any(labels[1:] != IGNORE):
        out.dropped += 1
        return
    out.ids.append(ids)
    out.labels.append(labels)


def _add_windows(out: Sequences, ids: list[int], seq_len: int):
    for start in range(0, max(len(ids), 1), seq_len):
        window = ids[start:start + seq_len]
        _add(out, window, window)


CHAT_ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates render (Llama, Qwen2, SmolLM2)


def check_messages(messages, assistant: bool = True) -> None:
    """A conversation's shape: {role, content} objects with texts, each role one the chat templates know (a typo
    such as "wizard" would be rendered as some other turn or dropped), and (for training) an assistant turn."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError("messages must be a non-empty list of {\"role\", \"content\"} objects with string values.")
    unknown = [m["role"] for m in messages if m["role"] not in CHAT_ROLES]
    if unknown:
        raise ValueError(f"role {unknown[0]!r} is not one of the chat roles {', '.join(CHAT_ROLES)}.")
    if assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("messages hold no assistant turn to learn.")


def record_kind(record: dict) -> str:
    """Which format a JSONL line is (text, prompt, messages, ids), its fields' types checked; nothing tokenized."""
    kinds = [k for k in ("text", "prompt", "messages", "ids") if k in record]
    if len(kinds) != 1:
        raise ValueError("expected exactly one of the fields text, prompt (+ completion), messages, ids; got "
                         f"{sorted(record)}.")
    kind = kinds[0]
    if kind == "text" and not isinstance(record["text"], str):
        raise ValueError("field text is not a string.")
    if kind == "prompt" and not (isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)):
        raise ValueError("prompt and completion must both be strings.")
    if kind == "messages":
        check_messages(record["messages"])
    return kind


def check_files(paths) -> None:
    """Every JSONL line's format, before the model loads (a bad line fails in seconds, not after the load)."""
    for path in paths:
        if Path(path).suffix != ".jsonl":
            continue
        for number, record in numbered_jsonl(path):
            try:
                record_kind(record)
            except ValueError as e:
                raise LtJaxError(f"{path} line {number}: {e}") from None


def _add_record(out: Sequences, record: dict, model, seq_len: int, vocab: int):
    kind = record_kind(record)
    if kind == "text":
        _add_windows(out, _encode(model, record["text"], "field text"), seq_len)
        return
    if kind == "ids":
        ids = record["ids"]
        labels = record.get("labels", ids)
        if not _int_list(ids) or not _int_list(labels) or len(labels) != len(ids):
            raise ValueError("ids must be a list of integers, and labels (if given) one integer per id.")
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise ValueError(f"ids must lie in 0..{vocab - 1}.")
        if any(lab != IGNORE and not 0 <= lab < vocab for lab in labels):
            raise ValueError(f"labels must be ids in 0..{vocab - 1} or {IGNORE}.")
        _add_truncated(out, ids, labels, seq_len)
        return
    if kind == "prompt":
        prompt, completion = record["prompt"], record["completion"]
        head = _encode(model, prompt, "field prompt")
        tail = _encode(model, completion, "field completion", special=False) + _eos(model)
        _add_truncated(out, head + tail, [IGNORE] * len(head) + tail, seq_len)
        return
    ids, labels = chat_sequence(model, record["messages"])
    _add_truncated(out, ids, labels, seq_len)


def _add_truncated(out: Sequences, ids, labels, seq_len: int):
    if len(ids) > seq_len:  # keep the end: the answer a prompt leads to
        ids, labels = ids[-seq_len:], labels[-seq_len:]
        out.truncated += 1
    _add(out, ids, labels)


def _int_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _eos(model) -> list[int]:
    eos = model.config.eos_token_ids
    return [eos[0]] if eos else []


def chat_sequence(model, messages) -> tuple[list[int], list[int]]:
    """A conversation through the chat template, labels on the assistant turns only. Each assistant turn's tokens
    are the difference between the rendering up to it (with the generation prompt) and the rendering including
    it, so whatever the template wraps around a turn (the assistant header) stays unlabelled."""
    check_messages(messages)
    if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
        raise LtJaxError("chat messages need a tokenizer with a chat template, and this model has none.")

    def render(turns, generation_prompt=False):
        ids = model.tokenizer.apply_chat_template(turns, add_generation_prompt=generation_prompt, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        upto = render(messages[:i + 1])
        if message["role"] == "assistant":
            opened = render(messages[:i], generation_prompt=True)
            if upto[:len(opened)] != opened or opened[:len(ids)] != ids:
                raise ValueError("the chat template does not render turn by turn as a prefix; cannot find the "
                                 "assistant tokens.")
            labels += [IGNORE] * (len(opened) - len(ids)) + upto[len(opened):]
        else:
            if upto[:len(ids)] != ids:
                raise ValueError("the chat template does not render turn by turn as a prefix; cannot find the "
                                 "assistant tokens.")
            labels += [IGNORE] * (len(upto) - len(ids))
        ids = upto
    return ids, labels


def step_rows(n: int, rows_per_step: int, seed: int, step: int) -> np.ndarray:
    """Indices of the sequences step `step` trains on: positions [step*R, (step+1)*R) of the stream of epoch
    permutations, epoch e's drawn from (seed, e)."""
    at = np.arange(step * rows_per_step, (step + 1) * rows_per_step)
    epochs, index = np.divmod(at, n)
    out = np.empty(rows_per_step, np.int64)
    for epoch in np.unique(epochs):  # one permutation per epoch the step touches (one or two)
        here = epochs == epoch
        out[here] = np.random.default_rng([seed, int(epoch)]).permutation(n)[index[here]]
    return out


def make_batch(data: Sequences, rows: np.ndarray, micro_batches: int, seq_len: int) -> dict:
    """The rows as {"tokens", "positions", "labels"} int32 [A, B, T], left padded; T is the longest row's bucket
    (at most seq_len), so few shapes compile."""
    longest = max(len(data.ids[r]) for r in rows)
    T = min(bucket(longest, 16), seq_len) if longest <= seq_len else longest
    tokens = np.zeros((len(rows), T), np.int32)
    positions = np.full((len(rows), T), -1, np.int32)
    labels = np.full((len(rows), T), IGNORE, np.int32)
    for b, r in enumerate(rows):
        n = len(data.ids[r])
        tokens[b, T - n:], labels[b, T - n:], positions[b, T - n:] = data.ids[r], data.labels[r], np.arange(n)
    shape = (micro_batches, len(rows) // micro_batches, T)
    return {"tokens": tokens.reshape(shape), "positions": positions.reshape(shape), "labels": labels.reshape(shape)}


def eval_batches(data: Sequences, batch_size: int, seq_len: int):
    """The held-out sequences in order, as [B, T] batches."""
    for start in range(0, len(data), batch_size):
        rows = np.arange(start, min(start + batch_size, len(data)))
        yield {k: v[0] for k, v in make_batch(data, rows, 1, seq_len).items()}
