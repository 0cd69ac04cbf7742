"""Every program compiles for TPU slices ahead of time (lt_jax.aot, through libtpu on this CPU host): the decode
of single-kind plans (which aborted the TPU compiler), decode-loop temporaries small next to the cache, and the
FLOP accounting against a hand count. Skipped only where libtpu is absent."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu present: keep the local backend on CPU (and quiet)

import dataclasses  # noqa: E402
import json  # noqa: E402
from functools import lru_cache  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from lt_jax.config import Config  # noqa: E402
from lt_jax.errors import LtJaxError  # noqa: E402
from lt_jax.plan import make_plan  # noqa: E402

aot = pytest.importorskip("lt_jax.aot")
pytest.importorskip("libtpu", reason="TPU ahead-of-time compilation needs libtpu (jax's tpu extra)")

# hidden 256 = 4 heads of 64, 2 KV heads (split on model=2, replicated on model=4), 4 layers
TINY_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
CFG = Config.from_hf(TINY_HF, source="tiny", dtype="bfloat16")
PLANS = ("full", "streaming", "last", "lighttransfer")
B, T = 4, 256


@lru_cache(maxsize=None)
def tgt(topology, mesh):
    return aot.target(topology, mesh)


def plan_of(spec):
    return make_plan(spec, CFG, lazy_fraction=0.5, sink=4, window=60)


def compile_all(topology, mesh, spec, train, decode_only=False):
    programs = aot.programs(plan_of(spec), spec, B, T, train=train)
    if decode_only:  # the programs whose single-kind form aborted the TPU compiler
        programs = [p for p in programs if p.name in ("generate_loop", "decode_chunk")]
    rows = [aot.compile_row(p, CFG, tgt(topology, mesh), cost=False) for p in programs]
    names = [r["program"] for r in rows]
    if decode_only:
        assert names == ["generate_loop", "decode_chunk"]
    else:
        assert {"generate_loop", "decode_chunk", "insert_rows", "token_nll"} <= set(names)
        assert any(n.startswith("prefill") for n in names)
    for r in rows:
        assert r["total"] > r["weights"] >= 0 and r["fits"], r
    return names


COMBOS = [(topology, mesh, spec) for topology in ("v5e:2x2", "v6e:2x2") for mesh in ("data=2,model=2", "data=1,model=4")
          for spec in PLANS]
# the default suite: every inference program once (full), and the decode of the other single-kind plan and of a
# mixed one (whose decode aborted the TPU compiler, or could); selecting prefill: the calibrated-plans test;
# every program of every plan on both chips and meshes: slow
FAST = [("v5e:2x2", "data=2,model=2", "full", False), ("v6e:2x2", "data=1,model=4", "streaming", True),
        ("v6e:2x2", "data=2,model=2", "lighttransfer", True)]


@pytest.mark.parametrize("topology,mesh,spec,decode_only", FAST)
def test_every_inference_program_compiles(topology, mesh, spec, decode_only):
    compile_all(topology, mesh, spec, train=False, decode_only=decode_only)


@pytest.mark.slow
@pytest.mark.parametrize("topology,mesh,spec", COMBOS)
def test_every_program_compiles_with_training(topology, mesh, spec):
    names = compile_all(topology, mesh, spec, train=True)
    assert {"train_step remat=off", "train_step remat=on"} <= set(names)


# head_dim 128 like every shipped config (a 64-wide minor dimension is padded to a 128-lane tile anyway), KV heads
# split over model=2, and a cache of 32K places per layer (ring: half of it): the cache, not the weights, dominates;
# Llama-3's vocabulary, split over model (the sampler's temporaries grow with it)
CACHE_CFGS = {128: Config.from_hf(dict(TINY_HF, hidden_size=512, vocab_size=128256), source="tiny-128",
                                  dtype="bfloat16"),
              64: Config.from_hf(TINY_HF, source="tiny", dtype="bfloat16")}


@pytest.mark.parametrize("spec,head_dim,mesh", [("full", 128, "data=2,model=2"), ("full", 64, "data=2,model=2"),
                                               ("full", 128, "data=1,model=4")] + [
    pytest.param(s, 128, "data=2,model=2", marks=pytest.mark.slow) for s in PLANS[1:]])
def test_decode_loop_temporaries_are_small_next_to_the_cache(spec, head_dim, mesh):
    """Donation lets the loops update the cache in place: no cache-sized copy. A one-place scatter into the keys
    (places minor) made the compiled loop copy every key slot into a head_dim-minor layout before the `while` and
    back after it (`cache.put_step_tokens`): 28-82 % of the cache on 8B shapes. Values stored [B, K, M, H] with
    head_dim 64 were copied places-minor inside the loop (29 % of this cache here, 103 % at 64K): now [B, K, H, M].
    The sampler sorted the vocabulary, which the TPU compiler gathers rows-minor, padded 32-fold (on v5p:
    `test_sampling_a_split_vocabulary_...`). On model=4 the 2 KV heads do not divide the axis that splits the 4
    query heads: replicated, the loop split the cache over heads and gathered it back (113 % of it); now each
    chip's cache holds the one KV head it reads (`sharding.cache_kv_heads`), half the bytes. What stays is the
    weights' share. `generate_loop` only: `decode_chunk` runs the same loop (docs/pods.md)."""
    cfg, target, context = CACHE_CFGS[head_dim], tgt("v5e:2x2", mesh), 32768
    assert cfg.head_dim == head_dim
    plan = make_plan(spec, cfg, lazy_fraction=0.5, sink=4, window=context // 2 - 4)
    kv = aot.kv_cache_bytes(cfg, plan, 8, context, target.mesh)
    row = aot.compile_row(aot.decode_programs(plan, 8, context, spec)[0], cfg, target, cost=False)
    assert row["temporaries"] < 0.1 * kv, (row["temporaries"], kv)
    if mesh == "data=1,model=4":  # one KV head per chip: the whole cache over the model's 2 heads, halved
        from lt_jax.cache import expected_kv_bytes
        assert kv == expected_kv_bytes(cfg, plan, 8, context) // cfg.num_kv_heads


@pytest.mark.parametrize("heads,kv_heads,topology,mesh,held", [
    (32, 8, "v5e:2x4", "data=1,model=8", 8),    # Llama-3.1-8B on v5e-8: the KV heads divide model
    (32, 8, "v5e:4x4", "data=1,model=16", 16),  # on v5e-16: each KV head held by the 2 chips reading it
    (32, 8, "v5e:4x4", "data=2,model=8", 8),
    (4, 2, "v5e:2x2", "data=1,model=4", 4), (4, 2, "v5e:2x2", "data=2,model=2", 2),
    (9, 3, "v5e:2x2", "data=1,model=4", 3),     # SmolLM2: the query heads are not split either
    (12, 3, "v5e:2x4", "data=1,model=8", 3),    # 8 splits the 12 query heads? no: nothing to copy for
])
def test_the_cache_holds_a_kv_head_per_chip_that_reads_it(heads, kv_heads, topology, mesh, held):
    from lt_jax.sharding import cache_kv_heads
    cfg = Config.from_hf(dict(TINY_HF, hidden_size=64 * heads, num_attention_heads=heads,
                              num_key_value_heads=kv_heads), source="t", dtype="bfloat16")
    assert cache_kv_heads(cfg, tgt(topology, mesh).mesh) == held
    assert cache_kv_heads(cfg, None) == kv_heads


def test_sampling_a_split_vocabulary_gathers_nothing_vocabulary_sized():
    """The sampler on v5p, Llama-3's 128K vocabulary split 8 ways, 4 rows: a sort gathered the vocabulary rows-minor,
    padded 32-fold (65 MiB of temporaries, more than a 70B's whole decode step otherwise needs); the bisection's
    stay below the rows' whole-vocabulary logits (2 MiB)."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from lt_jax.inference import sample
    mesh = tgt("v5p:2x2x2", "data=1,model=8").mesh
    logits = jax.ShapeDtypeStruct((4, 128256), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "model")))
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(mesh, PartitionSpec()))  # noqa: E731
    compiled = jax.jit(sample).lower(logits, scalar(jax.random.key(0).dtype), scalar(jnp.float32), scalar(jnp.int32),
                                     scalar(jnp.float32)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * 128256 * 4


def hand_flops_per_token(cfg, attended):
    """Matmul FLOPs of one token through the whole model attending `attended` places per layer."""
    D, N, K, H, F = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    projections = D * N * H * 2 + D * K * H * 2 + 3 * D * F  # q, o; k, v; gate, up, down
    return cfg.num_layers * 2 * (projections + 2 * N * H * attended) + 2 * D * cfg.vocab_size


def test_flop_and_byte_accounting_match_a_hand_count():
    """token_nll scans its layers (cost analysis counts the body once; the report scales by trip count): within 5 %
    of the matmul count. A decode step: its growth with the cache's length within 5 % of the count's, and its
    traffic floor is the weights and the cache. One row, replicated over a mesh of `data` only: each chip computes
    the whole model."""
    cfg = CFG.replace(dtype="float32")
    target = aot.target("v5e:2x2", "data=4")
    plan = plan_of("full")
    nll = aot.compile_row(aot.nll_program(plan, T, "full"), cfg, target)
    expected = T * hand_flops_per_token(cfg, T)  # scores and values over all T keys (masked, not skipped)
    assert nll["flops"] == pytest.approx(expected, rel=0.05)
    loop = aot.compile_row(aot.decode_programs(plan, 1, T, "full")[0], cfg, target)
    longer = aot.compile_row(aot.decode_programs(plan, 1, 2 * T, "full")[0], cfg, target)
    # the attention's share, exactly what grows with the cache; the rest (the one-token block writes of
    # `cache.put_step_tokens`, softmax, norms, sampling) is fixed per step, and never negative
    assert longer["flops"] - loop["flops"] == pytest.approx(
        hand_flops_per_token(cfg, 2 * T + 1) - hand_flops_per_token(cfg, T + 1), rel=0.05)
    assert hand_flops_per_token(cfg, T + 1) <= loop["flops"] <= 1.2 * hand_flops_per_token(cfg, T + 1)
    # bytes: a decode step reads every weight and every cache slot once (the floor); XLA's count is over it (it
    # counts the in-place cache writes at their whole buffers)
    kv = aot.kv_cache_bytes(cfg, plan, 1, T, target.mesh)
    assert loop["weights"] + kv <= loop["floor_bytes"] <= 1.01 * (loop["weights"] + kv)
    assert loop["bytes_accessed"] > 2 * loop["floor_bytes"]
    assert loop["roofline_s"] == max(loop["flops"] / aot.CHIPS["v5e"].bf16_flops,
                                     loop["floor_bytes"] / aot.CHIPS["v5e"].hbm_bytes_per_s)
    insert = aot.compile_row(aot.decode_programs(plan, 1, T, "full")[2], cfg, target, cost=False)
    assert insert["floor_bytes"] == 2 * kv  # one row read, then written in place


@pytest.mark.parametrize("spec,program", [("lighttransfer", 0), pytest.param("last", 1, marks=pytest.mark.slow)])
def test_cost_of_a_hybrid_equals_the_whole_model_unrolled(spec, program):
    """A hybrid's full and lazy layers cost differently: the report prices each kind from its own variant, and a
    selecting prefill's variants keep selecting (a variant with more lazy layers than layers crashed the report).
    Reference: the whole model compiled with its layers unrolled."""
    target = tgt("v5e:2x2", "data=4")
    plan = plan_of(spec)
    prog = aot.programs(plan, spec, 1, T, train=False)[program]  # the selecting prefill; `last`'s hybrid prefill
    row = aot.compile_row(prog, CFG, target)
    jax.clear_caches()
    with aot._layers_unrolled():
        whole = aot._cost(prog.lower(CFG, target.mesh, prog.layout, "split").compile())  # the variants' storage
    assert row["flops"] == pytest.approx(whole[0], rel=0.01)
    assert row["bytes_accessed"] == pytest.approx(whole[1], rel=0.05)  # fusion differs where layers of two kinds meet


def test_bad_target_is_one_sentence():
    with pytest.raises(LtJaxError, match="v9x"):
        aot.target("v9x:2x2")
    with pytest.raises(LtJaxError, match="mesh") as bad_mesh:
        aot.target("v5e:2x2", "data=3,model=1")
    message = str(bad_mesh.value)  # names the target's chips, and no CPU device-count flag (it cannot add TPU chips)
    assert message.startswith("target 'v5e:2x2' has 4 chips: mesh 'data=3,model=1' needs 3 devices")
    assert "XLA_FLAGS" not in message and "\n" not in message


def test_cli_compile_reads_a_config_and_prints_rows(tmp_path, capsys, monkeypatch):
    from lt_jax.cli.main import main
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    assert main(["compile", str(tmp_path), "--target", "v5e:2x2", "--mesh", "data=2,model=2", "--context", "128",
                 "--batch", "2", "--plans", "full", "--no-train", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["program"] for r in rows] == ["prefill exact", "generate_loop", "decode_chunk", "insert_rows",
                                            "token_nll"]
    assert all(r["compiled_not_run"] and r["flops"] > 0 for r in rows)
    compiled = {r["program"]: r for r in rows}  # the table of the same rows, not compiled again
    monkeypatch.setattr(aot, "compile_row", lambda program, *_, **__: compiled[program.name])
    assert main(["compile", str(tmp_path), "--target", "v5e:2x2", "--context", "128", "--batch", "2", "--plans",
                 "full", "--no-train"]) == 0  # the table a user reads
    table = capsys.readouterr().out.splitlines()
    assert str(tmp_path) in table[0] and len(table) == 2 + len(rows) and table[2].startswith("prefill exact")
    assert main(["compile", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json" in err, err
    assert main(["compile", str(tmp_path), "--programs", "generate_loop,insert_rows", "--plans", "full", "--no-train",
                 "--json"]) == 0  # (the stand-in compile_row: only the names asked for reach it)
    assert [r["program"] for r in json.loads(capsys.readouterr().out)["rows"]] == ["generate_loop", "insert_rows"]
    assert main(["compile", str(tmp_path), "--programs", "decode"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--programs decode" in err, err
    # 6 query / 2 KV heads on model=4: neither split (every chip holds attention whole); the report says which
    # sizes of model would split them (Qwen2.5-7B's 28 / 4 on model=8 is this case)
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY_HF, num_attention_heads=6, num_key_value_heads=2,
                                                          hidden_size=384)))
    assert main(["compile", str(tmp_path), "--target", "v5e:2x2", "--mesh", "data=1,model=4", "--programs",
                 "insert_rows", "--plans", "full", "--no-train"]) == 0
    note = capsys.readouterr().out.splitlines()[1]
    assert note == ("not split on this mesh, held whole by every chip of the axis: q_heads (6) over model=4: not "
                    "split (model=2 would split it); kv_heads (2) over model=4: not split (model=2 would split it)")
    assert main(["compile", str(tmp_path), "--target", "v5e:2x2", "--mesh", "data=2,model=2", "--programs",
                 "insert_rows", "--plans", "full", "--no-train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unsplit"] == []


@pytest.mark.slow  # a few compiles per plan at a 256K context
def test_max_batch_fits_the_chip_and_the_next_does_not_and_prices_its_throughput(tmp_path, capsys):
    """`--max-batch`: the largest decode batch whose generate_loop fits one chip, the next
    one not; the throughput is that batch over its roofline step; halving the full layers' cache lets more rows in."""
    from lt_jax.cli.main import main
    hf = dict(TINY_HF, hidden_size=1024, num_attention_heads=8, num_key_value_heads=4,  # head_dim 128 (docs/pods.md)
              max_position_embeddings=262144)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg, context, target = Config.from_hf(hf, source="tiny", dtype="bfloat16"), 262144, tgt("v5e:2x2", "data=1,model=4")
    assert main(["compile", str(tmp_path), "--target", "v5e:2x2", "--mesh", "data=1,model=4", "--context",
                 str(context), "--plans", "full,lighttransfer", "--programs", "insert_rows", "--no-train",
                 "--max-batch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    full, hybrid = out["throughput"]
    assert out["max_batch"] == {"full": full["max_batch"], "lighttransfer": hybrid["max_batch"]}
    for best in (full, hybrid):
        plan = make_plan(best["plan"], cfg, lazy_fraction=0.5)
        fits, over = (aot.compile_row(aot.decode_programs(plan, b, context, best["plan"])[0], cfg, target,
                                      cost=False) for b in (best["max_batch"], best["max_batch"] + 1))
        assert fits["fits"] and not over["fits"]
        assert best["tokens_per_s"] == pytest.approx(best["max_batch"] / best["roofline_s"])
    assert hybrid["max_batch"] > 1.5 * full["max_batch"]
    assert hybrid["relative_to_full"] == pytest.approx(hybrid["tokens_per_s"] / full["tokens_per_s"])


def test_a_compiler_failure_is_a_row_of_its_own_when_asked():
    """libtpu crashes on some programs (docs/pods.md); `lt-jax compile` asks for a row naming the failure, so the
    other programs are still reported. The library call raises by default. The compiler is stood in for: the
    real crash is a libtpu bug that a later libtpu may fix."""
    class Lowered:
        def compile(self):
            raise jax.errors.JaxRuntimeError(
                'INTERNAL: during context [post-optimization]: %bitcast.51 = f32[1,256]{1,0} bitcast(%fusion.84), '
                'metadata={op_name="jit(generate_loop)/while/body"}: Bitcast cannot have different shape sizes of '
                'output (1024) and operand (512)\nmore lines')
    program = dataclasses.replace(aot.decode_programs(make_plan("full", CFG), 2, T, "full")[0],
                                  lower=lambda *a, **k: Lowered())
    target = tgt("v5e:2x2", "data=2,model=2")
    row = aot.compile_row(program, CFG, target, failure_as_row=True)
    assert row["failed"] == ("INTERNAL: Bitcast cannot have different shape sizes of output (1024) and operand "
                             "(512)")
    assert row["fits"] is None and row["total"] is None and row["program"] == "generate_loop"
    with pytest.raises(jax.errors.JaxRuntimeError, match="Bitcast"):
        aot.compile_row(program, CFG, target)


def test_one_row_per_chip_decodes_compile_under_a_hybrid_plan():
    """libtpu 0.0.42 stopped on the stacked hybrid decode of one row per chip ("Bitcast cannot have different
    shape sizes of output (1024) and operand (512)": attention's output cast to bf16 after its heads were merged,
    which the TPU compiler fused into an f32 -> bf16 bitcast; Llama-3.1-70B lighttransfer on v5p-32 at batch 2 too).
    Cast first, the heads merged after: it compiles. The smallest program found that stopped: 4 layers of 4 heads
    of 128 (2 KV heads), 256K places, data=2,model=2, batch 2."""
    hf = dict(TINY_HF, hidden_size=512, max_position_embeddings=262144)
    cfg = Config.from_hf(hf, source="tiny-128", dtype="bfloat16")
    plan = make_plan("lighttransfer", cfg, lazy_fraction=0.5)
    row = aot.compile_row(aot.decode_programs(plan, 2, 262144, "lighttransfer")[0], cfg,
                          tgt("v5e:2x2", "data=2,model=2"), cost=False)
    assert row["fits"] and row["batch"] == 2


# Weights big next to the cache: F = 16384 split over model=4 (8 MiB of gate_up_proj per chip and layer), a 4K cache
MLP_CFG = Config.from_hf(dict(TINY_HF, hidden_size=512, intermediate_size=16384, num_hidden_layers=2),
                         source="tiny-wide-mlp", dtype="bfloat16")


@pytest.mark.slow  # the default tier keeps the cache-sized case (`test_decode_loop_temporaries_...[full]`)
def test_decode_loop_reads_sharded_weights_in_place():
    """The projections contract each weight in its stored shape. Viewing gate_up_proj [2, F, D] (F split over
    `model`) as one [2F, D] matrix moved the halves of F between chips: the compiled loop all-to-all'ed every
    layer's MLP weights into temporaries (33 % of this cache; 1.9 GiB, 193 % of the per-chip cache, for
    Llama-3.1-8B on v5e:2x4 at 8K, results/pods/temporaries-8b.json). Split weights (one buffer per layer, as
    on CPU/GPU) show it as memory; stacked ones (a TPU load's) would pay it as traffic on every step instead.
    Measured against the weights per chip (27.8 MB): the copy was 22.1 MB of temporaries (80 %), now 3.9 MB (14 %).
    (Against the cache it was 33 %; since each chip's cache holds one KV head here, `sharding.cache_kv_heads`, the
    cache is half as large and no longer the yardstick.)"""
    target, context = tgt("v5e:2x2", "data=1,model=4"), 4096
    plan = make_plan("full", MLP_CFG)
    kv = aot.kv_cache_bytes(MLP_CFG, plan, 8, context, target.mesh)
    row = aot.compile_row(aot.decode_programs(plan, 8, context, "full", layers="split")[0], MLP_CFG, target,
                          cost=False)
    assert row["weights"] > 0.4 * kv  # the weights' copy would show
    assert row["temporaries"] < 0.25 * row["weights"], (row["temporaries"], row["weights"])


# ---- the weights' storage: stacked on TPU, so decode scans one layer body (issue 22, decode compile time) -------

@pytest.mark.slow
def test_decode_of_stacked_weights_scans_and_costs_what_the_unrolled_decode_costs():
    """A TPU load keeps the layers stacked (`params.default_layers`), so programs compile decode as a scan over one
    layer body by default (every plan and mesh in test_every_program_compiles_with_training; full, streaming and
    lighttransfer in the default tier). Cost analysis counts the scanned body once: the report's per-step cost (its
    cost variants) equals what the split weights' decode, unrolled, costs as compiled, for a mixed plan."""
    target = tgt("v5e:2x2", "data=2,model=2")
    stacked, split = (aot.compile_row(aot.decode_programs(plan_of("last"), B, T, "last", layers=layers)[0], CFG,
                                      target) for layers in ("stacked", "split"))
    assert aot.TPU_LAYERS == "stacked" and (stacked["layers"], split["layers"]) == ("stacked", "split")
    assert stacked["flops"] == pytest.approx(split["flops"], rel=0.02)
    assert stacked["bytes_accessed"] == pytest.approx(split["bytes_accessed"], rel=0.1)


def test_calibrated_plans_compile_without_a_calibration_as_their_uncalibrated_twins():
    """`lt-jax compile --plans retrieval-aware,loss-guided` on a bare config: a stand-in calibration, since which
    layers a calibration protects (or streams) is data; the selecting prefill plans exactly as lighttransfer's,
    the loss-guided decode as the fixed plan of as many lazy layers."""
    from lt_jax.cli.compile import _plan
    target = tgt("v5e:2x2", "data=2,model=2")
    aware, lighttransfer = _plan("retrieval-aware", CFG, 0.5), _plan("lighttransfer", CFG, 0.5)
    assert aware.per_prompt and len(aware.protect) == 1 and aware.select_lazy == lighttransfer.select_lazy
    guided = _plan("loss-guided", CFG, 0.5)
    assert not guided.per_prompt and guided.lazy_count == 2
    keys = ("arguments", "temporaries", "outputs", "total")
    rows = [aot.compile_row(aot.prefill_program(p, 1, T, s), CFG, target, cost=False)
            for s, p in (("retrieval-aware", aware), ("lighttransfer", lighttransfer))]
    assert [rows[0][k] for k in keys] == [rows[1][k] for k in keys]
    rows = [aot.compile_row(aot.decode_programs(p, B, T, s)[0], CFG, target, cost=False)
            for s, p in (("loss-guided", guided), ("last", _plan("last", CFG, 0.5)))]
    assert [rows[0][k] for k in keys] == [rows[1][k] for k in keys]


def test_a_program_the_tpu_compiler_refuses_for_hbm_is_a_row_not_a_crash(capsys):
    """A Llama-3.1-70B layer's prefill of 16 prompts of 32K on v5e chips (16 GiB): the TPU compiler refuses it (its
    temporaries alone exceed HBM); `lt-jax compile` reports it as a row that does not fit, with what the compiler
    asked for (before, the exception ended the command)."""
    from lt_jax.cli.compile import read_config
    cfg = read_config(str(aot.__file__).rsplit("/lt_jax/", 1)[0] + "/configs/Llama-3.1-70B-Instruct", "bfloat16")
    cfg = cfg.replace(num_layers=1)  # one layer's activations at 32K already exceed the chip
    target = tgt("v5e:2x2", "data=1,model=4")
    row = aot.compile_row(aot.prefill_program(make_plan("full", cfg), 16, 32768, "full", "exact"), cfg, target,
                          cost=False)
    assert not row["fits"] and row["total"] is None and "RESOURCE_EXHAUSTED" in row["refused"]
    assert row["temporaries"] > target.chip.hbm_bytes
    # libtpu's other wording (arguments and temporaries together over the chip; seen in a --max-batch search,
    # which it crashed), verbatim but shortened: a row too, with the program's own temporaries
    message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory "
               "in memory space hbm. Used 15.75G of 15.75G hbm. Exceeded hbm capacity by 2.45M.\n"
               "Total hbm usage >= 16.00G:\n    reserved        258.00M \n    program         130.41M \n"
               "    arguments        15.62G \n\nOutput size 15.61G; shares 15.61G with arguments.\n\n"
               "Program hbm requirement 130.41M:\n    global           240.5K\n    HLO temp        125.53M (99.9% "
               "utilization: Unpadded (123.14M) Padded (123.28M), 1.8% fragmentation (2.25M))\n")

    class Refused:
        def compile(self):
            raise jax.errors.JaxRuntimeError(message)
    program = aot.decode_programs(make_plan("full", cfg), 8, 1024, "full")[0]
    row = aot.compile_row(dataclasses.replace(program, lower=lambda *_: Refused()), cfg, target, cost=False)
    assert not row["fits"] and row["total"] is None and row["refused"].startswith("RESOURCE_EXHAUSTED: E1000")
    assert row["temporaries"] == round(125.53 * 2 ** 20)
