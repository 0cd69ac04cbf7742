"""LightTransfer-Test: lazy ratios against transformers' attention probabilities, the selecting prefill against
the fixed plan it chose (caches, logits, decode), its memory as XLA plans the buffers, compile counts, and
`lt-jax identify` (the selection rule, the queue and the plan's refusals: tests/unit/test_lazy.py, test_plan.py)."""
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lt_jax.cache import expected_kv_bytes
from lt_jax.inference import decode_step
from lt_jax.lazy import top_lazy
from lt_jax.plan import Plan, make_plan

from helpers import LAYERS, SINK, W, W_LAST, lighttransfer_prefill, prefill_peak



def reference_ratios(hf, ids, sink, window, w_last):
    """Brute force from transformers' own softmax probabilities (eager attention, fp32, GQA expanded):
    [L, N] for one unpadded prompt."""
    with torch.no_grad():
        att = hf(torch.from_numpy(np.asarray(ids)[None]).long(), output_attentions=True).attentions
    n = len(ids)
    kept = np.zeros(n, bool)
    kept[:sink] = True
    kept[max(0, n - window):] = True
    out = []
    for a in att:  # [1, N, T, T]
        probs = a[0].double().numpy()[:, n - min(w_last, n):]  # last w_last queries
        out.append(probs[..., kept].sum(-1).mean(-1) if n > sink + window else np.ones(probs.shape[0]))
    return np.stack(out)


def test_ratios_equal_brute_force_from_transformers(deep):
    hf, model = deep
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 300, n).astype(np.int32) for n in (97, 60, 5, 23)]  # 23 = S + W: all ratios 1
    got = model.lazy_ratios(prompts, sink=SINK, window=W, w_last=W_LAST, per_head=True)  # one left-padded batch
    assert got.shape == (4, LAYERS, 4)
    for b, ids in enumerate(prompts):
        want = reference_ratios(hf, ids, SINK, W, W_LAST)
        assert np.abs(got[b] - want).max() <= 1e-5, b
    assert np.all(got[2:] == 1.0)
    assert got[0].std() > 0.01  # the ratios do tell the layers apart
    single = model.lazy_ratios(prompts[0], sink=SINK, window=W, w_last=W_LAST)
    np.testing.assert_allclose(single, got[0].mean(-1), atol=1e-6)


def test_ratios_under_mistral_native_window(tiny_models, prompt_ids, tiny_lt):
    """A full Mistral layer attends within its native window (100): the ratio is of that attention. 120 tokens:
    the first of the last 32 queries still see the sink tokens through that window, so the sink term counts."""
    hf, _ = tiny_models("mistral", prompt_ids)
    ids = prompt_ids[0, :120]
    model = tiny_lt("mistral")
    got = model.lazy_ratios(ids, sink=SINK, window=30, w_last=32, per_head=True)
    assert np.abs(got - reference_ratios(hf, ids, SINK, 30, 32)).max() <= 1e-5
    no_sink = model.lazy_ratios(ids, sink=0, window=30, w_last=32, per_head=True)
    assert (got - no_sink).min() > 1e-4  # every head puts some mass on the sinks it can see


@pytest.mark.parametrize("fraction", [0.5, 0.34])
def test_selecting_prefill_equals_the_fixed_plan_it_chose(deep, fraction):
    """A left-padded batch: the chosen set is the global top-k of the row-averaged ratios; every layer's cache
    (full, or the sinks + window an eviction copied out) equals a prefill under the fixed plan it chose; the
    prompt's logits are the full model's (exact prefill); decode steps equal the masked forward of that plan."""
    _, model = deep
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 300, n + 6).astype(np.int32) for n in (90, 71)]
    prompts = [s[:-6] for s in seqs]
    logits, cache, layers, ratios = lighttransfer_prefill(model, prompts, fraction, 100)
    ratios = np.asarray(ratios)  # [L, B, N]
    num_lazy = int(np.floor(fraction * LAYERS + 0.5))
    chosen = np.flatnonzero(np.asarray(layers.is_lazy))
    np.testing.assert_array_equal(chosen, top_lazy(ratios.mean(axis=(1, 2)), num_lazy))

    fixed = Plan(LAYERS, tuple(int(i) for i in chosen), sink=SINK, window=W)
    want_logits, want_cache, _, not_measured = lighttransfer_prefill(model, prompts, fraction, 100, plan=fixed)
    assert np.isnan(np.asarray(not_measured)).all() and not_measured.shape == ratios.shape  # same structure
    index, fixed_index = np.asarray(layers.slot), np.asarray(fixed.layers(model.config).slot)
    for layer in range(LAYERS):
        kind = ("ring_k", "ring_v") if layer in chosen else ("full_k", "full_v")
        for name in kind:
            got = np.asarray(getattr(cache, name)[index[layer]])
            want = np.asarray(getattr(want_cache, name)[fixed_index[layer]])
            pos = np.asarray(cache.ring_pos if name.startswith("ring") else cache.full_pos)
            by_place = lambda a: np.moveaxis(a, 3, 1)  # [B, places, ...]  # noqa
            np.testing.assert_array_equal(by_place(got)[pos >= 0], by_place(want)[pos >= 0])

    full_logits = model.logits(seqs[0][:90])[0]
    assert np.abs(np.asarray(logits[0, -90:]) - full_logits).max() <= 1e-5
    assert np.abs(np.asarray(logits) - np.asarray(want_logits)).max() == 0

    shape = fixed.shape
    step_logits = []
    for t in range(6):
        token = jnp.asarray([s[-6 + t] for s in seqs])
        lg, cache = decode_step(model.params, token, cache, layers, model.config, shape)
        step_logits.append(np.asarray(lg))
    for b, s in enumerate(seqs):
        ref = model.logits(s, plan=fixed, prefix=len(s) - 6)[0]
        assert np.abs(np.stack(step_logits)[:, b] - ref[-6:]).max() <= 1e-5


