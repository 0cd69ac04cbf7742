"""A small safetensors reader/writer over numpy (bf16 via ml_dtypes, which `safetensors.numpy` cannot do).

Reading maps the file and hands out one tensor at a time; the header is checked against the file size first, so a
truncated file is reported by name instead of failing somewhere inside a tensor.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from lt_jax.errors import LtJaxError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Tensors of one .safetensors file, read lazily: `names()`, `shape(name)`, `get(name)` (a read-only view)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise LtJaxError(f"safetensors file {self.path} does not exist.") from None
        except (OSError, ValueError, struct.error) as e:
            raise LtJaxError(f"{self.path} is not a readable safetensors file ({e}).") from None
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + n
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        if self.data_start + end > size:
            raise LtJaxError(f"safetensors file {self.path} is truncated: its header needs "
                             f"{self.data_start + end} bytes but the file has {size}.")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        t = self.header[name]
        if t["dtype"] not in DTYPES:
            raise LtJaxError(f"tensor {name!r} in {self.path} has unsupported dtype {t['dtype']}.")
        a, b = t["data_offsets"]
        raw = self._map[self.data_start + a:self.data_start + b]
        return raw.view(DTYPES[t["dtype"]]).reshape(t["shape"])


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Writes tensor by tensor: views (transposes) are copied one tensor at a time, never the whole dict."""
    header, offset = {}, 0
    for name, arr in tensors.items():
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(arr.tobytes())  # C order, whatever the view's strides
