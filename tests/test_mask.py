"""The one mask rule against a brute-force transcription of docs/design.md §4."""
import numpy as np
import pytest

from lt_jax.attention import FULL, attention_mask


def brute_force(q_pos, k_pos, sink, window):
    B, T = q_pos.shape
    S = k_pos.shape[1]
    out = np.zeros((B, T, S), bool)
    for b in range(B):
        for i in range(T):
            for j in range(S):
                q, k = q_pos[b, i], k_pos[b, j]
                out[b, i, j] = k >= 0 and k <= q and (k < sink or q - k < window)
    return out


@pytest.mark.parametrize("sink,window", [(0, FULL), (4, 8), (0, 5), (3, 1), (129, 1025)])
def test_mask_equals_brute_force(sink, window):
    rng = np.random.default_rng(sink * 7 + window % 97)
    # positions with left padding (-1) and a scrambled key order, as a ring cache stores them
    q_pos = np.stack([np.arange(-5, 35), np.arange(0, 40)]).astype(np.int32)
    q_pos = np.maximum(q_pos, -1)
    k_pos = rng.permutation(np.arange(-3, 1200))[None].repeat(2, 0).astype(np.int32)
    k_pos = np.maximum(k_pos, -1)
    got = np.asarray(attention_mask(q_pos, k_pos, sink, window))
    np.testing.assert_array_equal(got, brute_force(q_pos, k_pos, sink, window))


def test_full_is_causal():
    pos = np.arange(50, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(attention_mask(pos, pos, 0, FULL))[0], np.tril(np.ones((50, 50), bool)))
