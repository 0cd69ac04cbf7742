"""The KV cache: one preallocated pytree, stacked by layer kind.

- full layers:      `full_k`, `full_v` [Lf, B, K, M, H]; slot = the token's position (M = max length).
- streaming layers: `ring_k`, `ring_v` [Ls, B, K, S+W, H]; S sink slots (positions 0..S-1) then a ring of W slots
                    (position p >= S lives in slot S + (p - S) % W). A token in the sink never enters the ring.
- `full_pos` [B, M] and `ring_pos` [B, S+W]: the position stored in each slot (-1 = empty), shared by all layers
  of a kind; masks are built from them with the one rule, never from slot order.
- `length` [B]: tokens seen per row, i.e. the position of the row's next token.

Which stack a layer uses, and at which index, is data (`LayerSlots`), so plans with the same number of lazy layers
share one compilation. Writes drop out-of-range indices (`mode="drop"`), which is how a layer of the other kind,
a padding token, or a token that will be overwritten within the same chunk writes nothing.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.config import Config
from lt_jax.plan import Plan


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    full_k: jax.Array
    full_v: jax.Array
    full_pos: jax.Array
    ring_k: jax.Array
    ring_v: jax.Array
    ring_pos: jax.Array
    length: jax.Array

    @property
    def stacks(self) -> tuple:
        """(full_k, full_v, ring_k, ring_v): what a layer loop carries and writes."""
        return self.full_k, self.full_v, self.ring_k, self.ring_v

    def with_stacks(self, stacks) -> "KVCache":
        return dataclasses.replace(self, full_k=stacks[0], full_v=stacks[1], ring_k=stacks[2], ring_v=stacks[3])

    @property
    def kv_bytes(self) -> int:
        """Bytes of the K/V buffers (what the formula counts; positions are per row, not per layer)."""
        return sum(a.size * a.dtype.itemsize for a in (self.full_k, self.full_v, self.ring_k, self.ring_v))


def expected_kv_bytes(cfg: Config, plan: Plan, batch: int, max_len: int) -> int:
    """DESIGN.md's formula: full layers `max_len` entries, streaming layers `S + W` entries, K and V each."""
    per_entry = 2 * batch * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize
    lazy = plan.lazy_count
    return per_entry * ((cfg.num_layers - lazy) * max_len + lazy * (plan.sink + plan.window))


def init_cache(cfg: Config, plan: Plan, batch: int, max_len: int) -> KVCache:
    lazy = plan.lazy_count
    K, H, dt = cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype)
    ring = plan.sink + plan.window
    return KVCache(
        full_k=jnp.zeros((cfg.num_layers - lazy, batch, K, max_len, H), dt),
        full_v=jnp.zeros((cfg.num_layers - lazy, batch, K, max_len, H), dt),
        full_pos=jnp.full((batch, max_len), -1, jnp.int32),
        ring_k=jnp.zeros((lazy, batch, K, ring, H), dt),
        ring_v=jnp.zeros((lazy, batch, K, ring, H), dt),
        ring_pos=jnp.full((batch, ring), -1, jnp.int32),
        length=jnp.zeros((batch,), jnp.int32),
    )


