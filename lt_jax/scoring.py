"""Teacher-forced scoring of token sequences under a plan, for the harnesses that read logprobs (the server's echo
logprobs, the lm-evaluation-harness model)."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from lt_jax.config import Config
from lt_jax.model import default_positions, forward_masked
from lt_jax.plan import LayerPlan


@partial(jax.jit, static_argnames=("cfg", "top"))
def token_logprobs(params, tokens, layers: LayerPlan, cfg: Config, prefix=None, top: int = 1):
    """Per row of tokens [B, T] and position t >= 1: log p(token t | tokens < t) [B, T-1] and the `top` most likely
    (logprobs [B, T-1, top], ids [B, T-1, top]), under a plan as data with `Model.logits`' prefix rule (`prefix`
    None, or [B]: positions below a row's prefix are an exact prefill); `api.token_nll`'s computation. Right padding
    changes nothing before it (causal), so callers pad T to a bucket and rows to a batch size."""
    logits = forward_masked(params, tokens, default_positions(tokens), layers, cfg, prefix)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    values, ids = jax.lax.top_k(logp, top)
    return chosen, values, ids
