"""Figures for head studies: a layer x head heatmap, the ablation curve, and probe trajectories."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402


def plot_head_heatmap(values: Mapping[str, torch.Tensor | np.ndarray], path: str | Path,
                      title: str = "") -> Path:
    """Draw one layer x head heatmap per entry of `values` ((n_layers, n_heads) each), side by side.

    The colour scale is centred at 0 and shared by nothing: each panel has its own
    range, because the methods have different units.
    """
    fig, axes = plt.subplots(1, len(values), figsize=(4.2 * len(values), 5.5), squeeze=False)
    for axis, (name, grid) in zip(axes[0], values.items()):
        grid = np.asarray(grid, dtype=float)
        limit = np.nanmax(np.abs(grid)) or 1.0
        image = axis.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
        axis.set_title(name)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        fig.colorbar(image, ax=axis, shrink=0.8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_ablation_curve(results: pd.DataFrame, path: str | Path, metric: str = "asr") -> Path:
    """Plot `metric` against the share of heads ablated: top heads, random heads (mean and min-max band), none."""
    fig, axis = plt.subplots(figsize=(6, 4))
    top = results[results["kind"] == "top"].sort_values("fraction")
    axis.plot(100 * top["fraction"], top[metric], "o-", color="tab:red", label="top suppression heads")

    random_rows = results[results["kind"] == "random"]
    if len(random_rows):
        grouped = random_rows.groupby("fraction")[metric]
        fractions = 100 * np.array(sorted(grouped.groups))
        axis.plot(fractions, grouped.mean().values, "s--", color="tab:gray", label="random heads (mean)")
        axis.fill_between(fractions, grouped.min().values, grouped.max().values, color="tab:gray", alpha=0.25,
                          label="random heads (min to max)")

    none = results[results["kind"] == "none"]
    if len(none):
        axis.axhline(float(none[metric].iloc[0]), color="black", linestyle=":", label="no ablation")
    axis.set_xlabel("% of all heads ablated")
    axis.set_ylabel(metric)
    axis.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_trajectories(trajectories: Mapping[str, torch.Tensor | np.ndarray], path: str | Path,
                      window: int = 64, title: str = "") -> Path:
    """Plot the mean probe score against distance from the end, one line per setting.

    Each entry is (n_traces, max_length), aligned at the end (column 0 is the
    last position) with NaN before a trace starts, as `score_trajectories` returns.
    """
    fig, axis = plt.subplots(figsize=(7, 4))
    for name, scores in trajectories.items():
        scores = np.asarray(scores, dtype=float)[:, :window]
        with warnings.catch_warnings():
            # A column that no trace reaches is all NaN; its mean is NaN and not drawn.
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(scores, axis=0)
        axis.plot(-np.arange(len(mean)), mean, label=name)
    axis.set_xlabel("positions before the end (0 = closing think marker)")
    axis.set_ylabel("probe score")
    if title:
        axis.set_title(title)
    axis.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_head_trajectories(trajectory: torch.Tensor | np.ndarray, heads: list[tuple[int, int]], path: str | Path,
                           window: int = 64, title: str = "") -> Path:
    """Plot chosen heads' direct projections against distance from the end.

    `trajectory` is (max_length, n_layers, n_heads) with index 0 at the last
    position, as in `HeadAttribution.trajectory`.
    """
    values = np.asarray(trajectory, dtype=float)[:window]
    fig, axis = plt.subplots(figsize=(7, 4))
    for layer, head in heads:
        axis.plot(-np.arange(len(values)), values[:, layer, head], label=f"L{layer}H{head}")
    axis.axhline(0.0, color="black", linewidth=0.5)
    axis.set_xlabel("positions before the end (0 = closing think marker)")
    axis.set_ylabel("projection onto the direction")
    if title:
        axis.set_title(title)
    axis.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