def layer_slots(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(is_lazy bool [L], index int32 [L] into that layer's stack): the plan as data."""
    is_lazy = np.zeros(plan.num_layers, bool)
    is_lazy[list(plan.lazy_layers)] = True
    index = np.zeros(plan.num_layers, np.int32)
    index[is_lazy] = np.arange(is_lazy.sum())
    index[~is_lazy] = np.arange((~is_lazy).sum())
    return is_lazy, index


def full_slots(positions, max_len):
    """Slot of each token in a full-layer buffer: its position; padding (-1) goes out of range (dropped)."""
    return jnp.where(positions >= 0, positions, max_len)


def ring_slots(positions, sink: int, window: int):
    """Slot of each token of one chunk in the sink+ring buffer, or S+W (dropped) for padding and for tokens that a
    later token of the same chunk overwrites: only the sink and the chunk's last W positions are kept."""
    last = jnp.max(positions, axis=-1, keepdims=True)
    keep = (positions >= 0) & ((positions < sink) | (positions > last - window))
    slot = jnp.where(positions < sink, positions, sink + (positions - sink) % window)
    return jnp.where(keep, slot, sink + window)


def write_positions(cache: KVCache, positions, sink: int, window: int) -> KVCache:
    """Record the positions of a chunk (shared by every layer of a kind) and advance `length`."""
    B = positions.shape[0]
    rows = jnp.arange(B)[:, None]
    M = cache.full_pos.shape[1]
    return dataclasses.replace(
        cache,
        full_pos=cache.full_pos.at[rows, full_slots(positions, M)].set(positions, mode="drop"),
        ring_pos=cache.ring_pos.at[rows, ring_slots(positions, sink, window)].set(positions, mode="drop"),
        length=jnp.maximum(cache.length, jnp.max(positions, axis=-1) + 1),
    )


def full_to_ring(stack, index, ring_pos):
    """What a ring holds, read from a full layer's buffer: stack [Lf, B, K, M, H], index (data), ring_pos [B, S+W]
    -> [B, K, S+W, H]. Slot = position in a full buffer, so the ring's stored positions say where to read; empty
    ring slots (-1) read slot 0, which their position hides from every mask."""
    rows = jnp.arange(stack.shape[1])[:, None]
    return stack[index, rows, :, jnp.maximum(ring_pos, 0)].swapaxes(1, 2)  # advanced dims first: [B, S+W, K, H]


def restrict(cache: KVCache, plan: Plan) -> KVCache:
    """From the cache of an all-full exact prefill, the cache an exact prefill under the fixed `plan` leaves (each
    lazy layer keeps its sinks and window): many plans share one prefill. The prompt's positions are the cache's
    own `full_pos` (a full layer's slot is the position). The input is left intact."""
    is_lazy, _ = layer_slots(plan)
    positions = cache.full_pos
    B, S, W = positions.shape[0], plan.sink, plan.window
    empty = dataclasses.replace(cache, ring_pos=jnp.full((B, S + W), -1, jnp.int32), length=jnp.zeros((B,), jnp.int32))
    ring_pos = write_positions(empty, positions, S, W).ring_pos

    def rings(stack):
        kept = [full_to_ring(stack, i, ring_pos) for i in np.flatnonzero(is_lazy)]
        return jnp.stack(kept) if kept else jnp.zeros((0, B, stack.shape[2], S + W, stack.shape[4]), stack.dtype)

    full = np.flatnonzero(~is_lazy)
    return KVCache(full_k=cache.full_k[full], full_v=cache.full_v[full], full_pos=jnp.array(cache.full_pos),
                   ring_k=rings(cache.full_k), ring_v=rings(cache.full_v), ring_pos=ring_pos,
                   length=jnp.array(cache.length))  # new buffers throughout: the result may be donated


def write_layer_kv(stacks, k, v, positions, is_lazy, index, sink: int, window: int):
    """Write one layer's new k, v [B, K, T, H] into its stack; the other kind's stack gets dropped writes.

    stacks: (full_k, full_v, ring_k, ring_v). Branch-free, so a plan's kinds can be data inside `lax.scan`.
    """
    full_k, full_v, ring_k, ring_v = stacks
    B = k.shape[0]
    rows = jnp.arange(B)[:, None]
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, T, K, H]: the order advanced indexing yields below
    f_layer = jnp.where(is_lazy, full_k.shape[0], index)  # out of range -> dropped
    r_layer = jnp.where(is_lazy, index, ring_k.shape[0])
    f_slot = full_slots(positions, full_k.shape[3])
    r_slot = ring_slots(positions, sink, window)
    if full_k.shape[0]:
        full_k = full_k.at[f_layer, rows, :, f_slot].set(k, mode="drop")
        full_v = full_v.at[f_layer, rows, :, f_slot].set(v, mode="drop")
    if ring_k.shape[0]:
        ring_k = ring_k.at[r_layer, rows, :, r_slot].set(k, mode="drop")
        ring_v = ring_v.at[r_layer, rows, :, r_slot].set(v, mode="drop")
    return full_k, full_v, ring_k, ring_v


@partial(jax.jit, donate_argnames=("cache",))
def insert_rows(cache: KVCache, small: KVCache, row) -> KVCache:
    """Copy the b rows of `small` (a cache of the same plan and slots, e.g. one prefilled row) into rows
    row..row+b-1 of `cache`, in place (`cache` is donated). `row` is data: one compilation per pair of shapes."""
    def put(field):
        big, part = getattr(cache, field.name), getattr(small, field.name)
        axis = 1 if field.name.endswith(("_k", "_v")) else 0  # stacks [L, B, K, M, H]; positions [B, M]; length [B]
        start = [jnp.int32(0)] * big.ndim
        start[axis] = jnp.asarray(row, jnp.int32)
        return jax.lax.dynamic_update_slice(big, part, start)
    return KVCache(**{f.name: put(f) for f in dataclasses.fields(KVCache)})
