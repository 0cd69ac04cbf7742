"""Prefill, decode and generation: compositions of the decoder layer (`lt_jax.model`), attention
(`lt_jax.attention`), the cache's writes (`lt_jax.cache`) and LightTransfer-Test's queue (`lt_jax.lazy`).

One token's path through `generate`: `prefill` runs the prompt through every layer (exact mode: full attention on
the prompt for every layer; hybrid mode: each layer's own mask) and writes each layer's keys into its slot (with a
selecting plan it also measures each layer's lazy ratio, and the priority queue decides, layer by layer, which
caches stay full); then a compiled `lax.while_loop` repeats `_sample_step`: it samples a token, and `_decode` (one
decoder pass) attends over each layer's slot (read in place) and the token itself, and writes every layer's keys
at the end of the step. `generate_loop` and serving's `decode_chunk` drive the same loop.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.attention import attend_cached, attend_layer, layer_kinds, native_window
from lt_jax.batching import bucket
from lt_jax.cache import (KVCache, evict, ordered_after, read_slot, to_cache_heads, write_layer_kv,
                          write_positions, write_step_kv)
from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.lazy import init_queue, lazy_ratio, push, queue_score
from lt_jax.model import decoder, unembed
from lt_jax.plan import LayerPlan, PlanShape, Selection


@partial(jax.jit, static_argnames=("cfg", "shape", "all_logits"), donate_argnames=("cache",))
def prefill(params, tokens, positions, cache: KVCache, layers: LayerPlan | Selection, cfg: Config,
            shape: PlanShape, all_logits: bool = False):
    """Run a prompt chunk [B, T] (left padded: position -1) from an empty cache.

    `layers`: the fixed plan as data, or when `shape.select` (the prefill chooses) the `Selection`: the queue
    ranks a protected layer below every other (`queue_score`), so it stays full. Returns, for every plan, the
    same structure: (logits float32 [B, V] of the last column, or [B, T, V] with all_logits; the filled cache; the
    LayerPlan decode runs with; ratios float32 [L, B, N], every layer's lazy ratio per row and query head, NaN
    unless `shape.select`)."""
    L, native = cfg.num_layers, native_window(cfg)
    cache = write_positions(cache, positions, shape.sink, shape.window)  # evictions read the ring's positions
    queue = init_queue(L, L - shape.num_lazy) if shape.select else None
    protected = layers.protected if shape.select else jnp.zeros(L, bool)
    if shape.select:  # where the queue's choices will go; only is_lazy / slot are read below
        layers = LayerPlan.of(np.zeros(L, bool), np.zeros(L, np.int32), shape, cfg)
    # exact prefill: every layer attends like a full layer over the prompt
    kinds = layer_kinds(shape.num_lazy, L) if shape.prefill == "hybrid" else "full"

    def attention(q, k, v, layer, carry):
        layer_id, is_lazy, slot, protect = layer
        kv, queue = carry
        k, v = to_cache_heads(k, v, kv)
        out = attend_layer(q, k, v, positions, is_lazy, shape.sink, shape.window, native, kinds)
        if not shape.select:
            return out, (write_layer_kv(kv, k, v, positions, is_lazy, slot, shape.sink, shape.window), queue), \
                jnp.full(q.shape[:1] + q.shape[2:3], jnp.nan, jnp.float32)
        ratio = lazy_ratio(q, k, positions, shape.sink, shape.window, shape.w_last, native)
        queue, lazy, at, full_slot, evict_to = push(queue, layer_id, queue_score(jnp.mean(ratio), protect))
        after_eviction, at = evict(kv, full_slot, evict_to, cache.ring_pos, at)
        return out, (write_layer_kv(after_eviction, k, v, positions, lazy, at, shape.sink, shape.window), queue), ratio

    xs = (jnp.arange(L), layers.is_lazy, layers.slot, protected)
    logits, (kv, queue), ratios = decoder(params, tokens, positions, cfg, attention, xs, (cache.kv, queue),
                                          head="all" if all_logits else "last")
    if shape.select:
        layers = LayerPlan.of(queue.is_lazy, queue.slot, shape, cfg)
    return (logits if all_logits else logits[:, 0]), cache.with_kv(kv), layers, ratios


def _decode(params, tokens, cache: KVCache, layers: LayerPlan, cfg: Config, shape: PlanShape):
    """One token per row [B] at position `cache.length` -> (logits [B, V], cache)."""
    positions = cache.length[:, None]
    full_k, full_v, ring_k, ring_v = cache.kv
    if not (full_k and ring_k):  # one kind of layer: layer i's slot is i, known while tracing
        layers = dataclasses.replace(layers, is_lazy=np.full(cfg.num_layers, not full_k),
                                     slot=np.arange(cfg.num_layers))

    def attention(q, k, v, layer, _):
        is_lazy, slot, sink, window = layer
        k, v = to_cache_heads(k, v, cache.kv)

        def over(slots_k, slots_v, slot_pos):
            return attend_cached(q, k, v, partial(read_slot, slots_k, slot), partial(read_slot, slots_v, slot),
                                 positions, slot_pos, sink, window)
        full, ring = partial(over, full_k, full_v, cache.full_pos), partial(over, ring_k, ring_v, cache.ring_pos)
        out = jax.lax.cond(is_lazy, ring, full) if (full_k and ring_k) else (full() if full_k else ring())
        return out, None, (k, v)

    xs = (layers.is_lazy, layers.slot, layers.sink, layers.window)
    # split weights (CPU, GPU) unroll the layers; stacked ones (TPU) scan one layer body (`params.default_layers`)
    x, _, (new_k, new_v) = decoder(params, tokens[:, None], positions, cfg, attention, xs, head=None, unroll=True)
    # Every slot is read before the step's write into it: the writes wait for the last hidden state.
    written = ordered_after(positions, x[:, 0, :1], -1)
    kv = write_step_kv(cache.kv, new_k, new_v, written, layers.is_lazy, layers.slot, shape.sink, shape.window)
    cache = write_positions(cache, positions, shape.sink, shape.window).with_kv(kv)
    return unembed(params, x, cfg)[:, 0], cache


decode_step = jax.jit(_decode, static_argnames=("cfg", "shape"), donate_argnames=("cache",))


# ---- sampling --------------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How generation samples, as one argument. temperature 0 = greedy; top_k 0 and top_p 1 disable those filters;
    a row stops after any of `stop_ids` (None: the model's EOS ids) or after `max_new_tokens`. Every field but
    `steps` is data inside the compiled loop, so changing them does not recompile; `steps` (static) is the loop's
    output buffer, `max_new_tokens` bucketed (`batching.bucket`: a power of two, at least 64; `prepared`)."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple | None = None
    steps: int = dataclasses.field(default=0, metadata=dict(static=True))

    def check(self) -> "Sampling":
        """Raises LtJaxError naming the bad value."""
        whole = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)  # noqa: E731
        if not whole(self.max_new_tokens) or self.max_new_tokens < 1:
            raise LtJaxError(f"max_new_tokens={self.max_new_tokens!r} must be a whole number of at least 1.")
        if not self.temperature >= 0:  # NaN fails too
            raise LtJaxError(f"temperature={self.temperature} must be >= 0 (0 = greedy).")
        if not whole(self.top_k) or self.top_k < 0:
            raise LtJaxError(f"top_k={self.top_k!r} must be a whole number >= 0 (0 = off).")
        if not 0 < self.top_p <= 1:
            raise LtJaxError(f"top_p={self.top_p} must lie in (0, 1].")
        if not whole(self.seed):
            raise LtJaxError(f"seed={self.seed!r} must be a whole number.")
        if self.stop_ids is not None and not all(whole(t) for t in self.stop_ids):
            raise LtJaxError(f"stop_ids={list(self.stop_ids)!r} must be token ids (whole numbers).")
        return self

    def prepared(self, eos_ids=()) -> "Sampling":
        """Checked, with typed scalars (so the loop compiles once per `steps`) and the stop ids resolved ([-2]:
        none, which no token matches)."""
        self.check()
        stop = tuple(int(t) for t in (eos_ids if self.stop_ids is None else self.stop_ids)) or (-2,)
        return Sampling(jnp.int32(self.max_new_tokens), jnp.float32(self.temperature), jnp.int32(self.top_k),
                        jnp.float32(self.top_p), jnp.int32(self.seed), tuple(jnp.int32(t) for t in stop),
                        bucket(int(self.max_new_tokens)))


def sample(logits, key, temperature, top_k, top_p):
    """logits [B, V] -> token ids [B]. temperature 0 = greedy; top_k 0 and top_p 1 disable those filters.
    All three are data, so changing them does not recompile; greedy skips the filters (a cond, not a select).

    No sort: each filter is a threshold on the scaled logits, found by bisection over their 32-bit order
    (`_threshold`), so every step is an elementwise pass and a reduction over V. On a mesh that splits the
    vocabulary a sort gathers it instead: on TPU in a rows-minor layout padded 32-fold (63 MiB of temporaries per
    chip at Llama-3's 128K vocabulary and 4 rows, more than a 70B's decode needs for everything else). The kept
    set is the sort's: top-k keeps the k largest, top-p every token whose strictly larger tokens hold < top_p of
    the mass (the largest always); tokens tied at a boundary are kept together, as transformers' top-k keeps them."""

    def sampled():
        filtered = filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sampled, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def filter_logits(scaled, top_k, top_p):
    """scaled logits [B, V] with every token the top-k and top-p filters drop set to -inf."""
    order = _ordered(scaled)
    none = jnp.zeros(order.shape[:-1], jnp.uint32)
    k_on = (top_k > 0) & (top_k < scaled.shape[-1])
    kth = jax.lax.cond(k_on, lambda: _threshold(lambda t: jnp.sum(order >= t[:, None], -1) >= top_k, order),
                       lambda: none)
    probs = jax.nn.softmax(scaled, axis=-1)
    above = lambda t: jnp.sum(jnp.where(order > t[:, None], probs, 0), -1)  # noqa: E731 - the mass strictly above t
    # the largest t with >= top_p of the mass strictly above it: the tokens above it are those top-p keeps
    # with top_p < 1, rounding may leave < top_p of the mass above every token: then it keeps them all
    last, everything = jax.lax.cond(top_p < 1, lambda: (_threshold(lambda t: above(t) >= top_p, order),
                                                        above(none) < top_p),
                                    lambda: (none, jnp.ones(none.shape, bool)))
    keep = (order >= kth[:, None]) & ((order > last[:, None]) | everything[:, None])
    return jnp.where(keep, scaled, -jnp.inf)


