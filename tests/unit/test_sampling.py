"""Sampling (lt_jax/inference.py: `sample`, `Sampling`): greedy, temperature, top-k and top-p against a numpy
reference of the filtered distribution; the settings' refusals. Through `Model.generate` (seeds, stop ids, the
filters' plumbing): tests/integration/test_inference.py."""
import json
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lt_jax.errors import LtJaxError
from lt_jax.inference import Sampling, filter_logits, sample

LOGITS = np.array([2.0, 1.5, 1.4, 0.3, -0.5, -1.0, -3.0, 0.9], np.float32)  # V = 8, distinct
DRAWS = 20_000
sample_jit = jax.jit(sample)  # temperature, top_k and top_p are data: one compilation per batch shape


def reference(logits, temperature, top_k, top_p):
    """numpy float64: the distribution `sample` draws from."""
    order = np.argsort(-logits)
    p = np.exp((logits[order] - logits.max()) / temperature)
    p /= p.sum()
    before = np.cumsum(p) - p
    rank = np.arange(len(p))
    keep = ((top_k <= 0) | (rank < top_k)) & ((top_p >= 1) | (before < top_p) | (rank == 0))  # 1 is off
    out = np.zeros(len(p))
    out[order[keep]] = p[keep] / p[keep].sum()
    return out


def test_greedy_is_the_argmax_of_each_row():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    want = np.argmax(np.asarray(logits), axis=-1)
    for temperature, top_k, top_p in ((0.0, 0, 1.0), (0.0, 3, 0.2), (1.5, 1, 1.0), (1.5, 0, 1e-6)):
        got = sample_jit(logits, jax.random.key(1), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        np.testing.assert_array_equal(got, want)


# At temperature 1 the mass above each candidate is 0, .356, .572, .767, ...; at 2: 0, .243, .432, .612, ...
# top_p lies 0.008 either side of one of them, so the filter's boundary is pinned.
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0),
                                                       (1.0, 0, 0.564), (1.0, 0, 0.58), (2.0, 5, 0.62),
                                                       (2.0, 3, 0.62), (1.0, 2, 0.99)])
def test_sampled_frequencies_equal_the_reference(temperature, top_k, top_p):
    """DRAWS rows of one distribution under one key: a token the filters drop is never drawn, and each kept
    token's frequency is within 5 standard errors of the reference probability (a fixed key: deterministic)."""
    want = reference(LOGITS.astype(np.float64), temperature, top_k, top_p)
    got = sample_jit(jnp.tile(jnp.asarray(LOGITS), (DRAWS, 1)), jax.random.key(7), jnp.float32(temperature),
                     jnp.int32(top_k), jnp.float32(top_p))
    freq = np.bincount(np.asarray(got), minlength=len(LOGITS)) / DRAWS
    assert np.all(freq[want == 0] == 0), (freq, want)
    np.testing.assert_array_less(np.abs(freq - want), 5 * np.sqrt(want * (1 - want) / DRAWS) + 1e-9)
    assert (want > 0).sum() > 1  # the case does sample


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (0, 0.3), (17, 1.0), (1, 1.0), (199, 1.0), (40, 0.8),
                                          (5, 0.999), (0, 1e-6)])
def test_the_filters_keep_what_a_sort_keeps(top_k, top_p):
    """`filter_logits` finds each filter's boundary by bisection, not a sort: on 64 rows of 200 logits (normal,
    spread 0.5 to 8, so top-p cuts anywhere from a few tokens to most) its kept set equals the sort-based numpy
    reference's, row for row."""
    rng = np.random.default_rng(top_k * 1000 + int(top_p * 1000))
    logits = (rng.normal(size=(64, 200)) * rng.uniform(0.5, 8, size=(64, 1))).astype(np.float32)
    got = np.isfinite(np.asarray(jax.jit(filter_logits)(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p))))
    want = np.stack([reference(row.astype(np.float64), 1.0, top_k, top_p) > 0 for row in logits])
    np.testing.assert_array_equal(got, want)


