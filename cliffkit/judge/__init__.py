"""Judges that label each answer to a prompt as refused or complied, and reports over the labels.

- `KeywordJudge` (the default): refusal phrases near the start of the answer,
  matched at word boundaries after normalisation. Its module docstring lists the
  rules and how they differ from the reference code's keyword filter.
- `GuardModelJudge`: a Hugging Face guard model such as Llama Guard, loaded by
  the caller. "unsafe" means the answer complied with a harmful request.
- `judge_traces` writes the verdicts into `Trace.labels`, and `refusal_report`
  counts them per group with refusal rate, attack success rate and Wilson
  intervals.

An empty answer is labelled `refused=None` ("no answer") by every judge, and
the report counts it in its own `no_answer` column, outside the rates.
"""

from cliffkit.judge.base import Judge, Verdict
from cliffkit.judge.guard import GuardModelJudge, GuardOutputError, parse_guard_output
from cliffkit.judge.keyword import (
    ACTION_WORDS,
    DEFAULT_WINDOW,
    FILLER_WORDS,
    MAX_FILLER_WORDS,
    REFUSAL_PHRASES,
    KeywordJudge,
    RefusalPhrase,
    normalize_answer,
)
from cliffkit.judge.label import LABEL_KEYS, judge_traces
from cliffkit.judge.report import UnjudgedTracesError, refusal_report, wilson_interval

__all__ = [
    "ACTION_WORDS",
    "DEFAULT_WINDOW",
    "FILLER_WORDS",
    "LABEL_KEYS",
    "MAX_FILLER_WORDS",
    "REFUSAL_PHRASES",
    "GuardModelJudge",
    "GuardOutputError",
    "Judge",
    "KeywordJudge",
    "RefusalPhrase",
    "UnjudgedTracesError",
    "Verdict",
    "judge_traces",
    "normalize_answer",
    "parse_guard_output",
    "refusal_report",
    "wilson_interval",
]
