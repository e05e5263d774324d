"""Linear probes that read refusal intention from the residual stream, with the controls that say what they read.

A probe is a logistic regression on standardised last-position activations, fitted on
a train split BY PROMPT id with C chosen by cross-validation, and exposed as a
direction in raw residual-stream space. The tasks separate "intends to refuse" from
"the prompt is harmful", and `transfer_by_distance` checks how a last-position probe
reads earlier positions of held-out traces.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from cliffkit.render import SEGMENT_NAMES
from cliffkit.traces import Trace

logger = logging.getLogger(__name__)

DEFAULT_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
MIN_PER_CLASS = 8
PROBE_SPACE = "residual stream: output of decoder block `layer`, before the final norm"


# --------------------------------------------------------------------------- tasks and labels

@dataclass(frozen=True)
class ProbeTask:
    """Which traces a probe is trained on and what class 1 and class 0 mean."""

    name: str
    positive: str
    negative: str
    description: str
    caveat: str = ""


TASKS: dict[str, ProbeTask] = {
    task.name: task
    for task in [
        ProbeTask("refusal", "harmful-refused", "harmful-complied",
                  "Intends to refuse: harmful prompts only, so prompt harmfulness is held fixed."),
        ProbeTask("harmfulness", "harmful", "benign",
                  "Prompt harmfulness regardless of outcome: the signal the refusal probe must not be reduced to."),
        ProbeTask("paper", "harmful-refused", "benign-complied",
                  "The reference labelling: class 1 harmful and refused, class 0 benign and answered.",
                  caveat="Class 1 is always a harmful prompt and class 0 always a benign one, so this probe "
                         "can separate the classes by prompt harmfulness alone. Compare it with the 'refusal' task."),
    ]
}


class UnjudgedTracesError(ValueError):
    """Traces lack the refusal label that a judge writes."""


@dataclass
class TaskData:
    """The traces of one task: `indices` into the trace list, labels `y` and prompt ids `groups`."""

    task: ProbeTask
    indices: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    excluded: dict[str, int] = field(default_factory=dict)


def get_task(name: str) -> ProbeTask:
    if name not in TASKS:
        raise ValueError(f"Unknown probe task {name!r}. Known tasks: {', '.join(TASKS)}.")
    return TASKS[name]


def require_judged(traces: Sequence[Trace]) -> None:
    """Raise `UnjudgedTracesError` when any trace has no "refused" label."""
    missing = [trace.prompt_id for trace in traces if "refused" not in trace.labels]
    if missing:
        raise UnjudgedTracesError(
            f"{len(missing)} of {len(traces)} traces have no 'refused' label (first: {missing[0]!r}). "
            "Judge them first: `cliffkit judge TRACES.jsonl`."
        )


def task_labels(traces: Sequence[Trace], task: str | ProbeTask) -> TaskData:
    """Select the traces of a task and label them 1 (task.positive) or 0 (task.negative).

    Traces whose answer is empty (labels["refused"] is None) have no outcome and are left
    out of the tasks that need one. `TaskData.excluded` counts the traces left out.
    """
    task = get_task(task) if isinstance(task, str) else task
    if task.name != "harmfulness":
        require_judged(traces)

    indices, labels = [], []
    excluded = {"no_answer": 0, "other_class": 0}
    for index, trace in enumerate(traces):
        label = _label_for(task.name, trace)
        if label is None:
            excluded["no_answer" if trace.labels.get("refused", False) is None else "other_class"] += 1
            continue
        indices.append(index)
        labels.append(label)

    groups = np.array([traces[index].prompt_id for index in indices], dtype=object)
    return TaskData(task=task, indices=np.array(indices, dtype=np.int64), y=np.array(labels, dtype=np.int64),
                    groups=groups, excluded=excluded)


def _label_for(task: str, trace: Trace) -> int | None:
    if task == "harmfulness":
        return int(trace.harmful)
    refused = trace.labels.get("refused")
    if refused is None:
        return None
    if task == "refusal":
        return int(refused) if trace.harmful else None
    # "paper": harmful-refused vs benign-complied.
    if trace.harmful and refused:
        return 1
    if not trace.harmful and not refused:
        return 0
    return None


def check_class_counts(y: np.ndarray, task: ProbeTask, min_per_class: int = MIN_PER_CLASS) -> None:
    """Raise ValueError naming the counts when a class has fewer than `min_per_class` examples."""
    positives, negatives = int((y == 1).sum()), int((y == 0).sum())
    if min(positives, negatives) < min_per_class:
        raise ValueError(
            f"Probe task {task.name!r} needs at least {min_per_class} traces per class, got {positives} "
            f"{task.positive!r} and {negatives} {task.negative!r}. Generate more traces (a larger --per-source, "
            "more sources, or sampling with --temperature > 0 to get both outcomes), or pick another task "
            f"({', '.join(TASKS)})."
        )


# --------------------------------------------------------------------------- splits

@dataclass(frozen=True)
class Split:
    """Row indices of the train, validation and test parts. No prompt id is in two parts."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_by_prompt(groups: Sequence[str], y: Sequence[int], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                    seed: int = 0) -> Split:
    """Split rows into train/validation/test by prompt id, stratified by class.

    Each prompt id goes whole into one part, so several traces of one prompt never
    straddle train and test. Prompts are stratified by the label of their first row.
    Each part with a non-zero fraction gets at least one prompt of each class.
    """
    groups = np.asarray(groups, dtype=object)
    y = np.asarray(y)
    if len(groups) != len(y):
        raise ValueError(f"got {len(groups)} prompt ids for {len(y)} labels.")
    if any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0) or fractions[0] <= 0:
        raise ValueError(f"fractions must be (train > 0, val >= 0, test >= 0) summing to 1, got {fractions}.")

    first_label: dict[Any, int] = {}
    for group, label in zip(groups, y):
        first_label.setdefault(group, int(label))

    rng = np.random.default_rng(seed)
    parts: list[list[Any]] = [[], [], []]
    for label in sorted(set(first_label.values())):
        members = sorted(group for group, value in first_label.items() if value == label)
        rng.shuffle(members)
        counts = _part_sizes(len(members), fractions, label)
        start = 0
        for part, count in zip(parts, counts):
            part.extend(members[start:start + count])
            start += count

    return Split(*(np.flatnonzero(np.isin(groups, np.array(part, dtype=object))) for part in parts))