def _ordered(x):
    """float32 -> uint32 in the same order (negative floats: every bit flipped; positive: the sign bit set; -0.0
    is 0.0)."""
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _threshold(holds, order):
    """Per row, the largest t in [0, 2^32) with holds(t) [B] true, for a `holds` true at 0 and monotone (true,
    then false as t grows): 32 halvings of [lo, hi]."""
    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)  # the upper middle, without overflowing uint32
        ok = holds(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
    rows = order.shape[:-1]
    lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.zeros(rows, jnp.uint32), jnp.full(rows, 2 ** 32 - 1, jnp.uint32)))
    return lo


# ---- the decode loop: one step, two drivers ----------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Per-row state of a decode loop, all [B]: `budget` the tokens a row may still emit, `done` whether it has
    stopped (a stop id, or its budget spent; an empty row is done), `key` the raw data of the PRNG key, split once
    per step: one key for the batch ([2] uint32, `generate_loop`) or one per row ([B, 2], `decode_chunk`), each
    split as the one key of a lone `generate` is, so a row samples what it would sample alone."""
    budget: jax.Array
    done: jax.Array
    key: jax.Array


def _sample_tokens(logits, key, sampling: Sampling):
    """(next key data, tokens [B]) from logits [B, V] and the state's key data (one for the batch, or per row)."""
    if key.ndim == 1:
        key, sub = jax.random.split(jax.random.wrap_key_data(key))
        return jax.random.key_data(key), sample(logits, sub, sampling.temperature, sampling.top_k, sampling.top_p)
    split = jax.vmap(jax.random.split)(jax.random.wrap_key_data(key))
    sample_row = jax.vmap(lambda lg, k: sample(lg[None], k, sampling.temperature, sampling.top_k,
                                               sampling.top_p)[0])
    return jax.random.key_data(split[:, 0]), sample_row(logits, split[:, 1])


