"""Figures of the refusal cliff: trajectories with bands, layer × position heatmaps, cliff sizes, probe sweeps.

Every function returns a `matplotlib.figure.Figure` built without pyplot, so the
library never opens a window or touches global figure state. Notebooks display the
returned figure, and `save_figure` writes it to a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

# One fixed colour per outcome, so every figure of the book uses the same ones.
OUTCOME_COLORS = {"refused": "#1b9e77", "complied": "#d95f02", "benign": "#7570b3",
                  "no answer": "#999999", "unjudged": "#cccccc"}


def _new_axes(width: float = 7.0, height: float = 4.0):
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots()


def _group_colors(groups: Sequence[str]) -> dict[str, str]:
    palette = sns.color_palette("tab10", n_colors=max(1, len(groups))).as_hex()
    return {group: OUTCOME_COLORS.get(group, palette[i]) for i, group in enumerate(groups)}


def save_figure(figure: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure to `path` (the format follows the suffix, e.g. .png or .svg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def plot_trajectories(curves: pd.DataFrame, *, title: str = "Refusal score by distance from the end",
                      ylabel: str = "refusal score (probe probability)", band_label: str = "95% bootstrap band",
                      ylim: tuple[float, float] | None = (0.0, 1.0)) -> Figure:
    """Plot mean curves with bands, one line per group.

    Args:
        curves: from `cliffkit.cliff.tail_frame` (x = distance, drawn as tokens before the
            end so the end is on the right) or `thinking_frame` (x = position on the
            thinking axis).
    """
    on_thinking_axis = "position" in curves.columns
    figure, ax = _new_axes()
    groups = list(dict.fromkeys(curves["group"]))
    colors = _group_colors(groups)
    for group in groups:
        part = curves[curves["group"] == group]
        x = part["position"].to_numpy() if on_thinking_axis else -part["distance"].to_numpy()
        n = int(part["count"].max())
        ax.plot(x, part["mean"], color=colors[group], label=f"{group} (n={n})", linewidth=1.8)
        ax.fill_between(x, part["low"], part["high"], color=colors[group], alpha=0.2, linewidth=0)

    ax.set_xlabel("position on the thinking (0 = first token, 1 = last)" if on_thinking_axis
                  else "tokens before the end (0 = last position)")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.legend(title=f"group, shaded: {band_label}", fontsize="small", title_fontsize="small")
    ax.grid(alpha=0.3)
    return figure


def plot_layer_heatmap(matrix: np.ndarray, layers: Sequence[int], *, title: str = "Refusal score by layer and position",
                       cbar_label: str = "mean refusal score", vmin: float | None = 0.0,
                       vmax: float | None = 1.0) -> Figure:
    """Plot a (n_layers, n_distances) tail-aligned matrix, layers bottom to top and the end on the right.

    Args:
        matrix: from `cliffkit.cliff.layer_tail_matrix`. Column d is d tokens before the end.
    """
    matrix = np.asarray(matrix)
    if matrix.shape[0] != len(layers):
        raise ValueError(f"matrix has {matrix.shape[0]} rows for {len(layers)} layers.")
    figure, ax = _new_axes(8.0, 4.5)
    n_distances = matrix.shape[1]
    image = ax.imshow(matrix[:, ::-1], aspect="auto", origin="lower", cmap="viridis", vmin=vmin, vmax=vmax,
                      extent=(-(n_distances - 0.5), 0.5, -0.5, len(layers) - 0.5), interpolation="nearest")
    step = max(1, len(layers) // 12)
    ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    ax.set_xlabel("tokens before the end (0 = last position)")
    ax.set_ylabel("layer")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label=cbar_label)
    return figure


def plot_cliff_distribution(metrics: pd.DataFrame, by: str = "outcome", metric: str = "cliff", *,
                            title: str | None = None) -> Figure:
    """Plot the distribution of one cliff metric per group: a box plot with every trace as a dot."""
    if metric not in metrics.columns or by not in metrics.columns:
        raise ValueError(f"metrics need columns {by!r} and {metric!r}, got {list(metrics.columns)}.")
    data = metrics.dropna(subset=[metric])
    figure, ax = _new_axes(6.0, 4.0)
    order = sorted(data[by].astype(str).unique())
    colors = _group_colors(order)
    plotted = data.assign(**{by: data[by].astype(str)})
    sns.boxplot(data=plotted, x=by, y=metric, order=order, hue=by, palette=colors, ax=ax, fliersize=0,
                legend=False, boxprops={"alpha": 0.5})
    sns.stripplot(data=plotted, x=by, y=metric, order=order, color="black", size=3, alpha=0.6, ax=ax)
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    counts = plotted.groupby(by).size()
    ax.set_xticks(range(len(order)), [f"{group}\n(n={counts[group]})" for group in order])
    ax.set_xlabel(by)
    ax.set_title(title or f"{metric} by {by}")
    return figure


def plot_layer_sweep(sweep: pd.DataFrame, *, title: str = "Probe accuracy and AUROC by layer",
                     parts: Sequence[str] = ("val", "test")) -> Figure:
    """Plot held-out accuracy and AUROC per layer, with one line style per task when there is a "task" column."""
    figure = Figure(figsize=(10.0, 4.0), layout="constrained")
    axes = figure.subplots(1, 2, sharex=True)
    tasks = list(dict.fromkeys(sweep["task"])) if "task" in sweep.columns else [None]
    styles = ["-", "--", ":", "-."]
    colors = {"val": "#1f77b4", "test": "#ff7f0e", "train": "#2ca02c"}
    for ax, metric in zip(axes, ("accuracy", "auroc")):
        for t, task in enumerate(tasks):
            part_frame = sweep if task is None else sweep[sweep["task"] == task]
            for part in parts:
                column = f"{part}_{metric}"
                label = part if task is None else f"{task}, {part}"
                ax.plot(part_frame["layer"], part_frame[column], styles[t % len(styles)], marker="o",
                        markersize=3, color=colors.get(part), label=label)
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("layer")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small")
    figure.suptitle(title)
    return figure


def plot_transfer(transfer: pd.DataFrame, *, title: str = "Last-position probe read at earlier positions") -> Figure:
    """Plot held-out accuracy and AUROC against distance from the end (from `probe.transfer_by_distance`)."""
    figure, ax = _new_axes()
    x = -transfer["distance"].to_numpy()
    ax.plot(x, transfer["accuracy"], marker=".", label="accuracy")
    ax.plot(x, transfer["auroc"], marker=".", label="AUROC")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("tokens before the end (0 = the position the probe was trained on)")
    ax.set_ylabel("held-out metric")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return figure
