"""Sharding specs on an abstract mesh (no devices): a model whose KV heads divide `model` but not `data` puts
`kv_heads` on `model` in the weights and in the cache (issue 27: `kv_heads` mapped to `data` was seen only by the
8-device subprocess test, since SmolLM2's 3 KV heads divide neither axis)."""
import jax
from jax.sharding import AbstractMesh, PartitionSpec as P

from helpers import tiny_config
from lt_jax.cache import init_cache
from lt_jax.params import param_specs
from lt_jax.plan import Plan
from lt_jax.sharding import CACHE_AXES, spec_for

MESH = AbstractMesh((4, 2), ("data", "model"))
CFG = tiny_config(qkv_bias=True)  # 4 query and 2 KV heads (2 divides model=2, not data=4), ffn 48, vocab 64


def test_weight_specs_put_heads_on_model():
    specs = param_specs(CFG)
    got = {name: spec_for(MESH, s.axes, s.shape) for name, s in specs["layers"].items()}
    assert got["qkv_proj"] == P(None, "model")  # [L, K, G+2, H, D]
    assert got["qkv_bias"] == P(None, "model")
    assert got["o_proj"] == P(None, None, "model")  # [L, D, N, H]
    assert got["gate_up_proj"] == P(None, None, "model")  # [L, 2, F, D]
    assert got["down_proj"] == P(None, None, "model")  # [L, D, F]
    assert spec_for(MESH, specs["embed"].axes, specs["embed"].shape) == P("model")  # [V, D]


def test_cache_specs_put_rows_on_data_and_kv_heads_on_model():
    cache = jax.eval_shape(lambda: init_cache(CFG, Plan(CFG.num_layers, (1,), sink=4, window=16), 8, 64))
    got = {field: spec_for(MESH, axes, (getattr(cache, field)[0] if field.endswith(("_k", "_v"))
                                        else getattr(cache, field)).shape)
           for field, axes in CACHE_AXES.items()}
    assert got == {"full_k": P("data", "model"), "full_v": P("data", "model"), "full_pos": P("data"),
                   "ring_k": P("data", "model"), "ring_v": P("data", "model"), "ring_pos": P("data"),
                   "length": P("data")}


def test_unsplit_names_what_a_mesh_axis_holds_whole_and_the_sizes_that_would_split_it():
    from lt_jax.sharding import unsplit
    mesh = lambda data, model: AbstractMesh((data, model), ("data", "model"))  # noqa: E731
    # Qwen2.5-7B's heads (28 query / 4 KV) on model=8: neither split; model=2 or 4 (of 8 chips) would split both
    qwen = tiny_config(num_heads=28, num_kv_heads=4, dim=28 * 8, ffn_dim=64, vocab_size=64)
    assert unsplit(qwen, mesh(1, 8)) == ["q_heads (28) over model=8: not split (model=2, 4 would split it)",
                                         "kv_heads (4) over model=8: not split (model=2, 4 would split it)"]
    assert unsplit(qwen, mesh(2, 4)) == []
    # 4 query / 2 KV heads on model=4: the cache copies a KV head per chip (cache_kv_heads), so nothing is held whole
    assert unsplit(tiny_config(), mesh(2, 4)) == []
    # a vocabulary of 63 on model=2: the embedding and head held whole
    assert unsplit(tiny_config(vocab_size=63), mesh(4, 2)) == ["vocab (63) over model=2: not split"]
