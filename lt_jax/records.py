"""Result files that survive kills and split across processes: JSONL, a first line {"meta": ...} recording what
the file was made with, then one row per key (e.g. (example, method) for `lt-jax eval`, the input line for batch
`lt-jax generate`).

- One process (`Records`): rows are appended, flushed and fsync'd one at a time; a rerun keeps every complete
  row, drops the half-written last line a kill can leave, and refuses a file made with other settings. So a killed
  run loses at most the row in flight and never counts one twice.
- Several processes (`open_part`, `merge_parts`): each process appends only to its own part file next to the
  result (`out.jsonl.part-I-of-N`), never to another's, and skips the keys already in the result or in any part
  (from this run or an earlier one with another process count). When every process is done, process 0 merges the
  result and every part into the result (written whole, then renamed into place; duplicates dropped) and only then
  deletes the parts, so a kill during the merge loses nothing either.

`shared` is the one way a command writes a result file, by one process or by every process of a job.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

from lt_jax import distributed
from lt_jax.errors import LtJaxError
from lt_jax.files import differences


class Records:
    """The rows of one JSONL file that this process owns (creates, repairs and appends to)."""

    def __init__(self, path: Path, meta: dict, key: Callable[[dict], object], what: str = "lt-jax eval"):
        self.path, self.key, self.what = Path(path), key, what
        self.rows = read_rows(self.path, meta, key, what, repair=True)
        if not self.path.exists() or not self.path.stat().st_size:  # a new file, or an empty one
            self.path.write_text(json.dumps({"meta": meta}) + "\n")
        self.done = {key(r) for r in self.rows}

    def add(self, row: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.done.add(self.key(row))


def read_rows(path: Path, meta: dict | None, key, what: str, repair: bool = False) -> list[dict]:
    """The complete rows of `path` ([] if it does not exist), after checking that it is a file of `what` made with
    `meta` (None: any settings; a check that can run before the model loads). A half-written last line is
    dropped: truncated away with repair=True (the owner), else ignored."""
    path = Path(path)
    if not path.exists() or not path.stat().st_size:
        return []
    raw = path.read_bytes()
    complete, _, partial = raw.rpartition(b"\n")
    try:
        text = complete.decode()
    except UnicodeDecodeError:
        raise LtJaxError(f"{path} is not a results file of {what} (not UTF-8 text).") from None
    lines = [_parse(path, number, line, what) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines or "meta" not in lines[0]:
        raise LtJaxError(f"{path} is not a results file of {what} (its first line is not the settings line); give "
                         f"another output file.")
    if meta is not None and lines[0]["meta"] != meta:
        diff = "; ".join(differences(lines[0]["meta"] or {}, meta))
        raise LtJaxError(f"{path} holds results made with other settings ({diff}); give another output file or "
                         f"delete it.")
    if partial and repair:  # ours, with a killed run's half-written row: drop it
        print(f"[{what}] {path}: dropping an incomplete last row", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(len(complete) + 1)
    rows = lines[1:]
    for number, row in enumerate(rows, 2):
        try:
            key(row)
        except (KeyError, TypeError):
            raise LtJaxError(f"{path} line {number} is not a result row of {what}.") from None
    return rows



def _parse(path: Path, number: int, line: str, what: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise LtJaxError(f"{path} line {number} is not valid JSON ({e.msg}): not a results file of {what}?")
    if not isinstance(row, dict):
        raise LtJaxError(f"{path} line {number} is not a result row of {what}.")
    return row


# ---- several processes --------------------------------------------------------------------------------------

def part_path(path: Path, index: int, count: int) -> Path:
    return Path(path).with_name(f"{Path(path).name}.part-{index}-of-{count}")


def part_paths(path: Path) -> list[Path]:
    path = Path(path)
    return sorted(path.parent.glob(f"{path.name}.part-*-of-*"))


def open_part(path: Path, meta: dict, key, index: int, count: int, what: str = "lt-jax eval") -> Records:
    """This process's part of a result written by `count` processes: its own part file, with `done` holding every
    key already in the result or in any part (so no key is run twice, whichever process ran it before)."""
    mine = Records(part_path(path, index, count), meta, key, what)
    for other in [Path(path), *part_paths(path)]:
        if other != mine.path:
            mine.done |= {key(r) for r in read_rows(other, meta, key, what)}
    return mine


def merge_parts(path: Path, meta: dict, key, order=None, what: str = "lt-jax eval") -> list[dict]:
    """Process 0, once every process is done: the result and every part -> the result (meta line, then each key's
    first row, sorted by `order` if given), written whole and renamed into place before the parts are deleted."""
    path = Path(path)
    parts = part_paths(path)
    rows, seen = [], set()
    for source in [path, *parts]:
        for row in read_rows(source, meta, key, what):
            if key(row) not in seen:
                seen.add(key(row))
                rows.append(row)
    if order is not None:
        rows.sort(key=order)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    for part in parts:
        part.unlink()
    return rows


@contextlib.contextmanager
def shared(path: Path, meta: dict, key, what: str, order=None, share: tuple[int, int] | None = None):
    """The writer of this process's rows of the result `path` (`done`: keys to skip, `add(row)`), for one process
    or for every process of a job (`share`: (index, count), default `lt_jax.distributed.share()`). When the body
    ends, several processes meet at a barrier, process 0 merges (rows sorted by `order`), and `rows` becomes every
    process's rows."""
    path = Path(path)
    index, count = share or distributed.share()
    if count == 1 and part_paths(path):  # parts of an earlier multi-process run
        merge_parts(path, meta, key, order, what)
    writer = Records(path, meta, key, what) if count == 1 else open_part(path, meta, key, index, count, what)
    yield writer
    if count > 1:
        distributed.barrier(f"{what} {path.name}: rows written")
        if index == 0:
            merge_parts(path, meta, key, order, what)
        distributed.barrier(f"{what} {path.name}: merged")
        writer.rows = read_rows(path, meta, key, what)
