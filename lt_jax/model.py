"""The decoder (LLaMA / Mistral / Qwen2): pure functions over the params pytree of `lt_jax.params`.

One token's path: embed -> L x [RMSNorm -> GQA attention (RoPE at the token's own position, the one mask rule
with the layer's sink/window) -> residual -> RMSNorm -> SwiGLU -> residual] -> RMSNorm -> tied or untied head.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.config import Config
from lt_jax.mask import FULL, attention_mask
from lt_jax.plan import Plan

Q_CHUNK = 256  # queries per attention block: scores are [B, N, Q_CHUNK, S], never [B, N, T, T]
K_CHUNK = 512  # keys per block of the tiled (flash-style) path
TILED_FROM = 2048  # prompts longer than this take the tiled path


def rope_inv_freq(cfg: Config) -> np.ndarray:
    """Inverse frequencies [H/2], float32, computed as transformers computes them."""
    r = cfg.rope
    H = cfg.head_dim
    inv = (1.0 / (np.float32(r.theta) ** (np.arange(0, H, 2, dtype=np.float32) / np.float32(H)))).astype(np.float32)
    if r.type == "linear":
        inv = inv / np.float32(r.factor)
    elif r.type == "llama3":
        old = r.original_max_position_embeddings
        low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / r.factor, inv)
        smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x, positions, inv_freq):
    """x [B, T, n, H]; positions [B, T] (padding -1 is rotated as 0; it is masked anyway)."""
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, H/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


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
    """probs [B, K, G, T, S] x v [B, K, S, H] -> float32 [B, K, G, T, H] (unnormalized)."""
    B, K, G, T, S = probs.shape
    probs = probs.astype(v.dtype).reshape(B, K, G * T, S)
    return jnp.einsum("BKMS,BKSH->BKMH", probs, v, preferred_element_type=jnp.float32).reshape(B, K, G, T, -1)


def merge_heads(out, dtype):
    """[B, K, G, T, H] -> [B, T, N, H]."""
    B, K, G, T, H = out.shape
    return jnp.einsum("BKGTH->BTKGH", out).reshape(B, T, K * G, H).astype(dtype)


def attend(q, k, v, q_pos, k_pos, sink, window):
    """Softmax attention under the mask rule. q [B, T, N, H]; k [B, K, H, S]; v [B, K, S, H] (heads before time:
    each head's keys and values are contiguous, which decode's matrix products need); -> [B, T, N, H]."""
    scores = masked_scores(q, k, q_pos, k_pos, sink, window)
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    # Normalize after the value product: a pass over [T, H] instead of [T, S].
    return merge_heads(value_product(probs, v) / jnp.sum(probs, axis=-1, keepdims=True), v.dtype)


def attend_causal(q, k, v, positions, sink, window):
    """Self-attention over one call's own tokens, in query blocks of Q_CHUNK.

    Block c sees only keys 0..end of its own block: later keys are later positions (rows are left padded,
    positions grow along the row), which the mask rule hides anyway. So no [T, T] score matrix exists, the
    masked upper triangle is never computed, and every softmax still spans every visible key: exact.
    Past TILED_FROM tokens the blocks run one at a time over key blocks (`attend_tiled`), so the scores alive at
    once are one [Q_CHUNK, K_CHUNK] block, not the whole triangle.
    sink, window: scalars, or per-query [B, T, 1] (teacher-forced scoring with an exact prefix).
    """
    T = q.shape[1]
    if T > TILED_FROM:
        return attend_tiled(q, k, v, positions, sink, window)
    per_query = lambda a, s, e: a[:, s:e] if jnp.ndim(a) == 3 else a  # noqa: E731
    outs = []
    for start in range(0, T, Q_CHUNK):
        end = min(start + Q_CHUNK, T)
        outs.append(attend(q[:, start:end], k[..., :end], v[:, :, :end], positions[:, start:end], positions[:, :end],
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
        q, k, v = (jnp.pad(a, [(0, 0)] * axis + [(0, pad)] + [(0, 0)] * (3 - axis)) for a, axis in ((q, 1), (k, 3), (v, 2)))
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
            acc = acc * scale + value_product(probs, block(v, j, K_CHUNK, 2))
            return new_top, total * scale + jnp.sum(probs, axis=-1, keepdims=True), acc

        floor = jnp.finfo(jnp.float32).min
        init = (jnp.full((B, K, G, Q_CHUNK, 1), floor), jnp.zeros((B, K, G, Q_CHUNK, 1)),
                jnp.zeros((B, K, G, Q_CHUNK, H), jnp.float32))
        n_keys = ((i + 1) * Q_CHUNK + K_CHUNK - 1) // K_CHUNK  # the key blocks up to this query block's end
        _, total, acc = jax.lax.fori_loop(0, n_keys, key_block, init)
        return merge_heads(acc / total, v.dtype)

    return over_query_blocks(query_block, n_q, T)


def attend_streaming(q, k, v, positions, sink: int, window: int):
    """Self-attention of a streaming layer in O(T * (S + W)): each query block sees the row's S sink keys
    (gathered per row, since left padding shifts them) plus the W + Q_CHUNK - 1 keys ending at the block's end;
    the rest is never computed. Keys with position < S are hidden in the window part, so none counts twice.
    A scan over query blocks: one block's scores and keys are alive at a time, whatever T.
    sink, window: static ints (the layer plan's S and W)."""
    B, T = positions.shape
    span = window + Q_CHUNK - 1
    if T <= sink + span:
        return attend_causal(q, k, v, positions, sink, window)
    pad = jnp.sum(positions < 0, axis=1, keepdims=True)  # [B, 1]
    at = pad + jnp.arange(sink)  # index of position j of each row
    idx = jnp.minimum(at, T - 1)
    sink_k = jnp.take_along_axis(k, idx[:, None, None, :], axis=3)
    sink_v = jnp.take_along_axis(v, idx[:, None, :, None], axis=2)
    sink_pos = jnp.where(at < T, jnp.take_along_axis(positions, idx, axis=1), -1)
    # Keys get span - Q_CHUNK empty slots in front (block c's window is then slots [c*Q_CHUNK, +span)) and, like
    # the queries, empty slots at the end up to a whole number of blocks; empty slots have position -1.
    front, back = span - Q_CHUNK, -T % Q_CHUNK
    n_q = (T + back) // Q_CHUNK
    q = jnp.pad(q, ((0, 0), (0, back), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (front, back)))
    v = jnp.pad(v, ((0, 0), (0, 0), (front, back), (0, 0)))
    q_positions = jnp.pad(positions, ((0, 0), (0, back)), constant_values=-1)
    k_positions = jnp.pad(jnp.where(positions < sink, -1, positions), ((0, 0), (front, back)), constant_values=-1)

    def query_block(c):
        start = c * Q_CHUNK
        window_of = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, start, span, axis)  # noqa: E731
        keys_pos = jnp.concatenate([sink_pos, window_of(k_positions, 1)], axis=1)
        return attend(jax.lax.dynamic_slice_in_dim(q, start, Q_CHUNK, 1),
                      jnp.concatenate([sink_k, window_of(k, 3)], axis=3),
                      jnp.concatenate([sink_v, window_of(v, 2)], axis=2),
                      jax.lax.dynamic_slice_in_dim(q_positions, start, Q_CHUNK, 1), keys_pos, sink, window)

    return over_query_blocks(query_block, n_q, T)


