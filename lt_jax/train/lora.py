"""LoRA on the layer projections (Hu et al., 2021): W' = W + (alpha / r) * B A for each of qkv_proj, o_proj,
gate_up_proj and down_proj, per layer, with A [L, r, in] (uniform in ±1/sqrt(in), as peft's kaiming init) and B
[L, out, r] (zeros, so training starts from the model itself). Only A and B train; `merge` folds them into the
weights for saving and export, so a LoRA run's output is an ordinary checkpoint."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# leaf -> how many trailing axes are the input (the rest, after the layer axis, are the output)
INPUT_AXES = {"qkv_proj": 1, "o_proj": 2, "gate_up_proj": 1, "down_proj": 1}


def _split(shape, n_in: int) -> tuple[int, int, int]:
    """[L, out..., in...] -> (L, prod(out), prod(in))."""
    return shape[0], math.prod(shape[1:len(shape) - n_in]), math.prod(shape[len(shape) - n_in:])


def init_lora(params, rank: int, seed: int = 0) -> dict:
    """{"layers": {leaf: {"a": [L, r, in], "b": [L, out, r]}}} for stacked float32 params."""
    leaves = {}
    keys = jax.random.split(jax.random.key(seed), len(INPUT_AXES))
    for key, (name, n_in) in zip(keys, INPUT_AXES.items()):
        L, n_out, n_inputs = _split(params["layers"][name].shape, n_in)
        bound = 1.0 / math.sqrt(n_inputs)
        leaves[name] = {"a": jax.random.uniform(key, (L, rank, n_inputs), jnp.float32, -bound, bound),
                        "b": jnp.zeros((L, n_out, rank), jnp.float32)}
    return {"layers": leaves}


def merge(params, lora, scale: float):
    """The weights with each adapter folded in: W + scale * B A, reshaped to W's layout."""
    layers = dict(params["layers"])
    for name, ab in lora["layers"].items():
        w = layers[name]
        delta = jnp.einsum("lor,lri->loi", ab["b"], ab["a"]).reshape(w.shape)
        layers[name] = w + (scale * delta).astype(w.dtype)
    return {**params, "layers": layers}
