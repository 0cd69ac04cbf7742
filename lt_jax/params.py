"""The one abstract description of every parameter: shape, logical axes. Init, conversion, checkpoint templates
and (later) sharding are all derived from it. Layer weights are stacked on a leading L axis (checkpoints, init, a
mesh's uniform sharding); a loaded `Model` holds them split, one dict per layer (`split_layers`), which every
layer loop of `lt_jax.model.scan_layers` accepts as well."""
from __future__ import annotations

import dataclasses

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


def split_layers(params: dict) -> dict:
    """params on the device with `layers` as a tuple of per-layer dicts, each leaf its own buffer (only placed if
    already split). Like `jax.device_put`, loading briefly holds the host arrays and their device copies."""
    layers = params["layers"]
    if isinstance(layers, tuple):
        return jax.device_put(params)
    num_layers = len(jax.tree.leaves(layers)[0])
    per_leaf = {name: [jax.device_put(a) for a in np.asarray(stack)] for name, stack in layers.items()}
    rest = jax.device_put({name: a for name, a in params.items() if name != "layers"})
    return {**rest, "layers": tuple({name: per_leaf[name][i] for name in layers} for i in range(num_layers))}


def stack_layers(params: dict) -> dict:
    """The inverse of `split_layers`: layer weights stacked on a leading L axis (the checkpoint layout)."""
    if isinstance(params["layers"], dict):
        return params
    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *params["layers"])}
