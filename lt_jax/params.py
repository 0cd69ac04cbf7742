"""The one parameter layout (docs/design.md §2): every leaf's name, shape and logical axes, described once here.
Init, conversion, checkpoint templates and sharding are all derived from `param_specs`.

Per layer: `attn_norm [D]`, `qkv_proj [K, G+2, H, D]` (for each KV head its G query heads, then its key head, then
its value head), `qkv_bias [K, G+2, H]` (Qwen2), `o_proj [D, N, H]`, `mlp_norm [D]`, `gate_up_proj [2, F, D]`,
`down_proj [D, F]`; then `embed [V, D]`, `final_norm [D]` and, for untied heads, `lm_head [V, D]`. Every projection
is stored [out..., in] as in HF, so a layer is four matrix products whose weights are read row by row, and the
fused axes keep each KV head's group (and gate/up) apart so a mesh can shard heads or `ffn` without splitting a
fused piece.

Two storages of the same names: layers stacked on a leading L axis (`stack_layers`: checkpoints, init, a scanned
training step; a loaded `Model` on TPU) or a tuple of per-layer dicts (`split_layers`: a loaded `Model` on CPU and
GPU; decode reads each weight in place, where XLA:CPU would copy a stacked weight's slice before every product).
`default_layers` picks a loaded model's storage by platform."""
from __future__ import annotations

import dataclasses
import functools

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
    """The stacked description: layer leaves carry a leading "layers" axis."""
    L, D, F, V = cfg.num_layers, cfg.dim, cfg.ffn_dim, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = N // K
    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", "embed"), "ones"),
        "qkv_proj": ParamSpec((L, K, G + 2, H, D), ("layers", "kv_heads", "qkv", "head_dim", "embed")),
        "o_proj": ParamSpec((L, D, N, H), ("layers", "embed", "q_heads", "head_dim")),
        "mlp_norm": ParamSpec((L, D), ("layers", "embed"), "ones"),
        "gate_up_proj": ParamSpec((L, 2, F, D), ("layers", "gate_up", "ffn", "embed")),
        "down_proj": ParamSpec((L, D, F), ("layers", "embed", "ffn")),
    }
    if cfg.qkv_bias:
        layers["qkv_bias"] = ParamSpec((L, K, G + 2, H), ("layers", "kv_heads", "qkv", "head_dim"), "zeros")
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed")),
        "layers": layers,
        "final_norm": ParamSpec((D,), ("embed",), "ones"),
    }
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((V, D), ("vocab", "embed"))
    return specs


