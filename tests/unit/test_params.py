"""lt_jax/params.py: the one layout's leaves and shapes per config, what init draws, and the two storages
(stacked / per layer) as exact inverses. The layout against transformers' weights (conversion, the legacy
unfused layout): tests/integration/test_convert.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from lt_jax.params import (abstract_params, empty_params, init_params, param_specs, qkv_part, split_layers,
                           stack_layers)


@pytest.mark.parametrize("tie, bias", [(False, False), (True, True)])
def test_leaves_and_shapes(tie, bias):
    cfg = tiny_config(tie_embeddings=tie, qkv_bias=bias)  # L 4, D 32, F 48, V 64, N 4, K 2, H 8
    shapes = jax.tree.map(lambda s: s.shape, param_specs(cfg), is_leaf=lambda x: hasattr(x, "axes"))
    want = {"attn_norm": (4, 32), "qkv_proj": (4, 2, 4, 8, 32), "o_proj": (4, 32, 4, 8), "mlp_norm": (4, 32),
            "gate_up_proj": (4, 2, 48, 32), "down_proj": (4, 32, 48)}
    if bias:
        want["qkv_bias"] = (4, 2, 4, 8)
    assert shapes["layers"] == want and shapes["embed"] == (64, 32) and shapes["final_norm"] == (32,)
    assert ("lm_head" in shapes) == (not tie)
    for spec in jax.tree.leaves(param_specs(cfg), is_leaf=lambda x: hasattr(x, "axes")):
        assert len(spec.axes) == len(spec.shape)
    for tree in (abstract_params(cfg), empty_params(cfg)):
        assert jax.tree.map(lambda a: a.shape, tree) == shapes
        assert {a.dtype for a in jax.tree.leaves(tree)} == {np.dtype("float32")}
    bf16 = abstract_params(cfg.replace(dtype="bfloat16"))
    assert {a.dtype for a in jax.tree.leaves(bf16)} == {np.dtype(jnp.bfloat16)}


def test_qkv_part_picks_each_kv_heads_queries_key_and_value():
    cfg = tiny_config()  # G = 2: per KV head, query heads 0..1, then its key (2), then its value (3)
    fused = np.arange(2 * 4).reshape(2, 4)
    np.testing.assert_array_equal(fused[qkv_part(cfg, "q")], [[0, 1], [4, 5]])
    np.testing.assert_array_equal(fused[qkv_part(cfg, "k")], [2, 6])
    np.testing.assert_array_equal(fused[qkv_part(cfg, "v")], [3, 7])


def test_init_draws_small_weights_unit_norms_and_zero_biases():
    params = jax.tree.map(np.asarray, init_params(tiny_config(qkv_bias=True), jax.random.key(0)))
    layers = params["layers"]
    assert np.all(layers["attn_norm"] == 1) and np.all(params["final_norm"] == 1) and np.all(layers["qkv_bias"] == 0)
    for w in (layers["qkv_proj"], layers["gate_up_proj"], params["embed"], params["lm_head"]):
        assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
    assert not np.array_equal(layers["qkv_proj"][0], layers["qkv_proj"][1])  # every leaf draws its own
    assert not np.array_equal(params["embed"], init_params(tiny_config(qkv_bias=True), jax.random.key(1))["embed"])


@pytest.mark.parametrize("consume", [False, True])
def test_split_and_stack_are_exact_inverses(consume):
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), empty_params(tiny_config()))
    want = jax.tree.map(np.asarray, params)
    split = split_layers({**params, "layers": dict(params["layers"])}, consume=consume)
    assert isinstance(split["layers"], tuple) and len(split["layers"]) == 4
    for i, layer in enumerate(split["layers"]):
        for name, a in layer.items():
            np.testing.assert_array_equal(a, want["layers"][name][i])
    assert split_layers(split)["layers"][2].keys() == split["layers"][2].keys()  # already split: only placed
    back = stack_layers(split)
    assert jax.tree.structure(back) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert stack_layers(params) is params  # already stacked
