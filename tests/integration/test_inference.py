"""Hybrid inference: the ring cache, prefill + decode against the no-cache masked forward, generation against
transformers, compile counts, exact cache bytes, bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lt_jax.cache import KVCache, expected_kv_bytes, init_cache, write_positions
from lt_jax.errors import LtJaxError
from lt_jax.inference import Sampling, decode_step, prefill
from lt_jax.params import stack_layers
from lt_jax.plan import Plan, make_plan


write_traced = jax.jit(write_positions)  # sink and window traced: one compilation per ring size and chunk width


def positions_after(cache, n_prompt, n_decode, sink, window):
    """The prompt left padded to 40 places (padding: -1, dropped), then n_decode steps."""
    prompt = jnp.asarray(np.r_[np.full(40 - n_prompt, -1), np.arange(n_prompt)][None], jnp.int32)
    cache = write_traced(cache, prompt, sink, window)
    for _ in range(n_decode):
        cache = decode_traced(cache, sink, window)
    return cache


decode_traced = jax.jit(lambda cache, sink, window: write_positions(cache, cache.length[:, None], sink, window))


@settings(max_examples=60, deadline=None)
@given(sink=st.integers(0, 5), window=st.integers(1, 9), n_prompt=st.integers(1, 40), n_decode=st.integers(0, 30))
def test_ring_holds_sink_and_last_window(sink, window, n_prompt, n_decode):
    """Prefills shorter than S, between S and S+W and much longer, then decode steps: the stored positions are
    exactly {0..S-1} and the last W positions, each once; a sink token never also sits in the ring."""
    empty = KVCache(full_k=(), full_v=(), full_pos=jnp.full((1, 128), -1, jnp.int32), ring_k=(), ring_v=(),
                    ring_pos=jnp.full((1, sink + window), -1, jnp.int32), length=jnp.zeros((1,), jnp.int32))
    cache = positions_after(empty, n_prompt, n_decode, sink, window)
    n = n_prompt + n_decode
    stored = [int(p) for p in np.asarray(cache.ring_pos)[0] if p >= 0]
    want = set(range(min(sink, n))) | set(range(max(sink, n - window), n))
    assert sorted(stored) == sorted(want) and len(stored) == len(set(stored))
    assert all(p < sink for p in np.asarray(cache.ring_pos)[0, :sink] if p >= 0)
    assert int(cache.length[0]) == n
    assert sorted(p for p in np.asarray(cache.full_pos)[0] if p >= 0) == list(range(n))


def run_cached(model, plan, prompts, continuation):
    """Prefill left-padded prompts, then decode `continuation` token by token (teacher forcing)."""
    B, T = len(prompts), max(map(len, prompts))
    tokens = np.zeros((B, T), np.int32)
    positions = np.full((B, T), -1, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):], positions[b, T - len(p):] = p, np.arange(len(p))
    cache = init_cache(model.config, plan, B, T + continuation.shape[1])
    layers, shape = plan.layers(model.config), plan.shape
    logits, cache, _, _ = prefill(model.params, tokens, positions, cache, layers, model.config, shape, all_logits=True)
    prompt_logits = [np.asarray(logits[b, T - len(p):]) for b, p in enumerate(prompts)]
    steps = []
    for t in range(continuation.shape[1]):
        lg, cache = decode_step(model.params, jnp.asarray(continuation[:, t]), cache, layers, model.config, shape)
        steps.append(np.asarray(lg))
    return prompt_logits, np.stack(steps, 1), cache


def dense_logits(model, ids, plan, prefix=None):
    """The reference: one no-cache forward of one row whose every layer masks its full score matrix with the rule
    (`forward_masked`'s dense form, O(T^2) for streaming layers too) -> float32 [T, V]."""
    from lt_jax.model import default_positions, forward_masked
    tokens = jnp.asarray(np.asarray(ids, np.int32)[None])
    return np.asarray(forward_masked(model.params, tokens, default_positions(tokens), plan.layers(model.config),
                                     model.config, prefix))[0]


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("prefill_mode", ["exact", "hybrid"])
@pytest.mark.parametrize("seed", [0, 1])
def test_prefill_decode_equals_masked_forward(family, prefill_mode, seed, tiny_lt):
    """Random plans, left-padded rows of unequal length, a ring that wraps many times: every prompt position and
    every decode step equals one no-cache forward of the row alone (fp32, <= 1e-5)."""
    model = tiny_lt(family)
    rng = np.random.default_rng(seed)
    plan = dataclasses.replace(make_plan(f"random:{seed}", model.config, sink=3, window=8), prefill=prefill_mode)
    lengths = [23, 41]
    seqs = [rng.integers(0, 300, n + 25).astype(np.int32) for n in lengths]
    prompts = [s[:n] for s, n in zip(seqs, lengths)]
    continuation = np.stack([s[n:] for s, n in zip(seqs, lengths)])
    prompt_logits, step_logits, _ = run_cached(model, plan, prompts, continuation[:, :24])
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        ref = dense_logits(model, s, plan, prefix=n if prefill_mode == "exact" else None)
        assert np.abs(prompt_logits[b] - ref[:n]).max() <= 1e-5
        assert np.abs(step_logits[b] - ref[n:n + 24]).max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stacked_and_per_layer_storage_agree_and_decode_reads_weights_in_place(arch, tiny_lt):
    """One layout (`param_specs`), two storages: a loaded `Model` holds a buffer per layer (`split_layers`);
    `stack_layers` stacks the same leaves on a layer axis. Every layer loop gives the same numbers on both (prefill
    and forward scan both, decode unrolls over the per-layer one), and XLA's buffer plan for a per-layer decode step
    holds no copy of a layer's weights, where the stacked (scanned) step copies at least one layer."""
    from lt_jax.model import forward
    from lt_jax.params import abstract_params, split_layers
    model = tiny_lt(arch)
    cfg = model.config
    stacked = stack_layers(model.params)
    want = abstract_params(cfg)
    assert jax.tree.structure(stacked) == jax.tree.structure(want)  # the one set of names
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(want)))
    for a, b in zip(jax.tree.leaves(split_layers(stacked)), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(a, b)
    assert isinstance(model.params["layers"], tuple) and len(model.params["layers"]) == cfg.num_layers
    plan = make_plan("random:0", cfg, sink=3, window=8)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, (2, 30)).astype(np.int32)
    positions = np.broadcast_to(np.arange(30, dtype=np.int32), (2, 30))
    np.testing.assert_allclose(forward(model.params, tokens, positions, cfg, plan),
                               forward(stacked, tokens, positions, cfg, plan), rtol=0, atol=1e-6)
    layers, shape = plan.layers(cfg), plan.shape
    runs = []
    for params in (model.params, stacked):
        logits, cache, _, _ = prefill(params, tokens, positions, init_cache(cfg, plan, 2, 64), layers, cfg, shape)
        steps = [logits]
        for t in range(12):
            logits, cache = decode_step(params, jnp.full((2,), 7 * t, jnp.int32), cache,
                                        layers, cfg, shape)
            steps.append(logits)
        runs.append(np.stack(steps))
    np.testing.assert_allclose(runs[0], runs[1], rtol=0, atol=1e-6)
    layer_bytes = sum(a.nbytes for a in model.params["layers"][0].values())

    def temp_bytes(params):
        compiled = decode_step.lower(params, jnp.zeros((2,), jnp.int32), init_cache(cfg, plan, 2, 64), layers, cfg,
                                     shape).compile()
        return compiled.memory_analysis().temp_size_in_bytes
    # per layer: no layer's weights copied (what stays is mostly the cache writes' blocks, cache.put_step_tokens)
    assert temp_bytes(model.params) < layer_bytes <= temp_bytes(stacked)


