"""Which layers are lazy (streaming attention: S sinks + a W-token window) and which keep full attention, in the
three forms code needs (docs/design.md §9, §10):

- `Plan`: what a user writes and reads (the JSON of a plan file); hashable. Of one of two kinds
  (`plan.per_prompt`): *fixed* (`lazy_layers` are the lazy layers) or *per-prompt* (LightTransfer-Test: the
  prefill chooses `select_lazy` lazy layers for each prompt, never a `protect`ed one); `validate` checks what
  every plan needs, then what its kind needs.
- `PlanShape` (`plan.shape`): the part that decides a compilation: how many layers are lazy, S, W, the prefill
  mode, whether the prefill selects the lazy layers, w_last. Never *which* layers.
- `LayerPlan` (`plan.layers(cfg)`): the per-layer data jitted code reads: is_lazy, the cache slot of the layer's
  kind, and the mask's sink/window per layer. A selecting prefill returns the LayerPlan it chose.
- `Selection` (`plan.prefill_layers(cfg)` of a selecting plan): what the selecting prefill reads as data, the
  layers it must keep full (a `retrieval-aware` plan's protected layers; none for `lighttransfer`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.attention import FULL
from lt_jax.lazy import lazy_set

DEFAULT_SINK, DEFAULT_WINDOW, DEFAULT_W_LAST = 4, 1020, 32
PREFILL_MODES = ("exact", "hybrid")
PRESETS = {"lighttrans-code": (129, 1025)}  # the released LightTransfer training mask: S=129, W=1025


@dataclasses.dataclass(frozen=True)
class Plan:
    num_layers: int
    lazy_layers: tuple[int, ...] = ()
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW
    source: str = "full"
    prefill: str = "exact"  # "exact": full attention over the prompt in every layer; "hybrid": each layer's mask
    # LightTransfer-Test: choose this many lazy layers per prompt from the lazy ratios of its last `w_last` queries
    # (lazy_layers is then empty until `resolve`); None = the lazy layers are fixed.
    select_lazy: int | None = None
    w_last: int = DEFAULT_W_LAST
    # retrieval-aware: layers the per-prompt selection never makes lazy (from a calibration, docs/design.md §11);
    # data to the prefill, so another calibration of the same count does not recompile
    protect: tuple[int, ...] = ()

    @classmethod
    def full(cls, num_layers: int) -> "Plan":
        return cls(num_layers=num_layers)

    @property
    def per_prompt(self) -> bool:
        """The plan's kind: its prefill chooses the lazy layers per prompt (`select_lazy` of them, `lazy_layers`
        empty until `resolve`), rather than naming them in `lazy_layers`."""
        return self.select_lazy is not None

    @property
    def lazy_count(self) -> int:
        """How many layers stream (static: it sizes the cache), whether fixed or chosen per prompt."""
        return self.select_lazy if self.per_prompt else len(self.lazy_layers)

    def resolve(self, lazy_layers) -> "Plan":
        """The fixed plan a per-prompt selection chose."""
        return dataclasses.replace(self, lazy_layers=tuple(sorted(int(i) for i in lazy_layers)), select_lazy=None,
                                   protect=())

    def choose(self, ratios) -> "Plan":
        """The fixed plan this plan decodes a prompt with, given the prompt's lazy ratios [L] (measured with this
        plan's sink, window and w_last): itself if its layers are fixed, else the layers its prefill's queue
        picks (`lazy.lazy_set`: the highest ratios, protected layers kept full)."""
        if not self.per_prompt:
            return self
        protected = np.isin(np.arange(self.num_layers), self.protect)
        return self.resolve(lazy_set(ratios, self.select_lazy, protected))

    def validate(self, cfg: Config, where: str = "plan") -> "Plan":
        """The plan itself, if it fits `cfg`; else LtJaxError naming `where` and the value: the checks every plan
        passes, then its kind's."""
        self._check_common(cfg, where)
        (self._check_per_prompt if self.per_prompt else self._check_fixed)(cfg, where)
        return self

    def _check_common(self, cfg: Config, where: str):
        if self.num_layers != cfg.num_layers:
            raise LtJaxError(f"{where} is for {self.num_layers} layers but the model has {cfg.num_layers}.")
        if self.sink < 0 or self.window < 1:
            raise LtJaxError(f"{where} has sink={self.sink}, window={self.window}; need sink >= 0 and window >= 1.")
        if self.prefill not in PREFILL_MODES:
            raise LtJaxError(f"{where} has prefill={self.prefill!r}; expected one of {', '.join(PREFILL_MODES)}.")

    def _check_fixed(self, cfg: Config, where: str):
        bad = [i for i in self.lazy_layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise LtJaxError(f"{where} names lazy layer(s) {bad} outside 0..{cfg.num_layers - 1}.")
        if len(set(self.lazy_layers)) != len(self.lazy_layers):
            raise LtJaxError(f"{where} lists a lazy layer twice: {list(self.lazy_layers)}.")
        if self.protect:
            raise LtJaxError(f"{where} protects layers {list(self.protect)}; protection needs a per-prompt "
                             f"selection (select_lazy).")

    def _check_per_prompt(self, cfg: Config, where: str):
        L = cfg.num_layers
        if self.lazy_layers or not 0 <= self.select_lazy <= L:
            raise LtJaxError(f"{where} selects {self.select_lazy} lazy layers per prompt; need 0..{L} "
                             f"and no fixed lazy_layers.")
        if self.prefill != "exact":
            raise LtJaxError(f"{where} chooses its lazy layers during prefill, which must then be exact "
                             f"(got prefill={self.prefill!r}).")
        if self.w_last < 1:
            raise LtJaxError(f"{where} has w_last={self.w_last}; need at least 1 query.")
        if any(not 0 <= i < L for i in self.protect) or len(set(self.protect)) != len(self.protect):
            raise LtJaxError(f"{where} protects layers {list(self.protect)}; need distinct layers in 0..{L - 1}.")
        if len(self.protect) > L - self.select_lazy:
            raise LtJaxError(f"{where} protects {len(self.protect)} layers but keeps only "
                             f"{L - self.select_lazy} full; protect fewer or make fewer lazy.")

    @property
    def shape(self) -> "PlanShape":
        return PlanShape(self.lazy_count, self.sink, self.window, self.prefill, self.per_prompt, self.w_last)

    def layers(self, cfg: Config) -> "LayerPlan":
        """The fixed plan as per-layer data."""
        if self.per_prompt:
            raise LtJaxError("a lighttransfer plan chooses its lazy layers per prompt; resolve it on the prompt first.")
        is_lazy = np.zeros(self.num_layers, bool)
        is_lazy[list(self.lazy_layers)] = True
        return LayerPlan.of(is_lazy, slots_in_order(is_lazy), self.shape, cfg)

    def prefill_layers(self, cfg: Config) -> "LayerPlan | Selection":
        """What `inference.prefill` takes as the plan's data: the fixed plan, or what a selection reads."""
        if not self.per_prompt:
            return self.layers(cfg)
        protected = np.zeros(self.num_layers, bool)
        protected[list(self.protect)] = True
        return Selection(jnp.asarray(protected))

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["lazy_layers"] = list(self.lazy_layers)
        if d["select_lazy"] is None:
            del d["select_lazy"]
        if self.protect:
            d["protect"] = list(self.protect)
        else:
            del d["protect"]
        return json.dumps(d)

    @classmethod
    def from_json(cls, path: str | Path, cfg: Config) -> "Plan":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise LtJaxError(f"cannot read plan file {path}: {e}.") from None
        return cls.from_text(text, cfg, f"plan file {path}", source=str(path))

    @classmethod
    def from_text(cls, text: str, cfg: Config, where: str, source: str | None = None) -> "Plan":
        """A plan from its JSON text; errors name `where`."""
        def whole(value, what):  # 1.7 or "3" is refused, not rounded
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{what} must be a whole number, got {value!r}")
            return value

        try:
            d = json.loads(text)
        except ValueError as e:
            raise LtJaxError(f"cannot read {where}: {e}.") from None
        missing = [k for k in ("num_layers", "lazy_layers") if k not in d] if isinstance(d, dict) else None
        if missing is None or missing:
            what = f"it has no {' or '.join(map(repr, missing))} field" if missing else "it is not a JSON object"
            raise LtJaxError(f"{where} is not a plan: {what} (a plan has num_layers and lazy_layers).")
        try:
            plan = cls(num_layers=whole(d["num_layers"], "num_layers"),
                       lazy_layers=tuple(sorted(whole(i, "a lazy layer") for i in d["lazy_layers"])),
                       sink=whole(d.get("sink", DEFAULT_SINK), "sink"),
                       window=whole(d.get("window", DEFAULT_WINDOW), "window"),
                       source=str(d.get("source", source or "stored")), prefill=str(d.get("prefill", "exact")),
                       select_lazy=None if d.get("select_lazy") is None else whole(d["select_lazy"], "select_lazy"),
                       w_last=whole(d.get("w_last", DEFAULT_W_LAST), "w_last"),
                       protect=tuple(sorted(whole(i, "a protected layer") for i in d.get("protect", ()))))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LtJaxError(f"cannot read {where}: {e}.") from None
        return plan.validate(cfg, where=where)


@dataclasses.dataclass(frozen=True)
class PlanShape:
    """What a compilation depends on besides array shapes: counts and S/W, never which layers are lazy."""
    num_lazy: int
    sink: int
    window: int
    prefill: str = "exact"  # "exact" | "hybrid"
    select: bool = False  # LightTransfer-Test: the prefill picks the lazy layers from their lazy ratios
    w_last: int = DEFAULT_W_LAST  # queries that measure the ratios

    @property
    def decoding(self) -> "PlanShape":
        """What decode compiles for: the counts and S/W only. How the prompt was prefilled (exact, hybrid, or
        choosing its lazy layers) does not change a decode step, so all of them share one compilation."""
        return PlanShape(self.num_lazy, self.sink, self.window)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerPlan:
    """A fixed plan as data for jitted code, one entry per layer (all [L])."""
    is_lazy: jax.Array  # bool: the layer streams
    slot: jax.Array  # int32: the layer's slot among its kind's cache slots (full or ring)
    sink: jax.Array  # int32: the mask's S for this layer (0 for a full layer)
    window: jax.Array  # int32: the mask's W (a full layer's: FULL, or Mistral's native window)

    @classmethod
    def of(cls, is_lazy, slot, shape: PlanShape, cfg: Config) -> "LayerPlan":
        """From is_lazy and slot (numpy or traced): the mask's per-layer S and W follow from the layer kind."""
        return cls(jnp.asarray(is_lazy), jnp.asarray(slot, jnp.int32),
                   jnp.where(is_lazy, shape.sink, 0).astype(jnp.int32),
                   jnp.where(is_lazy, shape.window, cfg.sliding_window or FULL).astype(jnp.int32))

    @property
    def lazy_layers(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.flatnonzero(np.asarray(self.is_lazy)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Selection:
    """A selecting plan as data for the prefill: the layers its queue must keep full (bool [L])."""
    protected: jax.Array


def slots_in_order(is_lazy: np.ndarray) -> np.ndarray:
    """A fixed plan's slots: the lazy layers take ring slots 0, 1, ... in layer order, the others full slots."""
    slot = np.zeros(len(is_lazy), np.int32)
    slot[is_lazy] = np.arange(is_lazy.sum())
    slot[~is_lazy] = np.arange((~is_lazy).sum())
    return slot


def num_lazy(num_layers: int, lazy_fraction: float) -> int:
    """floor(rho * L + 0.5): docs/design.md §7's budget rule."""
    return int(np.floor(lazy_fraction * num_layers + 0.5))


def default_protect(num_layers: int, num_lazy: int) -> int:
    """How many layers a retrieval-aware plan protects unless told: a fifth of the layers (rounded), never more
    than stay full. Chosen from the measurements in results/README.md ("Retrieval-aware selection")."""
    return min(num_layers - num_lazy, int(np.floor(0.2 * num_layers + 0.5)))


def make_plan(spec: str, cfg: Config, lazy_fraction: float = 0.5, sink: int | None = None,
              window: int | None = None, preset: str | None = None, prefill: str | None = None,
              w_last: int | None = None, calibration=None, protect: int | None = None) -> Plan:
    """`full`, `streaming`, `first`, `last`, `random[:SEED]`, `periodic[:OFFSET]` (evenly spaced: with n of L
    layers lazy, layers (k L) // n + OFFSET mod L for k < n; every other layer at half, Gemma 3's five local per
    global at 5/6), `lighttransfer` (chosen per prompt), `retrieval-aware[:PROBE|:FILE]` (chosen per prompt, never
    making the `protect` layers of highest calibration score lazy), `loss-guided[:PROBE|:FILE]` (fixed: the n
    layers of lowest calibration score, an nll calibration's by default), or a plan JSON path; `calibration` is
    the `lt_jax.calibration.Calibration` a plan names; flags override S/W/prefill."""
    if not 0.0 <= lazy_fraction <= 1.0:
        raise LtJaxError(f"lazy_fraction={lazy_fraction} is outside [0, 1].")
    if preset is not None and preset not in PRESETS:
        raise LtJaxError(f"unknown stream preset {preset!r} (known: {', '.join(PRESETS)}).")
    L = cfg.num_layers
    n = num_lazy(L, lazy_fraction)
    name, _, arg = spec.partition(":")
    if name == "full":
        layers = ()
    elif name == "streaming":
        layers = tuple(range(L))
    elif name == "first":
        layers = tuple(range(n))
    elif name == "last":
        layers = tuple(range(L - n, L))
    elif name == "lighttransfer":
        plan = Plan(num_layers=L, select_lazy=n, source=f"lighttransfer:{lazy_fraction:g}")
        return override(plan, sink, window, preset, prefill, w_last).validate(cfg)
    elif name == "retrieval-aware":
        if calibration is None:
            raise LtJaxError("the retrieval-aware plan needs a calibration; run `lt-jax calibrate MODEL` first.")
        count = default_protect(L, n) if protect is None else protect
        if not 0 <= count <= L - n:
            raise LtJaxError(f"--protect {count} must lie in 0..{L - n} (the layers that stay full at "
                             f"--lazy-fraction {lazy_fraction:g}).")
        plan = Plan(num_layers=L, select_lazy=n, protect=calibration.protected(count),
                    source=f"retrieval-aware:{calibration.probe}:{lazy_fraction:g}:protect={count}")
        return override(plan, sink, window, preset, prefill, w_last).validate(cfg)
    elif name == "loss-guided":
        if calibration is None:
            raise LtJaxError("the loss-guided plan needs a calibration; run `lt-jax calibrate MODEL --probe nll` "
                             "first.")
        plan = Plan(num_layers=L, lazy_layers=calibration.lowest(n),
                    source=f"loss-guided:{calibration.probe}:{lazy_fraction:g}")
        return override(plan, sink, window, preset, prefill, w_last).validate(cfg)
    elif name == "periodic":
        try:
            offset = int(arg or 0)
        except ValueError:
            offset = -1
        if not 0 <= offset < L:
            raise LtJaxError(f"plan {spec!r}: the offset after 'periodic:' must be a layer index in 0..{L - 1}.")
        layers = tuple(sorted((k * L // n + offset) % L for k in range(n)))
    elif name == "random":
        try:
            seed = int(arg or 0)
        except ValueError:
            raise LtJaxError(f"plan {spec!r}: the seed after 'random:' must be an integer.") from None
        layers = tuple(sorted(int(i) for i in np.random.default_rng(seed).choice(L, n, replace=False)))
    elif Path(spec).suffix == ".json" or Path(spec).exists():
        plan = Plan.from_json(spec, cfg)
        return override(plan, sink, window, preset, prefill, w_last).validate(cfg, where=f"plan file {spec}")
    else:
        raise LtJaxError(f"unknown plan {spec!r} (full, streaming, first, last, random[:SEED], periodic[:OFFSET], "
                         f"lighttransfer, retrieval-aware[:PROBE], loss-guided[:PROBE], or a .json file).")
    plan = Plan(num_layers=L, lazy_layers=layers, source=spec)
    return override(plan, sink, window, preset, prefill, w_last).validate(cfg)


def override(plan: Plan, sink=None, window=None, preset=None, prefill=None, w_last=None) -> Plan:
    """The plan with S, W (or a preset's), the prefill mode or w_last replaced where given."""
    if preset is not None:
        plan = dataclasses.replace(plan, sink=PRESETS[preset][0], window=PRESETS[preset][1])
    changes = {k: v for k, v in dict(sink=sink, window=window, prefill=prefill, w_last=w_last).items() if v is not None}
    return dataclasses.replace(plan, **changes)