def test_selecting_prefill_holds_at_most_p_plus_one_full_caches(deep):
    """XLA's own buffer plan (compiled memory analysis: arguments + outputs + temporaries - donated aliases) for
    6 layers, P = 3, 8192-slot caches: besides the weights, the selecting prefill's peak is under P + 1 full layer
    caches (P held, plus the arriving layer's keys and the attention's temporaries), within half a layer cache of a
    prefill under a fixed plan with the same P, and L - P - 1 layer caches under an all-full prefill."""
    _, model = deep
    cfg, B, T, M = model.config, 2, 128, 8192
    layer_bytes = 2 * B * cfg.num_kv_heads * M * cfg.head_dim * 4
    weights = sum(a.nbytes for a in jax.tree.leaves(model.params))

    peak = partial(prefill_peak, model, batch=B, length=T, max_len=M)
    lt = make_plan("lighttransfer", cfg, lazy_fraction=0.5, sink=SINK, window=W)
    assert expected_kv_bytes(cfg, lt, B, M) > 3 * layer_bytes  # P = 3 full layers plus the rings
    lt_peak = peak(lt)
    assert 3 * layer_bytes < lt_peak - weights < 4 * layer_bytes
    assert abs(lt_peak - peak(make_plan("last", cfg, lazy_fraction=0.5, sink=SINK, window=W))) < layer_bytes / 2
    assert peak(Plan.full(LAYERS)) - lt_peak >= (LAYERS - 3 - 1) * layer_bytes


def test_another_lazy_set_of_the_same_bucket_compiles_nothing(deep):
    from test_inference import CompileCounter
    _, model = deep
    rng = np.random.default_rng(7)
    candidates = [rng.integers(0, 300, 50 + i).astype(np.int32) for i in range(6)]
    plan = make_plan("lighttransfer", model.config, lazy_fraction=0.5, sink=SINK, window=W, w_last=W_LAST)
    sets = [tuple(top_lazy(r, 3)) for r in model.lazy_ratios(candidates, sink=SINK, window=W, w_last=W_LAST)]
    a, b = 0, next(i for i in range(1, 6) if sets[i] != sets[0])
    counter = CompileCounter()
    first = model.generate([candidates[a]], plan=plan, max_new_tokens=8, stop_ids=[])[0]
    compiled = counter.count
    second = model.generate([candidates[b]], plan=plan, max_new_tokens=8, stop_ids=[])[0]
    assert compiled > 0 and counter.count == compiled, "another lazy set recompiled"
    assert first["plan"].lazy_layers == sets[a] and second["plan"].lazy_layers == sets[b]
    assert len(second["lazy_ratios"]) == LAYERS


def test_short_prompt_truncates_nothing(deep):
    """No longer than S + W: every ratio is 1, and the lighttransfer answer is the full model's."""
    _, model = deep
    prompt = list(range(10, 30))
    got = model.generate([prompt], plan="lighttransfer", sink=SINK, window=W, max_new_tokens=10, stop_ids=[])[0]
    assert got["lazy_ratios"] == [1.0] * LAYERS
    assert got["ids"] == model.generate([prompt], max_new_tokens=10, stop_ids=[])[0]["ids"]


