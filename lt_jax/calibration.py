"""A model's calibration: per-head probe scores (`lt_jax.probes`), each layer's score (the max over its heads), and
where they came from; one JSON file per probe, next to the checkpoint by default (`calibration-<probe>.json`).
`retrieval-aware` plans read it to protect the layers of highest score, `loss-guided` plans to stream the layers of
lowest score (docs/design.md §11). A per-layer probe (`nll`) stores its scores as one column, [L][1]."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.files import write_atomic

FORMAT = 2  # 2: a per-layer probe's head_scores are [L][1] (format 1 held per-head probes only; it still loads)
DEFAULT_PROBE = "retrieval"  # what `retrieval-aware` reads unless a probe is named (results/README.md)
PROBES = ("retrieval", "induction", "nll", "nll-greedy")  # what `lt-jax calibrate --probe` measures (lt_jax.probes)
LAYER_PROBES = ("nll", "nll-greedy")  # probes that score whole layers, not heads
# the plans that read a calibration, and the probe each reads unless a probe or file is named
PLAN_PROBES = {"retrieval-aware": DEFAULT_PROBE, "loss-guided": "nll"}


@dataclasses.dataclass(frozen=True)
class Calibration:
    probe: str
    head_scores: tuple[tuple[float, ...], ...]  # [L][N]
    provenance: dict  # model, checkpoint, settings, samples used, date

    @property
    def layer_scores(self) -> np.ndarray:
        """[L]: each layer's most copying head (a per-layer probe's one column)."""
        return np.asarray(self.head_scores, np.float64).max(axis=1)

    def protected(self, count: int) -> tuple[int, ...]:
        """The `count` layers of highest score (ties: the lower index), sorted."""
        return self._ranked(-self.layer_scores, count)

    def lowest(self, count: int) -> tuple[int, ...]:
        """The `count` layers of lowest score (ties: the lower index), sorted: what a loss-guided plan streams."""
        return self._ranked(self.layer_scores, count)

    @staticmethod
    def _ranked(key: np.ndarray, count: int) -> tuple[int, ...]:
        order = np.lexsort((np.arange(len(key)), key))
        return tuple(sorted(int(i) for i in order[:count]))

    def check(self, cfg: Config, where: str) -> "Calibration":
        shape = np.shape(self.head_scores)
        want = (cfg.num_layers, 1 if self.probe in LAYER_PROBES else cfg.num_heads)
        if shape != want:
            raise LtJaxError(f"{where} holds scores for {shape} layers x heads but {self.probe} scores of this model "
                             f"are {want}; calibrate this model with `lt-jax calibrate`.")
        return self

    def to_dict(self) -> dict:
        return {"format": FORMAT, "probe": self.probe, "layer_scores": [round(float(s), 6) for s in self.layer_scores],
                "head_scores": [[round(float(s), 6) for s in row] for row in self.head_scores],
                "provenance": self.provenance}

    def save(self, path: str | Path) -> Path:
        """Written whole, then renamed into place: a killed run leaves the old file or none."""
        return write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        try:
            d = json.loads(Path(path).read_text())
            version = d.get("format", 1)
            if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT:
                raise ValueError(f"it has format {version!r}; this lt-jax reads formats 1..{FORMAT}")
            scores = tuple(tuple(float(s) for s in row) for row in d["head_scores"])
            if not scores or len({len(r) for r in scores}) != 1 or not all(np.isfinite(r).all() for r in scores):
                raise ValueError("head_scores must be a non-empty [layers][heads] table of finite numbers")
            return cls(str(d["probe"]), scores, dict(d.get("provenance", {})))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LtJaxError(f"cannot read calibration file {path}: {e}.") from None


def default_path(model_path: str | Path, probe: str) -> Path:
    return Path(model_path) / f"calibration-{probe}.json"


def for_plan(model_path: str | Path | None, spec: str, cfg: Config) -> Calibration | None:
    """The calibration a plan spec reads (`retrieval-aware[:PROBE|:FILE]`, `loss-guided[:PROBE|:FILE]`; its
    default probe without one), or None for a plan that reads none."""
    name, _, source = spec.partition(":")
    if name not in PLAN_PROBES:
        return None
    return find(model_path, source or PLAN_PROBES[name], cfg, name)[0]


def find(model_path: str | Path | None, source: str, cfg: Config,
         plan: str = "retrieval-aware") -> tuple[Calibration, Path]:
    """The calibration a `plan[:PROBE|:FILE]` names: a .json file, or the probe's file next to the checkpoint.
    Missing: one sentence naming the command that makes it."""
    if not source.endswith(".json") and source not in PROBES:
        raise LtJaxError(f"{plan}:{source}: {source!r} is neither a probe ({', '.join(PROBES)}) nor a "
                         f"calibration file (.json).")
    path = Path(source) if source.endswith(".json") else (
        None if model_path is None else default_path(model_path, source))
    if path is None or not path.exists():
        where = path or f"calibration-{source}.json next to the checkpoint (this model was not loaded from one)"
        make = (f"`lt-jax calibrate MODEL --probe {source}`" if source in PROBES else
                f"`lt-jax calibrate MODEL --out {source}`")
        raise LtJaxError(f"the {plan} plan needs a calibration and there is none at {where}; run {make} first.")
    return Calibration.load(path).check(cfg, f"calibration file {path}"), path