def test_ties_at_a_boundary_are_kept_together():
    """Two tokens tied for second place: top-k 2 keeps both (transformers' top-k does too), as does a top-p whose
    boundary falls between them; -0.0 and 0.0 are the same logit."""
    logits = jnp.asarray([[3.0, 1.0, 1.0, -2.0, 0.5]], jnp.float32)
    keep = lambda k, p: np.isfinite(np.asarray(filter_logits(logits, jnp.int32(k), jnp.float32(p))))[0].tolist()
    assert keep(2, 1.0) == [True, True, True, False, False]
    assert keep(1, 1.0) == [True, False, False, False, False]
    assert keep(0, 0.85) == [True, True, True, False, False]  # 0.80 of the mass is above the tied pair
    zeros = jnp.asarray([[1.0, -0.0, 0.0, -1.0]], jnp.float32)
    assert np.isfinite(np.asarray(filter_logits(zeros, jnp.int32(2), jnp.float32(1.0))))[0].tolist() == \
        [True, True, True, False]


def test_the_same_key_draws_the_same_tokens_and_another_key_others():
    logits = jnp.tile(jnp.asarray(LOGITS), (64, 1))
    args = jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0)
    a = np.asarray(sample_jit(logits, jax.random.key(3), *args))
    np.testing.assert_array_equal(a, sample_jit(logits, jax.random.key(3), *args))
    assert np.any(a != np.asarray(sample_jit(logits, jax.random.key(4), *args)))


@pytest.mark.parametrize("settings, words", [
    (Sampling(max_new_tokens=0), "max_new_tokens=0 must be a whole number of at least 1"),
    (Sampling(max_new_tokens=1.5), "max_new_tokens=1.5 must be a whole number"),
    (Sampling(max_new_tokens=True), "max_new_tokens=True"),
    (Sampling(temperature=-1), "temperature=-1 must be >= 0 (0 = greedy)"),
    (Sampling(temperature=float("nan")), "temperature=nan"),
    (Sampling(top_k=-2), "top_k=-2 must be a whole number >= 0 (0 = off)"),
    (Sampling(top_k=2.5), "top_k=2.5"),
    (Sampling(top_p=0), "top_p=0 must lie in (0, 1]"),
    (Sampling(top_p=1.1), "top_p=1.1 must lie in (0, 1]"),
    (Sampling(seed="a"), "seed='a' must be a whole number"),
    (Sampling(stop_ids=(1, "a")), "stop_ids=[1, 'a'] must be token ids"),
])
def test_settings_refuse_with_the_value(settings, words):
    with pytest.raises(LtJaxError) as e:
        settings.check()
    assert words in str(e.value), str(e.value)


def test_prepared_resolves_stop_ids_and_buckets_the_steps():
    got = Sampling(max_new_tokens=100, top_k=np.int64(3)).prepared(eos_ids=(2, 5))
    assert [int(t) for t in got.stop_ids] == [2, 5] and got.steps == 128 and int(got.max_new_tokens) == 100
    assert [int(t) for t in Sampling(stop_ids=()).prepared(eos_ids=(2,)).stop_ids] == [-2]  # none: no token matches
    assert [int(t) for t in Sampling(stop_ids=(9,)).prepared(eos_ids=(2,)).stop_ids] == [9]
    assert Sampling(max_new_tokens=3).prepared().steps == 64


def test_the_sampling_benchmark_refuses_bad_sizes_in_one_line_and_times_both_samplers(capsys):
    import importlib.util
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_sampling.py"
    spec = importlib.util.spec_from_file_location("bench_sampling", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for flags, value in ((["--vocab", "abc"], "'abc'"), (["--vocab", "64,0"], "'0'"), (["--rows", "-1"], "'-1'")):
        with pytest.raises(SystemExit) as refused:
            bench.main(flags)
        assert refused.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert value in err and "Traceback" not in err
    assert bench.main(["--vocab", "64", "--rows", "2", "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["vocab"], r["rows"], r["top_k"]) for r in rows] == [(64, 2, 0), (64, 2, 50)]
    assert all(r["sort_ms"] > 0 and r["bisection_ms"] > 0 for r in rows)
