"""Attention under the one mask rule (docs/design.md §4): every path a layer attends by.

A query at position q may see a key at position k iff
    k >= 0  and  k <= q  and  (k < sink or q - k < window).
Positions are each token's index in its own sequence; -1 marks padding and empty cache slots. Full causal
attention is sink=0, window=FULL; Mistral's native window is sink=0, window=sliding_window. Masks are always built
from stored positions, never from slot order, so the same rule serves contiguous buffers and ring caches.

Paths: `attend` (one block), `attend_causal` (a call's own tokens in query blocks; past TILED_FROM tokens
`attend_tiled`, flash-style), `attend_streaming` (a streaming layer's prefill in O(T (sink + window))), `attend_cached`
(a decode step over one cache slot and the new token). `attend_layer` picks, for a layer over a call's own tokens
(prefill, training, scoring), between the first three by the layer's kind.
Shapes: q [B, T, N, H]; keys and values [B, K, H, S] (head_dim before time), as the cache stores them
(docs/design.md §5).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FULL = 2**30  # a window no sequence reaches: plain causal attention

Q_CHUNK = 256  # queries per attention block: scores are [B, N, Q_CHUNK, S], never [B, N, T, T]
K_CHUNK = 512  # keys per block of the tiled (flash-style) path
TILED_FROM = 2048  # prompts longer than this take the tiled path


def attention_mask(q_pos, k_pos, sink, window):
    """q_pos [B, T], k_pos [B, S] int; sink, window int scalars (static or traced), or per query [B, T, 1]
    -> bool [B, T, S]."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    return (k >= 0) & (k <= q) & ((k < sink) | (q - k < window))


def dot_scores(q, k):
    """Scaled dot products, GQA heads grouped: q [B, T, N, H], k [B, K, H, S] -> float32 [B, K, N/K, T, S].
    Keys are stored transposed (head_dim before time) everywhere: the score product is then a plain
    [G*T, H] x [H, S] matrix product per (row, KV head), which XLA:CPU runs ~1.3x faster than over [S, H] keys
    (decode-shaped microbenchmark, batch 1-8)."""
    B, T, N, H = q.shape
    K = k.shape[1]
    G = N // K
    # One [G*T, H] matrix per (row, KV head): with T a dimension of its own XLA:CPU leaves the product to a slow
    # generic kernel (2x slower at batch 4).
    q = jnp.einsum("BTKGH->BKGTH", (q * H ** -0.5).reshape(B, T, K, G, H)).reshape(B, K, G * T, H)
    return jnp.einsum("BKMH,BKHS->BKMS", q, k, preferred_element_type=jnp.float32).reshape(B, K, G, T, -1)


def masked(scores, q_pos, k_pos, sink, window):
    """Scores under the mask rule; masked entries hold float32's minimum, a finite floor that keeps fully masked
    rows (padding queries) finite instead of NaN after the softmax."""
    return jnp.where(attention_mask(q_pos, k_pos, sink, window)[:, None, None], scores, jnp.finfo(jnp.float32).min)


def masked_scores(q, k, q_pos, k_pos, sink, window):
    return masked(dot_scores(q, k), q_pos, k_pos, sink, window)


def value_product(probs, v):
    """probs [B, K, G, T, S] x v [B, K, H, S] -> float32 [B, K, G, T, H] (unnormalized)."""
    B, K, G, T, S = probs.shape
    probs = probs.astype(v.dtype).reshape(B, K, G * T, S)
    return jnp.einsum("BKMS,BKHS->BKMH", probs, v, preferred_element_type=jnp.float32).reshape(B, K, G, T, -1)


def merge_heads(out, dtype):
    """[B, K, G, T, H] -> [B, T, N, H]."""
    B, K, G, T, H = out.shape
    return jnp.einsum("BKGTH->BTKGH", out.astype(dtype)).reshape(B, T, K * G, H)


