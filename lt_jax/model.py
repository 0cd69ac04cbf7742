"""The decoder (LLaMA / Mistral / Qwen2): pure functions over the params pytree of `lt_jax.params`.
`decoder` is the one pass over the layers (embed, RoPE, the layer loop, remat, the head) that the no-cache forward,
prefill, decode, training and the probes all run; each passes only its attention (`lt_jax.attention`; a cache's
reads and writes, a queue) as a callback, with the per-layer data it scans over and the carry it threads through.

One token's path: embed -> L x [RMSNorm -> GQA attention (RoPE at the token's own position, the one mask rule
with the layer's sink/window) -> residual -> RMSNorm -> SwiGLU -> residual] -> RMSNorm -> tied or untied head.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.attention import attend_layer, layer_kinds, native_window
from lt_jax.config import Config
from lt_jax.plan import LayerPlan, Plan, PlanShape


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


def qkv(lp, x, positions, inv_freq, cfg: Config):
    """Projections of the normed input x [B, T, D] -> q [B, T, N, H]; k, v [B, K, H, T] (the cache
    layout); RoPE at each token's position, keys cached after RoPE. One product over the fused [K, G+2, H, D]
    weight, viewed as one [(K (G+2) H), D] matrix (a free reshape)."""
    B, T, D = x.shape
    K, G, H = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    y = jnp.einsum("BTD,ED->BTE", x, lp["qkv_proj"].reshape(-1, D))
    y = (y + lp["qkv_bias"].reshape(-1) if "qkv_bias" in lp else y).reshape(B, T, K, G + 2, H)
    q, k, v = y[:, :, :, :G].reshape(B, T, K * G, H), y[:, :, :, G], y[:, :, :, G + 1]
    k = apply_rope(k, positions, inv_freq)
    return apply_rope(q, positions, inv_freq), jnp.einsum("BTKH->BKHT", k), jnp.einsum("BTKH->BKHT", v)


def out_proj(lp, out):
    """Attention output [B, T, N, H] -> [B, T, D], o_proj [D, N, H] viewed as [D, N*H]. (On TPU the dot wants
    o_proj head-major, so the loops hold a relaid copy of it in either form; an einsum over both head axes as
    stored made XLA:CPU's decode 2-3x slower.)"""
    B, T, N, H = out.shape
    o = lp["o_proj"]
    return jnp.einsum("BTM,DM->BTD", out.reshape(B, T, N * H), o.reshape(o.shape[0], -1))


def mlp(lp, x):
    """SwiGLU over gate_up_proj [2, F, D] (one product over the stored shape) and down_proj [D, F]. Viewing
    gate_up_proj as [2F, D] merges the unsharded axis into F, which the model axis splits: a TPU decode loop then
    all-to-all'ed every layer's MLP weights into a second copy (1.9 GiB per chip for an 8B model on 8 chips)."""
    gate_up = jnp.einsum("BTD,CFD->CBTF", x, lp["gate_up_proj"])
    return jnp.einsum("BTF,DF->BTD", jax.nn.silu(gate_up[0]) * gate_up[1], lp["down_proj"])


def decoder_layer(lp, x, positions, cfg: Config, inv_freq, attention):
    """One decoder layer. `attention(q, k, v) -> (out, aux)` is where callers differ (which keys, which mask,
    cache writes); the rest of the layer is written once, here."""
    q, k, v = qkv(lp, rms_norm(x, lp["attn_norm"], cfg.norm_eps), positions, inv_freq, cfg)
    out, aux = attention(q, k, v)
    x = x + out_proj(lp, out)
    return x + mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.norm_eps)), aux


def scan_layers(step, carry, layers, xs, unroll: bool = False, remat: bool = False):
    """`step(carry, (layer weights, x_i)) -> (carry, y_i)` over the layers, like `lax.scan` over (layers, xs).

    layers: stacked (leaves [L, ...], scanned) or a tuple of per-layer dicts (`lt_jax.params.split_layers`),
    scanned over the layer index with the weights picked by `lax.switch`, or with `unroll` looped in Python.
    Why unroll: XLA:CPU copies a layer's slice of a stacked (or switched) weight before every matmul, which at a
    decode step is a copy of the whole model per token; unrolled over per-layer buffers, each matmul reads its
    weight in place (scripts/bench_inference.py). Prefill and training amortize that copy over many tokens and
    keep one compiled layer body. A TPU load keeps the layers stacked (`params.default_layers`): the TPU compiler
    fuses the slice into its matmul, so even decode scans (`unroll` is then ignored) and compiles one layer body. `remat`: each layer's activations are recomputed in the backward pass
    (`jax.checkpoint`), so a training step holds one layer's, not L layers'."""
    step = jax.checkpoint(step) if remat else step
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


