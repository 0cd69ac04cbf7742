"""Batching helpers: ids checked into arrays, rows left padded into one batch, lengths bucketed so that few
shapes (and so few compilations) arise."""
from __future__ import annotations

import numpy as np

from lt_jax.errors import LtJaxError


def as_batch(ids, vocab_size: int) -> np.ndarray:
    """int32 numpy [B, T] (a single sequence [T] becomes [1, T]), checked against the vocabulary on the host
    (no device op, so checking never compiles anything)."""
    arr = np.asarray(ids)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise LtJaxError(f"ids must be a non-empty integer array [B, T] or [T]; got shape {arr.shape}, "
                         f"dtype {arr.dtype}.")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise LtJaxError(f"token ids must lie in 0..{vocab_size - 1}; got {arr.min()}..{arr.max()}.")
    return arr.astype(np.int32)


def bucket(n: int, step: int = 64) -> int:
    """Round a length up to the next power of two (at least `step`): few distinct shapes, few compilations."""
    return max(step, 1 << (max(n, 1) - 1).bit_length())


def left_pad(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> (tokens, positions) int32 [B, width], right-aligned; padding has token 0 and position -1."""
    tokens = np.zeros((len(rows), width), np.int32)
    positions = np.full((len(rows), width), -1, np.int32)
    for b, r in enumerate(rows):
        tokens[b, width - len(r):] = r
        positions[b, width - len(r):] = np.arange(len(r))
    return tokens, positions