def qkv(lp, x, positions, inv_freq, cfg: Config):
    """Projections of the normed input x [B, T, D] -> q [B, T, N, H]; k [B, K, H, T]; v [B, K, T, H] (the cache
    layout); RoPE at each token's position, keys cached after RoPE. Either layout of `lt_jax.params`."""
    B, T, _ = x.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if "qkv_proj" in lp:  # serving layout: one product over the fused [out, in] weight
        y = jnp.einsum("BTD,ED->BTE", x, lp["qkv_proj"])
        y = y + lp["qkv_bias"] if "qkv_bias" in lp else y
        q, k, v = (a.reshape(B, T, -1, H) for a in jnp.split(y, [N * H, (N + K) * H], axis=-1))
    else:
        q, k, v = (jnp.einsum("BTD,DNH->BTNH", x, lp[name]) for name in ("q", "k", "v"))
        if "q_bias" in lp:
            q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
    k = apply_rope(k, positions, inv_freq)
    return apply_rope(q, positions, inv_freq), jnp.einsum("BTKH->BKHT", k), v.swapaxes(1, 2)


def out_proj(lp, out):
    """Attention output [B, T, N, H] -> [B, T, D]."""
    B, T, N, H = out.shape
    out = out.reshape(B, T, N * H)
    if "o_proj" in lp:
        return jnp.einsum("BTM,DM->BTD", out, lp["o_proj"])
    # [N*H, D] is o's own row-major layout (a free reshape); contracting (N, H) as two axes lets XLA:CPU transpose
    # the weight instead, a copy of it at every call.
    return out @ lp["o"].reshape(N * H, -1)