def decoder(params, tokens, positions, cfg: Config, attention, xs=None, carry=None, head: str | None = "all",
            unroll: bool = False, remat: bool = False):
    """The decoder pass: embed tokens [B, T] -> L x `decoder_layer` -> the head, at positions [B, T].

    attention(q, k, v, x_i, carry) -> (out [B, T, N, H], carry, y_i): the caller's attention for layer i, given
    its slice x_i of `xs` (per-layer data, leaves [L, ...]) and the `carry` (a cache, a queue) it threads through
    the layers. head: "all" -> logits float32 [B, T, V]; "last" -> [B, 1, V] of the last column; None -> the
    hidden states [B, T, D] before the final norm. unroll, remat: as `scan_layers` takes them.
    Returns (logits or hidden states, carry, ys: the y_i stacked over layers)."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))

    def step(state, layer):
        x, carry = state
        lp, x_i = layer

        def layer_attention(q, k, v):
            out, new_carry, y = attention(q, k, v, x_i, carry)
            return out, (new_carry, y)

        x, (carry, y) = decoder_layer(lp, x, positions, cfg, inv_freq, layer_attention)
        return (x, carry), y

    (x, carry), ys = scan_layers(step, (params["embed"][tokens], carry), params["layers"], xs, unroll, remat)
    if head is not None:
        x = unembed(params, x if head == "all" else x[:, -1:], cfg)
    return x, carry, ys


def forward(params, tokens, positions, cfg: Config, plan: Plan | LayerPlan | None = None, prefix=None):
    """No-cache forward. tokens, positions int32 [B, T] (padding: position -1) -> logits float32 [B, T, V].

    Each layer masks with its own (sink, window) from the plan; layers are scanned, so the model compiles once
    whatever its depth, and the plan enters as data (`Plan.layers`), so plans differing only in which layers are
    lazy share that compilation. A `Plan`'s lazy layers attend in O(T (S + W)) (`forward_masked`'s streaming
    form), exactly what a hybrid prefill computes. `prefix` N (int or [B], data): queries at positions < N attend
    as in a full layer, which is what an exact prefill of N tokens followed by decode steps computes
    (teacher-forced scoring; the dense form, as for a `LayerPlan`).
    """
    shape = None
    if not isinstance(plan, LayerPlan):
        plan = plan or Plan.full(cfg.num_layers)
        shape = streaming_shape(plan, prefix)
        plan = plan.layers(cfg)
    return forward_masked(params, tokens, positions, plan, cfg, prefix, shape=shape)


def streaming_shape(plan: Plan, prefix=None) -> PlanShape | None:
    """What `forward_masked` compiles its streaming form for: the plan's lazy count, S and W; None (the dense
    form, one compilation for every plan) where no layer streams or a prefix needs per-query masks."""
    return None if prefix is not None or not plan.lazy_count else plan.shape.decoding


@partial(jax.jit, static_argnames=("cfg", "remat", "shape"))
def forward_masked(params, tokens, positions, layers: LayerPlan, cfg: Config, prefix=None, remat: bool = False,
                   shape: PlanShape | None = None):
    """`forward` with the plan as data (`LayerPlan`); `remat` recomputes each layer in the backward pass
    (`scan_layers`). Without `shape`, the dense form (`attention.attend_layer`): every layer's full score matrix
    under the mask rule, its sink and window read from `layers` (any plan, one compilation; `prefix` allowed).
    With `shape` (`streaming_shape`: lazy count, S, W) and no prefix, the streaming form: lazy layers in
    O(T (S + W))."""
    native = native_window(cfg)
    full_queries = None if prefix is None else (positions < jnp.reshape(jnp.asarray(prefix), (-1, 1)))[:, :, None]
    dense = shape is None
    if not dense and prefix is not None:
        raise ValueError("a prefix needs the dense form (shape=None)")
    kinds = "mixed" if dense else layer_kinds(shape.num_lazy, cfg.num_layers)

    def attention(q, k, v, layer, _):
        is_lazy, sink, window = layer
        if not dense:
            sink, window = shape.sink, shape.window
        return attend_layer(q, k, v, positions, is_lazy, sink, window, native, kinds, dense, full_queries), None, None

    logits, _, _ = decoder(params, tokens, positions, cfg, attention, (layers.is_lazy, layers.sink, layers.window),
                           remat=remat)
    return logits


def default_positions(tokens) -> jax.Array:
    """Positions 0..T-1 for unpadded rows."""
    B, T = tokens.shape
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
