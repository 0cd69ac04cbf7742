"""Layer plan: which layers are lazy (streaming attention: S sinks + a W-token window) and which keep full
attention. Static (hashable), so jit specializes on it; saved as the JSON of DESIGN.md section 3."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.mask import FULL

DEFAULT_SINK, DEFAULT_WINDOW = 4, 1020


@dataclasses.dataclass(frozen=True)
class Plan:
    num_layers: int
    lazy_layers: tuple[int, ...] = ()
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW
    source: str = "full"

    @classmethod
    def full(cls, num_layers: int) -> "Plan":
        return cls(num_layers=num_layers)

    def validate(self, cfg: Config, where: str = "plan") -> "Plan":
        if self.num_layers != cfg.num_layers:
            raise LtJaxError(f"{where} is for {self.num_layers} layers but the model has {cfg.num_layers}.")
        bad = [i for i in self.lazy_layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise LtJaxError(f"{where} names lazy layer(s) {bad} outside 0..{cfg.num_layers - 1}.")
        if self.sink < 0 or self.window < 1:
            raise LtJaxError(f"{where} has sink={self.sink}, window={self.window}; need sink >= 0 and window >= 1.")
        return self

    def layer_windows(self, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer (sink, window) for the mask rule: int32 [L] each."""
        native = cfg.sliding_window or FULL
        sinks = np.zeros(cfg.num_layers, np.int32)
        windows = np.full(cfg.num_layers, native, np.int32)
        lazy = list(self.lazy_layers)
        sinks[lazy] = self.sink
        windows[lazy] = self.window
        return sinks, windows

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["lazy_layers"] = list(self.lazy_layers)
        return json.dumps(d)

    @classmethod
    def from_json(cls, path: str | Path, cfg: Config) -> "Plan":
        try:
            d = json.loads(Path(path).read_text())
            plan = cls(num_layers=int(d["num_layers"]), lazy_layers=tuple(sorted(int(i) for i in d["lazy_layers"])),
                       sink=int(d.get("sink", DEFAULT_SINK)), window=int(d.get("window", DEFAULT_WINDOW)),
                       source=str(d.get("source", str(path))))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LtJaxError(f"cannot read plan file {path}: {e}.") from None
        return plan.validate(cfg, where=f"plan file {path}")
