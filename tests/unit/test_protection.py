"""Retrieval-aware protection through the real selecting prefill, against a plain-Python reference (the top lazy
ratios among the unprotected layers), on a model built so that a protected layer's ratio leads the layers that
should go lazy by more than any margin short of PROTECTED (issue 27: a margin of 0.5 passed the suite, whose random
model's ratios span less than 0.5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from lt_jax.cache import init_cache
from lt_jax.inference import prefill
from lt_jax.params import init_params
from lt_jax.plan import Plan

CFG = tiny_config(qkv_bias=True)
T, SINK, WINDOW, W_LAST = 200, 4, 16, 8
LOCAL_HEADS = (0, 4, 1, 4)  # per layer: query heads that attend to themselves (ratio ~1); the rest attend
#                             uniformly (ratio ~(S + W) / T ~ 0.08). Layer ratios ~0.08, ~1, ~0.31, ~1.


def built_ratio_params():
    """Queries and keys are constant biases (weights zeroed), so scores depend on the distance alone: a head whose
    query equals its key (c in the first half of every RoPE pair) peaks at distance 0; a zero query attends
    uniformly."""
    params = init_params(CFG, jax.random.key(0))
    G, H = CFG.num_heads // CFG.num_kv_heads, CFG.head_dim
    peak = np.r_[np.full(H // 2, 12.0), np.zeros(H // 2)].astype(np.float32)
    proj = np.array(params["layers"]["qkv_proj"])
    bias = np.zeros(params["layers"]["qkv_bias"].shape, np.float32)  # [L, K, G+2, H]
    proj[:, :, :G + 1] = 0.0  # queries and keys: bias only
    bias[:, :, G] = peak  # every key
    for layer, local in enumerate(LOCAL_HEADS):
        for head in range(local):
            bias[layer, head // G, head % G] = peak
    layers = {**params["layers"], "qkv_proj": jnp.asarray(proj), "qkv_bias": jnp.asarray(bias)}
    return {**params, "layers": layers}


def reference_choice(ratios, num_lazy, protect):
    """Plain Python: the num_lazy unprotected layers of highest ratio, a tie to the higher index."""
    candidates = [i for i in range(len(ratios)) if i not in protect]
    ranked = sorted(candidates, key=lambda i: (ratios[i], i), reverse=True)
    return tuple(sorted(ranked[:num_lazy]))


@pytest.fixture(scope="module")
def params():
    return built_ratio_params()


@pytest.mark.parametrize("protect", [(3,), (1,)])
def test_selecting_prefill_never_makes_a_protected_layer_lazy(params, protect):
    plan = Plan(CFG.num_layers, select_lazy=2, sink=SINK, window=WINDOW, w_last=W_LAST,
                protect=protect).validate(CFG)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, T)).astype(np.int32)
    positions = np.arange(T, dtype=np.int32)[None]
    _, _, layers, ratios = prefill(params, tokens, positions, init_cache(CFG, plan, 1, T),
                                   plan.prefill_layers(CFG), CFG, plan.shape)
    ratios = np.asarray(ratios).mean(axis=(1, 2))  # [L]
    # the fixture does what it claims: the protected layer leads the least lazy of the right choice by > 0.5
    want = reference_choice(ratios, 2, protect)
    assert ratios[protect[0]] - min(ratios[i] for i in want) > 0.5, ratios
    assert layers.lazy_layers == want, (ratios, layers.lazy_layers)
