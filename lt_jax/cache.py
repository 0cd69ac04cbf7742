"""The KV cache (docs/design.md §5): one preallocated pytree, one buffer per cache slot, and every write into it.

- full layers:      `full_k` and `full_v` [B, K, H, M], a tuple of Lf slots each; a token's place
                    is its position (M = max length).
- streaming layers: `ring_k` and `ring_v` [B, K, H, R] with R = min(sink + window, M), a tuple of
                    Ls slots each; `sink` places (positions 0..sink-1) then a ring of `window` (position p >= sink
                    lives at sink + (p - sink) % window). A token in the sink never enters the ring. When M <=
                    sink + window no position wraps, so M places hold all of them: a streaming layer's buffer is
                    never larger than a full layer's.
- Keys and values are stored transposed (head_dim before time), as `model.qkv` makes them: the TPU compiler
  keeps values of head_dim 64 places-minor inside the decode loop, so time-minor values saved a copy of the
  whole value cache there (docs/pods.md); on XLA:CPU both products contract the minor dimension.
- `full_pos` [B, M] and `ring_pos` [B, R]: the position stored at each place (-1 = empty), shared by all layers
  of a kind; masks are built from them with the one rule, never from slot order.
- `length` [B]: tokens seen per row, i.e. the position of the row's next token.

One buffer per slot, not one [L, ...] stack: XLA:CPU copies any slice of a stacked buffer that feeds a matrix
product, which at a decode step is a copy of the whole cache per token; a slot of its own is read in place.
Which slot a layer uses is data (`LayerPlan.slot`), so plans with the same number of lazy layers share one
compilation: a layer reads its slot through `read_slot` (a `lax.switch`, each branch reading one buffer in place)
and writes with scatters that drop out-of-range places (`mode="drop"`), which is how the other slots, a padding
token, or a token that a later one of the same chunk overwrites write nothing.
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
    full_k: tuple
    full_v: tuple
    full_pos: jax.Array
    ring_k: tuple
    ring_v: tuple
    ring_pos: jax.Array
    length: jax.Array

    @property
    def kv(self) -> tuple:
        """(full_k, full_v, ring_k, ring_v): the slots a layer loop carries and writes."""
        return self.full_k, self.full_v, self.ring_k, self.ring_v

    def with_kv(self, kv) -> "KVCache":
        return dataclasses.replace(self, **dict(zip(("full_k", "full_v", "ring_k", "ring_v"), map(tuple, kv))))

    @property
    def kv_bytes(self) -> int:
        """Bytes of the K/V buffers (what the formula counts; positions are per row, not per layer)."""
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self.kv))


def expected_kv_bytes(cfg: Config, plan: Plan, batch: int, max_len: int) -> int:
    """docs/design.md §5's formula: full layers `max_len` entries, streaming layers min(sink + window, max_len)
    entries, K and V each."""
    per_entry = 2 * batch * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize
    lazy = plan.lazy_count
    return per_entry * ((cfg.num_layers - lazy) * max_len + lazy * ring_size(plan.sink, plan.window, max_len))


def ring_size(sink: int, window: int, max_len: int) -> int:
    """Places of a streaming layer's buffer: its sinks and window, or all `max_len` places if fewer."""
    return min(sink + window, max_len)


def init_cache(cfg: Config, plan: Plan, batch: int, max_len: int, kv_heads: int | None = None) -> KVCache:
    """An empty cache; `kv_heads` (a multiple of the model's KV heads; default: those) holds each KV head that many
    times over, for a mesh that splits the query heads finer than the KV heads (`sharding.cache_kv_heads`)."""
    lazy = plan.lazy_count
    K, H, dt = kv_heads or cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype)
    if K % cfg.num_kv_heads:
        raise ValueError(f"kv_heads={K} is not a multiple of the model's {cfg.num_kv_heads} KV heads")
    ring = ring_size(plan.sink, plan.window, max_len)
    slots = lambda n, shape: tuple(jnp.zeros(shape, dt) for _ in range(n))  # noqa: E731
    return KVCache(
        full_k=slots(cfg.num_layers - lazy, (batch, K, H, max_len)),
        full_v=slots(cfg.num_layers - lazy, (batch, K, H, max_len)),
        full_pos=jnp.full((batch, max_len), -1, jnp.int32),
        ring_k=slots(lazy, (batch, K, H, ring)),
        ring_v=slots(lazy, (batch, K, H, ring)),
        ring_pos=jnp.full((batch, ring), -1, jnp.int32),
        length=jnp.zeros((batch,), jnp.int32),
    )


def to_cache_heads(k, v, kv: tuple):
    """A layer's new keys and values [B, K, H, T] with each head repeated to the heads the cache `kv` holds
    (`init_cache`'s kv_heads): a query head n reads KV head n // (N / heads) either way, so attention is unchanged."""
    slots = kv[0] or kv[2]  # full_k, else ring_k
    copies = slots[0].shape[1] // k.shape[1]
    return (k, v) if copies == 1 else (jnp.repeat(k, copies, axis=1), jnp.repeat(v, copies, axis=1))


