"""LightTransfer-Train's step (docs/design.md §13): the causal-LM loss of the hybrid, whose streaming layers see
only their S sinks and last W keys in training as in inference, and one AdamW update through optax.

- `loss_fn(params, batch, cfg, plan)`: the mean next-token NLL over the labelled tokens, transformers' convention
  (labels aligned with the tokens, shifted inside, -100 ignored). Pure: jit, grad and vmap through it.
- `train_step(state, batch, layers, cfg, settings)`: jitted, the state donated; `make_step(cfg, settings, plan)`
  binds everything but (state, batch). The plan enters as data (`LayerPlan`) and the settings are static and
  hashable, so runs with other plans of the same lazy count reuse the compilation.

The forward is `model.decoder` with `attention.attend_layer`'s streaming form: streaming layers in O(T (S + W))
in the forward and, being a scan over query blocks, in the backward pass too; full layers through
`attend_causal`. The layer loop is a scan, with `remat` each layer is recomputed in the backward pass
(`jax.checkpoint`).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import optax

from lt_jax.attention import attend_layer, layer_kinds, native_window
from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.model import decoder, default_positions, unembed
from lt_jax.plan import DEFAULT_SINK, DEFAULT_WINDOW, LayerPlan, Plan, PlanShape
from lt_jax.train.lora import init_lora, merge

IGNORE = -100  # a label that is not predicted (transformers' ignore_index)
TRAINABLE = ("all", "attention", "mlp", "lazy-layers", "lazy-attention")
ATTENTION_LEAVES = ("qkv_proj", "qkv_bias", "o_proj")
MLP_LEAVES = ("gate_up_proj", "down_proj")
NO_DECAY = ("attn_norm", "mlp_norm", "final_norm", "qkv_bias")  # norm scales and biases: no weight decay


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything static about a run's step (hashable: a jit static argument). `steps` sizes the schedule."""
    steps: int = 200
    lr: float = 1e-5
    warmup: int = 0
    schedule: str = "cosine"  # "cosine" (to 10 % of lr at the last step) | "constant"
    weight_decay: float = 0.0
    clip: float = 1.0  # global gradient norm; 0 = no clipping
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    trainable: str = "all"  # one of TRAINABLE
    compute_dtype: str = "float32"  # master weights stay float32; "bfloat16" runs the forward in bfloat16
    remat: bool = False
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on the projections instead of the weights
    lora_alpha: float = 0.0  # the adapters' scale is alpha / rank (0: alpha = rank, scale 1)
    num_lazy: int = 0  # the plan's shape: lazy count, S, W (which layers are lazy is data)
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW

    def check(self) -> "TrainSettings":
        if self.trainable not in TRAINABLE:
            raise LtJaxError(f"trainable={self.trainable!r}; expected one of {', '.join(TRAINABLE)}.")
        if self.schedule not in ("cosine", "constant"):
            raise LtJaxError(f"schedule={self.schedule!r}; expected cosine or constant.")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise LtJaxError(f"compute dtype {self.compute_dtype!r}; expected float32 or bfloat16.")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise LtJaxError(f"lora rank {self.lora_rank} and alpha {self.lora_alpha} must be >= 0.")
        if self.steps < 1 or self.warmup < 0 or self.lr <= 0 or self.clip < 0 or self.weight_decay < 0:
            raise LtJaxError(f"need steps >= 1, warmup >= 0, lr > 0, clip >= 0, weight_decay >= 0; got steps="
                             f"{self.steps}, warmup={self.warmup}, lr={self.lr}, clip={self.clip}, "
                             f"weight_decay={self.weight_decay}.")
        return self

    @property
    def lora_scale(self) -> float:
        return (self.lora_alpha or self.lora_rank) / max(self.lora_rank, 1)

    @property
    def shape(self) -> PlanShape:
        return PlanShape(self.num_lazy, self.sink, self.window, prefill="hybrid")

    @classmethod
    def for_plan(cls, plan: Plan, **settings) -> "TrainSettings":
        if plan.per_prompt:
            raise LtJaxError("training needs fixed lazy layers, not a per-prompt choice: write a plan with "
                             "`lt-jax identify` (LightTransfer-Train's offline selection) and train with it.")
        return cls(num_lazy=len(plan.lazy_layers), sink=plan.sink, window=plan.window, **settings).check()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: dict  # float32 master weights, layers stacked [L, ...]; with LoRA {"base": those, "lora": adapters}
    opt_state: optax.OptState