def _sample_step(params, carry, layers: LayerPlan, sampling: Sampling, cfg: Config, shape: PlanShape):
    """One step of every row: sample from its logits, record the token (-1 for a row already done), spend one of
    its budget, stop after a stop id or its last token, then decode every token (a done row's is ignored, and
    rows never mix)."""
    t, logits, cache, state, out = carry
    key, token = _sample_tokens(logits, state.key, sampling)
    out = out.at[:, t].set(jnp.where(state.done, -1, token))
    budget = state.budget - (~state.done).astype(state.budget.dtype)
    done = state.done | jnp.isin(token, jnp.stack(sampling.stop_ids)) | (budget <= 0)
    logits, cache = _decode(params, token, cache, layers, cfg, shape)
    return t + 1, logits, cache, DecodeState(budget, done, key), out


def _decode_loop(params, logits, cache: KVCache, layers: LayerPlan, state: DecodeState, sampling: Sampling,
                 cfg: Config, shape: PlanShape, steps: int, until_finish=False):
    """Up to `steps` `_sample_step`s in one compiled loop, from logits [B, V]; ends early once every row is done,
    or, with `until_finish` (data), once a row finishes. Returns (tokens int32 [B, steps], -1 where a row emitted
    nothing; the logits after the last step; the cache; the state)."""
    done_before = state.done

    def cond(carry):
        t, _, _, state, _ = carry
        return (t < steps) & ~jnp.all(state.done) & ~(until_finish & jnp.any(state.done & ~done_before))

    carry = (jnp.int32(0), logits, cache, state, jnp.full((logits.shape[0], steps), -1, jnp.int32))
    _, logits, cache, state, out = jax.lax.while_loop(
        cond, partial(_sample_step, params, layers=layers, sampling=sampling, cfg=cfg, shape=shape), carry)
    return out, logits, cache, state


