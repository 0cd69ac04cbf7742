"""The small facade users call: `lt_jax.load(path)` -> Model with `.logits`, `.perplexity`, `.generate`,
`.lazy_ratios`."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.cache import init_cache
from lt_jax.inference import Shape, generate_loop, plan_arrays, prefill
from lt_jax.model import default_positions, forward, forward_masked
from lt_jax.params import serving_params
from lt_jax.plan import Plan, make_plan


@partial(jax.jit, static_argnames=("cfg",))
def token_nll(params, tokens, layer_windows, cfg: Config, prefix=None):
    """-log p(tokens[:, t] | tokens[:, :t]) for t >= 1 under a plan's `layer_windows`: float32 [B, T-1]. Reduced
    inside jit: no [T, V] to host."""
    logits = forward_masked(params, tokens, default_positions(tokens), layer_windows, cfg, prefix)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def as_batch(ids, vocab_size: int) -> np.ndarray:
    """int32 numpy [B, T] (a single sequence [T] becomes [1, T]), checked against the vocabulary on the host
    (no device op, so checking never compiles anything)."""
    arr = np.asarray(ids)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise LtJaxError(f"ids must be a non-empty integer array [B, T] or [T]; got shape {arr.shape}, "
                         f"dtype {arr.dtype}.")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise LtJaxError(f"token ids must lie in 0..{vocab_size - 1}; got {arr.min()}..{arr.max()}.")
    return arr.astype(np.int32)


def bucket(n: int, step: int = 64) -> int:
    """Round a length up to the next power of two (at least `step`): few distinct shapes, few compilations."""
    return max(step, 1 << (max(n, 1) - 1).bit_length())


def left_pad(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> (tokens, positions) int32 [B, width], right-aligned; padding has token 0 and position -1."""
    tokens = np.zeros((len(rows), width), np.int32)
    positions = np.full((len(rows), width), -1, np.int32)
    for b, r in enumerate(rows):
        tokens[b, width - len(r):] = r
        positions[b, width - len(r):] = np.arange(len(r))
    return tokens, positions


