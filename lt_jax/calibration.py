"""A model's calibration: per-head probe scores (`lt_jax.probes`), each layer's score (the max over its heads), and
where they came from; one JSON file per probe, next to the checkpoint by default (`calibration-<probe>.json`).
`retrieval-aware` plans read it to protect the layers that copy (docs/design.md §11)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.files import write_atomic

FORMAT = 1
DEFAULT_PROBE = "retrieval"  # what `retrieval-aware` reads unless a probe is named (results/README.md)


@dataclasses.dataclass(frozen=True)
class Calibration:
    probe: str
    head_scores: tuple[tuple[float, ...], ...]  # [L][N]
    provenance: dict  # model, checkpoint, settings, samples used, date

    @property
    def layer_scores(self) -> np.ndarray:
        """[L]: each layer's most copying head."""
        return np.asarray(self.head_scores, np.float64).max(axis=1)

    def protected(self, count: int) -> tuple[int, ...]:
        """The `count` layers of highest score (ties: the lower index), sorted."""
        scores = self.layer_scores
        order = np.lexsort((np.arange(len(scores)), -scores))
        return tuple(sorted(int(i) for i in order[:count]))

    def check(self, cfg: Config, where: str) -> "Calibration":
        shape = np.shape(self.head_scores)
        if shape != (cfg.num_layers, cfg.num_heads):
            raise LtJaxError(f"{where} holds scores for {shape} layers x heads but the model has "
                             f"({cfg.num_layers}, {cfg.num_heads}); calibrate this model with `lt-jax calibrate`.")
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
            scores = tuple(tuple(float(s) for s in row) for row in d["head_scores"])
            if not scores or len({len(r) for r in scores}) != 1 or not all(np.isfinite(r).all() for r in scores):
                raise ValueError("head_scores must be a non-empty [layers][heads] table of finite numbers")
            return cls(str(d["probe"]), scores, dict(d.get("provenance", {})))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LtJaxError(f"cannot read calibration file {path}: {e}.") from None


PROBES = ("retrieval", "induction")  # what `lt-jax calibrate --probe` measures (lt_jax.probes)


def default_path(model_path: str | Path, probe: str) -> Path:
    return Path(model_path) / f"calibration-{probe}.json"


def find(model_path: str | Path | None, source: str, cfg: Config) -> tuple[Calibration, Path]:
    """The calibration a `retrieval-aware[:PROBE|:FILE]` plan names: a .json file, or the probe's file next to
    the checkpoint. Missing: one sentence naming the command that makes it."""
    if not source.endswith(".json") and source not in PROBES:
        raise LtJaxError(f"retrieval-aware:{source}: {source!r} is neither a probe ({', '.join(PROBES)}) nor a "
                         f"calibration file (.json).")
    path = Path(source) if source.endswith(".json") else (
        None if model_path is None else default_path(model_path, source))
    if path is None or not path.exists():
        where = path or f"calibration-{source}.json next to the checkpoint (this model was not loaded from one)"
        make = (f"`lt-jax calibrate MODEL --probe {source}`" if source in PROBES else
                f"`lt-jax calibrate MODEL --out {source}`")
        raise LtJaxError(f"the retrieval-aware plan needs a calibration and there is none at {where}; run {make} "
                         f"first.")
    return Calibration.load(path).check(cfg, f"calibration file {path}"), path
