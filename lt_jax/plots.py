"""Figures (matplotlib, headless). Written to a temporary file and renamed, so a failure leaves no half-written
image."""
from __future__ import annotations

import os
from pathlib import Path


def plot_lazy_ratios(stats: dict, path: str | Path, title: str) -> None:
    """Per-layer lazy ratio: mean with the min..max range and +-1 std, lazy layers marked (stats from
    `lt_jax.lazy.calibrate`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mean, std = np.asarray(stats["ratio_mean"]), np.asarray(stats["ratio_std"])
    lo, hi = np.asarray(stats["ratio_min"]), np.asarray(stats["ratio_max"])
    layers = np.arange(len(mean))
    lazy = np.isin(layers, stats["lazy_layers"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(mean)), 3.6), dpi=120)
    ax.vlines(layers, lo, hi, color="0.75", lw=6, label="min..max")
    ax.errorbar(layers, mean, yerr=std, fmt="none", ecolor="0.35", capsize=2, label="mean +- std")
    ax.scatter(layers[~lazy], mean[~lazy], color="tab:blue", zorder=3, label="full attention")
    ax.scatter(layers[lazy], mean[lazy], color="tab:red", marker="s", zorder=3, label="lazy (streaming)")
    ax.set_xlabel("layer")
    ax.set_ylabel("lazy ratio (mass on sinks + window)")
    ax.set_xticks(layers)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)