def read_slot(slots: tuple, index, read):
    """read(slot) of the slot at `index`: static (an int) or data, then a `lax.switch` whose branches each read one
    buffer in place (indexing a stack of them would copy the slot first)."""
    if isinstance(index, (int, np.integer)) or len(slots) == 1:
        return read(slots[int(index) if len(slots) > 1 else 0])
    return jax.lax.switch(index, [partial(read, slot) for slot in slots])


def full_slots(positions, max_len):
    """Place of each token in a full layer's buffer: its position; padding (-1) goes out of range (dropped)."""
    return jnp.where(positions >= 0, positions, max_len)


def ring_slots(positions, sink: int, window: int):
    """Place of each token of one chunk in the sink + ring buffer, or sink + window (dropped) for padding and for
    tokens that a later token of the same chunk overwrites: only the sink and the chunk's last `window` positions
    are kept."""
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


def full_to_ring(buffer, ring_pos):
    """What a ring holds, read from one full layer's buffer (keys or values [B, K, H, M]) at the ring's
    stored positions ring_pos [B, R] (a full buffer's place is the position); empty ring places (-1) read place
    0, which their position hides from every mask."""
    at = jnp.maximum(ring_pos, 0)
    return jnp.take_along_axis(buffer, at[:, None, None, :], axis=3)


def restrict(cache: KVCache, plan: Plan) -> KVCache:
    """From the cache of an all-full exact prefill, the cache an exact prefill under the fixed `plan` leaves (each
    lazy layer keeps its sinks and window): many plans share one prefill. The prompt's positions are the cache's
    own `full_pos` (a full layer's place is the position). The input is left intact."""
    positions = cache.full_pos
    B, sink, window = positions.shape[0], plan.sink, plan.window
    ring = ring_size(sink, window, positions.shape[1])
    empty = dataclasses.replace(cache, ring_pos=jnp.full((B, ring), -1, jnp.int32),
                                length=jnp.zeros((B,), jnp.int32))
    ring_pos = write_positions(empty, positions, sink, window).ring_pos
    lazy = sorted(plan.lazy_layers)
    full = [i for i in range(len(cache.full_k)) if i not in lazy]
    return KVCache(full_k=tuple(jnp.array(cache.full_k[i]) for i in full),
                   full_v=tuple(jnp.array(cache.full_v[i]) for i in full), full_pos=jnp.array(cache.full_pos),
                   ring_k=tuple(full_to_ring(cache.full_k[i], ring_pos) for i in lazy),
                   ring_v=tuple(full_to_ring(cache.full_v[i], ring_pos) for i in lazy),
                   ring_pos=ring_pos, length=jnp.array(cache.length))  # new buffers throughout: may be donated


