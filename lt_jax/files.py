"""Files a command reads and writes, at the bottom of the import graph (it imports only `lt_jax.errors`).

Reading: text files and JSONL, with errors that name the file and the line.

Writing, one rule for every output (`output_file`, `output_image`, `new_dir`): a new path is written atomically
(whole to a temporary sibling, then renamed: a kill leaves the old file or none); an existing file is replaced or
resumed only if it is of the kind the command writes; anything else (a user's notes, a folder where a file is
wanted, a file where a folder is wanted) is refused before any work, in one sentence naming it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from lt_jax.errors import LtJaxError

# ---- reading --------------------------------------------------------------------------------------------------


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


# ---- writing --------------------------------------------------------------------------------------------------


def write_atomic(path: str | Path, text: str) -> Path:
    """`text` written whole to a temporary sibling, flushed, then renamed onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def output_file(path: str | Path | None, flag: str, kind: str | None = None,
                recognize: Callable[[Path], object] | None = None) -> Path | None:
    """The file a command will write at `flag`: its folder must exist; an existing file must be `kind`, which
    `recognize(path)` checks (raising LtJaxError, or returning False, when it is not). Checked before any work."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise LtJaxError(f"cannot write {flag} {path}: it is a folder, not a file.")
    if not path.parent.is_dir():
        raise LtJaxError(f"cannot write {flag} {path}: its folder {path.parent} does not exist.")
    if path.exists() and kind is not None:
        try:
            ours = recognize is None or recognize(path) is not False
        except LtJaxError:
            ours = False
        if not ours:
            raise LtJaxError(f"{flag} {path} exists and is not {kind}; it is left as it is: give a new path.")
    return path


IMAGE_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "eps", "ps", "webp", "tif", "tiff")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"%PDF", b"%!", b"RIFF", b"II*\x00", b"MM\x00*")


def _is_image(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(1024)
    return head.startswith(_IMAGE_MAGIC) or b"<svg" in head or head.startswith(b"<?xml")


def output_image(path: str | Path | None, flag: str) -> Path | None:
    """A figure's path: a known format by suffix, and an existing file there only if it is an image."""
    if path is None:
        return None
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in IMAGE_FORMATS:
        raise LtJaxError(f"cannot write {flag} {path}: the format {'.' + fmt if fmt else '(no suffix)'} is not one "
                         f"of {', '.join('.' + f for f in IMAGE_FORMATS)}.")
    return output_file(path, flag, "an image", _is_image)


def new_dir(out: str | Path, flag: str = "output directory") -> Path:
    """A folder a command will create (whole, `atomic_dir`): refused if anything exists there or its parent is
    missing or read-only. Returns its parent."""
    out = Path(out)
    if out.is_file():
        raise LtJaxError(f"{flag} {out} is a file, not a folder; it is left as it is: give a new folder path.")
    if out.exists():
        raise LtJaxError(f"{flag} {out} already exists; remove it or choose another path.")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise LtJaxError(f"cannot create {flag} {out}: {parent} is not an existing directory.")
    if not os.access(parent, os.W_OK):
        raise LtJaxError(f"cannot create {flag} {out}: {parent} is not writable.")
    return parent


@contextlib.contextmanager
def atomic_dir(out: str | Path, flag: str = "output directory"):
    """Yields a temporary sibling of `out`, renamed to `out` only if the body finishes."""
    out = Path(out)
    parent = new_dir(out, flag)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise LtJaxError(f"cannot write {flag} {out}: {e.strerror}.") from None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result gets the mode any new directory gets
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def differences(old: dict, new: dict, old_as: str = "the file has", new_as: str = "this run",
                prefix: str = "") -> list[str]:
    """'sampling.temperature: the file has 0.0, this run 0.7' for each setting that differs between what an
    output was made with and what this run would make (nested dicts opened): why a resume is refused."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, old_as, new_as, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {old_as} {a!r}, {new_as} {b!r}")
    return out
