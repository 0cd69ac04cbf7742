"""lt_jax/lazy.py: the lazy ratio against a brute-force softmax, the selection rule (top_lazy, queue_score,
lazy_set) against brute-force choices, the queue against the global choice, the offline calibration. The ratio on
real models against transformers' attention probabilities: tests/integration/test_lazy.py."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lt_jax.attention import FULL
from lt_jax.lazy import calibrate, init_queue, lazy_ratio, lazy_set, push, queue_score, top_lazy


def brute_force_choice(ratios, num_lazy, protected=()):
    """Over every set of num_lazy unprotected layers: the one whose ratios, sorted high to low with ties to the
    higher index, rank first (the lazier set); None if too few layers are unprotected."""
    free = [i for i in range(len(ratios)) if i not in protected]
    if len(free) < num_lazy:
        return None
    key = lambda s: sorted(((ratios[i], i) for i in s), reverse=True)  # noqa: E731
    return tuple(max(itertools.combinations(free, num_lazy), key=key))


@settings(max_examples=80, deadline=None)
@given(data=st.data(), num_layers=st.integers(1, 8))
def test_selection_rule_equals_brute_force(data, num_layers):
    """Ratios drawn from a few values (many ties), some layers protected: lazy_set is the brute-force choice, and
    top_lazy is lazy_set with nothing protected."""
    num_lazy = data.draw(st.integers(0, num_layers))
    ratios = np.asarray(data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), min_size=num_layers,
                                           max_size=num_layers)), np.float32)
    protected = data.draw(st.sets(st.integers(0, num_layers - 1), max_size=num_layers - num_lazy))
    mask = np.isin(np.arange(num_layers), sorted(protected))
    assert tuple(lazy_set(ratios, num_lazy, mask)) == brute_force_choice(ratios, num_lazy, protected)
    unprotected = brute_force_choice(ratios, num_lazy)
    assert tuple(top_lazy(ratios, num_lazy)) == unprotected == tuple(lazy_set(ratios, num_lazy))


def test_protected_scores_below_every_unprotected():
    assert queue_score(1.0, True) < queue_score(0.0, False)
    assert queue_score(np.float32(1.0), np.bool_(True)) < queue_score(np.float32(0.0), np.bool_(False))
    traced = queue_score(jnp.float32([1.0, 0.0]), jnp.bool_([True, False]))
    assert float(traced[0]) < float(traced[1])
    assert queue_score(0.3, False) == 0.3


@settings(max_examples=50, deadline=None)
@given(data=st.data(), num_layers=st.integers(1, 12))
def test_queue_reaches_the_global_top_k(data, num_layers):
    """Ratios drawn from a few values (many ties): the queue's lazy set is the global top-k with ties to the
    higher index, and its plan-as-data is a valid placement (full slots 0..P-1, rings 0..L-P-1, each once)."""
    num_lazy = data.draw(st.integers(0, num_layers))
    ratios = np.asarray(data.draw(st.lists(st.sampled_from([0.1, 0.5, 0.5, 0.9]), min_size=num_layers,
                                           max_size=num_layers)), np.float32)
    queue = init_queue(num_layers, num_layers - num_lazy)
    for layer in range(num_layers):
        queue, *_ = push(queue, jnp.int32(layer), jnp.float32(ratios[layer]))
    lazy = np.flatnonzero(np.asarray(queue.is_lazy))
    np.testing.assert_array_equal(lazy, top_lazy(ratios, num_lazy))
    index = np.asarray(queue.slot)
    assert sorted(index[lazy]) == list(range(num_lazy))
    assert sorted(np.delete(index, lazy)) == list(range(num_layers - num_lazy))


def reference_ratio(q, k, sink, window, w_last, full_window):
    """Brute force for one unpadded row, float64: q [T, N, H], k [K, H, T] -> [N]."""
    T, N, H = q.shape
    G = N // k.shape[0]
    if T <= sink + window:
        return np.ones(N)
    kept = (np.arange(T) < sink) | (np.arange(T) >= T - window)
    out = np.zeros(N)
    for n in range(N):
        for t in range(T - min(w_last, T), T):
            s = np.arange(T)
            visible = (s <= t) & (t - s < full_window)
            scores = np.where(visible, q[t, n] @ k[n // G] / np.sqrt(H), -np.inf)
            p = np.exp(scores - scores.max())
            out[n] += (p / p.sum())[kept].sum() / min(w_last, T)
    return out


@pytest.mark.parametrize("full_window", [FULL, 36])
def test_lazy_ratio_equals_brute_force_on_a_left_padded_batch(full_window):
    """Rows of 40, 23 (= S + W: every ratio 1) and 31 tokens, left padded to 40; a full layer's native window of
    36 (Mistral) limits what the ratio measures. fp32 against float64: <= 1e-5."""
    rng = np.random.default_rng(0)
    B, T, N, K, H, S, W, w_last = 3, 40, 4, 2, 8, 3, 20, 6
    lengths = (40, 23, 31)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32) * 2
    k = rng.normal(size=(B, K, H, T)).astype(np.float32) * 2
    positions = np.stack([np.r_[np.full(T - n, -1), np.arange(n)] for n in lengths]).astype(np.int32)
    got = np.asarray(lazy_ratio(jnp.asarray(q), jnp.asarray(k), jnp.asarray(positions), S, W, w_last, full_window))
    assert got.shape == (B, N)
    for b, n in enumerate(lengths):
        want = reference_ratio(q[b, T - n:], k[b, :, :, T - n:], S, W, w_last, full_window)
        np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-5, err_msg=str(b))
    assert np.all(got[1] == 1.0) and got[0].std() > 0.01


def test_calibrate_counts_how_often_a_layer_is_lazy():
    ratios = np.array([[0.9, 0.1, 0.5, 0.2], [0.8, 0.7, 0.1, 0.3], [0.1, 0.6, 0.9, 0.3]])
    got = calibrate(ratios, 2)  # per-sample sets {0, 2}, {0, 1}, {1, 2}: each layer twice -> the mean decides
    assert got["frequency"] == pytest.approx([2 / 3, 2 / 3, 2 / 3, 0])
    assert got["lazy_layers"] == [0, 2] and got["mean_ratio_ranking"] == [0, 2, 1, 3]
    assert got["mean_ratio_lazy"] == [0, 2] and got["ratio_max"] == [0.9, 0.7, 0.9, 0.3]
