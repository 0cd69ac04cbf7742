"""Prefill, decode and generation over the KV cache of `lt_jax.cache`.

One token's path through `generate`: `prefill` runs the prompt through every layer (exact mode: full attention on
the prompt for every layer; hybrid mode: each layer's own mask) and writes each layer's keys into its slot (with a
`lighttransfer` plan it also measures each layer's lazy ratio, and the priority queue of `lt_jax.lazy` decides,
layer by layer, which caches stay full); then a compiled `lax.while_loop` samples a token, and `decode_step`
attends over each layer's slot (read in place) and the token itself, and writes every layer's keys at the end of
the step (the place it overwrites in a ring holds a position the mask hides anyway).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.cache import (KVCache, full_to_ring, layer_slots, read_slot, write_layer_kv, write_positions,
                         write_step_kv)
from lt_jax.config import Config
from lt_jax.lazy import init_queue, lazy_ratio, push
from lt_jax.mask import FULL
from lt_jax.model import (attend_causal, attend_streaming, decoder_layer, dot_scores, masked, merge_heads,
                          rope_inv_freq, scan_layers, unembed, value_product)
from lt_jax.plan import DEFAULT_W_LAST, Plan


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a compilation depends on besides array shapes: counts and S/W, never which layers are lazy."""
    num_lazy: int
    sink: int
    window: int
    prefill: str  # "exact" | "hybrid"
    select: bool = False  # LightTransfer-Test: the prefill picks the lazy layers from their lazy ratios
    w_last: int = DEFAULT_W_LAST  # queries that measure the ratios

    @classmethod
    def of(cls, plan: Plan) -> "Shape":
        return cls(plan.lazy_count, plan.sink, plan.window, plan.prefill, plan.select_lazy is not None, plan.w_last)

    @property
    def decoding(self) -> "Shape":
        """What decode compiles for: the counts and S/W only. How the prompt was prefilled (exact, hybrid, or
        choosing its lazy layers) does not change a decode step, so all of them share one compilation."""
        return Shape(self.num_lazy, self.sink, self.window, "exact")


def plan_arrays(plan: Plan) -> dict:
    """The plan as data: which layers are lazy and where their caches sit."""
    is_lazy, index = layer_slots(plan)
    return {"is_lazy": jnp.asarray(is_lazy), "index": jnp.asarray(index)}


def _layer_mask(is_lazy, shape: Shape, cfg: Config):
    """(sink, window) of a layer as data. Full layers: causal, or Mistral's native window."""
    return jnp.where(is_lazy, shape.sink, 0), jnp.where(is_lazy, shape.window, cfg.sliding_window or FULL)