@partial(jax.jit, static_argnames=("cfg", "shape"), donate_argnames=("cache",))
def generate_loop(params, logits, cache: KVCache, layers: LayerPlan, sampling: Sampling, cfg: Config,
                  shape: PlanShape):
    """Sample up to `sampling.max_new_tokens` tokens per row inside one compiled loop, from a prefill's last
    logits [B, V]; a row stops after a stop id. `sampling` comes from `Sampling.prepared`.

    Returns (tokens int32 [B, sampling.steps], -1 after a row stops; number generated per row [B]; the cache,
    returned so the donated input buffers are reused in place rather than copied)."""
    B = logits.shape[0]
    state = DecodeState(jnp.full((B,), sampling.max_new_tokens, jnp.int32), jnp.zeros((B,), bool),
                        jax.random.key_data(jax.random.key(sampling.seed)))
    out, _, cache, _ = _decode_loop(params, logits, cache, layers, state, sampling, cfg, shape, sampling.steps)
    return out, jnp.sum(out >= 0, axis=-1), cache


@partial(jax.jit, static_argnames=("cfg", "shape", "steps"), donate_argnames=("cache",))
def decode_chunk(params, logits, cache: KVCache, layers: LayerPlan, state: DecodeState, sampling: Sampling,
                 cfg: Config, shape: PlanShape, steps: int, until_finish=False):
    """Up to `steps` decode steps of a continuously batched decode whose rows started at different times
    (`lt_jax.serving`), with per-row budgets and keys (`state`); with `until_finish` the loop ends once a row
    finishes, so a waiting prompt takes its row without idling. `sampling` comes from `Sampling.prepared`; its
    max_new_tokens is not used. Returns what `_decode_loop` returns."""
    return _decode_loop(params, logits, cache, layers, state, sampling, cfg, shape, steps, until_finish)
