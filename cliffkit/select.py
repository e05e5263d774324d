"""Cliff-as-a-Judge: score each pool prompt by the model's own refusal cliff and select a small training set.

The scores come from the model's natural traces (generated without the safety system
prompt): the refusal probe is read at the last position of prompt + thinking + closing
marker ("final") and averaged over the thinking ("plateau"), and cliff = plateau − final.
Baselines: random subsets, the keyword rule (prompts the model did not refuse) and the
full pool.

Which ranking the paper uses: its abstract selects "the examples with the largest
refusal cliff", while the authors' selection script (src/train/ranking.py in
MikaStars39/RefusalCliff) sorts the pool by the probe output at the final position,
ascending. `by="final"` (the default) follows the script, `by="cliff"` the abstract.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from cliffkit.generate import GenerationSettings, generate_traces
from cliffkit.judge import Judge, judge_traces
from cliffkit.models import LoadedModel
from cliffkit.pool import PoolExample, check_disjoint, write_pool
from cliffkit.probe import LinearProbe
from cliffkit.traces import Trace, read_traces, write_traces_atomic

logger = logging.getLogger(__name__)

RankBy = Literal["final", "cliff"]
RANKINGS: tuple[str, ...] = ("final", "cliff")
SCORE_COLUMNS = ("id", "source", "category", "refused", "closed_by", "thinking_tokens",
                 "plateau", "final", "cliff", "max_drop", "n_thinking")


# --------------------------------------------------------------------------- the model's own traces and scores

def natural_traces(
    lm: LoadedModel,
    pool: Sequence[PoolExample],
    out: str | Path,
    settings: GenerationSettings = GenerationSettings(),
    judge: Judge | None = None,
    progress: bool = True,
) -> list[Trace]:
    """Generate and judge the model's own response to every pool prompt, as it answers without safety prompting.

    The traces use the family's default system prompt (`settings.system` must be None),
    are appended to `out` (resumable) and come back judged, in pool order.
    """
    if settings.system is not None:
        raise ValueError("natural traces must use the family's own system prompt, but settings.system is set "
                         f"({settings.system[:60]!r}...). Pass GenerationSettings(system=None).")
    check_disjoint(pool)
    generate_traces(lm, list(pool), settings, out=out, progress=progress)

    by_id = {trace.prompt_id: trace for trace in read_traces(out)}
    missing = [example.id for example in pool if example.id not in by_id]
    if missing:
        raise RuntimeError(f"{out} lacks traces for {len(missing)} pool prompts (first: {missing[:3]}); "
                           "rerun to resume the generation.")
    pool_ids = {example.id for example in pool}
    traces = judge_traces([by_id[example.id] for example in pool], judge)
    others = [trace for prompt_id, trace in by_id.items() if prompt_id not in pool_ids]
    write_traces_atomic(out, [*traces, *others])
    return traces


def score_pool(
    lm: LoadedModel,
    traces: Sequence[Trace],
    probe: LinearProbe,
    *,
    exclude_last: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> pd.DataFrame:
    """Read the probe along each natural trace and return one row of cliff metrics per pool prompt.

    Scores are probabilities of the probe's class 1 (refusal) at `probe.layer`, over
    prompt + thinking + closing marker. Columns: `SCORE_COLUMNS`; `refused` is the
    judge's label of the model's own answer (True, False or None).
    """
    from cliffkit.cliff import DEFAULT_EXCLUDE_LAST, cliff_metrics, score_traces

    if not traces:
        raise ValueError("no traces to score.")
    exclude_last = DEFAULT_EXCLUDE_LAST if exclude_last is None else exclude_last
    trajectories = score_traces(lm, traces, probe, until="close", batch_size=batch_size, progress=progress)
    values = trajectories.values(probe.layer, "probability")

    rows = []
    for trace, scores, segments in zip(traces, values, trajectories.segments):
        metrics = cliff_metrics(scores, segments, exclude_last)
        rows.append({"id": trace.prompt_id, "source": trace.source, "category": trace.category,
                     "refused": trace.labels.get("refused"), "closed_by": trace.closed_by,
                     "thinking_tokens": trace.thinking_tokens,
                     **{name: metrics[name] for name in ("plateau", "final", "cliff", "max_drop", "n_thinking")}})
    return pd.DataFrame(rows, columns=list(SCORE_COLUMNS))


# --------------------------------------------------------------------------- selection rules

def resolve_count(pool_size: int, k: int | None = None, percent: float | None = None) -> int:
    """Return how many examples to select: `k`, or ceil(pool_size * percent / 100) (at least 1).

    Exactly one of `k` and `percent` must be given. Raises ValueError for k < 1,
    k > pool_size, or percent outside (0, 100].
    """
    if (k is None) == (percent is None):
        raise ValueError(f"pass exactly one of k and percent, got k={k!r} and percent={percent!r}.")
    if pool_size < 1:
        raise ValueError("the pool is empty: build or load a pool with at least one example first.")
    if percent is not None:
        if not 0 < percent <= 100:
            raise ValueError(f"percent must be in (0, 100], got {percent}. For 1.7% of the pool pass 1.7.")
        return max(1, math.ceil(pool_size * percent / 100))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if k > pool_size:
        raise ValueError(f"k={k} is larger than the pool ({pool_size} examples). Pass k <= {pool_size}, "
                         "or a percentage of the pool.")
    return int(k)


def rank_pool(scores: pd.DataFrame, by: RankBy = "final") -> pd.DataFrame:
    """Order the pool for Cliff-as-a-Judge and add a 1-based `rank` column.

    by="final": lowest final refusal score first (the model is least inclined to refuse
    when its answer starts). by="cliff": largest cliff (plateau − final) first. Ties are
    broken by id, ascending, and rows whose score is NaN (no thinking) go last.
    """
    if by not in RANKINGS:
        raise ValueError(f"by must be one of {RANKINGS}, got {by!r}.")
    _require_columns(scores, ("id", by))
    key = scores[by].astype(float)
    # Sorting on (missing, signed score, id) gives one total order whatever the input order.
    frame = scores.assign(_missing=key.isna(), _key=key if by == "final" else -key)
    ordered = frame.sort_values(["_missing", "_key", "id"], kind="mergesort").drop(columns=["_missing", "_key"])
    ordered = ordered.reset_index(drop=True)
    ordered.insert(0, "rank", np.arange(1, len(ordered) + 1))
    return ordered


def select_top(scores: pd.DataFrame, *, k: int | None = None, percent: float | None = None,
               by: RankBy = "final") -> pd.DataFrame:
    """Select the top k (or top `percent`%) of the pool by Cliff-as-a-Judge ranking (see `rank_pool`)."""
    count = resolve_count(len(scores), k, percent)
    return rank_pool(scores, by).head(count).reset_index(drop=True)


def select_random(scores: pd.DataFrame, *, k: int | None = None, percent: float | None = None,
                  seed: int = 0) -> pd.DataFrame:
    """Select k pool rows uniformly at random with `random.Random(seed)`, drawn from the pool sorted by id."""
    count = resolve_count(len(scores), k, percent)
    _require_columns(scores, ("id",))
    ordered = scores.sort_values("id", kind="mergesort").reset_index(drop=True)
    chosen = random.Random(seed).sample(range(len(ordered)), count)
    picked = ordered.iloc[chosen].reset_index(drop=True)
    picked.insert(0, "rank", np.arange(1, len(picked) + 1))
    return picked


def select_rule(scores: pd.DataFrame, *, k: int | None = None, percent: float | None = None,
                seed: int = 0) -> pd.DataFrame:
    """Select pool prompts whose own natural answer did NOT refuse (judge label False).

    With k or percent, k of those candidates are drawn at random with `seed`. When
    there are fewer candidates than k, all of them are returned with a warning, so the
    result can be shorter than k. Empty answers (label None) are not candidates.
    """
    _require_columns(scores, ("id", "refused"))
    candidates = scores[scores["refused"].map(_is_false)]
    candidates = candidates.sort_values("id", kind="mergesort").reset_index(drop=True)
    if k is None and percent is None:
        picked = candidates
    else:
        count = resolve_count(len(scores), k, percent)
        if len(candidates) < count:
            logger.warning("keyword rule: only %d pool prompts were answered without refusal, fewer than k=%d; "
                           "using all of them", len(candidates), count)
            picked = candidates
        else:
            chosen = random.Random(seed).sample(range(len(candidates)), count)
            picked = candidates.iloc[chosen].reset_index(drop=True)
    picked = picked.copy()
    picked.insert(0, "rank", np.arange(1, len(picked) + 1))
    return picked


def _is_false(value) -> bool:
    # The column contains True, False and None (numpy bools after pandas operations).
    return value is not None and not pd.isna(value) and not bool(value)


def select_full(scores: pd.DataFrame) -> pd.DataFrame:
    """Select the whole pool, ordered by id."""
    _require_columns(scores, ("id",))
    picked = scores.sort_values("id", kind="mergesort").reset_index(drop=True)
    picked.insert(0, "rank", np.arange(1, len(picked) + 1))
    return picked


def _require_columns(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"the score table lacks columns {missing}; it has {list(frame.columns)}. "
                         "Build it with cliffkit.select.score_pool.")


# --------------------------------------------------------------------------- writing a selection

def write_selection(
    selection: pd.DataFrame,
    pool: Sequence[PoolExample],
    out_dir: str | Path,
    name: str,
    info: dict | None = None,
) -> Path:
    """Write the selected examples with their scores: `<name>.jsonl`, `<name>.csv` and `<name>.json`.

    The JSON Lines file follows the pool schema (so `read_pool` and `cliffkit repair`
    read it) with the scores under meta["selection"]; the CSV has one row of scores
    per selected example; the JSON holds `info` (method, k, pool size, ...).
    Returns the JSON Lines path.
    """
    by_id = {example.id: example for example in pool}
    unknown = [pool_id for pool_id in selection["id"] if pool_id not in by_id]
    if unknown:
        raise ValueError(f"selection {name!r} names ids that are not in the pool: {unknown[:5]}.")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for row in selection.to_dict(orient="records"):
        example = by_id[row["id"]]
        scores = {key: _plain(value) for key, value in row.items() if key != "id"}
        records.append(replace(example, meta={**example.meta, "selection": {"name": name, **scores}}))
    path = write_pool(out / f"{name}.jsonl", records)
    selection.to_csv(out / f"{name}.csv", index=False)
    summary = {"name": name, "n_selected": len(selection), "ids": list(selection["id"]), **(info or {})}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2, default=_plain), encoding="utf-8")
    return path


def _plain(value):
    """Convert numpy scalars and NaN to JSON-friendly Python values."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