def model_weights(params, settings: TrainSettings):
    """The model's weights from a state's params: the params themselves, or with LoRA the base with the adapters
    merged in. Frozen leaves (the LoRA base among them) sit behind stop_gradient: no gradient is computed for
    them, and theirs is exactly zero."""
    labels = leaf_labels(params, settings.trainable)
    params = jax.tree.map(lambda p, lab: jax.lax.stop_gradient(p) if lab == "frozen" else p, params, labels)
    if not settings.lora_rank:
        return params
    return merge(params["base"], params["lora"], settings.lora_scale)


def hidden_states(params, tokens, positions, is_lazy, cfg: Config, shape: PlanShape, remat: bool = False):
    """The decoder under a fixed plan with the streaming mask everywhere (what the hybrid computes over a whole
    sequence): [B, T, D] before the final norm. is_lazy bool [L] is data."""
    kinds = layer_kinds(shape.num_lazy, cfg.num_layers)

    def attention(q, k, v, lazy, _):
        # tiled=False: the flash-style path's loop bound is traced, which reverse-mode cannot differentiate.
        # Without layer remat attention is still recomputed in the backward pass (checkpoint): its residuals
        # (the score blocks) are most of a step's memory, and under grad `cond` would keep both branches'.
        return attend_layer(q, k, v, positions, lazy, shape.sink, shape.window, native_window(cfg), kinds,
                            tiled=False, checkpoint=not remat), None, None

    x, _, _ = decoder(params, tokens, positions, cfg, attention, jnp.asarray(is_lazy), head=None, remat=remat)
    return x


def loss_terms(params, batch, is_lazy, cfg: Config, shape: PlanShape, remat: bool = False,
               compute_dtype: str = "float32"):
    """(sum of the NLL over labelled tokens, their count): sums, so micro-batches add up to the whole batch's
    mean exactly. batch: {"tokens" int [B, T], "labels" int [B, T] (IGNORE where not predicted), optionally
    "positions" [B, T] (left padding -1; default 0..T-1)}. Only real positions predict: a left-padded row's first
    token is not a target, whatever its label."""
    tokens = batch["tokens"]
    positions = batch.get("positions")
    positions = default_positions(tokens) if positions is None else positions
    if compute_dtype != "float32":
        params = jax.tree.map(lambda a: a.astype(compute_dtype), params)
    x = hidden_states(params, tokens, positions, is_lazy, cfg, shape, remat)
    logits = unembed(params, x[:, :-1], cfg)  # float32 [B, T-1, V]; token t predicts label t + 1
    labels = batch["labels"][:, 1:]
    valid = (labels != IGNORE) & (positions[:, :-1] >= 0)  # a row's first token has no real predecessor
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def loss_fn(params, batch, cfg: Config, plan: Plan | None = None, remat: bool = False,
            compute_dtype: str = "float32"):
    """Mean next-token NLL of the labelled tokens under a fixed plan (None: every layer full), as transformers'
    causal-LM loss computes it. params: stacked layers (`lt_jax.params.stack_layers`) or per-layer."""
    plan = plan or Plan.full(cfg.num_layers)
    total, count = loss_terms(params, batch, plan.layers(cfg).is_lazy, cfg, plan.shape, remat, compute_dtype)
    return total / jnp.maximum(count, 1)


def schedule(settings: TrainSettings) -> optax.Schedule:
    lr, warmup = settings.lr, settings.warmup
    if settings.schedule == "constant":
        return optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(settings.steps, warmup + 1), end_value=0.1 * lr)


def _where(path) -> tuple[str, bool, str]:
    """(part: "base" | "lora" | "", whether the leaf is a layer leaf, the weight's name) of a state leaf."""
    keys = [p.key for p in path]
    part = keys[0] if keys[0] in ("base", "lora") else ""
    keys = [k for k in keys[1 if part else 0:] if k not in ("a", "b")]
    return part, keys[0] == "layers", keys[-1]


def leaf_labels(params, trainable: str):
    """"train" / "frozen" per leaf: which leaves the optimizer touches at all (with LoRA: adapters only)."""
    def label(path, _):
        part, in_layers, name = _where(path)
        if part == "base":
            return "frozen"
        if trainable in ("attention", "lazy-attention"):
            return "train" if name in ATTENTION_LEAVES else "frozen"
        if trainable == "mlp":
            return "train" if name in MLP_LEAVES else "frozen"
        if trainable == "lazy-layers":
            return "train" if in_layers else "frozen"
        return "train"
    return jax.tree_util.tree_map_with_path(label, params)


