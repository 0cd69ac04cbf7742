"""The weights' two storages (`lt_jax.params.default_layers`): a model whose layers are stacked (decode scans one
layer body, a TPU load's storage) prefills, decodes and generates what the same weights split into per-layer
buffers (decode unrolls the layers, the CPU storage) do, under a mixed plan and a selecting one."""
import jax
import numpy as np
import pytest

from helpers import SINK, W, W_LAST, tiny_config
from lt_jax.api import Model, load
from lt_jax.errors import LtJaxError
from lt_jax.inference import DecodeState, Sampling, decode_chunk
from lt_jax.params import LAYERS, ParamSpec, default_layers, param_specs

STD = 0.2  # peaked attention: which layer's weights and cache a step reads decides its tokens
STEPS = 12  # greedy decode steps


@pytest.fixture(scope="module")
def models():
    cfg = tiny_config()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: np.ones(s.shape, np.float32) if s.init == "ones" else
                          (STD * rng.standard_normal(s.shape)).astype(np.float32), param_specs(cfg),
                          is_leaf=lambda x: isinstance(x, ParamSpec))
    return {layers: Model(cfg, params, layers=layers) for layers in LAYERS}


def test_the_storage_follows_the_platform(models):
    assert isinstance(models["split"].params["layers"], tuple) and len(models["split"].params["layers"]) == 4
    assert models["stacked"].params["layers"]["qkv_proj"].shape[0] == 4
    assert [default_layers(p) for p in ("cpu", "gpu", "cuda", "tpu")] == ["split", "split", "split", "stacked"]
    with pytest.raises(LtJaxError, match="'scanned' is not one of split, stacked"):
        load("nowhere", layers="scanned")


def run(model, spec, prompts):
    """(the prefill's logits, the logits after STEPS greedy decode steps, the tokens they sampled, the lazy layers)
    through serving's decode loop, the one `generate` runs."""
    done = model.prefill(prompts, spec, max_len=64, lazy_fraction=0.5, sink=SINK, window=W, w_last=W_LAST)
    B = len(prompts)
    state = DecodeState(np.full(B, STEPS, np.int32), np.zeros(B, bool), np.zeros((B, 2), np.uint32))
    first = np.asarray(done.logits)
    tokens, logits, _, _ = decode_chunk(model.params, done.logits, done.cache, done.layers, state,
                                        Sampling().prepared(), model.config, done.plan.shape.decoding, STEPS)
    return np.stack([first, np.asarray(logits)]), np.asarray(tokens), done.plan.lazy_layers


@pytest.mark.parametrize("spec", [pytest.param("last", marks=pytest.mark.slow), "lighttransfer"])
def test_stacked_weights_decode_what_split_weights_decode(models, spec):
    """Bit-equal on XLA:CPU (float32): the prefill's logits, the greedy tokens and the logits after the last step.
    A selecting plan's decode is a mixed one (its lazy layers chosen per prompt); a fixed mixed plan with its hybrid
    prefill in the slow tier."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 64, 40).tolist(), rng.integers(0, 64, 27).tolist()]
    split_logits, split_tokens, split_lazy = run(models["split"], spec, prompts)
    stacked_logits, stacked_tokens, stacked_lazy = run(models["stacked"], spec, prompts)
    assert stacked_lazy == split_lazy and len(split_lazy) == 2
    assert split_logits.std() > 1.0
    np.testing.assert_array_equal(stacked_logits, split_logits)
    np.testing.assert_array_equal(stacked_tokens, split_tokens)
    assert (split_tokens >= 0).all() and len(set(split_tokens.ravel().tolist())) > 3
