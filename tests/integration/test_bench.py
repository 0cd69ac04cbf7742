"""`lt_jax.eval.bench`: inserting prefilled rows into a batch cache, the max-batch search on XLA's buffer plans, the
result schema of `lt-jax bench`, budget parsing and bad input. Compilation dominates on this CPU, so one set of
compiled executables (tiny LLaMA, 128-slot caches, 4 new tokens) is shared by every test."""
import argparse
import math

import jax.numpy as jnp
import numpy as np
import pytest

from lt_jax.cli.bench import hf_dir_of, parse_budget
from lt_jax.cli.bench import measure as run
from lt_jax.eval.bench import (Executables, insert_rows, markdown, max_batch,
                          search_max_batch)
from lt_jax.cache import init_cache
from lt_jax.errors import LtJaxError
from lt_jax.inference import decode_step

CONTEXT, NEW = 128, 4
PLAN_FLAGS = dict(lazy_fraction=0.5, sink=4, window=28)  # 2 of the tiny model's 3 layers stream


def args(**over):
    base = dict(model="tiny", methods="full,lighttransfer", contexts=str(CONTEXT), batches="1", new_tokens=NEW,
                repeats=1, seed=0, throughput=False, memory_budget="8GiB", prefill_every_row=False,
                transformers=False, json=True, plan=None, stream_preset=None, prefill=None, w_last=None, **PLAN_FLAGS)
    return argparse.Namespace(**{**base, **over})


@pytest.fixture(scope="module")
def model(tiny_lt):
    return tiny_lt("llama")


@pytest.fixture(scope="module")
def exe(model):
    return Executables(model, NEW)


@pytest.fixture(scope="module")
def plans(model):
    return {"full": model.plan("full", **PLAN_FLAGS), "half": model.plan("last", **PLAN_FLAGS)}  # as run() makes them


@pytest.fixture(scope="module")
def throughput(model, exe, plans):
    """One tiny --throughput run; its budget is full's exact footprint at batch 5 (from the same analysis)."""
    budget = exe.footprint(plans["full"], 5, CONTEXT)
    result = run(args(throughput=True, memory_budget=str(budget), prefill_every_row=True), model,
                       executables=exe)
    return budget, result


def test_insert_rows_equals_batched_prefill(model, exe, plans):
    """Three rows prefilled one at a time and inserted equal one batched prefill of the same prompts (equal
    lengths; the rings wrap), and decoding from either gives the same logits."""
    cfg, plan = model.config, plans["half"]
    prompts = np.random.default_rng(3).integers(0, cfg.vocab_size, (3, CONTEXT - NEW)).astype(np.int32)
    positions = np.broadcast_to(np.arange(CONTEXT - NEW, dtype=np.int32), prompts.shape)
    layers = plan.layers(cfg)
    batched, _ = exe.prefill(plan, 3, CONTEXT)
    one, _ = exe.prefill(plan, 1, CONTEXT)
    logits_b, cache_b, _, _ = batched(model.params, prompts, positions, init_cache(cfg, plan, 3, CONTEXT), layers)
    cache, logits = init_cache(cfg, plan, 3, CONTEXT), []
    for row in range(3):
        lg, small, _, _ = one(model.params, prompts[row:row + 1], positions[row:row + 1],
                           init_cache(cfg, plan, 1, CONTEXT), layers)
        old = cache.full_k[0]
        cache = insert_rows(cache, small, jnp.int32(row))
        assert old.is_deleted(), "insert_rows copied the batch cache instead of updating it in place"
        logits.append(lg)
    for name in ("full_pos", "ring_pos", "length"):
        np.testing.assert_array_equal(getattr(cache, name), getattr(cache_b, name))
    for name in ("full_k", "full_v", "ring_k", "ring_v"):
        assert [a.shape for a in getattr(cache, name)] == [a.shape for a in getattr(cache_b, name)]
        np.testing.assert_allclose(np.stack(getattr(cache, name)), np.stack(getattr(cache_b, name)), rtol=0,
                                   atol=1e-6)
    np.testing.assert_allclose(np.concatenate(logits), logits_b, rtol=0, atol=1e-5)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (NEW, 3)).astype(np.int32)
    for t in tokens:
        a, cache = decode_step(model.params, t, cache, layers, cfg, plan.shape.decoding)
        b, cache_b = decode_step(model.params, t, cache_b, layers, cfg, plan.shape.decoding)
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5


