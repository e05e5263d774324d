"""Public loading API: select prompts by source, category, split and label, and sample them."""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from cliffkit.datasets.readers import READERS
from cliffkit.datasets.records import SOURCES, SPLITS, Prompt

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

DEFAULT_PER_SOURCE = 8


@functools.cache
def _source_prompts(source: str) -> tuple[Prompt, ...]:
    prompts = tuple(READERS[source]())
    logger.debug("Loaded %d prompts from source %s", len(prompts), source)
    return prompts


def _as_name_list(value: str | Iterable[str], argument: str) -> list[str]:
    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise ValueError(f"Invalid {argument}: the list is empty. Pass None to select all.")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"Invalid {argument} entry {name!r}: expected a string.")
    return names


def _select_sources(sources: str | Iterable[str] | None) -> list[str]:
    if sources is None:
        return list(SOURCES)
    names = _as_name_list(sources, "sources")
    for name in names:
        if name not in SOURCES:
            raise ValueError(f"Unknown source {name!r}. Valid sources: {', '.join(SOURCES)}.")
    return [source for source in SOURCES if source in names]


def _select_splits(splits: str | Iterable[str] | None) -> set[str]:
    if splits is None:
        return set(SPLITS)
    names = _as_name_list(splits, "splits")
    for name in names:
        if name not in SPLITS:
            raise ValueError(f"Invalid split {name!r}. Valid splits: {', '.join(SPLITS)}.")
    return set(names)


def _validate_limit(limit: int | None) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"Invalid limit {limit!r}: expected a positive integer or None.")
    if limit <= 0:
        raise ValueError(f"Invalid limit {limit}: it must be at least 1. Pass None to load all prompts.")


def _categories_of(sources: Sequence[str]) -> list[str]:
    return sorted({prompt.category for source in sources for prompt in _source_prompts(source)})


def _check_categories(categories: list[str], sources: list[str]) -> None:
    available = _categories_of(sources)
    for category in categories:
        if category not in available:
            raise ValueError(
                f"Unknown category {category!r} for sources {sources}. "
                f"Available categories: {', '.join(available)}."
            )


def _sample_in_order(prompts: list[Prompt], limit: int, seed: int) -> list[Prompt]:
    """Draw `limit` prompts with `random.Random(seed)` and return them in their original order."""
    chosen = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[index] for index in chosen]


def list_sources() -> list[str]:
    """Return the source names in load order: harmful sources first, then benign ones."""
    return list(SOURCES)


def list_categories(source: str | None = None) -> list[str]:
    """Return the sorted categories of one source, or of all sources when `source` is None."""
    sources = _select_sources(source)
    return _categories_of(sources)


def load_prompts(
    sources: str | Iterable[str] | None = None,
    *,
    categories: str | Iterable[str] | None = None,
    splits: str | Iterable[str] | None = None,
    harmful: bool | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Prompt]:
    """Load the prompts that match every given filter, in source order and then file order.

    Each filter accepts a single name or a list of names, and None means no filter. With
    `limit`, the result is a random sample of that size drawn with `random.Random(seed)`,
    returned in the same order as the unsampled result, so the same arguments always give
    the same prompts. A limit larger than the number of matches returns all matches.

    Raises ValueError for an unknown source, category or split, for `limit` < 1, and when
    the filters together match no prompt. Raises TypeError for arguments of the wrong type.
    """
    selected_sources = _select_sources(sources)
    selected_splits = _select_splits(splits)
    _validate_limit(limit)
    if harmful is not None and not isinstance(harmful, bool):
        raise TypeError(f"Invalid harmful filter {harmful!r}: expected True, False or None.")

    prompts = [prompt for source in selected_sources for prompt in _source_prompts(source)]

    if categories is not None:
        selected_categories = _as_name_list(categories, "categories")
        _check_categories(selected_categories, selected_sources)
        prompts = [prompt for prompt in prompts if prompt.category in selected_categories]
    prompts = [prompt for prompt in prompts if prompt.split in selected_splits]
    if harmful is not None:
        prompts = [prompt for prompt in prompts if prompt.harmful == harmful]

    if not prompts:
        raise ValueError(
            f"No prompts match sources={selected_sources}, categories={categories!r}, "
            f"splits={splits!r}, harmful={harmful!r}. Remove or change a filter. "
            f"Available categories for these sources: {', '.join(_categories_of(selected_sources))}."
        )

    if limit is not None and limit < len(prompts):
        prompts = _sample_in_order(prompts, limit, seed)
    logger.debug("Selected %d prompts from %s", len(prompts), selected_sources)
    return prompts


def sample_prompts(
    per_source: int = DEFAULT_PER_SOURCE,
    *,
    sources: str | Iterable[str] | None = None,
    splits: str | Iterable[str] | None = None,
    seed: int = 0,
) -> list[Prompt]:
    """Draw up to `per_source` prompts from each source, for a quick run over all sources.

    Each source is sampled with `load_prompts(source, splits=splits, limit=per_source,
    seed=seed)`. A source with fewer matching prompts contributes all of them.
    """
    _validate_limit(per_source)
    sample = []
    for source in _select_sources(sources):
        sample.extend(load_prompts(source, splits=splits, limit=per_source, seed=seed))
    return sample


def prompts_to_frame(prompts: Iterable[Prompt]) -> pd.DataFrame:
    """Return a DataFrame with one row per prompt and one column per `Prompt` field.

    The `answer` column has the nullable "Int64" dtype, and `meta` contains one dict per row.
    """
    import pandas as pd  # Imported here so that loading prompts does not import pandas.

    columns = ["id", "text", "source", "category", "split", "harmful", "answer", "meta"]
    rows = [
        {
            "id": prompt.id,
            "text": prompt.text,
            "source": prompt.source,
            "category": prompt.category,
            "split": prompt.split,
            "harmful": prompt.harmful,
            "answer": prompt.answer,
            "meta": dict(prompt.meta),
        }
        for prompt in prompts
    ]
    frame = pd.DataFrame(rows, columns=columns)
    frame["answer"] = frame["answer"].astype("Int64")
    frame["harmful"] = frame["harmful"].astype(bool)
    return frame
