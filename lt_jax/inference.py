"""Prefill, decode and generation over the KV cache of `lt_jax.cache`.

One token's path through `generate`: `prefill` runs the prompt through every layer (exact mode: full attention on
the prompt for every layer; hybrid mode: each layer's own mask) and writes each layer's keys into its stack (with a
`lighttransfer` plan it also measures each layer's lazy ratio, and the priority queue of `lt_jax.lazy` decides,
layer by layer, which caches stay full); then a compiled `lax.while_loop` samples a token, and `decode_step`
writes its keys (write, then attend: the slot it overwrites in a ring holds a position the mask hides anyway) and
attends over the layer's cache.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from lt_jax.cache import KVCache, full_to_ring, layer_slots, write_layer_kv, write_positions
from lt_jax.config import Config
from lt_jax.lazy import init_queue, lazy_ratio, push
from lt_jax.mask import FULL
from lt_jax.model import attend, attend_causal, attend_streaming, decoder_layer, rope_inv_freq, scan_layers, unembed
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
        x, stacks, queue = carry
        lp, (layer_id, is_lazy, index) = layer

        def attention(q, k, v):
            if shape.prefill == "hybrid" and shape.num_lazy:
                full = lambda: attend_causal(q, k, v, positions, 0, native)  # noqa: E731
                stream = lambda: attend_streaming(q, k, v, positions, shape.sink, shape.window)  # noqa: E731
                out = jax.lax.cond(is_lazy, stream, full) if shape.num_lazy < cfg.num_layers else stream()
            else:  # exact prefill: every layer attends like a full layer over the prompt
                out = attend_causal(q, k, v, positions, 0, native)
            if not shape.select:
                return out, (write_layer_kv(stacks, k, v, positions, is_lazy, index, shape.sink, shape.window),
                             queue, None)
            ratio = lazy_ratio(q, k, positions, shape.sink, shape.window, shape.w_last, native)
            queue_after, lazy, at, slot, evict_to = push(queue, layer_id, jnp.mean(ratio))
            after_eviction, at = _evict(stacks, slot, evict_to, cache.ring_pos, at)
            return out, (write_layer_kv(after_eviction, k, v, positions, lazy, at, shape.sink, shape.window),
                         queue_after, ratio)

        x, (stacks, queue, ratio) = decoder_layer(lp, x, positions, cfg, inv_freq, attention)
        return (x, stacks, queue), ratio

    xs = (jnp.arange(cfg.num_layers), layers["is_lazy"], layers["index"])
    (x, stacks, queue), ratios = scan_layers(step, (x, cache.stacks, queue), params["layers"], xs)
    if shape.select:
        layers = {"is_lazy": queue.is_lazy, "index": queue.index, "ratios": ratios}
    logits = unembed(params, x if all_logits else x[:, -1:], cfg)
    return (logits if all_logits else logits[:, 0]), cache.with_stacks(stacks), layers


def _evict(stacks, slot, evict_to, ring_pos, at):
    """Move what a ring keeps of full slot `slot` (its sinks and window) into ring `evict_to`; out of range: no
    eviction. Returns (stacks, at), `at` being where the arriving layer writes next, into that freed slot."""
    full_k, full_v, ring_k, ring_v = stacks
    if not (full_k.shape[0] and ring_k.shape[0]):
        return stacks, at
    kept_k, kept_v = (full_to_ring(a, slot, ring_pos) for a in (full_k, full_v))
    ring_k = ring_k.at[evict_to].set(kept_k, mode="drop")
    ring_v = ring_v.at[evict_to].set(kept_v, mode="drop")
    # Make the overwrite of the freed slot depend on what was read from it (a NaN key, which a finite model never
    # makes, would drop the write): XLA then reads first and writes in place, where otherwise it copies both full
    # stacks at every layer (the P + 1 test measures this).
    at = jnp.where(jnp.isnan(kept_k[0, 0, 0, 0] + kept_v[0, 0, 0, 0]), full_k.shape[0] + ring_k.shape[0], at)
    return (full_k, full_v, ring_k, ring_v), at


def _decode(params, tokens, cache: KVCache, layers: dict, cfg: Config, shape: Shape):
    """One token per row [B] at position `cache.length` -> (logits [B, V], cache)."""
    positions = cache.length[:, None]
    cache = write_positions(cache, positions, shape.sink, shape.window)
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    x = params["embed"][tokens[:, None]]
    has_full, has_ring = cache.full_k.shape[0] > 0, cache.ring_k.shape[0] > 0

    def step(carry, layer):
        x, stacks = carry
        lp, (is_lazy, index) = layer

        def attention(q, k, v):
            full_k, full_v, ring_k, ring_v = written = write_layer_kv(stacks, k, v, positions, is_lazy, index,
                                                                      shape.sink, shape.window)
            sink, window = _layer_mask(is_lazy, shape, cfg)

            def over_full():
                return attend(q, full_k[index], full_v[index], positions, cache.full_pos, sink, window)

            def over_ring():
                return attend(q, ring_k[index], ring_v[index], positions, cache.ring_pos, sink, window)

            if has_full and has_ring:
                return jax.lax.cond(is_lazy, over_ring, over_full), written
            return (over_full() if has_full else over_ring()), written

        return decoder_layer(lp, x, positions, cfg, inv_freq, attention), None

    (x, stacks), _ = scan_layers(step, (x, cache.stacks), params["layers"], (layers["is_lazy"], layers["index"]),
                                 unroll=True)
    return unembed(params, x, cfg)[:, 0], cache.with_stacks(stacks)


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
