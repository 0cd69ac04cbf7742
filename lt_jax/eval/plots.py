"""Figures (matplotlib, headless). Written to a temporary file and renamed, so a failure leaves no half-written
image; their paths are checked by `lt_jax.files.output_image` before any work."""
from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _title(ax_or_fig, title: str, width: int) -> None:
    """A title wrapped to the figure's width (a long one was clipped at both edges)."""
    import textwrap
    text = "\n".join(textwrap.wrap(title, width))
    (ax_or_fig.suptitle if hasattr(ax_or_fig, "suptitle") else ax_or_fig.set_title)(text, fontsize=9)


def _save(fig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    _pyplot().close(fig)
    os.replace(tmp, path)


def plot_lazy_ratios(stats: dict, path: str | Path, title: str) -> None:
    """Per-layer lazy ratio: mean with the min..max range and +-1 std, lazy layers marked (stats from
    `lt_jax.lazy.calibrate`)."""
    import numpy as np
    plt = _pyplot()

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
    _title(ax, title, int(11 * fig.get_size_inches()[0]))
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    fig.tight_layout()
    _save(fig, path)


def plot_heat_maps(maps: dict, path: str | Path, title: str) -> None:
    """One depth x length accuracy map per method (`lt_jax.eval.evaluate.heat_maps`), side by side, one color scale."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(2.2 + 2.0 * len(maps), 3.4), dpi=120, squeeze=False,
                             sharey=True)
    for ax, (method, (lengths, depths, grid)) in zip(axes[0], maps.items()):
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths],
                      fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_title(method, fontsize=8)
        ax.set_xlabel("prompt tokens", fontsize=7)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if grid[i, j] == grid[i, j]:  # not NaN
                    ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=6)
    axes[0][0].set_ylabel("needle depth", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="accuracy")
    _title(fig, title, int(11 * fig.get_size_inches()[0]))
    _save(fig, path)


def plot_bars(values: dict, path: str | Path, title: str, ylabel: str) -> None:
    """One bar per method (perplexity, LongBench average)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(values)), 3.2), dpi=120)
    bars = ax.bar(range(len(values)), list(values.values()), color="tab:blue")
    ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(values)), list(values), rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    lo, hi = min(values.values()), max(values.values())
    if ylabel == "perplexity":  # differences of a few percent: start the axis near the values
        ax.set_ylim(lo - 0.5 * (hi - lo + 1e-9) - 0.02 * lo, hi + 0.3 * (hi - lo + 1e-9) + 0.02 * hi)
    _title(ax, title, int(11 * fig.get_size_inches()[0]))
    fig.tight_layout()
    _save(fig, path)


def plot_calibration(head_scores, path: str | Path, title: str, protected=()) -> None:
    """A calibration: the heads x layers score map above each layer's max (what selection reads) and mean (what
    hides a lone copying head), protected layers marked."""
    import numpy as np
    plt = _pyplot()
    scores = np.asarray(head_scores)
    L = scores.shape[0]
    layers = np.arange(L)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.28 * L), 5.4), dpi=120, sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.2]}, layout="constrained")
    image = top.imshow(scores.T, aspect="auto", cmap="viridis", origin="lower",
                       extent=(-0.5, L - 0.5, -0.5, scores.shape[1] - 0.5))
    fig.colorbar(image, ax=[top, bottom], pad=0.01, shrink=0.5, anchor=(0, 1)).set_label("head score", fontsize=8)
    top.set_ylabel("query head")
    from matplotlib.patches import Patch
    bottom.bar(layers, scores.max(axis=1), color=["tab:red" if i in protected else "tab:blue" for i in layers])
    (mean,) = bottom.plot(layers, scores.mean(axis=1), "k.-", lw=1, label="mean over heads")
    bottom.set_xlabel("layer")
    bottom.set_ylabel("score")
    # the bars' colours by hand: a labelled bar series would show its first bar's colour, whichever it is
    bottom.legend(handles=[Patch(color="tab:blue", label="layer score: max over heads"),
                           Patch(color="tab:red", label="layer score of a protected layer"), mean], fontsize=7)
    _title(fig, title, 110)
    _save(fig, path)
