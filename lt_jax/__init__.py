"""lt-jax: LightTransfer (hybrid streaming/full attention LLMs) in JAX."""
from lt_jax.api import Model, Prefilled, load
from lt_jax.attention import attention_mask
from lt_jax.config import Config, Rope
from lt_jax.errors import LtJaxError
from lt_jax.inference import Sampling
from lt_jax.model import forward
from lt_jax.plan import LayerPlan, Plan, PlanShape

__all__ = ["Config", "LayerPlan", "LtJaxError", "Model", "Plan", "PlanShape", "Prefilled", "Rope", "Sampling",
           "attention_mask", "forward", "load"]