def _part_sizes(n: int, fractions: tuple[float, float, float], label: int) -> list[int]:
    held = [max(1, round(n * f)) if f > 0 else 0 for f in fractions[1:]]
    train = n - sum(held)
    if train < 2:
        raise ValueError(f"class {label} has {n} prompts, too few for a train part of at least 2 prompts plus "
                         f"held-out parts at fractions {fractions}. Add traces or lower the held-out fractions.")
    return [train, *held]


# --------------------------------------------------------------------------- the probe

@dataclass
class LinearProbe:
    """A logistic-regression probe at one layer, stored in standardised form with its scaler.

    The sklearn decision function is ((x - mean) / scale) · weight + bias. `direction()`
    and `intercept()` fold the scaler in, so `direction() · x + intercept()` gives the
    same logit on raw residual-stream vectors x.
    """

    weight: np.ndarray  # (d_model,) coefficients in standardised space
    bias: float
    mean: np.ndarray  # (d_model,) scaler mean
    scale: np.ndarray  # (d_model,) scaler standard deviation (1 for constant features)
    layer: int
    model_id: str
    task: str
    positive: str = "class 1"
    negative: str = "class 0"
    C: float = 1.0
    class_weight: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    pipeline: Pipeline | None = field(default=None, repr=False, compare=False)

    def direction(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the (d_model,) probe direction w / σ in raw residual-stream space."""
        return torch.from_numpy(self._raw_direction()).to(dtype)

    def intercept(self) -> float:
        """Return the intercept b − Σ w·μ/σ that goes with `direction()`."""
        return float(self.bias - self._raw_direction() @ self.mean)

    def _raw_direction(self) -> np.ndarray:
        return np.asarray(self.weight, dtype=np.float64) / np.asarray(self.scale, dtype=np.float64)

    def score_logit(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Return the logit direction · x + intercept for x of shape (..., d_model), computed in float64."""
        if isinstance(x, torch.Tensor):
            return x.to(torch.float64) @ self.direction(torch.float64).to(x.device) + self.intercept()
        return np.asarray(x, dtype=np.float64) @ self._raw_direction() + self.intercept()

    def score(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Return the probability of class 1 (the refusal score for refusal tasks)."""
        logit = self.score_logit(x)
        if isinstance(logit, torch.Tensor):
            return torch.sigmoid(logit)
        return 1.0 / (1.0 + np.exp(-logit))

    def metadata(self) -> dict[str, Any]:
        return {"layer": self.layer, "model_id": self.model_id, "task": self.task,
                "labels": {"1": self.positive, "0": self.negative}, "C": self.C,
                "class_weight": self.class_weight, "metrics": self.metrics,
                "space": PROBE_SPACE, "d_model": int(len(self.weight)), "format": 1}

    def save(self, path: str | Path) -> Path:
        """Write <path>.npz (plain float64 arrays) and <path>.json (metadata), and return the .npz path."""
        stem = Path(path).with_suffix("")
        stem.parent.mkdir(parents=True, exist_ok=True)
        np.savez(stem.with_suffix(".npz"), weight=np.asarray(self.weight, np.float64),
                 bias=np.array(self.bias, np.float64), mean=np.asarray(self.mean, np.float64),
                 scale=np.asarray(self.scale, np.float64), direction=self._raw_direction(),
                 intercept=np.array(self.intercept(), np.float64))
        stem.with_suffix(".json").write_text(json.dumps(to_jsonable(self.metadata()), indent=2), encoding="utf-8")
        return stem.with_suffix(".npz")

    @classmethod
    def load(cls, path: str | Path) -> "LinearProbe":
        """Read a probe written by `save`. Object arrays (pickles) are rejected, never unpickled."""
        stem = Path(path).with_suffix("")
        arrays_path, meta_path = stem.with_suffix(".npz"), stem.with_suffix(".json")
        for needed in (arrays_path, meta_path):
            if not needed.exists():
                raise FileNotFoundError(f"probe file {needed} not found. Write it with LinearProbe.save.")
        try:
            with np.load(arrays_path, allow_pickle=False) as arrays:
                data = {key: arrays[key] for key in ("weight", "bias", "mean", "scale")}
        except ValueError as error:
            raise ValueError(f"{arrays_path} contains pickled objects, which cliffkit never loads: {error}. "
                             "Re-save the probe with LinearProbe.save.") from error
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return cls(weight=data["weight"], bias=float(data["bias"]), mean=data["mean"], scale=data["scale"],
                   layer=int(meta["layer"]), model_id=meta["model_id"], task=meta["task"],
                   positive=meta["labels"]["1"], negative=meta["labels"]["0"], C=float(meta["C"]),
                   class_weight=meta.get("class_weight"), metrics=meta.get("metrics", {}))


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars, tuples and NaN (to null) so that `json.dumps` writes strict JSON."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def binary_metrics(y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Return accuracy and balanced accuracy at logit 0, AUROC (NaN with one class present), log loss and counts."""
    y = np.asarray(y)
    logits = np.asarray(logits, dtype=np.float64)
    if len(y) == 0:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "auroc": float("nan"),
                "log_loss": float("nan"), "n": 0, "n_positive": 0}
    predicted = (logits > 0).astype(int)
    both_classes = len(set(y.tolist())) == 2
    return {"accuracy": float(accuracy_score(y, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(y, predicted)) if both_classes else float("nan"),
            "auroc": float(roc_auc_score(y, logits)) if both_classes else float("nan"),
            "log_loss": float(log_loss(y, 1.0 / (1.0 + np.exp(-logits)), labels=[0, 1])),
            "n": int(len(y)), "n_positive": int(y.sum())}


def fit_probe(
    X: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str],
    *,
    split: Split | None = None,
    layer: int = -1,
    model_id: str = "",
    task: str | ProbeTask = "refusal",
    Cs: Sequence[float] = DEFAULT_CS,
    cv_folds: int = 5,
    class_weight: str | None = "balanced",
    seed: int = 0,
) -> LinearProbe:
    """Fit a standardised logistic-regression probe on the train part and score the held-out parts.

    C is chosen by cross-validated log loss on the train part, with folds grouped by
    prompt id. AUROC ignores the scale of the logits, so on separable data it ties
    across C and would pick the strongest regularisation, which squeezes every
    probability toward 0.5. Ties in log loss go to the smallest C. With
    class_weight="balanced" (the default) both classes weigh the same in the loss, so
    a probability of 0.5 does not lean toward the larger class. Pass None for the
    plain maximum-likelihood fit.

    Args:
        X: (n, d_model) activations, one row per trace.
        y: (n,) labels 0/1.
        groups: (n,) prompt ids. The split and the folds never divide a prompt.
        split: a precomputed `split_by_prompt`, or None to split with `seed`.
    """
    task = get_task(task) if isinstance(task, str) else task
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    groups = np.asarray(groups, dtype=object)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (n, d_model) with one row per label, got X {X.shape} and {len(y)} labels.")
    split = split if split is not None else split_by_prompt(groups, y, seed=seed)

    pipeline = Pipeline([("scaler", StandardScaler()),
                         ("logreg", LogisticRegression(max_iter=5000, class_weight=class_weight))])
    train_x, train_y, train_groups = X[split.train], y[split.train], groups[split.train]
    chosen_c = _choose_c(pipeline, train_x, train_y, train_groups, Cs, cv_folds, seed)
    pipeline.set_params(logreg__C=chosen_c).fit(train_x, train_y)

    scaler, logreg = pipeline.named_steps["scaler"], pipeline.named_steps["logreg"]
    metrics = {name: binary_metrics(y[rows], pipeline.decision_function(X[rows])) if len(rows) else {}
               for name, rows in (("train", split.train), ("val", split.val), ("test", split.test))}
    return LinearProbe(weight=logreg.coef_[0].astype(np.float64), bias=float(logreg.intercept_[0]),
                       mean=scaler.mean_.astype(np.float64), scale=scaler.scale_.astype(np.float64),
                       layer=layer, model_id=model_id, task=task.name, positive=task.positive,
                       negative=task.negative, C=chosen_c, class_weight=class_weight, metrics=metrics,
                       pipeline=pipeline)


def _choose_c(pipeline: Pipeline, X: np.ndarray, y: np.ndarray, groups: np.ndarray, Cs: Sequence[float],
              cv_folds: int, seed: int) -> float:
    # Each fold needs a prompt of each class in its validation part.
    smallest_class = min(len(set(groups[y == label])) for label in (0, 1))
    folds = min(cv_folds, smallest_class)
    if folds < 2:
        raise ValueError(f"the train part has {smallest_class} prompt(s) in its smaller class, too few to "
                         "cross-validate C. Add traces or give more of them to the train part.")
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    search = GridSearchCV(pipeline, {"logreg__C": sorted(Cs)}, scoring="neg_log_loss",
                          cv=list(cv.split(X, y, groups)), refit=False)
    search.fit(X, y)
    return float(search.best_params_["logreg__C"])


# --------------------------------------------------------------------------- layer sweep and directions

def sweep_layers(
    X: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str],
    layers: Sequence[int],
    *,
    split: Split | None = None,
    model_id: str = "",
    task: str | ProbeTask = "refusal",
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[int, LinearProbe]]:
    """Fit one probe per layer on the same split, and return a table of metrics and the probes.

    Args:
        X: (n, n_layers, d_model) last-position activations, layers in the order of `layers`.
    """
    X = np.asarray(X)
    if X.ndim != 3 or X.shape[1] != len(layers):
        raise ValueError(f"X must be (n, n_layers={len(layers)}, d_model), got {X.shape}.")
    split = split if split is not None else split_by_prompt(groups, y, seed=seed)
    probes, rows = {}, []
    for column, layer in enumerate(layers):
        probe = fit_probe(X[:, column], y, groups, split=split, layer=int(layer), model_id=model_id,
                          task=task, Cs=Cs, seed=seed)
        probes[int(layer)] = probe
        row = {"layer": int(layer), "C": probe.C}
        for part in ("train", "val", "test"):
            for metric in ("accuracy", "balanced_accuracy", "auroc", "log_loss"):
                row[f"{part}_{metric}"] = probe.metrics.get(part, {}).get(metric, float("nan"))
        row.update(n_train=len(split.train), n_val=len(split.val), n_test=len(split.test))
        rows.append(row)
    return pd.DataFrame(rows), probes


