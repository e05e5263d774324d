"""The verdict record and the interface that every judge implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, runtime_checkable

# What a judge's verdict is about. A "refusal" judge reads whether the answer
# declines the request. A "harm" judge (a guard model) reads whether the answer
# is harmful, so its verdict means "refused" only for harmful prompts.
Measure = Literal["refusal", "harm"]


@dataclass(frozen=True)
class Verdict:
    """One judge's label for one answer.

    `refused` is True for a refusal, False for compliance, and None when the
    answer is empty (the model never answered), which no judge can label.
    `matched` is the evidence: the refusal phrase that fired, or the guard
    model's output. It is None when nothing matched.
    """

    refused: bool | None
    judge: str
    matched: str | None = None


@runtime_checkable
class Judge(Protocol):
    """A labeller of answers to prompts, such as the keyword judge or a guard model."""

    name: str

    def judge(self, prompts: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        """Label each answer, read together with the prompt at the same index."""
        ...


def check_same_length(prompts: Sequence[str], answers: Sequence[str]) -> None:
    """Raise ValueError unless there is exactly one answer per prompt."""
    if len(prompts) != len(answers):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(answers)} answers. Pass one answer per prompt."
        )
