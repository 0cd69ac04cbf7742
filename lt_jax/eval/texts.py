"""Reading text inputs: plain files and JSONL, with errors that name the file and the line."""
from __future__ import annotations

import json
from pathlib import Path

from lt_jax.errors import LtJaxError


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LtJaxError(f"cannot read text file {path}: {e}.") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per non-blank line."""
    return [record for _, record in numbered_jsonl(path)]


def numbered_jsonl(path: str | Path, text: str | None = None) -> list[tuple[int, dict]]:
    """(line number, object) per non-blank line of a JSONL file (or of its `text`, already read); a line that is
    not a JSON object is one error naming the file and line."""
    records = []
    for number, line in enumerate((read_text(path) if text is None else text).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LtJaxError(f"{path} line {number} is not valid JSON: {e.msg}.") from None
        if not isinstance(record, dict):
            raise LtJaxError(f"{path} line {number} is not a JSON object.")
        records.append((number, record))
    return records


def read_samples(paths, field: str = "text") -> list[str | list[int]]:
    """Samples from plain files (one text each) and .jsonl files (the `field` of every line: a text, or a list of
    token ids for pre-tokenized data)."""
    texts = []
    for path in paths:
        if Path(path).suffix != ".jsonl":
            texts.append(read_text(path))
            continue
        for number, record in enumerate(read_jsonl(path), 1):
            value = record.get(field)
            is_ids = isinstance(value, list) and all(isinstance(t, int) for t in value)
            if not isinstance(value, str) and not is_ids:
                raise LtJaxError(f"{path} record {number} has no field {field!r} holding a text or a list of ids.")
            texts.append(value)
    return texts


def parse_list(text: str, kind, flag: str) -> list:
    """'1,2,4' -> [kind(1), kind(2), kind(4)]; a clear error naming `flag` otherwise."""
    try:
        values = [kind(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        raise LtJaxError(f"{flag} must be a comma-separated list of {kind.__name__} values; got {text!r}.") from None
    if not values:
        raise LtJaxError(f"{flag} is empty.")
    return values