def mlp(lp, x):
    if "gate_up_proj" in lp:
        gate, up = jnp.split(jnp.einsum("BTD,ED->BTE", x, lp["gate_up_proj"]), 2, axis=-1)
        return jnp.einsum("BTF,DF->BTD", jax.nn.silu(gate) * up, lp["down_proj"])
    gate = jnp.einsum("BTD,DF->BTF", x, lp["gate"])
    up = jnp.einsum("BTD,DF->BTF", x, lp["up"])
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, lp["down"])


def decoder_layer(lp, x, positions, cfg: Config, inv_freq, attention):
    """One decoder layer. `attention(q, k, v) -> (out, aux)` is where callers differ (which keys, which mask,
    cache writes); the rest of the layer is written once, here."""
    q, k, v = qkv(lp, rms_norm(x, lp["attn_norm"], cfg.norm_eps), positions, inv_freq, cfg)
    out, aux = attention(q, k, v)
    x = x + out_proj(lp, out)
    return x + mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.norm_eps)), aux


def scan_layers(step, carry, layers, xs, unroll: bool = False):
    """`step(carry, (layer weights, x_i)) -> (carry, y_i)` over the layers, like `lax.scan` over (layers, xs).

    layers: stacked (leaves [L, ...], scanned) or a tuple of per-layer dicts (`lt_jax.params.serving_params`),
    scanned over the layer index with the weights picked by `lax.switch`, or with `unroll` looped in Python.
    Why unroll: XLA:CPU copies a layer's slice of a stacked (or switched) weight before every matmul, which at a
    decode step is a copy of the whole model per token; unrolled over per-layer buffers, each matmul reads its
    weight in place (scripts/bench_inference.py). Prefill and training amortize that copy over many tokens and
    keep one compiled layer body."""
    if isinstance(layers, dict):
        return jax.lax.scan(step, carry, (layers, xs))
    if unroll:
        ys = []
        for i, lp in enumerate(layers):
            carry, y = step(carry, (lp, jax.tree.map(lambda a: a[i], xs)))
            ys.append(y)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
    pick = [lambda lp=lp: lp for lp in layers]
    return jax.lax.scan(lambda c, ix: step(c, (jax.lax.switch(ix[0], pick), ix[1])), carry,
                        (jnp.arange(len(layers)), xs))


def unembed(params, x, cfg: Config):
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("BTD,VD->BTV", x, head, preferred_element_type=jnp.float32)


def forward(params, tokens, positions, cfg: Config, plan: Plan | None = None, prefix=None):
    """No-cache forward. tokens, positions int32 [B, T] (padding: position -1) -> logits float32 [B, T, V].

    Each layer masks with its own (sink, window) from the plan; layers are scanned, so the model compiles once
    whatever its depth, and the plan enters as data (`Plan.layer_windows`), so plans differing only in which
    layers are lazy share that compilation. `prefix` N (int or [B], data): queries at positions < N attend as in
    a full layer, which is what an exact prefill of N tokens followed by decode steps computes (teacher-forced
    scoring).
    """
    return forward_masked(params, tokens, positions, (plan or Plan.full(cfg.num_layers)).layer_windows(cfg), cfg,
                          prefix)


@partial(jax.jit, static_argnames=("cfg",))
def forward_masked(params, tokens, positions, layer_windows, cfg: Config, prefix=None):
    """`forward` with the plan as per-layer (sinks, windows) int32 [L] each."""
    native = cfg.sliding_window or FULL
    before = None if prefix is None else (positions < jnp.reshape(jnp.asarray(prefix), (-1, 1)))[:, :, None]
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    x = params["embed"][tokens]

    def step(x, layer):
        lp, (sink, window) = layer
        if before is not None:
            sink, window = jnp.where(before, 0, sink), jnp.where(before, native, window)
        return decoder_layer(lp, x, positions, cfg, inv_freq,
                             lambda q, k, v: (attend_causal(q, k, v, positions, sink, window), None))

    x, _ = scan_layers(step, x, params["layers"], tuple(layer_windows))
    return unembed(params, x, cfg)


def default_positions(tokens) -> jax.Array:
    """Positions 0..T-1 for unpadded rows."""
    B, T = tokens.shape
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
