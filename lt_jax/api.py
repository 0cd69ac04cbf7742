"""The small facade users call: `lt_jax.load(path)` -> Model with `.logits`, `.perplexity`, `.generate`,
`.lazy_ratios`, and for harnesses that run many plans on one prompt `.prefill` (once) and `.generate_from` (under
each plan)."""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax import calibration, sharding
from lt_jax.batching import as_batch, bucket, left_pad
from lt_jax.cache import KVCache, init_cache, restrict
from lt_jax.config import DTYPES, Config
from lt_jax.errors import LtJaxError
from lt_jax.inference import Sampling, generate_loop, prefill
from lt_jax.model import default_positions, forward, forward_masked, streaming_shape
from lt_jax.params import LAYERS, default_layers, split_layers, stack_layers
from lt_jax.plan import (DEFAULT_SINK, DEFAULT_W_LAST, DEFAULT_WINDOW, LayerPlan, Plan, PlanShape, make_plan,
                         override)


@partial(jax.jit, static_argnames=("cfg", "shape"))
def token_nll(params, tokens, layers: LayerPlan, cfg: Config, prefix=None, shape: PlanShape | None = None):
    """-log p(tokens[:, t] | tokens[:, :t]) for t >= 1 under a plan (as data): float32 [B, T-1]. Reduced inside
    jit: no [T, V] to host. `shape`: `model.streaming_shape` (lazy layers in O(T (S + W)); None: the dense form,
    which a prefix needs)."""
    logits = forward_masked(params, tokens, default_positions(tokens), layers, cfg, prefix, shape=shape)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


@dataclasses.dataclass
class Prefilled:
    """What `Model.prefill` leaves: the last column's logits [B, V], the filled cache, the plan decode runs with
    (fixed: a selecting plan's choice) as `Plan` and as data, and the lazy ratios [B, L] (mean over query heads;
    None unless the plan measured them). Generating from it donates the cache unless another plan restricts it."""
    logits: jax.Array
    cache: KVCache
    plan: Plan
    layers: LayerPlan
    ratios: np.ndarray | None