@pytest.mark.parametrize("spec", ["full", "random:0", "streaming"])
def test_decode_reads_and_writes_cache_slots_in_place(spec, tiny_lt):
    """A decode step attends over each layer's cache slot where it lies and writes the new token into it in place:
    XLA's buffer plan holds less than one slot of temporaries, whichever slot the plan (data) gives a layer. A
    stacked [L, ...] cache, or writes that may run before the reads, copy at least one slot."""
    model = tiny_lt("llama")
    cfg = model.config
    plan = make_plan(spec, cfg, sink=3, window=4093)
    # every slot 4096 places: 1 MB, against 128 KB of one slot's scores and 32 KB per slot of the writes' blocks
    cache = init_cache(cfg, plan, 2, 4096)
    slot_bytes = min(a.nbytes for a in jax.tree.leaves(cache.kv))
    compiled = decode_step.lower(model.params, jnp.zeros((2,), jnp.int32), cache, plan.layers(cfg), cfg,
                                 plan.shape.decoding).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < slot_bytes


def test_exact_prefix_differs_from_hybrid(tiny_lt):
    """Guard: the two prefill modes really differ once the prompt is longer than S+W."""
    model = tiny_lt("llama")
    s = np.random.default_rng(5).integers(0, 300, 60).astype(np.int32)
    plan = make_plan("streaming", model.config, sink=2, window=4)
    assert np.abs(model.logits(s, plan=plan, prefix=40) - model.logits(s, plan=plan)).max() > 1e-3