def attend(q, k, v, q_pos, k_pos, sink, window):
    """Softmax attention under the mask rule. q [B, T, N, H]; k, v [B, K, H, S] (heads before time:
    each head's keys and values are contiguous, which decode's matrix products need); -> [B, T, N, H]."""
    scores = masked_scores(q, k, q_pos, k_pos, sink, window)
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    # Normalize after the value product: a pass over [T, H] instead of [T, S].
    return merge_heads(value_product(probs, v) / jnp.sum(probs, axis=-1, keepdims=True), v.dtype)


def attend_causal(q, k, v, positions, sink, window, tiled: bool | None = None):
    """Self-attention over one call's own tokens, in query blocks of Q_CHUNK.

    Block c sees only keys 0..end of its own block: later keys are later positions (rows are left padded,
    positions grow along the row), which the mask rule hides anyway. So no [T, T] score matrix exists, the
    masked upper triangle is never computed, and every softmax still spans every visible key: exact.
    Past TILED_FROM tokens the blocks run one at a time over key blocks (`attend_tiled`), so the scores alive at
    once are one [Q_CHUNK, K_CHUNK] block, not the whole triangle.
    sink, window: scalars, or per-query [B, T, 1] (teacher-forced scoring with an exact prefix).
    tiled: force the tiled path on or off (default: past TILED_FROM). Training turns it off: its key loop has a
    traced bound, which reverse-mode differentiation cannot go through.
    """
    T = q.shape[1]
    if (T > TILED_FROM) if tiled is None else tiled:
        return attend_tiled(q, k, v, positions, sink, window)
    per_query = lambda a, s, e: a[:, s:e] if jnp.ndim(a) == 3 else a  # noqa: E731
    outs = []
    for start in range(0, T, Q_CHUNK):
        end = min(start + Q_CHUNK, T)
        outs.append(attend(q[:, start:end], k[..., :end], v[..., :end], positions[:, start:end], positions[:, :end],
                           per_query(sink, start, end), per_query(window, start, end)))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def over_query_blocks(block_out, n_blocks: int, T: int):
    """block_out(c) -> [B, Q_CHUNK, N, H] for query block c, computed one block at a time (a scan, so one block's
    scores are alive at once) and joined into [B, T, N, H] (the padded tail cut)."""
    _, outs = jax.lax.scan(lambda _, c: (None, block_out(c)), None, jnp.arange(n_blocks))  # [n, B, Qc, N, H]
    B, N, H = outs.shape[1], outs.shape[3], outs.shape[4]
    return jnp.moveaxis(outs, 0, 1).reshape(B, n_blocks * Q_CHUNK, N, H)[:, :T]


