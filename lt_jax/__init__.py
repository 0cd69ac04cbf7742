"""lt-jax: LightTransfer (hybrid streaming/full attention LLMs) in JAX."""
from lt_jax.api import Model, load
from lt_jax.config import Config, Rope
from lt_jax.errors import LtJaxError
from lt_jax.mask import attention_mask
from lt_jax.model import forward
from lt_jax.plan import Plan

__all__ = ["Config", "LtJaxError", "Model", "Plan", "Rope", "attention_mask", "forward", "load"]
