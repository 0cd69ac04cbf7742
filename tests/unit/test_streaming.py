"""Streaming prefill across several query blocks of Q_CHUNK, against the brute-force mask over the whole sequence
(`attention.attend`: one [T, T] score matrix), with windows that end exactly at a block edge; in inference
(`attend_streaming`) and in training (`train.step.hidden_states` / `loss_fn` on a hybrid plan). Issue 27: a window
missing the query itself at a block end past the first block was seen by one parametrization of one test."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from lt_jax.attention import FULL, Q_CHUNK, attend, attend_streaming
from lt_jax.model import decoder_layer, rope_inv_freq
from lt_jax.params import init_params
from lt_jax.plan import Plan
from lt_jax.train.step import hidden_states

SINK = 4
T = 3 * Q_CHUNK  # three whole blocks: the last query of every block is a block end, the sequence's end too


def qkv(T, pad, seed=0, B=2, N=4, K=2, H=8):
    """Random q [B, T, N, H], k, v [B, K, H, T]; row 1 left padded by `pad` (position -1)."""
    r = np.random.default_rng(seed)
    q, k, v = (r.standard_normal(s).astype(np.float32) for s in ((B, T, N, H), (B, K, H, T), (B, K, H, T)))
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    positions[1] = np.r_[np.full(pad, -1), np.arange(T - pad)]
    return q, k, v, positions


# windows: one key (the query itself: a block end that misses itself shows at once), a whole block (every
# block's first query's window starts at the previous block's end), and one past a block.
@pytest.mark.parametrize("window", [1, Q_CHUNK, Q_CHUNK + 1])
@pytest.mark.parametrize("length,pad", [(T, 0), (T, 37), (T - 57, 3)])
def test_attend_streaming_equals_the_whole_sequence_mask(window, length, pad):
    q, k, v, positions = qkv(length, pad)
    got = jax.jit(attend_streaming, static_argnums=(4, 5))(q, k, v, positions, SINK, window)
    want = attend(q, k, v, positions, positions, SINK, window)
    real = positions >= 0  # padding queries see nothing real; their output is not used
    assert float(jnp.max(jnp.abs(got - want)[real])) <= 1e-5


CFG = tiny_config(num_layers=2, vocab_size=32, dim=16, ffn_dim=24, head_dim=4)


@partial(jax.jit, static_argnums=(3, 4))
def reference_hidden(params, tokens, positions, lazy, window):
    """The decoder with every layer's attention over the whole sequence under its mask, [T, T] scores."""
    inv_freq = rope_inv_freq(CFG)
    x = params["embed"][tokens]
    for i in range(CFG.num_layers):
        sink, win = (SINK, window) if i in lazy else (0, FULL)
        lp = jax.tree.map(lambda a, i=i: a[i], params["layers"])
        x, _ = decoder_layer(lp, x, positions, CFG, inv_freq,
                             lambda q, k, v, s=sink, w=win: (attend(q, k, v, positions, positions, s, w), None))
    return x


@pytest.mark.parametrize("window", [1, Q_CHUNK])
def test_training_forward_on_a_hybrid_plan_equals_the_whole_sequence_mask(window):
    plan = Plan(CFG.num_layers, (1,), sink=SINK, window=window)
    params = init_params(CFG, jax.random.key(1))
    # projections of order one: attention is peaked, so one key more or less moves the output visibly
    params = {**params, "layers": {**params["layers"], "qkv_proj": params["layers"]["qkv_proj"] * 25,
                                   "o_proj": params["layers"]["o_proj"] * 25}}
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (1, T - 40)).astype(np.int32)
    positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
    got = jax.jit(partial(hidden_states, cfg=CFG, shape=plan.shape))(params, tokens, positions,
                                                                      plan.layers(CFG).is_lazy)
    want = reference_hidden(params, tokens, positions, plan.lazy_layers, window)
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * float(jnp.max(jnp.abs(want)))
