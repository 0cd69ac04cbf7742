"""The small facade users call: `lt_jax.load(path)` -> Model with `.logits`, `.perplexity`, `.greedy`."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.model import default_positions, forward


@partial(jax.jit, static_argnames=("cfg",))
def token_nll(params, tokens, cfg: Config):
    """-log p(tokens[:, t] | tokens[:, :t]) for t >= 1: float32 [B, T-1]. Reduced inside jit: no [T, V] to host."""
    logits = forward(params, tokens, default_positions(tokens), cfg)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def as_batch(ids, vocab_size: int) -> jnp.ndarray:
    """int array [B, T] (a single sequence [T] becomes [1, T]), checked against the vocabulary."""
    arr = np.asarray(ids)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise LtJaxError(f"ids must be a non-empty integer array [B, T] or [T]; got shape {arr.shape}, "
                         f"dtype {arr.dtype}.")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise LtJaxError(f"token ids must lie in 0..{vocab_size - 1}; got {arr.min()}..{arr.max()}.")
    return jnp.asarray(arr, jnp.int32)


class Model:
    def __init__(self, config: Config, params, tokenizer=None, path: Path | None = None):
        self.config = config
        self.params = jax.device_put(params)
        self.tokenizer = tokenizer
        self.path = path

    def __repr__(self):
        c = self.config
        return f"Model({c.arch}, {c.num_layers} layers, D={c.dim}, {c.dtype}, path={self.path})"

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise LtJaxError(f"model {self.path} has no tokenizer files; pass token ids instead of text.")
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            raise LtJaxError(f"model {self.path} has no tokenizer files; cannot decode ids to text.")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def logits(self, ids) -> np.ndarray:
        """ids int [B, T] or [T] -> float32 logits [B, T, V] (all layers full attention, no cache)."""
        tokens = as_batch(ids, self.config.vocab_size)
        return np.asarray(forward(self.params, tokens, default_positions(tokens), self.config))

    def perplexity(self, ids, max_tokens: int | None = None) -> dict:
        """{"ppl", "nll", "tokens"}: mean NLL over the predicted tokens (all but the first) of one sequence."""
        limit = max_tokens or self.config.max_position_embeddings
        tokens = as_batch(ids, self.config.vocab_size)[:, :limit]
        if tokens.shape[0] != 1 or tokens.shape[1] < 2:
            raise LtJaxError(f"perplexity needs one sequence of at least 2 tokens; got shape {tokens.shape}.")
        nll = float(jnp.mean(token_nll(self.params, tokens, self.config)))
        return {"ppl": float(np.exp(nll)), "nll": nll, "tokens": int(tokens.shape[1] - 1)}

    def greedy(self, ids, max_new_tokens: int) -> list[int]:
        """Greedy continuation of one sequence without a KV cache: one compiled forward over a fixed-length
        buffer, reused every step (causality makes the unfilled tail irrelevant)."""
        prompt = np.asarray(as_batch(ids, self.config.vocab_size))
        if prompt.shape[0] != 1:
            raise LtJaxError("greedy takes one sequence.")
        T = prompt.shape[1]
        buf = np.zeros((1, T + max_new_tokens), np.int32)
        buf[:, :T] = prompt
        positions = default_positions(buf)
        eos = set(self.config.eos_token_ids)
        out = []
        for t in range(T - 1, T - 1 + max_new_tokens):
            logits = forward(self.params, jnp.asarray(buf), positions, self.config)
            nxt = int(jnp.argmax(logits[0, t]))
            out.append(nxt)
            if nxt in eos:
                break
            buf[0, t + 1] = nxt
        return out


def load(path: str | Path, dtype: str | None = None) -> Model:
    """A converted lt-jax checkpoint, an HF model directory (converted in memory), or an asset name
    (`smollm2`, `qwen2.5-coder`: fetched and converted on first use)."""
    from checkpoints_conv import is_checkpoint, load_checkpoint, read_hf_config, read_hf_params
    from lt_jax import assets

    path = assets.resolve_model(path)
    if is_checkpoint(path):
        cfg, params = load_checkpoint(path)
        if dtype and dtype != cfg.dtype:
            cfg = cfg.replace(dtype=dtype)
            params = jax.tree.map(lambda a: np.asarray(a).astype(jnp.dtype(dtype)), params)
    elif (path / "config.json").exists():
        cfg = read_hf_config(path, dtype or "float32")
        params = read_hf_params(path, cfg)
    else:
        raise LtJaxError(f"{path} is neither an lt-jax checkpoint nor a Hugging Face model directory.")
    return Model(cfg, params, _tokenizer(path), path)


def _tokenizer(path: Path):
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)
