"""The one abstract description of every parameter: shape, logical axes. Init, conversion, checkpoint templates
and (later) sharding are all derived from it. Layer weights are stacked on a leading L axis (checkpoints, init, a
mesh's uniform sharding). A loaded `Model` holds them in the serving layout instead (`serving_params`): one dict
per layer, q/k/v and gate/up fused, every projection stored [out, in] as in HF; every layer loop of
`lt_jax.model` accepts both layouts."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.config import Config


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, one per dim, for sharding rules
    init: str = "normal"   # "normal" (std 0.02) or "ones" (norm scales)


def param_specs(cfg: Config) -> dict:
    L, D, F, V = cfg.num_layers, cfg.dim, cfg.ffn_dim, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", "embed"), "ones"),
        "q": ParamSpec((L, D, N, H), ("layers", "embed", "q_heads", "head_dim")),
        "k": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "v": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "o": ParamSpec((L, N, H, D), ("layers", "q_heads", "head_dim", "embed")),
        "mlp_norm": ParamSpec((L, D), ("layers", "embed"), "ones"),
        "gate": ParamSpec((L, D, F), ("layers", "embed", "ffn")),
        "up": ParamSpec((L, D, F), ("layers", "embed", "ffn")),
        "down": ParamSpec((L, F, D), ("layers", "ffn", "embed")),
    }
    if cfg.qkv_bias:
        layers["q_bias"] = ParamSpec((L, N, H), ("layers", "q_heads", "head_dim"))
        layers["k_bias"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"))
        layers["v_bias"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"))
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed")),
        "layers": layers,
        "final_norm": ParamSpec((D,), ("embed",), "ones"),
    }
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((V, D), ("vocab", "embed"))
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_dtype(cfg: Config):
    return jnp.dtype(cfg.dtype)


def empty_params(cfg: Config) -> dict:
    """Host buffers to be filled tensor by tensor (conversion): one copy of the model, nothing more."""
    dt = param_dtype(cfg)
    return jax.tree.map(lambda s: np.empty(s.shape, dt), param_specs(cfg), is_leaf=_is_spec)


def abstract_params(cfg: Config) -> dict:
    dt = param_dtype(cfg)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dt), param_specs(cfg), is_leaf=_is_spec)


def init_params(cfg: Config, key: jax.Array) -> dict:
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    dt = param_dtype(cfg)
    made = [jnp.ones(s.shape, dt) if s.init == "ones" else 0.02 * jax.random.normal(k, s.shape, dt)
            for s, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, made)


def out_in(a, n_in: int):
    """Our [in..., out...] weight -> HF's Linear layout [out, in]; n_in: how many leading axes are inputs (0: a
    bias, flattened)."""
    return a.reshape(-1) if n_in == 0 else a.reshape(math.prod(a.shape[:n_in]), -1).T


def from_out_in(w, shape):
    """The inverse of `out_in`: HF's [out, in] (or a flat bias) -> our `shape`."""
    return w.T.reshape(shape)


# Serving layout: fused leaf -> (the checkpoint leaves it joins, in order; their n_in). Biases: Qwen2 only.
FUSED = {"qkv_proj": (("q", "k", "v"), 1), "qkv_bias": (("q_bias", "k_bias", "v_bias"), 0),
         "o_proj": (("o",), 2), "gate_up_proj": (("gate", "up"), 1), "down_proj": (("down",), 1)}


def serving_params(params: dict) -> dict:
    """params on the device in the serving layout: `layers` a tuple of per-layer dicts, each leaf its own buffer,
    {attn_norm, mlp_norm, qkv_proj [(N + 2K) H, D], qkv_bias [(N + 2K) H] (Qwen2), o_proj [D, N H],
    gate_up_proj [2F, D], down_proj [D, F]}. Why: a small-batch decode step is a chain of matrix-vector products
    that XLA:CPU runs one after another; four products per layer over [out, in] rows in place decode 1.10-1.16x
    faster (SmolLM2, 2K context, batch 1-4) than seven over [in, out] weights (scripts/bench_inference.py), and
    per-layer buffers spare XLA's copy of a stacked weight's slice at every step. Already in this layout: only
    placed. Like `jax.device_put`, loading briefly holds the host arrays and their device copies."""
    layers = params["layers"]
    if isinstance(layers, tuple):
        return jax.device_put(params)
    host = {name: np.asarray(stack) for name, stack in layers.items()}

    def layer(i):
        out = {"attn_norm": host["attn_norm"][i], "mlp_norm": host["mlp_norm"][i]}
        for fused, (parts, n_in) in FUSED.items():
            if parts[0] in host:
                out[fused] = np.concatenate([out_in(host[p][i], n_in) for p in parts])
        return jax.device_put(out)

    rest = jax.device_put({name: a for name, a in params.items() if name != "layers"})
    return {**rest, "layers": tuple(layer(i) for i in range(len(host["attn_norm"])))}


def checkpoint_params(params: dict, cfg: Config) -> dict:
    """The inverse of `serving_params`: layer weights unfused and stacked on a leading L axis (the checkpoint
    layout of `param_specs`)."""
    if isinstance(params["layers"], dict):
        return params
    shapes = {name: spec.shape[1:] for name, spec in param_specs(cfg)["layers"].items()}

    def layer(lp):
        out = {"attn_norm": lp["attn_norm"], "mlp_norm": lp["mlp_norm"]}
        for fused, (parts, n_in) in FUSED.items():
            if fused in lp:
                cuts = np.cumsum([math.prod(shapes[p][n_in:]) for p in parts])[:-1]
                out.update({p: from_out_in(w, shapes[p]) for p, w in zip(parts, jnp.split(lp[fused], cuts))})
        return out

    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *map(layer, params["layers"]))}
