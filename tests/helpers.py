"""Helpers shared by test files (plain functions; fixtures live in conftest.py)."""
from __future__ import annotations

import collections

import jax

from lt_jax.config import Config, Rope

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # fired by every compilation jit makes
_compiled = collections.Counter()  # function name -> compilations in this process since this module loaded


def _count(event: str, _duration: float, fun_name: str = "?", **_):
    if event == BACKEND_COMPILE:
        _compiled[fun_name] += 1


jax.monitoring.register_event_duration_secs_listener(_count)


def compile_count(fn) -> int:
    """How many times the jitted function `fn` has compiled in this process (since tests/helpers.py was imported:
    conftest imports it first), through JAX's public monitoring events instead of the private `_cache_size()`. A
    persistent-cache hit counts too (the event wraps the cache lookup), so a recompilation cannot hide behind the
    disk cache. Counted by name: two jitted functions of one name count together."""
    return _compiled[f"jit({fn.__name__})"]


def tiny_config(**changes) -> Config:
    """A tiny random-init llama-style Config (4 layers, 4 query / 2 KV heads of 8, vocab 64): unit tests build
    params with `lt_jax.params.init_params` instead of converting a transformers model."""
    base = Config(arch="llama", vocab_size=64, dim=32, ffn_dim=48, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8, norm_eps=1e-6, rope=Rope(), max_position_embeddings=4096, tie_embeddings=False,
                  qkv_bias=False)
    return base.replace(**changes)


# ---- a 6-layer tiny llama's LightTransfer-Test settings (the `deep` fixture; test_lazy, test_retrieval_aware) ----

SINK, W, W_LAST = 3, 20, 8
LAYERS = 6


def lighttransfer_prefill(model, prompts, fraction, max_len, plan=None):
    """(logits [B, T, V], cache, LayerPlan, ratios [L, B, N]) of one prefill under `plan` (default: selecting)."""
    from lt_jax.batching import left_pad
    from lt_jax.cache import init_cache
    from lt_jax.inference import prefill
    from lt_jax.plan import make_plan
    plan = plan or make_plan("lighttransfer", model.config, lazy_fraction=fraction, sink=SINK, window=W,
                             w_last=W_LAST)
    tokens, positions = left_pad(prompts, max(map(len, prompts)))
    cache = init_cache(model.config, plan, len(prompts), max_len)
    return prefill(model.params, tokens, positions, cache, plan.prefill_layers(model.config), model.config,
                   plan.shape, all_logits=True)


def prefill_peak(model, plan, batch, length, max_len) -> int:
    """XLA's buffer plan of the prefill: arguments + outputs + temporaries - donated aliases."""
    import jax.numpy as jnp

    from lt_jax.cache import init_cache
    from lt_jax.inference import prefill
    cfg = model.config
    cache = jax.eval_shape(lambda: init_cache(cfg, plan, batch, max_len))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    s = prefill.lower(model.params, tokens, tokens, cache, plan.prefill_layers(cfg), cfg,
                      plan.shape).compile().memory_analysis()
    return s.argument_size_in_bytes + s.output_size_in_bytes + s.temp_size_in_bytes - s.alias_size_in_bytes