FOOTPRINTS = {"affine": lambda b: 1000 + 37 * b, "steps": lambda b: 1000 + 37 * b + 400 * (b // 16),
              "convex": lambda b: 1000 + int(5 * b * math.log2(b + 1))}


@pytest.mark.parametrize("shape", FOOTPRINTS)
@pytest.mark.parametrize("budget", [900, 1037, 1500, 5000, 40000])
def test_search_max_batch_equals_brute_force(shape, budget):
    footprint, upper = FOOTPRINTS[shape], 2000
    want = max([b for b in range(1, upper) if footprint(b) <= budget], default=0)
    got, probes = search_max_batch(footprint, budget, per_row=30, upper=upper)
    assert got == want and len(probes) <= 14, probes
    if shape == "affine" and want > 1:
        assert len(probes) <= 4, probes  # the secant lands at once


@pytest.mark.parametrize("shape", FOOTPRINTS)
@pytest.mark.parametrize("budget", [900, 1037, 1500, 5000, 40000])
def test_search_max_batch_steps_down_from_refusals_that_say_no_size(shape, budget):
    """A compiler refuses what does not fit without a size (footprint inf): no slope through it. The search still
    finds the largest batch, with few of the costly probes (those that fit: minutes each on a TPU compiler, where
    a refusal takes seconds)."""
    footprint = lambda b: FOOTPRINTS[shape](b) if FOOTPRINTS[shape](b) <= budget else math.inf  # noqa: E731
    want = max([b for b in range(1, 2000) if footprint(b) <= budget], default=0)
    got, probes = search_max_batch(footprint, budget, per_row=30, upper=2000)
    fits = [b for b in probes if footprint(b) <= budget]
    assert got == want and len(fits) <= 6 and len(probes) <= 24, probes


@pytest.mark.slow  # the max-batch search on a real compile (~45 s)
def test_max_batch_fits_and_one_more_does_not(model, exe, plans, throughput):
    """On XLA's buffer plans: the batch found fits the budget and one more does not, for full and a 50 % plan
    (the plan's batch >= full's); few compilations."""
    budget, result = throughput
    found = {}
    for name, plan in plans.items():
        b, probes = max_batch(exe, plan, CONTEXT, budget)
        assert b >= 1 and exe.footprint(plan, b, CONTEXT) <= budget < exe.footprint(plan, b + 1, CONTEXT)
        assert len(probes) <= 4, probes
        found[name] = b
    assert found["full"] == 5 and found["half"] >= found["full"]
    by_method = {r["method"]: r for r in result["records"]}
    assert by_method["full"]["max_batch"] == found["full"] and by_method["lighttransfer"]["max_batch"] == found["half"]
    # compiled per method: one batch-1 prefill, three generation loops (batch 1, the guess, one more), one insert
    # (fewer where another test compiled the same shape first)
    assert all(r["compilations"] <= 5 for r in result["records"]), result["records"]


@pytest.mark.slow  # the `throughput` fixture's search and runs (~50-110 s), shared with the test above in the slow
# tier; in the default suite the --throughput path through `run` is test_no_batch_fits, the search
# test_search_max_batch_equals_brute_force, --prefill-every-row's insertion test_insert_rows_equals_batched_prefill
def test_throughput_result_schema(throughput, capsys):
    budget, result = throughput
    assert result["mode"] == "throughput" and result["budget_bytes"] == budget
    recs = result["records"]
    assert [r["method"] for r in recs] == ["full", "lighttransfer"]
    keys = {"method", "context", "max_batch", "tokens_per_s", "relative_to_full", "theoretical", "kv_bytes_per_seq",
            "peak_bytes", "prefill_s", "decode_s", "compile_s"}
    for r in recs:
        assert keys <= set(r), keys - set(r)
        assert r["context"] == CONTEXT and r["tokens_per_s"] > 0 and r["peak_bytes"] <= budget
        assert r["prefills"] == r["max_batch"]  # --prefill-every-row
    assert recs[0]["relative_to_full"] == 1.0 and recs[0]["theoretical"] == 1.0
    assert recs[1]["theoretical"] > 1.0 and recs[1]["relative_to_full"] > 0
    table = markdown(result)
    assert "| method | context | max batch | tokens/s | × full | theoretical × | KV/seq MiB |" in table
    assert len(table.splitlines()) == 3 + 1 + 2


@pytest.mark.slow  # the `throughput` fixture: see above
def test_kv_bytes_per_seq_equal_formula(model, throughput):
    cfg = model.config
    per_slot = 2 * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, fp32
    recs = {r["method"]: r for r in throughput[1]["records"]}
    assert recs["full"]["kv_bytes_per_seq"] == per_slot * 3 * CONTEXT
    assert recs["lighttransfer"]["kv_bytes_per_seq"] == per_slot * (1 * CONTEXT + 2 * (4 + 28))
    assert recs["lighttransfer"]["num_lazy"] == 2


def test_no_batch_fits(model, exe):
    """A budget below weights + one row's KV: max batch 0, said on stderr, nothing compiled."""
    before = exe.count
    result = run(args(throughput=True, memory_budget="1KiB", methods="full"), model, executables=exe)
    (rec,) = result["records"]
    assert rec["max_batch"] == 0 and rec["tokens_per_s"] is None and exe.count == before


def test_speed_mode_schema(model, exe):
    result = run(args(methods="full,lighttransfer"), model, executables=exe)
    recs = result["records"]
    assert [(r["method"], r["batch"]) for r in recs] == [("full", 1), ("lighttransfer", 1)]
    for r in recs:
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["ttft_s"] >= r["prefill_s"]
        assert r["peak_prefill_bytes"] > r["kv_bytes"] and r["peak_decode_bytes"] > r["kv_bytes"]
    assert recs[0]["decode_vs_full"] == 1.0 and recs[1]["kv_vs_full"] < 1.0


@pytest.mark.parametrize("text,want", [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9),
                                       ("1.5GiB", 3 * 2**29), ("4096", 4096), (" 3 mib ", 3 * 2**20)])
