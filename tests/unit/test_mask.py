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
    """Queries reach past position 1300 (a row left padded), so every term of the rule decides some pair: the
    window hides causal keys, the sink shows keys the window hides, and FULL reaches back 1300 positions."""
    rng = np.random.default_rng(sink * 7 + window % 97)
    # positions with left padding (-1) and a scrambled key order, as a ring cache stores them
    q_pos = np.stack([np.arange(-5, 1395, 7), np.arange(0, 1400, 7)]).astype(np.int32)
    q_pos = np.maximum(q_pos, -1)
    k_pos = rng.permutation(np.arange(-3, 1400))[None].repeat(2, 0).astype(np.int32)
    k_pos = np.maximum(k_pos, -1)
    got = np.asarray(attention_mask(q_pos, k_pos, sink, window))
    want = brute_force(q_pos, k_pos, sink, window)
    np.testing.assert_array_equal(got, want)
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    causal = (k >= 0) & (k <= q)
    far = causal & (q - k >= min(window, 1300))  # causal pairs beyond the window
    assert far.any()
    if window < FULL:
        assert not got[far & (k >= sink)].any()  # the window hides them ...
    else:
        assert got[far].all()  # ... unless the layer is full
    if sink:
        assert got[far & (k < sink)].all()  # and the sink shows its keys whatever the distance


def test_full_is_causal():
    pos = np.arange(50, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(attention_mask(pos, pos, 0, FULL))[0], np.tril(np.ones((50, 50), bool)))