def attend_tiled(q, k, v, positions, sink, window):
    """`attend_causal` for long prompts, flash-style: a scan over query blocks; each block loops over the key
    blocks up to its own end with a running max and sum (online softmax), normalizing once at the end. Memory:
    one [Q_CHUNK, K_CHUNK] score block per head, whatever T (XLA otherwise keeps most of the triangle's blocks
    alive at once: ~1.5 GiB of temporaries for 8K tokens on SmolLM2). Key blocks past a query block's end are
    never computed; a block whose keys are all masked for a query adds nothing once a visible key has been seen
    (its weights are rescaled by exp(floor - max) = 0), and every query sees at least itself."""
    B, T, N, H = q.shape
    K = k.shape[1]
    G = N // K
    pad = -T % K_CHUNK  # K_CHUNK is a multiple of Q_CHUNK; padded queries and keys have position -1
    if pad:
        q, k, v = (jnp.pad(a, [(0, 0)] * axis + [(0, pad)] + [(0, 0)] * (3 - axis))
                   for a, axis in ((q, 1), (k, 3), (v, 3)))
        positions = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
        sink, window = (jnp.pad(a, ((0, 0), (0, pad), (0, 0))) if jnp.ndim(a) == 3 else a for a in (sink, window))
    n_q = (T + pad) // Q_CHUNK
    block = lambda a, i, size, axis: jax.lax.dynamic_slice_in_dim(a, i * size, size, axis)  # noqa: E731
    per_query = lambda a, i: block(a, i, Q_CHUNK, 1) if jnp.ndim(a) == 3 else a  # noqa: E731

    def query_block(i):
        q_i, q_pos = block(q, i, Q_CHUNK, 1), block(positions, i, Q_CHUNK, 1)
        sink_i, window_i = per_query(sink, i), per_query(window, i)

        def key_block(j, state):
            top, total, acc = state
            scores = masked_scores(q_i, block(k, j, K_CHUNK, 3), q_pos, block(positions, j, K_CHUNK, 1), sink_i,
                                   window_i)  # [B, K, G, Qc, Kc]
            new_top = jnp.maximum(top, jnp.max(scores, axis=-1, keepdims=True))
            probs = jnp.exp(scores - new_top)
            scale = jnp.exp(top - new_top)
            acc = acc * scale + value_product(probs, block(v, j, K_CHUNK, 3))
            return new_top, total * scale + jnp.sum(probs, axis=-1, keepdims=True), acc

        floor = jnp.finfo(jnp.float32).min
        init = (jnp.full((B, K, G, Q_CHUNK, 1), floor), jnp.zeros((B, K, G, Q_CHUNK, 1)),
                jnp.zeros((B, K, G, Q_CHUNK, H), jnp.float32))
        n_keys = ((i + 1) * Q_CHUNK + K_CHUNK - 1) // K_CHUNK  # the key blocks up to this query block's end
        _, total, acc = jax.lax.fori_loop(0, n_keys, key_block, init)
        return merge_heads(acc / total, v.dtype)

    return over_query_blocks(query_block, n_q, T)


def attend_streaming(q, k, v, positions, sink: int, window: int, tiled: bool | None = None):
    """Self-attention of a streaming layer in O(T * (sink + window)): each query block sees the row's `sink` first
    keys (gathered per row, since left padding shifts them) plus the window + Q_CHUNK - 1 keys ending at the
    block's end; the rest is never computed. Keys with position < sink are hidden in the window part, so none
    counts twice.
    A scan over query blocks: one block's scores and keys are alive at a time, whatever T.
    sink, window: static ints (the plan's); tiled: as `attend_causal` takes it, for short prompts."""
    B, T = positions.shape
    span = window + Q_CHUNK - 1
    if T <= sink + span:
        return attend_causal(q, k, v, positions, sink, window, tiled)
    pad = jnp.sum(positions < 0, axis=1, keepdims=True)  # [B, 1]
    at = pad + jnp.arange(sink)  # index of position j of each row
    idx = jnp.minimum(at, T - 1)
    sink_k = jnp.take_along_axis(k, idx[:, None, None, :], axis=3)
    sink_v = jnp.take_along_axis(v, idx[:, None, None, :], axis=3)
    sink_pos = jnp.where(at < T, jnp.take_along_axis(positions, idx, axis=1), -1)
    # Keys get span - Q_CHUNK empty slots in front (block c's window is then slots [c*Q_CHUNK, +span)) and, like
    # the queries, empty slots at the end up to a whole number of blocks; empty slots have position -1.
    front, back = span - Q_CHUNK, -T % Q_CHUNK
    n_q = (T + back) // Q_CHUNK
    q = jnp.pad(q, ((0, 0), (0, back), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (front, back)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (front, back)))
    q_positions = jnp.pad(positions, ((0, 0), (0, back)), constant_values=-1)
    k_positions = jnp.pad(jnp.where(positions < sink, -1, positions), ((0, 0), (front, back)), constant_values=-1)

    def query_block(c):
        start = c * Q_CHUNK
        window_of = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, start, span, axis)  # noqa: E731
        keys_pos = jnp.concatenate([sink_pos, window_of(k_positions, 1)], axis=1)
        return attend(jax.lax.dynamic_slice_in_dim(q, start, Q_CHUNK, 1),
                      jnp.concatenate([sink_k, window_of(k, 3)], axis=3),
                      jnp.concatenate([sink_v, window_of(v, 3)], axis=3),
                      jax.lax.dynamic_slice_in_dim(q_positions, start, Q_CHUNK, 1), keys_pos, sink, window)

    return over_query_blocks(query_block, n_q, T)


