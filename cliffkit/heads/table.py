"""The ranked head table: every method's per-head value side by side, with rank correlations.

Methods disagree in sign by construction. Direct attribution is negative for a
head that writes against the refusal direction, while an ablation effect is
positive for that head (removing it raises the score). `suppression_score`
aligns them: higher always means "works more against refusal".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

ATTRIBUTION_PREFIX = "attribution"


def merge_head_frames(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Join per-method frames (layer, head, value) on (layer, head)."""
    if not frames:
        raise ValueError("merge_head_frames needs at least one frame.")
    table = frames[0]
    for frame in frames[1:]:
        table = table.merge(frame, on=["layer", "head"], how="outer")
    return table.sort_values(["layer", "head"]).reset_index(drop=True)


def suppression_score(table: pd.DataFrame, column: str) -> pd.Series:
    """Return `column` signed so that higher means the head works more against refusal.

    Columns whose name starts with "attribution" are direct projections and get
    negated; every other column is an ablation effect and keeps its sign.
    """
    sign = -1.0 if column.startswith(ATTRIBUTION_PREFIX) else 1.0
    return sign * table[column]


def rank_heads(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Sort the table by `by`'s suppression score, strongest suppression head first, and add `rank_<by>` columns."""
    if by not in table.columns:
        raise ValueError(f"Column {by!r} is not in the head table; it has {', '.join(map(str, table.columns))}.")
    ranked = table.copy()
    for column in _value_columns(table):
        ranked[f"rank_{column}"] = suppression_score(table, column).rank(ascending=False, method="min")
    return ranked.sort_values(f"rank_{by}").reset_index(drop=True)


def top_heads(table: pd.DataFrame, by: str, k: int) -> list[tuple[int, int]]:
    """Return the k (layer, head) pairs with the highest suppression score in column `by`."""
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}.")
    scores = suppression_score(table, by).dropna().sort_values(ascending=False)
    rows = table.loc[scores.index[:k]]
    return [(int(layer), int(head)) for layer, head in zip(rows["layer"], rows["head"])]


def rank_correlations(table: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Return the Spearman rank correlation between methods, on sign-aligned suppression scores.

    A value near 1 means two methods rank the heads alike. Heads missing in
    either column (NaN) are left out of that pair.
    """
    columns = list(columns) if columns is not None else _value_columns(table)
    aligned = pd.DataFrame({column: suppression_score(table, column) for column in columns})
    return aligned.corr(method="spearman")


def _value_columns(table: pd.DataFrame) -> list[str]:
    return [column for column in table.columns
            if column not in ("layer", "head") and not str(column).startswith("rank_")
            and np.issubdtype(table[column].dtype, np.number)]
