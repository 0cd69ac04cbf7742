"""Helpers shared by test files (plain functions; fixtures live in conftest.py)."""
from __future__ import annotations

import collections
import contextlib

import jax

from lt_jax.config import Config, Rope

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # fired by every compilation jit does (cache hit or not)


@contextlib.contextmanager
def compilations():
    """Counts the compilations made while the block runs, by function name ("jit(train_step)"), through JAX's
    public monitoring events: `with compilations() as compiled: ...; assert compiled[name(fn)] == 0`. A
    persistent-cache hit counts too (the event wraps it), so a recompilation cannot hide behind the disk cache."""
    counts = collections.Counter()

    def listen(event, _duration, fun_name: str = "?", **_):
        if event == BACKEND_COMPILE:
            counts[fun_name] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def name(fn) -> str:
    """The name `compilations` counts a jitted function under."""
    return f"jit({getattr(fn, '__name__', fn)})"


def tiny_config(**changes) -> Config:
    """A tiny random-init llama-style Config (4 layers, 4 query / 2 KV heads of 8, vocab 64): unit tests build
    params with `lt_jax.params.init_params` instead of converting a transformers model."""
    base = Config(arch="llama", vocab_size=64, dim=32, ffn_dim=48, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8, norm_eps=1e-6, rope=Rope(), max_position_embeddings=4096, tie_embeddings=False,
                  qkv_bias=False)
    return base.replace(**changes)