def best_layer(sweep: pd.DataFrame, metric: str = "val_auroc") -> int:
    """Return the layer with the highest `metric` (validation AUROC by default).

    Ties, common when a small validation part is separated perfectly, go to the lower
    validation log loss and then to the deeper layer.
    """
    ranked = sweep.assign(_neg_loss=-sweep["val_log_loss"])
    ranked = ranked.sort_values([metric, "_neg_loss", "layer"], ascending=False, na_position="last")
    return int(ranked.iloc[0]["layer"])


def mean_difference_directions(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Return (n_layers, d_model) float64 directions mean(X | y=1) − mean(X | y=0).

    Args:
        X: (n, n_layers, d_model) activations.
    """
    y = np.asarray(y)
    for label in (0, 1):
        if not (y == label).any():
            raise ValueError(f"no example of class {label}, but a difference of means needs both classes.")
    # float64 sums: float32 or bfloat16 sums lose low bits and bias the small difference.
    X64 = np.asarray(X, dtype=np.float64)
    return X64[y == 1].mean(axis=0) - X64[y == 0].mean(axis=0)


# --------------------------------------------------------------------------- transfer to earlier positions

def transfer_by_distance(logits: Sequence[np.ndarray], y: Sequence[int], max_distance: int = 64) -> pd.DataFrame:
    """Score a last-position probe at each distance from the end of held-out traces.

    At distance d only traces with more than d positions count (no padding, no filling).

    Args:
        logits: per trace, (length,) probe logits at every position.
        y: per trace, the true label.
    Returns:
        DataFrame with columns distance, n, accuracy, balanced_accuracy, auroc.
    """
    y = np.asarray(y)
    rows = []
    for distance in range(max_distance + 1):
        present = [i for i, values in enumerate(logits) if len(values) > distance]
        if not present:
            break
        values = np.array([logits[i][len(logits[i]) - 1 - distance] for i in present])
        metrics = binary_metrics(y[present], values)
        rows.append({"distance": distance, "n": metrics["n"], "accuracy": metrics["accuracy"],
                     "balanced_accuracy": metrics["balanced_accuracy"], "auroc": metrics["auroc"]})
    return pd.DataFrame(rows)


def transfer_by_segment(logits: Sequence[np.ndarray], segments: Sequence[np.ndarray], y: Sequence[int]) -> pd.DataFrame:
    """Score the probe on each trace's mean logit over each segment (prompt, thinking, close, answer).

    Returns:
        DataFrame with columns segment, n, accuracy, balanced_accuracy, auroc. Traces without the segment are left out.
    """
    y = np.asarray(y)
    rows = []
    for code, name in SEGMENT_NAMES.items():
        present, means = [], []
        for i, (values, labels) in enumerate(zip(logits, segments)):
            selected = np.asarray(values)[np.asarray(labels) == code]
            if len(selected):
                present.append(i)
                means.append(float(selected.mean()))
        if present:
            metrics = binary_metrics(y[present], np.array(means))
            rows.append({"segment": name, "n": metrics["n"], "accuracy": metrics["accuracy"],
                         "balanced_accuracy": metrics["balanced_accuracy"], "auroc": metrics["auroc"]})
    return pd.DataFrame(rows)