def test_cache_bytes_equal_formula():
    from lt_jax.config import Config, Rope
    cfg = Config(arch="llama", vocab_size=49152, dim=576, ffn_dim=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                 head_dim=64, norm_eps=1e-5, rope=Rope(), max_position_embeddings=8192, tie_embeddings=True,
                 qkv_bias=False)
    plan = make_plan("last", cfg, lazy_fraction=0.5)
    shapes = jax.eval_shape(lambda: init_cache(cfg, plan, 8, 8192))
    assert len(shapes.full_k) == len(shapes.full_v) == 15 == len(shapes.ring_k) == len(shapes.ring_v)
    kv = sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(shapes.kv))
    by_hand = 2 * 8 * 3 * 64 * 4 * (15 * 8192 + 15 * (4 + 1020))
    assert kv == expected_kv_bytes(cfg, plan, 8, 8192) == by_hand == 1_698_693_120
    full = expected_kv_bytes(cfg, Plan.full(30), 8, 8192)
    assert full == 2 * 8 * 3 * 64 * 4 * 30 * 8192
    small = init_cache(cfg, plan, 1, 256)  # shorter than S + W: a streaming layer holds 256 places, not 1024
    assert small.kv_bytes == expected_kv_bytes(cfg, plan, 1, 256) == 2 * 3 * 64 * 4 * 30 * 256
    assert small.ring_k[0].shape[3] == small.ring_pos.shape[1] == 256
    for max_len in (64, 1023, 1024, 1025, 4096):  # never more than the all-full cache of the same length
        assert expected_kv_bytes(cfg, plan, 1, max_len) <= expected_kv_bytes(cfg, Plan.full(30), 1, max_len)


@pytest.mark.parametrize("prefill_mode", ["exact", "hybrid"])
def test_cache_shorter_than_sink_plus_window_decodes_like_the_masked_forward(prefill_mode, tiny_lt):
    """A streaming layer's buffer shrinks to the cache's length when that is under S + W (no position wraps):
    prefill and 20 decode steps still equal the masked forward (fp32, <= 1e-5), and the evaluation's
    restrict-from-all-full path gives the same cache."""
    from lt_jax.cache import restrict
    model = tiny_lt("llama")
    plan = dataclasses.replace(make_plan("random:0", model.config, sink=4, window=60), prefill=prefill_mode)
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, 300, n + 20).astype(np.int32) for n in (30, 17)]
    prompts = [s[:-20] for s in seqs]
    prompt_logits, step_logits, cache = run_cached(model, plan, prompts, np.stack([s[-20:] for s in seqs]))
    assert cache.ring_pos.shape[1] == 50 < 64  # max_len 30 + 20
    for b, s in enumerate(seqs):
        ref = model.logits(s, plan=plan, prefix=len(s) - 20 if prefill_mode == "exact" else None)[0]
        assert np.abs(step_logits[b] - ref[-20:]).max() <= 1e-5
    if prefill_mode == "exact":  # one all-full prefill restricted to the plan: the plan's own prefill
        from lt_jax.batching import left_pad
        tokens, positions = left_pad([list(p) for p in prompts], 30)
        caches = {}
        for name, p in (("full", Plan.full(3)), ("plan", plan)):
            _, caches[name], _, _ = prefill(model.params, tokens, positions, init_cache(model.config, p, 2, 50),
                                            p.layers(model.config), model.config, p.shape)
        got, want = restrict(caches["full"], plan), caches["plan"]
        np.testing.assert_array_equal(got.ring_pos, want.ring_pos)
        filled = np.asarray(want.ring_pos) >= 0  # empty places hold whatever: their position hides them
        by_place = lambda a: np.moveaxis(np.asarray(a), 3, 1)[filled]  # noqa: E731
        for kind in ("ring_k", "ring_v"):
            for a, b in zip(getattr(got, kind), getattr(want, kind)):
                np.testing.assert_array_equal(by_place(a), by_place(b), err_msg=kind)


