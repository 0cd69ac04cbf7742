"""A streaming layer's buffer size as a value: `ring_size` and the shapes `init_cache` allocates (issue 27: a ring
one slot too large changed no output and only the byte-count test saw it)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from lt_jax.cache import BLOCK, init_cache, put_step_tokens, put_tokens, ring_size
from lt_jax.plan import Plan


@pytest.mark.parametrize("sink,window,max_len,want", [
    (4, 16, 100, 20),  # sinks + window
    (4, 16, 20, 20),   # exactly fits
    (4, 16, 19, 19),   # shorter than S + W: every position has a place, no more
    (0, 1, 50, 1),
])
def test_ring_size(sink, window, max_len, want):
    assert ring_size(sink, window, max_len) == want


def test_init_cache_slot_shapes():
    cfg = tiny_config()  # K=2 KV heads of H=8
    plan = Plan(cfg.num_layers, (0, 2, 3), sink=4, window=16)
    cache = jax.eval_shape(lambda: init_cache(cfg, plan, 3, 100))
    assert [a.shape for a in cache.ring_k] == [(3, 2, 8, 20)] * 3
    assert [a.shape for a in cache.ring_v] == [(3, 2, 8, 20)] * 3
    assert cache.ring_pos.shape == (3, 20)
    assert [a.shape for a in cache.full_k] == [(3, 2, 8, 100)]
    assert [a.shape for a in cache.full_v] == [(3, 2, 8, 100)]
    assert cache.full_pos.shape == (3, 100) and cache.length.shape == (3,)


@pytest.mark.parametrize("M", [5, 2 * BLOCK + 3])
def test_one_token_block_write_equals_the_scatter(M):
    """Decode's block write (`put_step_tokens`) leaves what the one-place scatter leaves, bit for bit: places at a
    block's start and end, in the last partial block, and out of range (dropped), for a slot shorter than a block
    and one of several blocks."""
    rng = np.random.default_rng(M)
    B, K, H = 5, 2, 3
    buffer = jnp.asarray(rng.normal(size=(B, K, H, M)), jnp.float32)
    tokens = jnp.asarray(rng.normal(size=(B, K, H)), jnp.float32)
    at = jnp.array([0, min(BLOCK, M) - 1, M - 1, M, M + 200])
    want = put_tokens(buffer, tokens[:, None], at[:, None])
    np.testing.assert_array_equal(put_step_tokens(buffer, tokens, at), want)
    assert not np.array_equal(want, buffer)
