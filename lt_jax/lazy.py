"""LightTransfer-Test: each layer's lazy ratio, and the priority queue that picks the lazy layers during prefill.

Lazy ratio (docs/design.md §6) of a layer for one prompt: the mean, over the prompt's last `w_last` queries and
over all query heads, of the attention probability (the layer's own full-layer mask, 1/sqrt(H) scale, GQA heads
expanded) that falls on the union of the first S and the last W positions of the prompt. Higher = lazier. A
prompt no longer than S + W has ratio 1 everywhere: a ring of S + W slots holds all of it.

Selection: with a budget of P full layers, the P layers of lowest ratio stay full; a tie goes to the lower index
(layer a is lazier than b iff (ratio_a, a) > (ratio_b, b)). The queue sees layers in order and keeps the P least
lazy so far; when layer i arrives with P held, the laziest of the P+1 goes to the ring. That ends with the global
choice, and at no time are more than P full caches held plus the arriving layer's keys: P + 1.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.attention import masked_scores


def lazy_ratio(q, k, positions, sink: int, window: int, w_last: int, full_window):
    """q [B, T, N, H] (after RoPE), k [B, K, H, T], positions [B, T] (left padding: -1) -> float32 [B, N], one ratio
    per row and query head. Only the last `w_last` queries are scored ([B, N, w_last, T] scores: w_last / T of the
    prefill's attention), and `full_window` is the full layer's own window (Mistral's native one, or none)."""
    B, T, N, _ = q.shape
    w = min(w_last, T)
    q_pos = positions[:, T - w:]  # rows are left padded: a row's last tokens are the last columns
    length = jnp.max(positions, axis=-1, keepdims=True) + 1  # [B, 1]
    probs = jax.nn.softmax(masked_scores(q[:, T - w:], k, q_pos, positions, 0, full_window), axis=-1)
    kept = (positions >= 0) & ((positions < sink) | (positions >= length - window))  # [B, T]
    mass = jnp.sum(jnp.where(kept[:, None, None, None], probs, 0.0), axis=-1)  # [B, K, G, w]
    valid = (q_pos >= 0)[:, None, None, :]  # padding queries do not count
    ratio = jnp.sum(jnp.where(valid, mass, 0.0), axis=-1) / jnp.sum(valid, axis=-1)
    return jnp.where(length <= sink + window, 1.0, ratio.reshape(B, N))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Queue:
    """The queue's state between layers. held_*: the P layers holding full caches (slot j of the full stack holds
    layer held_layer[j]); is_lazy / slot: the plan as data so far (`LayerPlan`'s fields of the same names)."""
    held_ratio: jax.Array  # float32 [P]
    held_layer: jax.Array  # int32 [P]
    is_lazy: jax.Array  # bool [L]
    slot: jax.Array  # int32 [L]
    rings: jax.Array  # int32: ring slots used so far


def init_queue(num_layers: int, num_full: int) -> Queue:
    return Queue(held_ratio=jnp.zeros((num_full,), jnp.float32), held_layer=jnp.zeros((num_full,), jnp.int32),
                 is_lazy=jnp.zeros((num_layers,), bool), slot=jnp.zeros((num_layers,), jnp.int32),
                 rings=jnp.int32(0))


def push(queue: Queue, layer, ratio):
    """Layer `layer` (0, 1, ... in order) arrives with its batch ratio.

    Returns (queue, is_lazy, index, evict_slot, evict_to): where the arriving layer's keys go (the ring stack if
    is_lazy, else the full stack, at `index`), and which full slot, if any, must first move to ring `evict_to`
    (out of range = no eviction; writes there are dropped)."""
    num_full, num_layers = queue.held_ratio.shape[0], queue.is_lazy.shape[0]
    if num_full == 0:  # every layer streams
        lazy, evict, slot = jnp.bool_(True), jnp.bool_(False), jnp.int32(0)
    else:
        worst = jnp.max(queue.held_ratio)
        slot = jnp.argmax(jnp.where(queue.held_ratio == worst, queue.held_layer, -1)).astype(jnp.int32)
        filling = layer < num_full
        slot = jnp.where(filling, layer, slot)
        lazy = ~filling & (ratio >= worst)  # a tie: the arriving layer has the higher index, so it is the lazier
        evict = ~filling & ~lazy
    ring = queue.rings  # the ring slot the arriving or the evicted layer takes
    evicted = jnp.where(evict, queue.held_layer[slot] if num_full else 0, num_layers)  # out of range: no-op
    index = jnp.where(lazy, ring, slot)
    stays = jnp.where(lazy, num_full, slot)  # the arriving layer's full slot, or dropped
    held = lambda a, value: a.at[stays].set(value, mode="drop") if num_full else a  # noqa: E731
    queue = Queue(held_ratio=held(queue.held_ratio, ratio), held_layer=held(queue.held_layer, layer),
                  is_lazy=queue.is_lazy.at[layer].set(lazy).at[evicted].set(True, mode="drop"),
                  slot=queue.slot.at[layer].set(index).at[evicted].set(ring, mode="drop"),
                  rings=ring + (lazy | evict).astype(jnp.int32))
    return queue, lazy, index, slot, jnp.where(evict, ring, num_layers)


PROTECTED = 2.0  # subtracted from a protected layer's ratio (ratios lie in [0, 1]): it ranks below every other


def queue_score(ratio, protected):
    """What the queue ranks a layer by: its ratio, less PROTECTED if a retrieval-aware plan protects it (works on
    numpy and traced values)."""
    return ratio - PROTECTED * protected


def lazy_set(ratios, num_lazy: int, protected=None) -> np.ndarray:
    """The selection rule: the layers a selecting prefill's queue makes lazy for a prompt whose (row-averaged)
    ratios are `ratios` [L], with the layers of bool [L] `protected` kept full -> sorted layer indices. The queue
    reaches this global choice layer by layer (tests/integration/test_lazy.py, tests/integration/test_retrieval_aware.py)."""
    ratios = np.asarray(ratios)
    return top_lazy(ratios if protected is None else queue_score(ratios, np.asarray(protected)), num_lazy)


def top_lazy(ratios, num_lazy: int) -> np.ndarray:
    """The global choice the queue must reach: the `num_lazy` layers of highest ratio, ties to the higher index.
    ratios [L] -> sorted layer indices."""
    order = np.lexsort((np.arange(len(ratios)), np.asarray(ratios)))  # ascending by (ratio, index)
    return np.sort(order[len(ratios) - num_lazy:])


def calibrate(ratios, num_lazy: int) -> dict:
    """Offline identification (the paper's LightTransfer-Train choice) from ratios [samples, L]: each sample's own
    lazy set (`top_lazy`); a layer's frequency is the share of samples whose set holds it; the `num_lazy` most
    frequent layers become lazy (ties: the higher mean ratio, then the higher index). The mean-ratio ranking and
    per-layer statistics come along for provenance."""
    ratios = np.asarray(ratios, np.float64)
    n, L = ratios.shape
    freq = np.zeros(L)
    for r in ratios:
        freq[top_lazy(r, num_lazy)] += 1
    freq /= n
    mean = ratios.mean(axis=0)
    order = np.lexsort((np.arange(L), mean, freq))  # ascending by (frequency, mean ratio, index)
    return {"lazy_layers": sorted(int(i) for i in order[L - num_lazy:]), "samples": n,
            "frequency": freq.round(6).tolist(), "ratio_mean": mean.round(6).tolist(),
            "ratio_std": ratios.std(axis=0).round(6).tolist(), "ratio_min": ratios.min(axis=0).round(6).tolist(),
            "ratio_max": ratios.max(axis=0).round(6).tolist(),
            "mean_ratio_ranking": [int(i) for i in np.lexsort((np.arange(L), mean))[::-1]],
            "mean_ratio_lazy": [int(i) for i in top_lazy(mean, num_lazy)]}
