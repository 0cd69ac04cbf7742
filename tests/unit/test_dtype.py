"""bf16 serving on a tiny model: weights and KV cache in bfloat16, while the softmax, the lazy ratios and the logits
stay float32; the bf16 model against the same weights in float32 (perplexity and per-token NLL, lazy ratios);
bytes halved where bench and the TPU report count them; `--dtype` on every model command."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from lt_jax import aot
from lt_jax.api import Model
from lt_jax.cache import expected_kv_bytes, init_cache
from lt_jax.errors import LtJaxError
from lt_jax.params import ParamSpec, param_specs
from lt_jax.plan import Plan

STD = 0.2  # ten times init_params' 0.02: peaked attention and logits, so bf16 rounding shows in them
PPL_TOL = 0.01  # the bound; measured: 0.28 % on this model (SmolLM2 on essays: 0.06-0.13 %)
NLL_TOL = 0.25  # per token, nats; measured: 0.094
RATIO_TOL = 0.02  # lazy ratios lie in [0, 1]; measured: 1.1e-3 (SmolLM2 on needle prompts: ~8e-3)


@pytest.fixture(scope="module")
def models():
    """(float32 model, the same weights rounded to bfloat16): 4 layers, GQA 4/2, vocab 64."""
    cfg = tiny_config()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: np.ones(s.shape, np.float32) if s.init == "ones" else
                          (STD * rng.standard_normal(s.shape)).astype(np.float32), param_specs(cfg),
                          is_leaf=lambda x: isinstance(x, ParamSpec))  # numpy: no eager JAX op to compile
    half = cfg.replace(dtype="bfloat16")
    return Model(cfg, params), Model(half, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))


@pytest.fixture(scope="module")
def rows():
    ids = np.random.default_rng(0).integers(0, 64, 160).astype(np.int32)
    return [ids, ids[:100]]


def ratio_plan(cfg):
    """What `Model.lazy_ratios` prefills with: every layer's ratio measured, every cache a ring."""
    return Plan(cfg.num_layers, sink=4, window=16, select_lazy=cfg.num_layers, w_last=8).validate(cfg)


def test_bf16_weights_and_cache_but_float32_softmax_ratios_and_logits(models, rows):
    _, half = models
    assert {a.dtype for a in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    done = half.prefill(rows, ratio_plan(half.config))
    assert {a.dtype for a in jax.tree.leaves(done.cache.kv)} == {jnp.dtype(jnp.bfloat16)}
    assert done.logits.dtype == jnp.float32 and done.ratios.dtype == np.float32


def test_bf16_perplexity_and_lazy_ratios_match_float32(models, rows):
    full, half = models
    want, got = full.token_nll(rows[0]), half.token_nll(rows[0])
    a, b = np.exp(want.mean()), np.exp(got.mean())
    print(f"\ntiny model ppl: float32 {a:.4f}, bfloat16 {b:.4f} ({b / a - 1:+.3%}); per-token NLL: spread "
          f"{want.std():.2f}, max |float32 - bfloat16| {np.abs(got - want).max():.3f}")
    assert want.std() > 1.0  # peaked logits: rounding can show
    assert abs(b / a - 1) <= PPL_TOL and np.abs(got - want).max() <= NLL_TOL
    ra, rb = full.lazy_ratios(rows, sink=4, window=16, w_last=8), half.lazy_ratios(rows, sink=4, window=16, w_last=8)
    print(f"lazy ratios: spread {ra.max() - ra.min():.3f}, max |float32 - bfloat16| = {np.abs(ra - rb).max():.2e}")
    assert ra.max() - ra.min() > 0.05 and np.abs(ra - rb).max() <= RATIO_TOL


def test_bytes_per_token_halve_in_bench_and_the_tpu_report():
    """bench's KV bytes (the design formula, and what a cache holds) and the TPU report's per-chip bytes."""
    cfg = tiny_config()
    half = cfg.replace(dtype="bfloat16")
    plan = Plan.full(cfg.num_layers)
    for c in (cfg, half):
        assert init_cache(c, plan, 2, 64).kv_bytes == expected_kv_bytes(c, plan, 2, 64)
    assert 2 * expected_kv_bytes(half, plan, 2, 64) == expected_kv_bytes(cfg, plan, 2, 64)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    assert 2 * aot.kv_cache_bytes(half, plan, 2, 64, mesh) == aot.kv_cache_bytes(cfg, plan, 2, 64, mesh)
    assert 2 * aot.chip_bytes(aot.abstract_weights(half, mesh)) == aot.chip_bytes(aot.abstract_weights(cfg, mesh))


def test_an_unknown_dtype_is_refused_in_one_sentence_before_anything_loads():
    import lt_jax
    with pytest.raises(LtJaxError, match=r"^dtype 'float16' is not one of float32, bfloat16\.$"):
        lt_jax.load("/no/such/model", dtype="float16")


def test_every_model_command_takes_dtype_and_loads_with_it(monkeypatch, capsys):
    """Every command with a MODEL that it loads has --dtype (train's --dtype is its compute dtype: its weights
    load in float32); an unknown value is a usage error naming it."""
    import lt_jax
    from lt_jax.cli.flags import load_model
    from lt_jax.cli.main import build_parser, main
    commands = build_parser()._subparsers._group_actions[0].choices
    with_model = {n for n, p in commands.items() if any(a.dest == "model" for a in p._actions)}
    serving = {n for n in with_model if any(a.dest == "weights_dtype" for a in commands[n]._actions)}
    assert serving == with_model - {"train", "compile"} and {"generate", "ppl", "eval", "bench", "serve"} <= serving
    loaded = []
    monkeypatch.setattr(lt_jax, "load", lambda path, dtype=None, mesh=None: loaded.append(dtype))
    for argv in (["ppl", "m", "--text-file", "t", "--dtype", "bfloat16"], ["ppl", "m", "--text-file", "t"],
                 ["train", "m", "--data", "d", "--plan", "last", "--out", "o", "--dtype", "bfloat16"]):
        load_model(build_parser().parse_args(argv))
    assert loaded == ["bfloat16", None, None]
    assert main(["generate", "m", "--dtype", "float16"]) == 2
    assert "invalid choice: 'float16'" in capsys.readouterr().err