def test_lighttransfer_logits_and_ppl_choose_on_the_prefix(deep):
    _, model = deep
    s = np.random.default_rng(4).integers(0, 300, 80).astype(np.int32)
    chosen, ratios = model.select(s[:60], "lighttransfer", sink=SINK, window=W)
    assert chosen.source == "lighttransfer:0.5" and len(chosen.lazy_layers) == 3 and len(ratios) == LAYERS
    got = model.logits(s, plan=make_plan("lighttransfer", model.config, sink=SINK, window=W), prefix=60)
    np.testing.assert_array_equal(got, model.logits(s, plan=chosen, prefix=60))
    ppl = model.perplexity(s, plan=make_plan("lighttransfer", model.config, sink=SINK, window=W), prefix=60)
    assert ppl["plan"] == chosen and ppl["tokens"] == 20


@pytest.fixture(scope="module")
def deep_ckpt(deep, tmp_path_factory):
    from lt_jax.cli import main
    out = tmp_path_factory.mktemp("deep_ckpt") / "ckpt"
    assert main(["convert", str(deep[1].path), str(out)]) == 0
    return out


def test_identify_writes_the_calibrated_plan_and_a_plot(deep, deep_ckpt, tmp_path, capsys):
    """Pre-tokenized JSONL + a second file; long samples are split into --context chunks and chunks no longer than
    S + W are skipped; the plan is the most frequent per-sample lazy sets; the plan file loads as a plan."""
    from lt_jax.cli import main
    from lt_jax.lazy import calibrate
    _, model = deep
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, 300, n).tolist() for n in (150, 70, 20)]
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"ids": s}) for s in seqs[:2]) + "\n\n")
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"ids": seqs[2]}) + "\n")
    plan_file, png = tmp_path / "plan.json", tmp_path / "lazy.png"
    capsys.readouterr()
    assert main(["identify", str(deep_ckpt), str(data), str(more), "--field", "ids", "--context", "100",
                 "--sink", str(SINK), "--window", str(W), "--w-last", str(W_LAST), "--out", str(plan_file),
                 "--plot", str(png), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    chunks = [seqs[0][:100], seqs[0][100:], seqs[1]]  # seqs[2] (20 tokens <= S + W) is skipped
    ratios = np.stack([model.lazy_ratios(c, sink=SINK, window=W, w_last=W_LAST) for c in chunks])
    want = calibrate(ratios, 3)
    assert got["identify"]["samples"] == 3 and got["lazy_layers"] == want["lazy_layers"]
    np.testing.assert_allclose(got["identify"]["ratio_mean"], ratios.mean(0), atol=1e-6)
    assert json.loads(plan_file.read_text()) == got
    plan = make_plan(str(plan_file), model.config)
    assert plan.lazy_layers == tuple(want["lazy_layers"]) and (plan.sink, plan.window) == (SINK, W)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content,words", [
    ('{"ids": [1, 2, 3]}\n{"ids": [1, 2\n', "line 2 is not valid JSON"),
    ('{"ids": [1, 2, 3]}\n{"text": 5}\n', "record 2 has no field 'ids'"),
    ('{"ids": [1, 2, 3]}\n', "no longer than S + W = 1024"),  # the model's 1024 positions cap --context
    (None, "cannot read text file"),
])
def test_identify_bad_input(deep_ckpt, tmp_path, content, words, capsys):
    from lt_jax.cli import main
    data = tmp_path / "bad.jsonl"
    if content is not None:
        data.write_text(content)
    capsys.readouterr()
    assert main(["identify", str(deep_ckpt), str(data), "--field", "ids", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "lt-jax identify: error:" in err, err
    assert not (tmp_path / "p.json").exists()


def test_restricting_an_all_full_cache_equals_the_fixed_plan_prefill(deep):
    """Evaluations prefill once with every layer full and restrict the cache per plan: the same cache as an
    exact prefill under that plan (a left-padded batch)."""
    from lt_jax.cache import restrict
    _, model = deep
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 300, n).astype(np.int32) for n in (64, 41)]
    _, full_cache, _, _ = lighttransfer_prefill(model, prompts, 0.5, 80, plan=Plan.full(LAYERS))
    plan = Plan(LAYERS, (1, 4, 5), sink=SINK, window=W)
    _, want, _, _ = lighttransfer_prefill(model, prompts, 0.5, 80, plan=plan)
    got = restrict(full_cache, plan)
    for name in ("full_k", "full_v", "ring_k", "ring_v", "full_pos", "ring_pos", "length"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), err_msg=name)