def layer_mask(params, is_lazy, trainable: str):
    """Per leaf a float32 multiplier on gradients and updates: 1, or for the lazy-* choices [L, 1, ...] picking
    the lazy layers of a stacked leaf (which layers: data)."""
    def mask(path, a):
        if trainable.startswith("lazy-") and _where(path)[1]:
            return jnp.asarray(is_lazy, jnp.float32).reshape((-1,) + (1,) * (a.ndim - 1))
        return jnp.ones((), jnp.float32)
    return jax.tree_util.tree_map_with_path(mask, params)


def optimizer(settings: TrainSettings, params) -> optax.GradientTransformation:
    """Clip (global norm over the trained leaves), then AdamW (no decay on norms and biases); frozen leaves get
    zero updates and no optimizer state."""
    decays = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: _where(path)[2] not in NO_DECAY, p)  # noqa
    adamw = optax.adamw(schedule(settings), settings.b1, settings.b2, settings.eps,
                        weight_decay=settings.weight_decay, mask=decays)
    train = optax.chain(optax.clip_by_global_norm(settings.clip), adamw) if settings.clip else adamw
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()},
                                 leaf_labels(params, settings.trainable))


def init_state(params, settings: TrainSettings, seed: int = 0) -> TrainState:
    """Float32 master weights (stacked layers), LoRA adapters if asked (seeded), a fresh optimizer state."""
    from lt_jax.params import stack_layers
    # a copy, always: the step donates the state, and the caller's arrays (a Model's) must survive it
    params = jax.tree.map(lambda a: jnp.array(a, jnp.float32, copy=True), stack_layers(params))
    if settings.lora_rank:
        params = {"base": params, "lora": init_lora(params, settings.lora_rank, seed)}
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer(settings, params).init(params))


def gradients(params, batch, is_lazy, cfg: Config, settings: TrainSettings):
    """Gradient of the mean NLL over every labelled token of a batch [A, B, T] of A micro-batches (gradient
    accumulation: their sums are added, then divided once by the total count, so the result equals one batch of
    A*B rows). Returns (grads, mean loss, labelled token count)."""
    terms = jax.value_and_grad(lambda p, *a: loss_terms(model_weights(p, settings), *a), has_aux=True)

    def micro(acc, mb):
        (total, count), g = terms(params, mb, is_lazy, cfg, settings.shape, settings.remat, settings.compute_dtype)
        return jax.tree.map(jnp.add, acc, (g, total, count)), None

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (grads, total, count), _ = jax.lax.scan(micro, zeros, batch)
    denominator = jnp.maximum(count, 1).astype(jnp.float32)
    return jax.tree.map(lambda g: g / denominator, grads), total / denominator, count


@partial(jax.jit, static_argnames=("cfg", "settings"), donate_argnames=("state",))
def train_step(state: TrainState, batch, layers: LayerPlan, cfg: Config, settings: TrainSettings):
    """One optimizer update from a batch {"tokens", "labels"[, "positions"]} of int32 [A, B, T] (A micro-batches).
    Returns (state, metrics: loss, grad_norm (before clipping, trained entries only), lr, tokens)."""
    mask = layer_mask(state.params, layers.is_lazy, settings.trainable)
    grads, loss, count = gradients(state.params, batch, layers.is_lazy, cfg, settings)
    grads = jax.tree.map(jnp.multiply, grads, mask)
    tx = optimizer(settings, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u, m: (u * m).astype(u.dtype), updates, mask)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(settings)(state.step),
               "tokens": count}
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), metrics


@partial(jax.jit, static_argnames=("cfg", "settings"))
def eval_terms(params, batch, layers: LayerPlan, cfg: Config, settings: TrainSettings):
    """(NLL sum, count) of a batch [B, T] under the plan: held-out loss without a gradient."""
    return loss_terms(model_weights(params, settings), batch, layers.is_lazy, cfg, settings.shape, False,
                      settings.compute_dtype)


def make_step(cfg: Config, settings: TrainSettings, plan: Plan):
    """`step(state, batch) -> (state, metrics)`: `train_step` with the plan and static settings bound (the same
    compiled function for every plan of this lazy count)."""
    return partial(train_step, layers=plan.layers(cfg), cfg=cfg, settings=settings)


def host_metrics(metrics) -> dict:
    return {k: (int(v) if k == "tokens" else float(v)) for k, v in jax.device_get(metrics).items()}


__all__ = ["IGNORE", "TRAINABLE", "TrainSettings", "TrainState", "eval_terms", "gradients", "hidden_states",
           "init_state", "loss_fn", "loss_terms", "make_step", "model_weights", "optimizer", "schedule", "train_step"]

