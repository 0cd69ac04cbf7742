"""Every trainable subset, leaf by leaf and layer by layer, after one real optimizer step: exactly the leaves a
hand-written table allows change, and every other leaf stays bit-identical (issue 27: `lazy-attention` falling
through to "all" passed the suite)."""
import jax
import numpy as np
import pytest

from helpers import tiny_config
from lt_jax.params import init_params
from lt_jax.plan import Plan
from lt_jax.train.step import TRAINABLE, TrainSettings, init_state, make_step

CFG = tiny_config(qkv_bias=True)  # a bias leaf and an untied lm_head: every kind of leaf is present
LAZY = (1, 3)
EVERY = tuple(range(CFG.num_layers))
TOP = ("embed", "final_norm", "lm_head")
ATTENTION = ("qkv_proj", "qkv_bias", "o_proj")
MLP = ("gate_up_proj", "down_proj")
LAYER = ATTENTION + MLP + ("attn_norm", "mlp_norm")
ADAPTED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # the projections LoRA adapts


def layer_leaves(names, layers, prefix="layers"):
    return {f"{prefix}/{n}/{i}" for n in names for i in layers}


def adapters(names, layers):
    return {f"lora/layers/{n}/{ab}/{i}" for n in names for ab in ("a", "b") for i in layers}


# (trainable, lora rank) -> the leaves one step may change; every one of them must change.
MAY_CHANGE = {
    ("all", 0): set(TOP) | layer_leaves(LAYER, EVERY),
    ("attention", 0): layer_leaves(ATTENTION, EVERY),
    ("mlp", 0): layer_leaves(MLP, EVERY),
    ("lazy-layers", 0): layer_leaves(LAYER, LAZY),
    ("lazy-attention", 0): layer_leaves(ATTENTION, LAZY),
    ("all", 2): adapters(ADAPTED, EVERY),  # the base stays frozen
    ("lazy-attention", 2): adapters(("qkv_proj", "o_proj"), LAZY),
}


def test_the_table_covers_every_subset():
    assert {t for t, _ in MAY_CHANGE} == set(TRAINABLE)


def per_layer(params) -> dict:
    """'path/layer' (or 'path' for leaves outside the layers) -> a host copy."""
    out = {}
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(p.key) for p in path]
        a = np.array(a, copy=True)  # the step donates the state's buffers
        if "layers" in keys:
            out.update({"/".join(keys + [str(i)]): a[i] for i in range(a.shape[0])})
        else:
            out["/".join(keys)] = a
    return out


@pytest.mark.parametrize("trainable,rank", list(MAY_CHANGE))
def test_one_step_changes_exactly_the_trainable_leaves(trainable, rank):
    plan = Plan(CFG.num_layers, LAZY, sink=2, window=4)
    settings = TrainSettings.for_plan(plan, steps=1, lr=1e-2, weight_decay=0.1, trainable=trainable,
                                      lora_rank=rank)
    state = init_state(init_params(CFG, jax.random.key(0)), settings)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 2, 16)).astype(np.int32)
    before = per_layer(state.params)
    state, metrics = make_step(CFG, settings, plan)(state, {"tokens": tokens, "labels": tokens})
    after = per_layer(state.params)
    assert np.isfinite(float(metrics["loss"])) and set(after) == set(before)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    want = MAY_CHANGE[trainable, rank]
    assert want <= set(before), f"the table names leaves the state lacks: {sorted(want - set(before))}"
    assert changed == want, (f"changed but frozen: {sorted(changed - want)}; "
                             f"trainable but unchanged: {sorted(want - changed)}")
