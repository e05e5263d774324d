"""Per-token refusal trajectories and the metrics of the refusal cliff.

`score_traces` applies probes at every position of every trace in the batch loop and
keeps only the scores. Trajectories are compared by distance from the end, averaging
only the traces that reach each distance, or on a normalised thinking axis.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.special import expit  # the logistic sigmoid, without overflow for large negative logits

from cliffkit.activations import DEFAULT_BATCH_SIZE, Until, iter_projections
from cliffkit.models import LoadedModel
from cliffkit.probe import LinearProbe
from cliffkit.render import THINKING
from cliffkit.traces import Trace

logger = logging.getLogger(__name__)

Kind = Literal["probability", "logit"]
DEFAULT_EXCLUDE_LAST = 8
OUTCOMES = ("refused", "complied", "benign", "no answer", "unjudged")


def outcome_of(trace: Trace) -> str:
    """Return "refused" or "complied" for a judged harmful trace, "benign" for a benign prompt.

    A harmful trace with an empty answer is "no answer", one without a label "unjudged".
    """
    if not trace.harmful:
        return "benign"
    if "refused" not in trace.labels:
        return "unjudged"
    refused = trace.labels["refused"]
    if refused is None:
        return "no answer"
    return "refused" if refused else "complied"


def trace_metadata(traces: Sequence[Trace]) -> pd.DataFrame:
    """Return one row per trace: prompt_id, model_id, source, category, harmful, refused, outcome, closed_by."""
    return pd.DataFrame([{
        "prompt_id": trace.prompt_id, "model_id": trace.model_id, "source": trace.source,
        "category": trace.category, "harmful": bool(trace.harmful), "refused": trace.labels.get("refused"),
        "outcome": outcome_of(trace), "closed_by": trace.closed_by,
    } for trace in traces])


# --------------------------------------------------------------------------- scoring

@dataclass
class Trajectories:
    """Probe logits at every position of every trace, for one or more layers.

    Attributes:
        layers: decoder layers, in the order of dimension 0 of each logits array.
        logits: per trace, (n_layers, length) float32 probe logits.
        segments: per trace, (length,) int8 segment labels (PROMPT..ANSWER).
        meta: one row per trace, from `trace_metadata`.
        task: the probe task whose class 1 the scores measure.
    """

    layers: tuple[int, ...]
    logits: list[np.ndarray]
    segments: list[np.ndarray]
    meta: pd.DataFrame
    task: str = "refusal"

    def __len__(self) -> int:
        return len(self.logits)

    def layer_row(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not scored. These trajectories contain layers {list(self.layers)}.")
        return self.layers.index(layer)

    def values(self, layer: int, kind: Kind = "probability") -> list[np.ndarray]:
        """Return per-trace (length,) scores at one layer, as probabilities or logits."""
        row = self.layer_row(layer)
        logits = [values[row].astype(np.float64) for values in self.logits]
        if kind == "logit":
            return logits
        if kind != "probability":
            raise ValueError(f"kind must be 'probability' or 'logit', got {kind!r}.")
        return [expit(values) for values in logits]

    def subset(self, rows: Sequence[int] | np.ndarray) -> "Trajectories":
        rows = [int(row) for row in np.asarray(rows).reshape(-1)]
        return Trajectories(self.layers, [self.logits[r] for r in rows], [self.segments[r] for r in rows],
                            self.meta.iloc[rows].reset_index(drop=True), self.task)

    def save(self, path: str | Path) -> Path:
        """Write <path>.npz (concatenated arrays and offsets) and <path>.csv (metadata)."""
        stem = Path(path).with_suffix("")
        stem.parent.mkdir(parents=True, exist_ok=True)
        lengths = np.array([values.shape[1] for values in self.logits], dtype=np.int64)
        np.savez(stem.with_suffix(".npz"), layers=np.array(self.layers, dtype=np.int64), lengths=lengths,
                 logits=np.concatenate(self.logits, axis=1).astype(np.float32),
                 segments=np.concatenate(self.segments).astype(np.int8))
        self.meta.to_csv(stem.with_suffix(".csv"), index=False)
        stem.with_suffix(".json").write_text(json.dumps({"task": self.task, "layers": list(self.layers)}),
                                             encoding="utf-8")
        return stem.with_suffix(".npz")

    @classmethod
    def load(cls, path: str | Path) -> "Trajectories":
        stem = Path(path).with_suffix("")
        with np.load(stem.with_suffix(".npz"), allow_pickle=False) as arrays:
            layers, lengths = tuple(int(x) for x in arrays["layers"]), arrays["lengths"]
            logits, segments = arrays["logits"], arrays["segments"]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        meta = pd.read_csv(stem.with_suffix(".csv"), dtype={"prompt_id": str, "category": str, "source": str})
        info = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        return cls(layers, [logits[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                   [segments[a:b] for a, b in zip(bounds[:-1], bounds[1:])], meta, info.get("task", ""))


def score_traces(
    lm: LoadedModel,
    traces: Sequence[Trace],
    probes: LinearProbe | Mapping[int, LinearProbe],
    *,
    until: Until = "close",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> Trajectories:
    """Score every position of every trace with one probe per layer, in one forward pass per batch.

    The projection is applied inside the hooks, so only (n_layers, length) logits per
    trace are kept, never the activations.
    """
    by_layer = {probes.layer: probes} if isinstance(probes, LinearProbe) else dict(probes)
    if not by_layer:
        raise ValueError("no probes given.")
    for probe in by_layer.values():
        if probe.model_id and probe.model_id != lm.model_id:
            raise ValueError(f"the probe for layer {probe.layer} was fitted on {probe.model_id!r}, but the model "
                             f"is {lm.model_id!r}. Fit a probe on this model's traces (`cliffkit probe`).")
    tasks = {probe.task for probe in by_layer.values()}

    directions = {layer: probe.direction() for layer, probe in by_layer.items()}
    intercepts = {layer: probe.intercept() for layer, probe in by_layer.items()}
    logits: list[np.ndarray | None] = [None] * len(traces)
    segments: list[np.ndarray | None] = [None] * len(traces)
    layers: tuple[int, ...] = ()
    for batch in iter_projections(lm, traces, directions, intercepts, until=until, batch_size=batch_size,
                                  progress=progress):
        layers = batch.layers
        for row, index in enumerate(batch.indices):
            logits[index] = batch.trace_scores(row).numpy().copy()
            segments[index] = batch.trace_segments(row).numpy().copy()
    return Trajectories(layers, logits, segments, trace_metadata(traces), "/".join(sorted(tasks)))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- alignment and bands

def tail_align(sequences: Sequence[np.ndarray], max_distance: int | None = None) -> np.ndarray:
    """Stack sequences by distance from the end: column d contains each sequence's value d positions before its end.

    Missing positions are NaN, never 0: the reference code filled them with zeros,
    which pulls the mean at large distances toward 0.

    Returns:
        (n_sequences, n_distances) float64, n_distances = max length (or max_distance + 1).
    """
    if len(sequences) == 0:
        raise ValueError("no sequences to align.")
    longest = max(len(values) for values in sequences)
    width = longest if max_distance is None else min(longest, max_distance + 1)
    aligned = np.full((len(sequences), width), np.nan)
    for row, values in enumerate(sequences):
        tail = np.asarray(values, dtype=np.float64)[::-1][:width]
        aligned[row, :len(tail)] = tail
    return aligned


def tail_mean(sequences: Sequence[np.ndarray], max_distance: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (mean, count) per distance from the end, averaging only the sequences that reach it."""
    aligned = tail_align(sequences, max_distance)
    count = np.sum(~np.isnan(aligned), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(aligned, axis=0) / count
    return mean, count


def bootstrap_band(aligned: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return the (low, high) percentile band of the column means, resampling rows (traces) with replacement.

    Args:
        aligned: (n_traces, n_columns) with NaN where a trace has no value. Column
            means ignore the NaNs, and a resample with no value in a column gives no vote there.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    rng = np.random.default_rng(seed)
    present = ~np.isnan(aligned)
    filled = np.where(present, aligned, 0.0)
    draws = rng.integers(0, len(aligned), size=(n_boot, len(aligned)))
    means = np.empty((n_boot, aligned.shape[1]))
    # Resamples go in chunks so that (chunk, n_traces, n_columns) stays near 4M values.
    chunk = max(1, 4_000_000 // max(1, aligned.size))
    for start in range(0, n_boot, chunk):
        picked = draws[start:start + chunk]
        sums = filled[picked].sum(axis=1)
        counts = present[picked].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            means[start:start + chunk] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    alpha = (1 - level) / 2
    low = np.full(aligned.shape[1], np.nan)
    high = np.full(aligned.shape[1], np.nan)
    has_vote = np.any(~np.isnan(means), axis=0)
    low[has_vote] = np.nanquantile(means[:, has_vote], alpha, axis=0)
    high[has_vote] = np.nanquantile(means[:, has_vote], 1 - alpha, axis=0)
    return low, high


def resample_thinking(values: np.ndarray, segments: np.ndarray, n_points: int = 50,
                      clip: tuple[float, float] | None = (0.0, 1.0)) -> np.ndarray:
    """Resample the thinking part of one trajectory onto n_points over a 0..1 axis, linearly.

    Linear interpolation never leaves the range of the samples, unlike the cubic
    resampling of the reference code. `clip` clamps the result as well, to (0, 1) for
    probabilities by default. Pass clip=None for logits. Returns NaN when the trace has no thinking.
    """
    values = np.asarray(values, dtype=np.float64)
    thinking = values[np.asarray(segments) == THINKING]
    if len(thinking) == 0:
        return np.full(n_points, np.nan)
    if len(thinking) == 1:
        resampled = np.full(n_points, thinking[0])
    else:
        resampled = np.interp(np.linspace(0, 1, n_points), np.linspace(0, 1, len(thinking)), thinking)
    return resampled if clip is None else np.clip(resampled, *clip)


# --------------------------------------------------------------------------- per-trace cliff metrics

def cliff_metrics(scores: np.ndarray, segments: np.ndarray, exclude_last: int = DEFAULT_EXCLUDE_LAST) -> dict[str, float]:
    """Measure the cliff of one trajectory (probabilities, or logits).

    Definitions:
        plateau: mean score over the thinking segment without its last `exclude_last`
            tokens. It uses the whole thinking when the thinking has `exclude_last` tokens
            or fewer, and is NaN without thinking.
        final: score at the last position (the closing marker when tokenized until="close").
        cliff: plateau − final.
        max_drop: max score over the thinking − final.
        drop_start: with threshold = (plateau + final) / 2, the first position p at or
            after the start of the thinking such that every score from p to the end is
            below the threshold. It is reported as the distance from the end
            (length − 1 − p), and is NaN when cliff <= 0 (no drop).
    """
    scores = np.asarray(scores, dtype=np.float64)
    segments = np.asarray(segments)
    if scores.shape != segments.shape or scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"scores and segments must be equal non-empty 1-D arrays, got {scores.shape} and "
                         f"{segments.shape}.")
    thinking_positions = np.flatnonzero(segments == THINKING)
    final = float(scores[-1])
    nan = float("nan")
    if len(thinking_positions) == 0:
        return {"plateau": nan, "final": final, "cliff": nan, "max_drop": nan, "drop_start": nan,
                "n_thinking": 0}

    if exclude_last < 0:
        raise ValueError(f"exclude_last must be >= 0, got {exclude_last}.")
    kept = len(thinking_positions) - exclude_last
    window = thinking_positions[:kept] if kept > 0 else thinking_positions
    plateau = float(scores[window].mean())
    cliff = plateau - final
    max_drop = float(scores[thinking_positions].max()) - final

    drop_start = nan
    if cliff > 0:
        threshold = (plateau + final) / 2
        at_or_above = np.flatnonzero(scores >= threshold)
        start = thinking_positions[0] if len(at_or_above) == 0 else max(at_or_above[-1] + 1, thinking_positions[0])
        drop_start = float(len(scores) - 1 - start)
    return {"plateau": plateau, "final": final, "cliff": cliff, "max_drop": max_drop, "drop_start": drop_start,
            "n_thinking": int(len(thinking_positions))}


def metrics_frame(trajectories: Trajectories, layer: int, kind: Kind = "probability",
                  exclude_last: int = DEFAULT_EXCLUDE_LAST) -> pd.DataFrame:
    """Return one row per trace: its metadata, layer, length and `cliff_metrics`."""
    rows = []
    for values, segments in zip(trajectories.values(layer, kind), trajectories.segments):
        rows.append({"layer": layer, "length": len(values), **cliff_metrics(values, segments, exclude_last)})
    return pd.concat([trajectories.meta.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


METRIC_COLUMNS = ("plateau", "final", "cliff", "max_drop", "drop_start")


def group_summary(metrics: pd.DataFrame, by: str | Sequence[str] = "outcome") -> pd.DataFrame:
    """Return count, mean and median of each cliff metric per group (outcome, source, category, model_id, ...)."""
    keys = [by] if isinstance(by, str) else list(by)
    missing = [key for key in keys if key not in metrics.columns]
    if missing:
        raise ValueError(f"cannot group by {missing}: the columns are {list(metrics.columns)}.")
    grouped = metrics.groupby(keys, dropna=False)
    summary = grouped[list(METRIC_COLUMNS)].agg(["mean", "median"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary.insert(0, "n", grouped.size())
    return summary.reset_index()


# --------------------------------------------------------------------------- tidy curves for plots

def tail_frame(trajectories: Trajectories, layer: int, by: str = "outcome", *, kind: Kind = "probability",
               max_distance: int = 64, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Return the tail-aligned mean curve with a bootstrap band per group.

    Columns: group, distance (0 = last position), mean, low, high, count.
    """
    values = trajectories.values(layer, kind)
    rows = []
    for group, members in trajectories.meta.groupby(by, sort=True).groups.items():
        aligned = tail_align([values[i] for i in members], max_distance)
        mean, count = tail_mean([values[i] for i in members], max_distance)
        low, high = bootstrap_band(aligned, n_boot=n_boot, level=level, seed=seed)
        rows.append(pd.DataFrame({"group": str(group), "distance": np.arange(len(mean)), "mean": mean,
                                  "low": low, "high": high, "count": count}))
    return pd.concat(rows, ignore_index=True)


def thinking_frame(trajectories: Trajectories, layer: int, by: str = "outcome", *, kind: Kind = "probability",
                   n_points: int = 50, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Return mean curves on the normalised thinking axis (0 = first, 1 = last thinking token) per group.

    Columns: group, position, mean, low, high, count.
    """
    values = trajectories.values(layer, kind)
    clip = (0.0, 1.0) if kind == "probability" else None
    rows = []
    for group, members in trajectories.meta.groupby(by, sort=True).groups.items():
        resampled = np.stack([resample_thinking(values[i], trajectories.segments[i], n_points, clip)
                              for i in members])
        count = np.sum(~np.isnan(resampled), axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nansum(resampled, axis=0) / count
        low, high = bootstrap_band(resampled, n_boot=n_boot, level=level, seed=seed)
        rows.append(pd.DataFrame({"group": str(group), "position": np.linspace(0, 1, n_points), "mean": mean,
                                  "low": low, "high": high, "count": count}))
    return pd.concat(rows, ignore_index=True)


def layer_tail_matrix(trajectories: Trajectories, rows: Sequence[int] | None = None, *, kind: Kind = "probability",
                      max_distance: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Return (n_layers, n_distances) tail-aligned mean scores and the (n_distances,) trace counts.

    Args:
        rows: traces to average (all when None).
    """
    chosen = range(len(trajectories)) if rows is None else [int(r) for r in rows]
    if len(chosen) == 0:
        raise ValueError("no traces selected for the heatmap.")
    means, count = [], None
    for layer in trajectories.layers:
        values = trajectories.values(layer, kind)
        mean, count = tail_mean([values[i] for i in chosen], max_distance)
        means.append(mean)
    return np.stack(means), count
