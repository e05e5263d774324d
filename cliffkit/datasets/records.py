"""The `Prompt` record that every prompt source returns, and the names of sources and splits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

HARMFUL_SOURCES: tuple[str, ...] = ("harmbench", "advbench", "strongreject")
BENIGN_SOURCES: tuple[str, ...] = ("benign", "overrefusal", "arithmetic")
SOURCES: tuple[str, ...] = HARMFUL_SOURCES + BENIGN_SOURCES
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Prompt:
    """One prompt with its label, category and split.

    `id` has the form "<source>/<key>" and is unique across all sources and stable across
    releases, because `split` is derived from it. `meta` contains source-specific string
    fields, for example the HarmBench functional category or the StrongREJECT source column.
    Treat `meta` as read-only, because the loader caches and shares `Prompt` objects.
    """

    id: str
    text: str
    source: str
    category: str
    split: str
    harmful: bool
    answer: int | None = None
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)