class CompileCounter:
    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def test_second_generate_of_same_bucket_compiles_nothing(tiny_lt):
    model = tiny_lt("llama")
    counter = CompileCounter()
    plan_a = make_plan("first", model.config, lazy_fraction=0.34, sink=2, window=8)
    plan_b = make_plan("last", model.config, lazy_fraction=0.34, sink=2, window=8)
    assert plan_a.lazy_layers != plan_b.lazy_layers
    model.generate([list(range(1, 40))], plan=plan_a, max_new_tokens=10)
    first = counter.count
    out = model.generate([list(range(50, 95))], plan=plan_b, max_new_tokens=12, temperature=0.7, seed=3)
    assert first > 0 and counter.count == first, "a prompt of the same bucket (or another lazy set) recompiled"
    assert len(out[0]["ids"]) == 12


def test_sampling_filters(tiny_lt):
    """Generate passes the settings through (the filters themselves: tests/unit/test_sampling.py)."""
    model = tiny_lt("qwen2")
    prompt = [list(range(3, 30))]
    greedy = model.generate(prompt, max_new_tokens=16, stop_ids=[])[0]["ids"]
    assert model.generate(prompt, max_new_tokens=16, temperature=1.5, top_k=1, stop_ids=[])[0]["ids"] == greedy
    assert model.generate(prompt, max_new_tokens=16, temperature=1.5, top_p=1e-6, stop_ids=[])[0]["ids"] == greedy
    a = model.generate(prompt, max_new_tokens=16, temperature=2.0, seed=1, stop_ids=[])[0]["ids"]
    assert a == model.generate(prompt, max_new_tokens=16, temperature=2.0, seed=1, stop_ids=[])[0]["ids"]
    assert a != model.generate(prompt, max_new_tokens=16, temperature=2.0, seed=2, stop_ids=[])[0]["ids"]
    settings = Sampling(max_new_tokens=16, temperature=2.0, seed=1, stop_ids=())  # the same, as one argument
    assert model.generate(prompt, sampling=settings)[0]["ids"] == a


def test_batch_generation_equals_one_by_one(tiny_lt):
    model = tiny_lt("mistral")
    prompts = [list(range(5, 25)), list(range(40, 140)), [7, 8, 9]]
    plan = make_plan("first", model.config, sink=2, window=16)
    batch = model.generate(prompts, plan=plan, max_new_tokens=20, stop_ids=[])
    for p, got in zip(prompts, batch):
        assert got["ids"] == model.generate([p], plan=plan, max_new_tokens=20, stop_ids=[])[0]["ids"]


def test_stop_ids_end_a_row(tiny_lt):
    model = tiny_lt("qwen2")
    prompt = [list(range(3, 30))]
    free = model.generate(prompt, max_new_tokens=16, stop_ids=[])[0]["ids"]
    stop = free[5]
    cut = model.generate(prompt, max_new_tokens=16, stop_ids=[stop])[0]["ids"]
    assert cut == free[: free.index(stop) + 1]