def attend_cached(q, k, v, read_keys, read_values, q_pos, k_pos, sink, window):
    """Decode attention: one new token per row (q [B, 1, N, H], its own k and v [B, K, H, 1]) over one
    cache slot and over itself (the cache takes the token after the step): one softmax over both.
    `read_keys(f)` / `read_values(f)` apply f to the slot's buffers where they lie (the cache picks the slot), so
    only the two products read the slot; k_pos [B, S] are the slot's stored positions."""
    cached = masked(read_keys(lambda keys: dot_scores(q, keys)), q_pos, k_pos, sink, window)
    own = dot_scores(q, k)  # [B, K, G, 1, 1]; a token always sees itself
    top = jnp.maximum(jnp.max(cached, axis=-1, keepdims=True), own)
    p_cached, p_own = jnp.exp(cached - top), jnp.exp(own - top)
    out = read_values(lambda values: value_product(p_cached, values)) + value_product(p_own, v)
    return merge_heads(out / (jnp.sum(p_cached, axis=-1, keepdims=True) + p_own), v.dtype)


def native_window(cfg) -> int:
    """A full layer's window: the model's own sliding window (Mistral), or FULL."""
    return cfg.sliding_window or FULL


def layer_kinds(num_lazy: int, num_layers: int) -> str:
    """Which kinds of layer a plan holds (static): "full", "lazy", or "mixed" (each layer picks by data)."""
    return "full" if num_lazy == 0 else "lazy" if num_lazy == num_layers else "mixed"


def attend_layer(q, k, v, positions, is_lazy, sink, window, native, kinds: str = "mixed", dense: bool = False,
                 full_queries=None, tiled: bool | None = None, checkpoint: bool = False):
    """One layer's self-attention over a call's own tokens, by its kind: a full layer attends causally within
    `native` (`native_window`), a streaming (lazy) layer under its `sink` and `window`.

    is_lazy: the layer's kind, a bool scalar (data). kinds (`layer_kinds`, static): a plan of one kind needs no
    branch; "mixed" picks by `is_lazy` (a `lax.cond`).
    dense: the full-matrix form, one `attend_causal` whose mask takes the kind, sink and window as data (so any
    S/W share a compilation) and per query: `full_queries` bool [B, T, 1] marks queries that attend as in a full
    layer (teacher-forced scoring after an exact prefix of the prompt). O(T^2) scores for every layer.
    Otherwise the streaming form: a lazy layer in O(T (sink + window)) (`attend_streaming`; sink and window
    static), a full one through `attend_causal`.
    tiled: as `attend_causal` takes it; checkpoint: each form's residuals are recomputed in the backward pass
    (`jax.checkpoint`: the score blocks are most of a training step's memory)."""
    if dense:
        lazy = is_lazy if full_queries is None else is_lazy & ~full_queries
        return attend_causal(q, k, v, positions, jnp.where(lazy, sink, 0), jnp.where(lazy, window, native), tiled)
    if full_queries is not None:
        raise ValueError("per-query masks need the dense form")

    def full(q, k, v):
        return attend_causal(q, k, v, positions, 0, native, tiled)

    def stream(q, k, v):
        return attend_streaming(q, k, v, positions, sink, window, tiled)

    if checkpoint:
        full, stream = jax.checkpoint(full), jax.checkpoint(stream)
    if kinds == "full":
        return full(q, k, v)
    if kinds == "lazy":
        return stream(q, k, v)
    return jax.lax.cond(is_lazy, stream, full, q, k, v)