@partial(jax.jit, static_argnames=("cfg", "shape", "all_logits"), donate_argnames=("cache",))
def prefill(params, tokens, positions, cache: KVCache, layers: dict, cfg: Config, shape: Shape,
            all_logits: bool = False):
    """Run a prompt chunk [B, T] (left padded: position -1) from an empty cache.

    Returns (logits float32 [B, V] of the last column, or [B, T, V] with all_logits; the filled cache; the plan as
    data for decode: `layers` itself, or with `shape.select` the layers the priority queue chose plus "ratios"
    float32 [L, B, N], every layer's lazy ratio per row and query head)."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    native = cfg.sliding_window or FULL
    cache = write_positions(cache, positions, shape.sink, shape.window)  # evictions read the ring's positions
    queue = init_queue(cfg.num_layers, cfg.num_layers - shape.num_lazy) if shape.select else None
    x = params["embed"][tokens]

    def step(carry, layer):
        x, kv, queue = carry
        lp, (layer_id, is_lazy, index) = layer

        def attention(q, k, v):
            if shape.prefill == "hybrid" and shape.num_lazy:
                full = lambda: attend_causal(q, k, v, positions, 0, native)  # noqa: E731
                stream = lambda: attend_streaming(q, k, v, positions, shape.sink, shape.window)  # noqa: E731
                out = jax.lax.cond(is_lazy, stream, full) if shape.num_lazy < cfg.num_layers else stream()
            else:  # exact prefill: every layer attends like a full layer over the prompt
                out = attend_causal(q, k, v, positions, 0, native)
            if not shape.select:
                return out, (write_layer_kv(kv, k, v, positions, is_lazy, index, shape.sink, shape.window),
                             queue, None)
            ratio = lazy_ratio(q, k, positions, shape.sink, shape.window, shape.w_last, native)
            queue_after, lazy, at, slot, evict_to = push(queue, layer_id, jnp.mean(ratio))
            after_eviction, at = _evict(kv, slot, evict_to, cache.ring_pos, at)
            return out, (write_layer_kv(after_eviction, k, v, positions, lazy, at, shape.sink, shape.window),
                         queue_after, ratio)

        x, (kv, queue, ratio) = decoder_layer(lp, x, positions, cfg, inv_freq, attention)
        return (x, kv, queue), ratio

    xs = (jnp.arange(cfg.num_layers), layers["is_lazy"], layers["index"])
    (x, kv, queue), ratios = scan_layers(step, (x, cache.kv, queue), params["layers"], xs)
    if shape.select:
        layers = {"is_lazy": queue.is_lazy, "index": queue.index, "ratios": ratios}
    logits = unembed(params, x if all_logits else x[:, -1:], cfg)
    return (logits if all_logits else logits[:, 0]), cache.with_kv(kv), layers


def _evict(kv, slot, evict_to, ring_pos, at):
    """Move what a ring keeps of full slot `slot` (its sinks and window) into ring slot `evict_to`; out of range: no
    eviction. Returns (kv, at), `at` being where the arriving layer writes next, into that freed slot."""
    full_k, full_v, ring_k, ring_v = kv
    if not (full_k and ring_k):
        return kv, at
    kept_k, kept_v = (read_slot(slots, slot, partial(full_to_ring, ring_pos=ring_pos, keys=keys))
                      for slots, keys in ((full_k, True), (full_v, False)))
    rows = jnp.arange(ring_pos.shape[0])
    into = lambda slots, kept: tuple(s.at[jnp.where(evict_to == j, rows, len(rows))].set(kept, mode="drop")  # noqa
                                     for j, s in enumerate(slots))
    ring_k, ring_v = into(ring_k, kept_k), into(ring_v, kept_v)
    # Make the overwrite of the freed slot depend on what was read from it (a NaN key, which a finite model never
    # makes, would drop the write): XLA then reads first and writes in place, where otherwise it copies the full
    # slots at every layer (the P + 1 test measures this).
    at = jnp.where(jnp.isnan(kept_k[0, 0, 0, 0] + kept_v[0, 0, 0, 0]), len(full_k) + len(ring_k), at)
    return (full_k, full_v, ring_k, ring_v), at


def _attend_cached(q, k, v, slots_k, slots_v, index, positions, slot_pos, sink, window):
    """Decode attention: one new token per row (q [B, 1, N, H], its own k [B, K, H, 1], v [B, K, 1, H]) over its
    layer's slot, picked by `index` and read in place, and over itself (written after the step): one softmax over
    both. Only the two products read the slot; the mask and softmax stay outside the switch, so each branch is
    one matrix product (compile time grows with the branches)."""
    cached = masked(read_slot(slots_k, index, partial(dot_scores, q)), positions, slot_pos, sink, window)
    own = dot_scores(q, k)  # [B, K, G, 1, 1]; a token always sees itself
    top = jnp.maximum(jnp.max(cached, axis=-1, keepdims=True), own)
    p_cached, p_own = jnp.exp(cached - top), jnp.exp(own - top)
    out = read_slot(slots_v, index, partial(value_product, p_cached)) + value_product(p_own, v)
    return merge_heads(out / (jnp.sum(p_cached, axis=-1, keepdims=True) + p_own), v.dtype)


def _decode(params, tokens, cache: KVCache, layers: dict, cfg: Config, shape: Shape):
    """One token per row [B] at position `cache.length` -> (logits [B, V], cache)."""
    positions = cache.length[:, None]
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    x = params["embed"][tokens[:, None]]
    full_k, full_v, ring_k, ring_v = cache.kv
    if not (full_k and ring_k):  # one kind of layer: layer i's slot is i, known while tracing
        layers = {"is_lazy": np.full(cfg.num_layers, not full_k), "index": np.arange(cfg.num_layers)}

    def step(x, layer):
        lp, (is_lazy, index) = layer

        def attention(q, k, v):
            sink, window = _layer_mask(is_lazy, shape, cfg)
            over = lambda slots_k, slots_v, slot_pos: _attend_cached(  # noqa: E731
                q, k, v, slots_k, slots_v, index, positions, slot_pos, sink, window)
            full, ring = partial(over, full_k, full_v, cache.full_pos), partial(over, ring_k, ring_v, cache.ring_pos)
            out = jax.lax.cond(is_lazy, ring, full) if (full_k and ring_k) else (full() if full_k else ring())
            return out, (k, v)

        return decoder_layer(lp, x, positions, cfg, inv_freq, attention)

    x, (new_k, new_v) = scan_layers(step, x, params["layers"], (layers["is_lazy"], layers["index"]), unroll=True)
    # The writes depend on the last hidden state (a NaN, which a finite model never makes, would drop them), so
    # every slot is read before it is written: XLA then writes in place instead of copying slots to read them.
    written = jnp.where(jnp.isnan(x[:, 0, :1]), -1, positions)
    kv = write_step_kv(cache.kv, new_k, new_v, written, layers["is_lazy"], layers["index"], shape.sink, shape.window)
    cache = write_positions(cache, positions, shape.sink, shape.window).with_kv(kv)
    return unembed(params, x, cfg)[:, 0], cache


decode_step = jax.jit(_decode, static_argnames=("cfg", "shape"), donate_argnames=("cache",))


# ---- sampling --------------------------------------------------------------------------------------------

def sample(logits, key, temperature, top_k, top_p):
    """logits [B, V] -> token ids [B]. temperature 0 = greedy; top_k 0 and top_p 1 disable those filters.
    All three are data, so changing them does not recompile; greedy skips the sort (a cond, not a select)."""

    def sampled():
        scaled = logits / jnp.maximum(temperature, 1e-6)
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        rank = jnp.arange(logits.shape[-1])
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate
        keep = ((top_k <= 0) | (rank < top_k)) & ((before < top_p) | (rank == 0))
        choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sampled, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


@partial(jax.jit, static_argnames=("cfg", "shape", "max_new_tokens"), donate_argnames=("cache",))
def generate_loop(params, logits, cache: KVCache, layers: dict, limit, stop_ids, key, temperature, top_k, top_p,
                  cfg: Config, shape: Shape, max_new_tokens: int):
    """Sample up to `limit` (data, <= max_new_tokens, the static buffer size) tokens per row inside one compiled
    loop; a row stops after a stop id.

    Returns (tokens int32 [B, max_new_tokens], -1 after a row stops; number generated per row [B]; the cache,
    returned so the donated input buffers are reused in place rather than copied)."""
    B = logits.shape[0]
    out = jnp.full((B, max_new_tokens), -1, jnp.int32)

    def cond(state):
        t, _, _, _, done, _ = state
        return (t < jnp.minimum(limit, max_new_tokens)) & ~jnp.all(done)

    def body(state):
        t, logits, cache, out, done, key = state
        key, sub = jax.random.split(key)
        token = sample(logits, sub, temperature, top_k, top_p)
        out = out.at[:, t].set(jnp.where(done, -1, token))
        done = done | jnp.isin(token, stop_ids)
        logits, cache = _decode(params, token, cache, layers, cfg, shape)
        return t + 1, logits, cache, out, done, key

    state = (jnp.int32(0), logits, cache, out, jnp.zeros((B,), bool), key)
    _, _, cache, out, _, _ = jax.lax.while_loop(cond, body, state)
    return out, jnp.sum(out >= 0, axis=-1), cache