def test_mistral_native_window_generation_matches_transformers(tiny_models, prompt_ids, tiny_lt):
    """Prompt of 150 tokens, native window 100: greedy tokens equal transformers' generate."""
    hf, _ = tiny_models("mistral", prompt_ids)
    model = tiny_lt("mistral")
    prompt = prompt_ids[0, :150]
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(prompt[None]).long(), max_new_tokens=40, min_new_tokens=40,
                           do_sample=False)[0, 150:].tolist()
    assert model.generate([prompt], max_new_tokens=40, stop_ids=[])[0]["ids"] == want


@pytest.mark.parametrize("argv,words", [
    (["--ids", " ".join(["5"] * 1000), "--max-new-tokens", "64"], ["1000 tokens", "context of 1024"]),
    (["--ids", ""], ["at least one token"]),
    (["--ids", "1 2 x"], ["--ids"]),
    (["--ids", "1 2 3", "--temperature", "-1"], ["argument --temperature"]),  # CLI errors name the flags
    (["--ids", "1 2 3", "--top-p", "0"], ["argument --top-p"]),
    (["--ids", "1 2 3", "--top-k", "-2"], ["argument --top-k"]),
    (["--ids", "1 2 3", "--max-new-tokens", "0"], ["argument --max-new-tokens"]),
    (["--ids", "1 2 3", "--plan", "sideways"], ["unknown plan 'sideways'"]),
    (["--ids", "1 2 3", "--plan", "random:x"], ["random:x"]),
    (["--ids", "1 2 3", "--lazy-fraction", "1.5"], ["argument --lazy-fraction", "1.5"]),
    (["--ids", "1 2 3", "--plan", "streaming", "--window", "0"], ["argument --window"]),
])
def test_generate_bad_input(tiny_ckpt, argv, words, capsys):
    from lt_jax.cli import main
    capsys.readouterr()
    assert main(["generate", str(tiny_ckpt), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lt-jax generate: error:"), err
    for w in words:
        assert w in err, (w, err)


def test_plan_file_that_does_not_fit(tiny_ckpt, tmp_path, capsys):
    """The CLI reports a plan file's refusal (every refusal: tests/unit/test_plan.py)."""
    import json
    from lt_jax.cli import main
    for plan, words in [({"num_layers": 3, "lazy_layers": [0, 7]}, "[7] outside 0..2"),
                        ({"probe": "retrieval", "head_scores": [[1]]}, "has no 'num_layers' or 'lazy_layers' field")]:
        f = tmp_path / "plan.json"
        f.write_text(json.dumps(plan))
        capsys.readouterr()
        assert main(["generate", str(tiny_ckpt), "--ids", "1 2 3", "--plan", str(f)]) == 2
        assert words in capsys.readouterr().err


def test_generate_json_reports_plan_and_cache_bytes(tiny_ckpt, capsys):
    import json
    from lt_jax.cli import main
    capsys.readouterr()
    assert main(["generate", str(tiny_ckpt), "--ids", "1 2 3 4", "--plan", "last", "--lazy-fraction", "0.34",
                 "--sink", "2", "--window", "8", "--max-new-tokens", "5", "--stop-ids", "", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["plan"]["lazy_layers"] == [2] and len(got["ids"]) == 5
    per_slot = 2 * 2 * 16 * 4  # K and V, 2 kv heads, head dim 16, fp32
    assert got["kv_cache_bytes"] == per_slot * (2 * 128 + 1 * (2 + 8))
    assert got["kv_cache_bytes_all_full"] == per_slot * 3 * 128


def test_ppl_prefix_equals_cached_decode(tiny_lt):
    """ppl with prefix N: exact prefill of N tokens (its last logits score token N), then tokens N+1.. scored
    by decode steps: the single masked forward gives the same NLL."""
    model = tiny_lt("llama")
    plan = make_plan("streaming", model.config, sink=2, window=6)
    s = np.random.default_rng(9).integers(0, 300, 50).astype(np.int32)
    prompt_logits, steps, _ = run_cached(model, plan, [s[:30]], s[None, 30:49])
    logits = np.concatenate([prompt_logits[0][-1:], steps[0]])  # predict s[30..49]
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    nll_cached = -float(jnp.mean(logp[jnp.arange(20), s[30:50]]))
    got = model.perplexity(s, plan=plan, prefix=30)
    assert got["tokens"] == 20 and abs(got["nll"] - nll_cached) <= 1e-5


@pytest.mark.parametrize("spec,window,blocks", [("random:3", 8, (1, 1)), ("streaming", 8, (1, 1)),
                                                 ("streaming", 300, (3, 2))])
def test_hybrid_prefill_of_long_prompts_uses_the_window_path_exactly(spec, window, blocks, tiny_lt):
    """Prompts longer than S + W + Q_CHUNK take the O(T (S+W)) streaming path: still equal to the masked forward,
    with left padding shifting the sink tokens of the shorter row; a window wider than a query block spans
    several blocks."""
    from lt_jax.attention import Q_CHUNK
    model = tiny_lt("llama")
    plan = dataclasses.replace(make_plan(spec, model.config, sink=3, window=window), prefill="hybrid")
    rng = np.random.default_rng(11)
    lengths = [blocks[0] * Q_CHUNK + 40, blocks[1] * Q_CHUNK + 95]
    assert min(lengths) > 3 + window + Q_CHUNK - 1
    seqs = [rng.integers(0, 300, n + 6).astype(np.int32) for n in lengths]
    prompt_logits, step_logits, _ = run_cached(model, plan, [s[:n] for s, n in zip(seqs, lengths)],
                                               np.stack([s[n:n + 5] for s, n in zip(seqs, lengths)]))
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        ref = dense_logits(model, s, plan)
        assert np.abs(prompt_logits[b] - ref[:n]).max() <= 1e-5
        assert np.abs(step_logits[b] - ref[n:n + 5]).max() <= 1e-5
        # scoring (`token_nll`, perplexity) streams the lazy layers as the hybrid prefill does: the same NLL
        logp = jax.nn.log_softmax(jnp.asarray(prompt_logits[b][:-1]), axis=-1)
        want = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(s[1:n, None]), axis=-1))[:, 0]
        assert np.abs(model.token_nll(s[:n], plan)[0] - want).max() <= 1e-5


def test_long_prefill_keeps_one_score_block_alive(tiny_lt):
    """XLA's buffer plan of a 4096-token exact prefill: the tiled path's temporaries stay under the scores of
    ONE query block against all keys (N x Q_CHUNK x T floats), where the blockwise path holds several times more."""
    from lt_jax import attention as attention_module
    model = tiny_lt("llama")
    cfg, T = model.config, 4096
    plan = Plan.full(cfg.num_layers)
    row_block = cfg.num_heads * attention_module.Q_CHUNK * T * 4

    def temp_bytes(T):  # a shape not traced before: TILED_FROM is read at trace time
        tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
        cache = jax.eval_shape(lambda: init_cache(cfg, plan, 1, T))
        lowered = prefill.lower(model.params, tokens, tokens, cache, plan.layers(cfg), cfg=cfg, shape=plan.shape)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    tiled = temp_bytes(T)
    saved = attention_module.TILED_FROM
    attention_module.TILED_FROM = T  # the blockwise path, for contrast (one token shorter: a fresh trace)
    try:
        blockwise = temp_bytes(T - 1)
    finally:
        attention_module.TILED_FROM = saved
    assert tiled < row_block < blockwise / 2, (tiled, row_block, blockwise)


def test_hybrid_prefill_keeps_one_window_block_alive(tiny_lt):
    """XLA's buffer plan of a 4096-token hybrid prefill with every layer streaming: the temporaries stay under half
    of the window scores of all query blocks (N x Q_CHUNK x (S + W + Q_CHUNK - 1) floats each), i.e. the blocks
    are computed one at a time (unrolled over blocks, this plan held 34 MiB, > 2x that bound)."""
    from lt_jax.attention import Q_CHUNK
    model = tiny_lt("llama")
    cfg, T = model.config, 4096
    plan = dataclasses.replace(make_plan("streaming", cfg, sink=4, window=64), prefill="hybrid")
    tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
    cache = jax.eval_shape(lambda: init_cache(cfg, plan, 1, T))
    lowered = prefill.lower(model.params, tokens, tokens, cache, plan.layers(cfg), cfg=cfg, shape=plan.shape)
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    all_blocks = (T // Q_CHUNK) * cfg.num_heads * Q_CHUNK * (4 + 64 + Q_CHUNK - 1) * 4
    assert temp < all_blocks / 2, (temp, all_blocks)


def test_one_layout_differentiates_stacked_scanned_and_rematerialized():
    """`init_params` builds the one layout (`param_specs`' shapes, zero biases); the gradient of a next-token loss
    under a hybrid plan through the stacked, scanned layer loop equals the per-layer (switched) one, and stays
    the same with each layer rematerialized (what a training step will run), fp32 <= 1e-6."""
    from lt_jax.config import Config, Rope
    from lt_jax.model import forward_masked
    from lt_jax.params import abstract_params, init_params, split_layers
    cfg = Config(arch="qwen2", vocab_size=64, dim=32, ffn_dim=48, num_layers=3, num_heads=4, num_kv_heads=2,
                 head_dim=8, norm_eps=1e-6, rope=Rope(), max_position_embeddings=128, tie_embeddings=False,
                 qkv_bias=True)
    params = init_params(cfg, jax.random.key(0))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                                abstract_params(cfg))
    assert not np.any(params["layers"]["qkv_bias"])
    tokens = np.random.default_rng(0).integers(0, 64, (2, 24)).astype(np.int32)
    positions = np.broadcast_to(np.arange(24, dtype=np.int32), tokens.shape)
    layers = Plan(3, (1,), sink=2, window=5).layers(cfg)

    def loss(p, remat):
        logp = jax.nn.log_softmax(forward_masked(p, tokens, positions, layers, cfg, remat=remat)[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    grad = jax.grad(loss)
    stacked, remat = grad(params, False), grad(params, True)
    per_layer = stack_layers(grad(split_layers(params), False))
    for a, b, c in zip(jax.tree.leaves(stacked), jax.tree.leaves(remat), jax.tree.leaves(per_layer)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-6)
    assert float(jnp.abs(stacked["layers"]["qkv_proj"]).max()) > 0


@pytest.mark.parametrize("call, words", [
    (lambda m: m.generate([[1.5, 2.0]], max_new_tokens=2), "integer array"),  # was truncated to [1, 2]
    (lambda m: m.generate([1, 2], max_new_tokens=1.5), "max_new_tokens=1.5 must be a whole number"),
    (lambda m: m.generate([1, 2], max_new_tokens=2, temperature=float("nan")), "temperature=nan"),
    (lambda m: m.generate([1, 2], max_new_tokens=2, stop_ids=["a"]), "stop_ids=['a'] must be token ids"),
    (lambda m: m.generate([[[1, 2]]], max_new_tokens=2), "one sequence of token ids"),
    (lambda m: m.logits([1, 2, 3], prefix=0), "prefix=0 must lie in 1..3"),
    (lambda m: m.logits([1, 2, 3], prefix=5), "prefix=5 must lie in 1..3"),
    (lambda m: m.perplexity([1, 2, 3], max_tokens=0), "max_tokens=0 must lie in 1..1024"),
    (lambda m: m.perplexity([1, 2, 3], max_tokens=-5), "max_tokens=-5"),  # was: the last 5 tokens dropped
    (lambda m: m.plan("last", lazy_fraction=2), "lazy_fraction=2 is outside [0, 1]"),  # no CLI flag names
])
def test_python_api_bad_input_is_one_clear_error(tiny_lt, call, words):
    with pytest.raises(LtJaxError) as e:
        call(tiny_lt("llama"))
    assert words in str(e.value) and "--" not in str(e.value), str(e.value)