class Model:
    def __init__(self, config: Config, params, tokenizer=None, path: Path | None = None):
        self.config = config
        self.params = serving_params(params)  # per-layer fused buffers: decode reads each weight in place
        self.tokenizer = tokenizer
        self.path = path

    def __repr__(self):
        c = self.config
        return f"Model({c.arch}, {c.num_layers} layers, D={c.dim}, {c.dtype}, path={self.path})"

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise LtJaxError(f"model {self.path} has no tokenizer files; pass token ids instead of text.")
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def chat_ids(self, text: str) -> list[int]:
        """The prompt wrapped in the model's chat template, ready for generation."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise LtJaxError(f"model {self.path} has no chat template; drop --chat.")
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            raise LtJaxError(f"model {self.path} has no tokenizer files; cannot decode ids to text.")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def plan(self, plan: Plan | str | None = None, **flags) -> Plan:
        """A Plan from a Plan, a spec (`full`, `streaming`, `first`, `last`, `random[:SEED]`, `lighttransfer`, a
        .json path), or None (all layers full); flags: lazy_fraction, sink, window, preset, prefill, w_last."""
        if isinstance(plan, Plan):
            return plan.validate(self.config)
        return make_plan(plan or "full", self.config, **{k: v for k, v in flags.items() if v is not None})

    def logits(self, ids, plan: Plan | str | None = None, prefix: int | None = None) -> np.ndarray:
        """ids int [B, T] or [T] -> float32 logits [B, T, V]. With no prefix every layer uses its plan's mask over
        the whole sequence (hybrid); with prefix=N, positions < N are an exact prefill and positions >= N are
        scored as decode steps would score them."""
        tokens = as_batch(ids, self.config.vocab_size)
        plan, _ = self.select(tokens[:, :prefix], plan)
        return np.asarray(forward(self.params, tokens, default_positions(tokens), self.config, plan, prefix))

    def select(self, ids, plan: Plan | str | None = None, **flags) -> tuple[Plan, np.ndarray | None]:
        """(fixed plan, ratios): `plan` itself and None, or for `lighttransfer` the lazy layers its priority queue
        picks during an exact prefill of these prompts (one set per batch, from the row-averaged ratios) and
        those ratios [L]."""
        plan = self.plan(plan, **flags)
        if plan.select_lazy is None:
            return plan, None
        rows = self._prompt_rows(ids)
        _, _, layers = self.prefill_rows(rows, plan, bucket(max(len(r) for r in rows)))
        plan, ratios = _chosen(plan, layers)
        return plan, ratios.mean(axis=0)

    def lazy_ratios(self, ids, sink: int = 4, window: int = 1020, w_last: int = 32,
                    per_head: bool = False) -> np.ndarray:
        """Every layer's lazy ratio for one prompt ([L], or [L, N] per query head) or a batch of prompts of any
        lengths ([B, L] or [B, L, N]): the attention mass of the last `w_last` queries on the first `sink` and last
        `window` positions of the prompt, from one exact prefill whose caches are all rings (little memory)."""
        rows = self._prompt_rows(ids)
        plan = Plan(self.config.num_layers, sink=sink, window=window, select_lazy=self.config.num_layers,
                    w_last=w_last, source="lazy_ratios").validate(self.config)
        _, _, layers = self.prefill_rows(rows, plan, bucket(max(len(r) for r in rows)))
        ratios = np.asarray(layers["ratios"]).transpose(1, 0, 2)  # [B, L, N]
        ratios = ratios if per_head else ratios.mean(axis=-1)
        return ratios[0] if _is_single(ids) else ratios

    def prefill_rows(self, rows: list[list[int]], plan: Plan, max_len: int):
        """Left-pad rows into one bucketed batch and prefill a fresh cache of max_len slots under `plan`."""
        context = self.config.max_position_embeddings
        tokens, positions = left_pad(rows, min(bucket(max(len(r) for r in rows)), context))
        cache = init_cache(self.config, plan, len(rows), max_len)
        return prefill(self.params, jnp.asarray(tokens), jnp.asarray(positions), cache, plan_arrays(plan),
                       self.config, Shape.of(plan))

    def perplexity(self, ids, max_tokens: int | None = None, plan: Plan | str | None = None,
                   prefix: int | None = None) -> dict:
        """{"ppl", "nll", "tokens", "plan"}: mean NLL over the predicted tokens (all but the first; with prefix=N,
        the tokens at positions >= N) of one sequence, and the fixed plan used (lighttransfer: chosen on the
        prefix, or on the whole sequence without one, then also "lazy_ratios")."""
        limit = max_tokens or self.config.max_position_embeddings
        tokens = as_batch(ids, self.config.vocab_size)[:, :limit]
        T = tokens.shape[1]
        if tokens.shape[0] != 1 or T < 2:
            raise LtJaxError(f"perplexity needs one sequence of at least 2 tokens; got shape {tokens.shape}.")
        if prefix is not None and not 1 <= prefix < T:
            raise LtJaxError(f"--prefix {prefix} must lie in 1..{T - 1} for a sequence of {T} tokens.")
        plan, ratios = self.select(tokens[:, :prefix], plan)
        nll = token_nll(self.params, tokens, plan.layer_windows(self.config), self.config, prefix)[0]
        scored = nll[(prefix or 1) - 1:]
        mean = float(jnp.mean(scored))
        out = {"ppl": float(np.exp(mean)), "nll": mean, "tokens": int(scored.shape[0]), "plan": plan}
        return out if ratios is None else {**out, "lazy_ratios": [float(r) for r in ratios]}

    def generate(self, prompts, plan: Plan | str | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids=None, **plan_flags) -> list[dict]:
        """Continue one prompt or a batch: text, list of texts, ids [T], or a list of id lists (any lengths).

        Returns one dict per prompt: {"ids": generated ids, "text": decoded text or None, "plan": the fixed plan
        decoded with}, and for `lighttransfer` "lazy_ratios" (the row's ratio per layer; the lazy set is one per
        batch, from the row-averaged ratios). Rows are left padded into one batch; lengths are bucketed so prompts
        of the same bucket, whatever layers they choose, reuse one compilation."""
        plan = self.plan(plan, **plan_flags)
        rows = self._prompt_rows(prompts)
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        longest = max(len(r) for r in rows)
        context = self.config.max_position_embeddings
        if longest + max_new_tokens > context:
            raise LtJaxError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                             f"model's context of {context} tokens.")
        logits, cache, layers = self.prefill_rows(rows, plan, self.cache_len(longest, max_new_tokens))
        stop = list(self.config.eos_token_ids if stop_ids is None else stop_ids) or [-2]
        fixed = {"is_lazy": layers["is_lazy"], "index": layers["index"]}
        out, counts, _ = generate_loop(self.params, logits, cache, fixed, jnp.int32(max_new_tokens),
                                       jnp.asarray(stop, jnp.int32), jax.random.key(seed), jnp.float32(temperature),
                                       jnp.int32(top_k), jnp.float32(top_p), self.config, Shape.of(plan).decoding,
                                       bucket(max_new_tokens))
        out, counts = np.asarray(out), np.asarray(counts)
        plan, ratios = _chosen(plan, layers)
        results = []
        for b in range(len(rows)):
            ids = [int(t) for t in out[b, :counts[b]]]
            results.append({"ids": ids, "text": self.decode(ids) if self.tokenizer is not None else None,
                            "plan": plan})
            if ratios is not None:
                results[-1]["lazy_ratios"] = [float(r) for r in ratios[b]]
        return results

    def cache_len(self, prompt_len: int, max_new_tokens: int) -> int:
        """Slots of a full layer's cache for a generate call (bucketed, at most the model's context)."""
        return min(bucket(prompt_len + bucket(max_new_tokens)), self.config.max_position_embeddings)

    def greedy(self, ids, max_new_tokens: int) -> list[int]:
        """Greedy continuation of one sequence of ids (stops after EOS)."""
        return self.generate([list(np.asarray(ids).reshape(-1))], max_new_tokens=max_new_tokens)[0]["ids"]

    def _prompt_rows(self, prompts) -> list[list[int]]:
        if _is_single(prompts):
            prompts = [prompts]
        rows = [self.encode(p) if isinstance(p, str) else [int(t) for t in np.asarray(p).reshape(-1)]
                for p in prompts]
        if not rows or any(len(r) == 0 for r in rows):
            raise LtJaxError("every prompt must hold at least one token.")
        as_batch(np.concatenate([np.asarray(r) for r in rows]), self.config.vocab_size)  # range check
        return rows


def _is_single(prompts) -> bool:
    """One text or one sequence of ids (rather than a batch of them)."""
    return isinstance(prompts, str) or bool(len(prompts) and np.ndim(prompts[0]) == 0)


def _chosen(plan: Plan, layers: dict) -> tuple[Plan, np.ndarray | None]:
    """After a prefill under `plan`: the fixed plan it decoded with, and for a selecting plan every row's ratio per
    layer [B, L] (mean over query heads)."""
    if plan.select_lazy is None:
        return plan, None
    ratios = np.asarray(layers["ratios"]).mean(axis=-1).T
    return plan.resolve(np.flatnonzero(np.asarray(layers["is_lazy"]))), ratios


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
    if max_new_tokens < 1:
        raise LtJaxError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    if temperature < 0:
        raise LtJaxError(f"temperature={temperature} must be >= 0 (0 = greedy).")
    if top_k < 0:
        raise LtJaxError(f"top_k={top_k} must be >= 0 (0 = off).")
    if not 0 < top_p <= 1:
        raise LtJaxError(f"top_p={top_p} must lie in (0, 1].")


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