def qkv_part(cfg: Config, name: str):
    """Where HF's q/k/v projection sits on the fused [K, G+2, ...] axes of `qkv_proj` / `qkv_bias`."""
    G = cfg.num_heads // cfg.num_kv_heads
    return {"q": np.s_[:, :G], "k": np.s_[:, G], "v": np.s_[:, G + 1]}[name]


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
    """Random stacked params (std 0.02 weights, unit norms, zero biases)."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    dt = param_dtype(cfg)
    # Drawn flat and reshaped: the same values as a draw of the leaf's shape, but XLA:CPU compiles the rank-5
    # draw of qkv_proj ~8x slower (13 s against 1.6 s on the 2-core test machine).
    made = [jnp.ones(s.shape, dt) if s.init == "ones" else jnp.zeros(s.shape, dt) if s.init == "zeros"
            else 0.02 * jax.random.normal(k, (int(np.prod(s.shape)),), dt).reshape(s.shape)
            for s, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, made)


def split_layers(params: dict, shardings: dict | None = None, consume: bool = False) -> dict:
    """params with `layers` a tuple of per-layer dicts, each leaf a buffer of its own (what a loaded `Model`
    holds), placed on the default device or, with `shardings` (the same split tree of NamedShardings,
    `lt_jax.sharding.param_shardings(split=True)`), in their shards. Already split: only placed. Stacked: cut leaf
    by leaf; with consume=True (a freshly restored tree nobody else holds) each stacked leaf is taken out of
    `params["layers"]` and freed once cut, so splitting holds at most one stacked leaf beyond the split ones. On CPU
    the per-layer slices of host arrays may alias them."""
    where = (lambda *keys: None) if shardings is None else (  # noqa: E731
        lambda *keys: functools.reduce(lambda tree, k: tree[k], keys, shardings))
    rest = {k: jax.device_put(v, where(k)) for k, v in params.items() if k != "layers"}
    layers = params["layers"]
    if isinstance(layers, tuple):
        return {**rest, "layers": tuple({n: jax.device_put(a, where("layers", i, n)) for n, a in layer.items()}
                                        for i, layer in enumerate(layers))}
    pending = layers if consume else dict(layers)
    count = len(pending["attn_norm"])
    out = [{} for _ in range(count)]
    for name in list(pending):
        stack = pending.pop(name)
        cut = np.asarray(stack) if shardings is None else stack  # on a mesh: cut in place, shard by shard
        for i in range(count):
            out[i][name] = jax.device_put(cut[i], where("layers", i, name))
        del stack, cut
    return {**rest, "layers": tuple(out)}


def stack_layers(params: dict) -> dict:
    """The inverse of `split_layers`: layer leaves stacked on a leading L axis (checkpoints, a scanned step)."""
    if isinstance(params["layers"], dict):
        return params
    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *params["layers"])}


LAYERS = ("split", "stacked")


def default_layers(platform: str) -> str:
    """The storage a loaded `Model` keeps its layers in on `platform` (a `jax.default_backend()` name), which decides
    how decode runs them (`model.scan_layers`). "stacked" on TPU: decode scans one layer body, and the TPU compiler
    reads each layer's weights in place from the stack (no per-layer copy among its temporaries); a mixed plan's
    decode no longer compiles a `cond` and two slot switches per layer for each of L layers, so its loop compiles
    several times faster (results/pods/compile-time-8b.json). "split" elsewhere: decode unrolls the layers over
    per-layer buffers, because XLA:CPU copies a stacked weight's slice before every product (a copy of the model
    per token); XLA:GPU hands its GEMM library whole buffers too, so it keeps the same storage (not measured on a
    GPU)."""
    return "stacked" if platform == "tpu" else "split"


# Checkpoints written before the one layout (lt-jax 0.1: q/k/v/o/gate/up/down stored [in..., out...], unfused).
LEGACY_LAYER_LEAVES = {"q", "k", "v", "o", "gate", "up", "down"}


def from_legacy(params: dict, cfg: Config) -> dict:
    """A stacked params tree of the 0.1 checkpoint layout -> this layout (numpy, fused at read time)."""
    old = {name: np.asarray(a) for name, a in params["layers"].items()}
    L, D = cfg.num_layers, cfg.dim
    K, G, H = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    out_first = lambda a: np.moveaxis(a.reshape(L, D, -1), 1, 2)  # [L, D, out...] -> [L, out, D]  # noqa: E731
    qkv = np.concatenate([out_first(old["q"]).reshape(L, K, G, H, D), out_first(old["k"]).reshape(L, K, 1, H, D),
                          out_first(old["v"]).reshape(L, K, 1, H, D)], axis=2)
    layers = {"attn_norm": old["attn_norm"], "mlp_norm": old["mlp_norm"], "qkv_proj": qkv,
              "o_proj": np.moveaxis(old["o"].reshape(L, -1, D), 2, 1).reshape(L, D, cfg.num_heads, H),
              "gate_up_proj": np.stack([np.moveaxis(old["gate"], 1, 2), np.moveaxis(old["up"], 1, 2)], axis=1),
              "down_proj": np.moveaxis(old["down"], 1, 2)}
    if "q_bias" in old:
        layers["qkv_bias"] = np.concatenate([old["q_bias"].reshape(L, K, G, H), old["k_bias"].reshape(L, K, 1, H),
                                             old["v_bias"].reshape(L, K, 1, H)], axis=2)
    return {**params, "layers": {k: np.ascontiguousarray(v) for k, v in layers.items()}}