def test_parse_budget(text, want):
    assert parse_budget(text) == want


@pytest.mark.parametrize("text", ["", "eight", "8XB", "-1GiB", "0", "1.2.3GB", "GiB"])
def test_parse_budget_garbage(text):
    with pytest.raises(LtJaxError, match="--memory-budget"):
        parse_budget(text)


@pytest.mark.parametrize("over,words", [
    (dict(methods="full,sideways"), "unknown plan 'sideways'"),
    (dict(contexts="0"), "--contexts"),
    (dict(contexts="128,x"), "--contexts"),
    (dict(batches="0"), "--batches"),
    (dict(new_tokens=0), "--new-tokens"),
    (dict(contexts="4"), "leaves no prompt"),
    (dict(contexts="2048"), "exceeds the model's 1024 positions"),
    (dict(throughput=True, memory_budget="lots"), "--memory-budget"),
    (dict(transformers=True), "add --throughput"),
    (dict(lazy_fraction=2.0), "lazy_fraction=2.0"),
])
def test_bad_input(model, over, words):
    with pytest.raises(LtJaxError, match=None) as e:
        run(args(**over), model)
    assert words in str(e.value) and str(e.value).count(". ") == 0


def test_transformers_needs_an_hf_model(model):
    from lt_jax.api import Model
    bare = Model(model.config, model.params, path=None)
    with pytest.raises(LtJaxError, match="Hugging Face model directory"):
        hf_dir_of("some/ckpt", bare)
    assert hf_dir_of("x", model) == model.path  # the tiny model was loaded from its HF directory


def test_cli_bench_reports_bad_input_as_one_sentence(model, capsys):
    from lt_jax.cli import main
    capsys.readouterr()
    assert main(["bench", str(model.path), "--throughput", "--memory-budget", "lots", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lt-jax bench: error: --memory-budget 'lots'") and err.count("\n") == 1