class Model:
    def __init__(self, config: Config, params, tokenizer=None, path: Path | None = None,
                 default_plan: Plan | None = None, mesh=None, rules=None, layers: str | None = None):
        self.config = config
        # Where the model runs: None (one device), or the part of a mesh this process addresses (lt_jax.sharding)
        self.mesh = None if mesh is None else sharding.local_mesh(sharding.make_mesh(mesh))
        self.rules = sharding.RULES if rules is None else tuple(rules)
        # How the layers are stored, which decides how decode runs them (`params.default_layers`)
        self.layers = _layers(layers)
        split = self.layers == "split"
        if self.mesh is not None:
            self.params = sharding.place_params(params, config, self.mesh, self.rules, split=split)
        else:
            self.params = split_layers(params) if split else jax.device_put(stack_layers(params))
        self.tokenizer = tokenizer
        self.path = path
        # What plan=None means: a trained hybrid's training plan (stored with its checkpoint), else all full
        self.default_plan = None if default_plan is None else default_plan.validate(config, "the model's default plan")

    @property
    def label(self) -> str:
        """The model's name in results files (`lt_jax.assets.label`)."""
        from lt_jax import assets
        return assets.label(self.path) if self.path is not None else "in-memory"

    def __repr__(self):
        c = self.config
        return f"Model({c.arch}, {c.num_layers} layers, D={c.dim}, {c.dtype}, path={self.path})"

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise LtJaxError(f"model {self.path} has no tokenizer files; pass token ids instead of text.")
        if not isinstance(text, str):
            raise LtJaxError(f"encode takes a str; got {type(text).__name__}.")
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def chat_ids(self, text: str) -> list[int]:
        """The prompt wrapped in the model's chat template, ready for generation."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise LtJaxError(f"model {self.path} has no chat template (tokenizer_config.json names none).")
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            raise LtJaxError(f"model {self.path} has no tokenizer files; cannot decode ids to text.")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def plan(self, plan: Plan | str | None = None, **flags) -> Plan:
        """A Plan from a Plan, a spec (`full`, `streaming`, `first`, `last`, `random[:SEED]`, `lighttransfer`,
        `retrieval-aware[:PROBE|:FILE]`, `loss-guided[:PROBE|:FILE]` (read the calibration `lt-jax calibrate` saved
        next to the checkpoint), `periodic[:OFFSET]`, a
        .json path), or None: the model's default plan (a trained hybrid's training plan; otherwise every layer
        full); flags: lazy_fraction, sink, window, preset, prefill, w_last, protect."""
        if isinstance(plan, Plan):
            return plan.validate(self.config)
        flags = {k: v for k, v in flags.items() if v is not None}
        if plan is not None and (found := calibration.for_plan(self.path, plan, self.config)) is not None:
            flags["calibration"] = found
        if plan is None and self.default_plan is not None:
            flags.pop("lazy_fraction", None)  # the stored plan fixes its layers; S, W and the prefill may change
            flags.pop("protect", None)
            return override(self.default_plan, **flags).validate(self.config)
        return make_plan(plan or "full", self.config, **flags)

    def logits(self, ids, plan: Plan | str | None = None, prefix: int | None = None) -> np.ndarray:
        """ids int [B, T] or [T] -> float32 logits [B, T, V]. With no prefix every layer uses its plan's mask over
        the whole sequence (hybrid); with prefix=N, positions < N are an exact prefill and positions >= N are
        scored as decode steps would score them."""
        tokens = as_batch(ids, self.config.vocab_size)
        if prefix is not None and not 1 <= prefix <= tokens.shape[1]:
            raise LtJaxError(f"prefix={prefix} must lie in 1..{tokens.shape[1]} for a sequence of {tokens.shape[1]} "
                             f"tokens.")
        plan, _ = self.select(tokens[:, :prefix], plan)
        return np.asarray(forward(self.params, self.rows(tokens), self.rows(default_positions(tokens)), self.config,
                                  plan, prefix))

    def select(self, ids, plan: Plan | str | None = None, **flags) -> tuple[Plan, np.ndarray | None]:
        """(fixed plan, ratios): `plan` itself and None, or for `lighttransfer` the lazy layers its priority queue
        picks during an exact prefill of these prompts (one set per batch, from the row-averaged ratios) and
        those ratios [L]."""
        plan = self.plan(plan, **flags)
        if not plan.per_prompt:
            return plan, None
        rows = self.prompt_rows(ids)
        done = self.prefill(rows, plan, bucket(max(len(r) for r in rows)))
        return done.plan, done.ratios.mean(axis=0)

    def lazy_ratios(self, ids, sink: int = DEFAULT_SINK, window: int = DEFAULT_WINDOW, w_last: int = DEFAULT_W_LAST,
                    per_head: bool = False) -> np.ndarray:
        """Every layer's lazy ratio for one prompt ([L], or [L, N] per query head) or a batch of prompts of any
        lengths ([B, L] or [B, L, N]): the attention mass of the last `w_last` queries on the first `sink` and last
        `window` positions of the prompt, from one exact prefill whose caches are all rings (little memory)."""
        rows = self.prompt_rows(ids)
        plan = Plan(self.config.num_layers, sink=sink, window=window, select_lazy=self.config.num_layers,
                    w_last=w_last, source="lazy_ratios").validate(self.config)
        _, _, _, ratios = self._prefill(rows, plan, bucket(max(len(r) for r in rows)))
        ratios = np.asarray(ratios).transpose(1, 0, 2)  # [B, L, N]
        ratios = ratios if per_head else ratios.mean(axis=-1)
        return ratios[0] if _is_single(ids) else ratios

    def prefill(self, prompts, plan: Plan | str | None = None, max_len: int | None = None, **plan_flags) -> Prefilled:
        """Prefill prompts (as `generate` takes them) into a fresh cache of `max_len` slots (default: the prompt's
        bucket) under `plan`, once; then `generate_from` decodes from it, under this plan or, if this one keeps
        every layer full with an exact prefill (e.g. `Plan(L, select_lazy=0)`, which also measures every ratio),
        under any other plan. Rows are left padded into one bucketed batch."""
        plan = self.plan(plan, **plan_flags)
        rows = self.prompt_rows(prompts)
        longest = max(len(r) for r in rows)
        logits, cache, layers, ratios = self._prefill(rows, plan, max_len or bucket(longest))
        if not plan.per_prompt:
            return Prefilled(logits, cache, plan, layers, None)
        return Prefilled(logits, cache, plan.resolve(layers.lazy_layers), layers, np.asarray(ratios).mean(axis=-1).T)

    def empty_cache(self, plan: Plan, batch: int, max_len: int) -> KVCache:
        """A fresh cache of `batch` rows and `max_len` places for `plan`'s shape, placed where the model runs (on a
        mesh: made in its shards, rows over `data`, KV heads over `model` where they divide, or copied up to
        `model` where that splits the query heads: `sharding.cache_kv_heads`)."""
        make = partial(init_cache, self.config, plan, batch, max_len,
                       sharding.cache_kv_heads(self.config, self.mesh, self.rules))
        if self.mesh is None:
            return make()
        shardings = sharding.cache_shardings(jax.eval_shape(make), self.mesh, self.rules)
        return jax.jit(make, out_shardings=shardings)()

    def rows(self, array) -> jax.Array:
        """A host batch (first axis = rows) on the device, or on a mesh split over `data` where the rows divide."""
        array = np.asarray(array)
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, sharding.rows_sharding(self.mesh, array.shape, self.rules))

    def _prefill(self, rows: list[list[int]], plan: Plan, max_len: int):
        context = self.config.max_position_embeddings
        tokens, positions = left_pad(rows, min(bucket(max(len(r) for r in rows)), context))
        cache = self.empty_cache(plan, len(rows), max_len)
        return prefill(self.params, self.rows(tokens), self.rows(positions), cache,
                       plan.prefill_layers(self.config), self.config, plan.shape)

    def generate_from(self, prefilled: Prefilled, plan: Plan | str | None = None, sampling: Sampling | None = None,
                      **plan_flags) -> list[dict]:
        """Decode from a `prefill`: under its own plan (plan None; its cache is donated, so only once), or under
        another plan from an all-full exact prefill, whose cache is then copied and restricted to the plan
        (`cache.restrict`; `lighttransfer` takes the top of the ratios that prefill measured), so one prefill
        serves every plan. Returns what `generate` returns."""
        sampling = sampling or Sampling()
        if plan is None:
            plan, cache, layers = prefilled.plan, prefilled.cache, prefilled.layers
        else:
            plan = self.plan(plan, **plan_flags)
            base = prefilled.plan
            if base.lazy_layers or base.prefill != "exact" or plan.prefill != "exact":
                raise LtJaxError("generate_from under another plan needs an all-full exact prefill and a plan with "
                                 "an exact prefill.")
            if plan.per_prompt:
                if prefilled.ratios is None:
                    raise LtJaxError("a lighttransfer plan needs a prefill that measured the lazy ratios "
                                     "(Plan(num_layers, select_lazy=0)).")
                measured = {k: getattr(base, k) for k in ("sink", "window", "w_last")}
                wanted = {k: getattr(plan, k) for k in measured}
                if measured != wanted:
                    raise LtJaxError(f"plan {plan.source} selects from the ratios of {_settings(wanted)}, but the "
                                     f"prefill measured them with {_settings(measured)}; prefill with "
                                     f"Plan(num_layers, select_lazy=0, {_settings(wanted)}).")
                plan = plan.choose(prefilled.ratios.mean(axis=0))
            cache, layers = restrict(prefilled.cache, plan), plan.layers(self.config)
        out, counts, _ = generate_loop(self.params, prefilled.logits, cache, layers,
                                       sampling.prepared(self.config.eos_token_ids), self.config, plan.shape.decoding)
        out, counts = np.asarray(out), np.asarray(counts)
        results = []
        for b in range(out.shape[0]):
            ids = [int(t) for t in out[b, :counts[b]]]
            results.append({"ids": ids, "text": self.decode(ids) if self.tokenizer is not None else None,
                            "plan": plan})
        return results

    def token_nll(self, ids, plan: Plan | str | None = None, prefix=None) -> np.ndarray:
        """-log p(token t | tokens < t) for t >= 1: float32 [B, T-1], under a fixed plan (`logits`' prefix rule)."""
        plan = self.plan(plan)
        return np.asarray(token_nll(self.params, self.rows(as_batch(ids, self.config.vocab_size)),
                                    plan.layers(self.config), self.config, prefix, streaming_shape(plan, prefix)))

    def perplexity(self, ids, max_tokens: int | None = None, plan: Plan | str | None = None,
                   prefix: int | None = None) -> dict:
        """{"ppl", "nll", "tokens", "plan"}: mean NLL over the predicted tokens (all but the first; with prefix=N,
        the tokens at positions >= N) of one sequence, and the fixed plan used (lighttransfer: chosen on the
        prefix, or on the whole sequence without one, then also "lazy_ratios")."""
        context = self.config.max_position_embeddings
        if max_tokens is not None and not 1 <= max_tokens <= context:
            raise LtJaxError(f"max_tokens={max_tokens} must lie in 1..{context} (the model's context).")
        tokens = as_batch(ids, self.config.vocab_size)[:, :max_tokens or context]
        T = tokens.shape[1]
        if tokens.shape[0] != 1 or T < 2:
            raise LtJaxError(f"perplexity needs one sequence of at least 2 tokens; got shape {tokens.shape}.")
        if prefix is not None and not 1 <= prefix < T:
            raise LtJaxError(f"prefix={prefix} must lie in 1..{T - 1} for a sequence of {T} tokens.")
        plan, ratios = self.select(tokens[:, :prefix], plan)
        nll = self.token_nll(tokens, plan, prefix)[0]
        scored = nll[(prefix or 1) - 1:]
        mean = float(jnp.mean(scored))
        out = {"ppl": float(np.exp(mean)), "nll": mean, "tokens": int(scored.shape[0]), "plan": plan}
        return out if ratios is None else {**out, "lazy_ratios": [float(r) for r in ratios]}

    def generate(self, prompts, plan: Plan | str | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids=None, sampling: Sampling | None = None,
                 **plan_flags) -> list[dict]:
        """Continue one prompt or a batch: text, list of texts, ids [T], or a list of id lists (any lengths).
        Sampling settings come as keywords or as one `Sampling` (which then wins).

        Returns one dict per prompt: {"ids": generated ids, "text": decoded text or None, "plan": the fixed plan
        decoded with}, and for `lighttransfer` "lazy_ratios" (the row's ratio per layer; the lazy set is one per
        batch, from the row-averaged ratios). Rows are left padded into one batch; lengths are bucketed so prompts
        of the same bucket, whatever layers they choose, reuse one compilation."""
        plan = self.plan(plan, **plan_flags)
        rows = self.prompt_rows(prompts)
        sampling = (sampling or Sampling(max_new_tokens, temperature, top_k, top_p, seed,
                                         None if stop_ids is None else tuple(stop_ids))).check()
        longest = max(len(r) for r in rows)
        context = self.config.max_position_embeddings
        if longest + sampling.max_new_tokens > context:
            raise LtJaxError(f"a prompt of {longest} tokens plus max_new_tokens={sampling.max_new_tokens} exceeds "
                             f"the model's context of {context} tokens.")
        done = self.prefill(rows, plan, self.cache_len(longest, sampling.max_new_tokens))
        results = self.generate_from(done, sampling=sampling)
        if done.ratios is not None:
            for row, ratios in zip(results, done.ratios):
                row["lazy_ratios"] = [float(r) for r in ratios]
        return results

    def cache_len(self, prompt_len: int, max_new_tokens: int) -> int:
        """Slots of a full layer's cache for a generate call (bucketed, at most the model's context)."""
        return min(bucket(prompt_len + bucket(max_new_tokens)), self.config.max_position_embeddings)

    def greedy(self, ids, max_new_tokens: int) -> list[int]:
        """Greedy continuation of one sequence of ids (stops after EOS)."""
        return self.generate([list(np.asarray(ids).reshape(-1))], max_new_tokens=max_new_tokens)[0]["ids"]

    def prompt_rows(self, prompts) -> list[list[int]]:
        """Prompts as `generate` takes them (a text, ids, or a list of either) -> checked lists of token ids."""
        if _is_single(prompts):
            prompts = [prompts]
        rows = [self.encode(p) if isinstance(p, str) else list(np.asarray(p).reshape(-1)) for p in prompts]
        if not rows or any(len(r) == 0 for r in rows):
            raise LtJaxError("every prompt must hold at least one token.")
        if any(not isinstance(p, str) and np.ndim(p) != 1 for p in prompts):
            raise LtJaxError("each prompt must be a text or one sequence of token ids.")
        # integer ids in the vocabulary (1.5 is refused, not truncated)
        return [as_batch(np.asarray(r), self.config.vocab_size)[0].tolist() for r in rows]

    def generate_stream(self, prompts, plan: Plan | str | None = None, batch_size: int = 8, **kwargs):
        """Many prompts with continuous batching: yields one result per prompt as its row finishes (see
        `lt_jax.serving.generate_stream`: "index", "ids", "text", "plan", "finish_reason", "prompt_tokens",
        "lazy_ratios"). kwargs: sampling=Sampling(...), max_new_tokens (one or one per prompt), chunk, plan flags."""
        from lt_jax import serving
        return serving.generate_stream(self, prompts, plan, batch_size=batch_size, **kwargs)


def _settings(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _is_single(prompts) -> bool:
    """One text or one sequence of ids (rather than a batch of them)."""
    return isinstance(prompts, str) or bool(len(prompts) and np.ndim(prompts[0]) == 0
                                            and not isinstance(prompts[0], str))


def _layers(layers: str | None) -> str:
    if layers is None:
        return default_layers(jax.default_backend())
    if layers not in LAYERS:
        raise LtJaxError(f"layers {layers!r} is not one of {', '.join(LAYERS)}.")
    return layers


def load(path: str | Path, dtype: str | None = None, mesh=None, rules=None, layers: str | None = None) -> Model:
    """A converted lt-jax checkpoint, an HF model directory (converted in memory), or an asset name
    (`smollm2`, `qwen2.5-coder`: fetched and converted on first use). `mesh`: a `jax.sharding.Mesh` or
    "data=2,model=4" (lt_jax.sharding); a checkpoint is then restored straight into its shards. `rules`: the
    logical-to-mesh rules (default `lt_jax.sharding.RULES`). `dtype`: "float32" or "bfloat16", the dtype of the
    weights and of the KV cache (softmax, lazy ratios and logits stay float32); default: the checkpoint's own, or
    float32 for an HF directory. `layers`: "split" (per-layer buffers; decode unrolls the layers) or "stacked"
    (decode scans one layer body); default: the platform's (`lt_jax.params.default_layers`: stacked on TPU)."""
    _layers(layers)
    if dtype is not None and dtype not in DTYPES:
        raise LtJaxError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    from checkpoints_conv import default_plan_json, is_checkpoint, load_checkpoint, read_hf_config, read_hf_params
    from lt_jax import assets

    path = assets.resolve_model(path)
    stored_plan = default_plan_json(path)
    mesh = None if mesh is None else sharding.local_mesh(sharding.make_mesh(mesh))
    rules = sharding.RULES if rules is None else tuple(rules)
    if is_checkpoint(path):
        cfg, params = load_checkpoint(path, None if mesh is None else partial(
            sharding.param_shardings, mesh=mesh, rules=rules))
        if dtype and dtype != cfg.dtype:
            cfg = cfg.replace(dtype=dtype)
            params = jax.tree.map(lambda a: a.astype(jnp.dtype(dtype)), params)  # numpy, or jax arrays in their shards
    elif (path / "config.json").exists():
        cfg = read_hf_config(path, dtype or "float32")
        params = read_hf_params(path, cfg)
    else:
        raise LtJaxError(f"{path} is neither an lt-jax checkpoint nor a Hugging Face model directory.")
    default = None if stored_plan is None else Plan.from_text(stored_plan, cfg, f"the plan stored with {path}")
    if mesh is not None:  # nobody else holds the restored tree: each stacked leaf is freed once placed
        params = sharding.place_params(params, cfg, mesh, rules, consume=True, split=_layers(layers) == "split")
    return Model(cfg, params, _tokenizer(path), path, default, mesh, rules, layers)


def _tokenizer(path: Path):
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)
