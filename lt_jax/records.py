"""Result files that survive kills and split across processes. A result is a pair:

- `OUT` (e.g. `out.jsonl`): JSONL, one row per key (e.g. (example, method) for `lt-jax eval`, the input line for
  batch `lt-jax generate`) and nothing else, so `pandas.read_json(OUT, lines=True)`, `datasets.load_dataset("json",
  data_files=OUT)` or a loop over `json.loads(line)` read every line as a row;
- `OUT.meta.json` (`sidecar`): `{"written_by": "lt-jax eval", "settings": {...}}`, what the rows were made with,
  written atomically (`files.write_atomic`). A rerun with these settings continues the file; other settings are
  refused in one sentence naming what differs. Both are the output: `output` checks each before any work.

The sidecar is written before the first row exists and changes only when a run grows the result (`grow`: more
samples of the same draw, so every row stays a row of the new settings; rewritten atomically before the first new
row). So whatever a kill leaves reads as one of: no file (a new result); a sidecar and no rows, or an empty OUT (a result with no row yet); a sidecar and
rows. Rows without a sidecar come from nowhere but earlier versions, which wrote the settings as a first line
`{"meta": ...}`: such a file is read as it is by readers, and converted in place by its owner when it resumes it
(sidecar written first, then the rows without that line renamed over OUT; a kill in between leaves a sidecar and
the old line, which agree, and the next run finishes the conversion). A JSONL with neither is refused, naming it.

- One process (`Records`): rows are appended, flushed and fsync'd one at a time; a rerun keeps every complete
  row, drops the half-written last line a kill can leave, and refuses a result made with other settings. So a
  killed run loses at most the row in flight and never counts one twice.
- Several processes (`open_part`, `merge_parts`): each process appends only to its own part next to the result
  (`out.jsonl.part-I-of-N`), a pair like any result, with its own sidecar (`out.jsonl.part-I-of-N.meta.json`): no
  file is written by two processes, and a part is read by the same code as a result. Each process skips the keys
  already in the result or in any part (from this run or an earlier one with another process count). When every
  process is done, process 0 merges the result and every part into the result: the sidecar first, then the rows
  (written whole, renamed into place; duplicates dropped), and only then each part's rows, then its sidecar, are
  deleted; so a kill during the merge loses nothing either, and the next run merges again.

`shared` is the one way a command writes a result file, by one process or by every process of a job.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

from lt_jax import distributed
from lt_jax.errors import LtJaxError
from lt_jax.files import differences, output_file, write_atomic


def sidecar(path: Path) -> Path:
    """Where the settings of the result `path` live: `path` + `.meta.json`."""
    return Path(path).with_name(f"{Path(path).name}.meta.json")


def output(path, flag: str, what: str, key) -> Path:
    """`files.output_file` for the result `path` and its sidecar: an existing one of the two must belong to a result
    of `what` (any settings: the settings are checked when the rows are read). Checked before the model loads."""
    path = output_file(path, flag, f"a results file of {what}", lambda p: read_rows(p, None, key, what))
    output_file(sidecar(path), flag, f"the settings of a results file of {what}", lambda p: _settings(p, what))
    return path


class Records:
    """The rows of one result that this process owns (creates, repairs, converts and appends to)."""

    def __init__(self, path: Path, meta: dict, key: Callable[[dict], object], what: str = "lt-jax eval"):
        self.path, self.key, self.what = Path(path), key, what
        self.rows = read_rows(self.path, meta, key, what, repair=True)
        if not sidecar(self.path).exists():  # before any row: a kill leaves settings without rows, never the reverse
            _write_settings(self.path, meta, what)
        self.path.touch()
        self.done = {key(r) for r in self.rows}

    def add(self, row: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.done.add(self.key(row))


def read_rows(path: Path, meta: dict | None, key, what: str, repair: bool = False) -> list[dict]:
    """The complete rows of the result `path` ([] if it has none yet), after checking that it is a result of `what`
    made with `meta` (None: any settings; a check that can run before the model loads). A half-written last line
    is dropped: truncated away with repair=True (the owner), else ignored. A file of an earlier version (its first
    line {"meta": ...}) is read as it is, or with repair=True converted to rows and sidecar."""
    path = Path(path)
    settings = _settings(sidecar(path), what) if sidecar(path).exists() else None
    raw = path.read_bytes() if path.exists() else b""
    complete, _, partial = raw.rpartition(b"\n")
    try:
        text = complete.decode()
    except UnicodeDecodeError:
        raise LtJaxError(f"{path} is not a results file of {what} (not UTF-8 text).") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = [(number, _parse(path, number, line, what)) for number, line in lines]
    old = rows and set(rows[0][1]) == {"meta"} and isinstance(rows[0][1]["meta"], dict)
    if old:
        old_settings = rows.pop(0)[1]["meta"]
        if settings is not None and settings != old_settings:
            raise LtJaxError(f"{path} begins with a settings line other than {sidecar(path)} "
                             f"({'; '.join(differences(settings, old_settings, 'the sidecar has', 'the line'))}); "
                             f"give another output file or delete both.")
        settings = old_settings
    if settings is None:
        if raw.strip():  # even a lone unfinished line: ours are never written before their sidecar
            raise LtJaxError(f"{path} is not a results file of {what}: it has no settings file {sidecar(path).name} "
                             f"next to it and no settings line; give another output file.")
        return []
    if meta is not None and settings != meta:
        raise LtJaxError(f"{path} holds results made with other settings ({'; '.join(differences(settings, meta))}); "
                         f"give another output file or delete it and {sidecar(path).name}.")
    for number, row in rows:
        try:
            key(row)
        except (KeyError, TypeError):
            raise LtJaxError(f"{path} line {number} is not a result row of {what}.") from None
    if repair and old:  # an earlier version's file, resumed by its owner: sidecar first, then the rows alone
        print(f"[{what}] {path}: moving its settings line to {sidecar(path).name}"
              + (" and dropping an incomplete last row" if partial else ""), file=sys.stderr)
        _write_settings(path, settings, what)
        write_atomic(path, "".join(line + "\n" for _, line in lines[1:]))
    elif repair and partial:  # ours, with a killed run's half-written row: drop it
        print(f"[{what}] {path}: dropping an incomplete last row", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(len(complete) + 1 if complete else 0)
    return [row for _, row in rows]


def grow(path: Path, meta: dict, what: str, extends: Callable[[dict, dict], bool]) -> bool:
    """Give the result `path` the settings `meta` when its own settings are others that `extends(old, meta)` says
    `meta` contains (e.g. fewer samples of the same draw: its rows are the first rows of `meta`'s). Returns whether
    it did; anything else is left for `read_rows` to accept or refuse. Only the result's owner calls it, before
    `shared`; a result still in parts is left as it is (`merge_parts` first, by one process)."""
    path = Path(path)
    if not sidecar(path).exists() or part_paths(path):
        return False
    old = _settings(sidecar(path), what)
    if old == meta or not extends(old, meta):
        return False
    rows = len(read_rows(path, old, lambda r: r, what))
    _write_settings(path, meta, what)
    print(f"[{what}] {path}: growing its {rows} rows to the settings of this run "
          f"({'; '.join(differences(old, meta))}); the rows written are kept", file=sys.stderr)
    return True


def _write_settings(path: Path, meta: dict, what: str):
    write_atomic(sidecar(path), json.dumps({"written_by": what, "settings": meta}, indent=1) + "\n")


def _settings(side: Path, what: str) -> dict:
    """The settings a sidecar holds, once it is checked to be the sidecar of a result of `what`."""
    try:
        held = json.loads(side.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        held = None
    except OSError as e:
        raise LtJaxError(f"cannot read {side}: {e.strerror}.") from None
    if not isinstance(held, dict) or not isinstance(held.get("settings"), dict) or held.get("written_by") != what:
        raise LtJaxError(f"{side} is not the settings of a results file of {what}; give another output file.")
    return held["settings"]


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
    """Every part of the result `path` that has rows or a sidecar (a merge killed while deleting a part can leave
    the sidecar alone)."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.part-\d+-of-\d+")
    return sorted({path.with_name(name) for p in path.parent.glob(f"{path.name}.part-*-of-*")
                   if pattern.fullmatch(name := p.name.removesuffix(".meta.json"))})


def open_part(path: Path, meta: dict, key, index: int, count: int, what: str = "lt-jax eval") -> Records:
    """This process's part of a result written by `count` processes: its own part file, with `done` holding every
    key already in the result or in any part (so no key is run twice, whichever process ran it before)."""
    mine = Records(part_path(path, index, count), meta, key, what)
    for other in [Path(path), *part_paths(path)]:
        if other != mine.path:
            mine.done |= {key(r) for r in read_rows(other, meta, key, what)}
    return mine


def merge_parts(path: Path, meta: dict, key, order=None, what: str = "lt-jax eval") -> list[dict]:
    """Process 0, once every process is done: the result and every part -> the result (each key's first row,
    sorted by `order` if given): its sidecar, then its rows written whole and renamed into place, then the parts
    deleted, each part's rows before its sidecar."""
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
    _write_settings(path, meta, what)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    for part in parts:
        part.unlink(missing_ok=True)
        sidecar(part).unlink(missing_ok=True)
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