def put_tokens(buffer, k_or_v, places):
    """Write tokens [B, T, K, H] into one slot [B, K, H, M'] at places [B, T]; out-of-range places are dropped."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, :, :, places].set(k_or_v, mode="drop")  # advanced indices first: the update is [B, T, K, H]


BLOCK = 128  # places of a one-token write: a TPU tile's minor extent (see `put_step_tokens`)


def put_step_tokens(buffer, tokens, places):
    """Write one token per row, tokens [B, K, H], into one slot [B, K, H, M'] at places [B]; out-of-range places
    are dropped.

    Each row rewrites the aligned block of BLOCK places that holds its place, by two block scatters (times 0 at the
    place and 1 elsewhere, then plus the token at the place): no gather, and rows stay where `data` puts them. A
    scatter of single places into a slot, whose places are its minor dimension, makes the TPU compiler (libtpu
    0.0.42) keep every key slot of a decode loop head_dim-minor instead: a copy of the whole cache into that layout
    before the loop and back after it. The block writes keep the cache's own layout on TPU and CPU alike, for
    2 * B * BLOCK places per slot and step."""
    n = min(BLOCK, buffer.shape[3])
    start = jnp.clip(places - places % n, 0, buffer.shape[3] - n)
    mine = (jnp.arange(n) == (places - start)[:, None])[:, None, None, :]  # [B, 1, 1, n]; nowhere if out of range
    at = jnp.stack([jnp.arange(buffer.shape[0]), start], axis=-1)
    blocks = jax.lax.ScatterDimensionNumbers(update_window_dims=(1, 2, 3), inserted_window_dims=(0,),
                                             scatter_dims_to_operand_dims=(0, 3))
    add = jnp.where(mine, tokens[..., None], 0).astype(buffer.dtype)  # [B, K, H, n]
    options = dict(dimension_numbers=blocks, indices_are_sorted=True, unique_indices=True)
    keep = jnp.broadcast_to(jnp.where(mine, 0, 1).astype(buffer.dtype), add.shape)
    buffer = jax.lax.scatter_mul(buffer, at, keep, **options)  # the cache is finite: 0 * old = 0
    return jax.lax.scatter_add(buffer, at, add, **options)


def _as_tokens(k, v):
    """k, v [B, K, H, T] -> both [B, T, K, H], the order `put_tokens` writes."""
    return jnp.einsum("BKHT->BTKH", k), jnp.einsum("BKHT->BTKH", v)


def _write_slots(kv, positions, sink: int, window: int, write):
    """Every slot of kv = (full_k, full_v, ring_k, ring_v) after `write(slot, j, lazy, keys, places)`: slot j of its
    kind, and the places [B, T] of the chunk's tokens in a slot of that kind (out of range: dropped)."""
    full_k, full_v, ring_k, ring_v = kv
    places = {False: full_slots(positions, full_k[0].shape[3] if full_k else 0),
              True: ring_slots(positions, sink, window)}
    return tuple(tuple(write(slot, j, lazy, keys, places[lazy]) for j, slot in enumerate(slots))
                 for slots, lazy, keys in ((full_k, False, True), (full_v, False, False), (ring_k, True, True),
                                           (ring_v, True, False)))


def ordered_after(value, read, dropped):
    """`value`, or `dropped` where `read` holds a NaN (which a finite model never makes). A write whose place is
    `value` then depends on `read`, so XLA schedules that read first and writes in place; without it XLA copies a
    buffer to read it after the write ("write after read": decode's cache write, an eviction's freed slot)."""
    return jnp.where(jnp.isnan(read), dropped, value)


def write_layer_kv(kv, k, v, positions, is_lazy, index, sink: int, window: int):
    """Write one layer's new k, v [B, K, H, T] into its slot; every other slot gets dropped writes.
    Branch-free, so which slot is the layer's can be data inside `lax.scan` (prefill). Costs a scatter per slot per
    layer; decode writes once per step instead (`write_step_kv`)."""
    k, v = _as_tokens(k, v)

    def write(slot, j, lazy, keys, places):
        mine = (is_lazy if lazy else ~is_lazy) & (index == j)
        return put_tokens(slot, k if keys else v, jnp.where(mine, places, slot.shape[3]))
    return _write_slots(kv, positions, sink, window, write)


def write_step_kv(kv, k, v, positions, is_lazy, index, sink: int, window: int):
    """Write every layer's one new token, k and v [L, B, K, H, 1], into its slot: each slot takes
    the token of the layer it belongs to (data), one block write per slot per step (`put_step_tokens`).

    The owner table is data even when the plan is known while tracing (decode's single-kind shortcut passes numpy
    `is_lazy`/`index`): each slot's token is then a dynamic slice of the stacked tokens, one form for CPU and TPU.
    With a constant owner XLA fuses the layer's projection into the scatter, and the TPU compiler (libtpu 0.0.42)
    aborts on that fusion (`scatter_emitter.cc: operand_indices.size() == 1`)."""
    k, v = jax.vmap(_as_tokens)(k, v)  # [L, B, 1, K, H]
    is_lazy, index = jax.lax.optimization_barrier((jnp.asarray(is_lazy), jnp.asarray(index)))

    def owners(n, mine):  # the layer whose token each of a kind's n slots takes
        return jnp.zeros((n,), jnp.int32).at[jnp.where(mine, index, n)].set(jnp.arange(len(mine)), mode="drop")
    owner = {False: owners(len(kv[0]), ~is_lazy), True: owners(len(kv[2]), is_lazy)}

    def write(slot, j, lazy, keys, places):
        return put_step_tokens(slot, (k if keys else v)[owner[lazy][j], :, 0], places[:, 0])
    return _write_slots(kv, positions, sink, window, write)


def evict(kv, slot, evict_to, ring_pos, at):
    """Move what a ring keeps of full slot `slot` (its sinks and window) into ring slot `evict_to`; out of range: no
    eviction (LightTransfer-Test's priority queue, docs/design.md §7). Returns (kv, at), `at` being where the
    arriving layer writes next, into that freed slot, ordered after the read of it."""
    full_k, full_v, ring_k, ring_v = kv
    if not (full_k and ring_k):
        return kv, at
    kept_k, kept_v = (read_slot(slots, slot, partial(full_to_ring, ring_pos=ring_pos)) for slots in (full_k, full_v))
    rows = jnp.arange(ring_pos.shape[0])
    into = lambda slots, kept: tuple(s.at[jnp.where(evict_to == j, rows, len(rows))].set(kept, mode="drop")  # noqa
                                     for j, s in enumerate(slots))
    ring_k, ring_v = into(ring_k, kept_k), into(ring_v, kept_v)
    at = ordered_after(at, kept_k[0, 0, 0, 0] + kept_v[0, 0, 0, 0], len(full_k) + len(ring_k))
    return (full_k, full_v, ring_k, ring_v), at


@partial(jax.jit, donate_argnames=("cache",))
def insert_rows(cache: KVCache, small: KVCache, row) -> KVCache:
    """Copy the b rows of `small` (a cache of the same plan and slots, e.g. one prefilled row) into rows
    row..row+b-1 of `cache`, in place (`cache` is donated). `row` is data: one compilation per pair of shapes.
    Every leaf has the batch first."""
    return jax.tree.map(lambda big, part: jax.lax.dynamic_update_slice_in_dim(big, part, row, 0), cache, small)
