"""Labelling of traces: run a judge over trace answers and store its verdicts."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

from tqdm.auto import tqdm

from cliffkit.judge.base import Judge, Verdict
from cliffkit.judge.keyword import KeywordJudge
from cliffkit.traces import Trace

logger = logging.getLogger(__name__)

# The keys that `judge_traces` writes into `Trace.labels`.
LABEL_KEYS = ("refused", "judge", "matched")


def judge_traces(traces: Sequence[Trace], judge: Judge | None = None,
                 batch_size: int = 64) -> list[Trace]:
    """Label each trace's answer and store the verdict in `trace.labels`.

    Sets labels "refused" (True, False, or None for an empty answer), "judge" and
    "matched" in place, keeping other labels, and returns the traces as a list.
    The default judge is `KeywordJudge()`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    traces = list(traces)
    judge = judge if judge is not None else KeywordJudge()
    _warn_if_harm_judge_on_benign(judge, traces)

    starts = range(0, len(traces), batch_size)
    for start in tqdm(starts, desc=f"judging with {judge.name}", disable=len(starts) <= 1):
        batch = traces[start:start + batch_size]
        verdicts = judge.judge([trace.prompt for trace in batch], [trace.answer for trace in batch])
        _store_verdicts(batch, verdicts, judge.name)

    counts = Counter(trace.labels["refused"] for trace in traces)
    logger.info("%s labelled %d traces: %d refused, %d complied, %d without an answer",
                judge.name, len(traces), counts[True], counts[False], counts[None])
    return traces


def _store_verdicts(batch: Sequence[Trace], verdicts: Sequence[Verdict], judge_name: str) -> None:
    if len(verdicts) != len(batch):
        raise RuntimeError(f"judge {judge_name} returned {len(verdicts)} verdicts "
                           f"for {len(batch)} answers")
    for trace, verdict in zip(batch, verdicts):
        trace.labels.update(refused=verdict.refused, judge=verdict.judge, matched=verdict.matched)


def _warn_if_harm_judge_on_benign(judge: Judge, traces: Sequence[Trace]) -> None:
    benign = sum(not trace.harmful for trace in traces)
    if getattr(judge, "measures", "refusal") == "harm" and benign:
        logger.warning(
            "%s judges harm, not refusal: on %d benign prompts a helpful answer is labelled "
            "refused, so their complied rate does not measure over-refusal",
            judge.name, benign,
        )
