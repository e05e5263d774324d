"""Deterministic train/val/test assignment from a SHA-256 hash of the prompt id."""

from __future__ import annotations

import hashlib
import math

from cliffkit.datasets.records import SPLITS

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)


def hash_unit_interval(prompt_id: str) -> float:
    """Map an id to a number in [0, 1) from the first 8 bytes of its UTF-8 SHA-256 digest.

    The value is the big-endian integer of those bytes divided by 2**64. It does not depend
    on the Python process, unlike the built-in `hash()`, which is salted per process.
    """
    digest = hashlib.sha256(prompt_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def validate_fractions(fractions: tuple[float, float, float]) -> None:
    """Raise ValueError unless `fractions` contains three non-negative numbers that sum to 1."""
    if len(fractions) != len(SPLITS):
        raise ValueError(
            f"Invalid split fractions {fractions!r}: expected 3 values for {SPLITS}, "
            f"for example {DEFAULT_FRACTIONS}."
        )
    if any(value < 0 for value in fractions):
        raise ValueError(f"Invalid split fractions {fractions!r}: every fraction must be >= 0.")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
        raise ValueError(f"Invalid split fractions {fractions!r}: they sum to {sum(fractions)}, not 1.")


def split_of(prompt_id: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """Return "train", "val" or "test" for an id, with the given (train, val, test) fractions.

    With the default fractions (0.6, 0.2, 0.2), an id goes to train when
    `hash_unit_interval(id) < 0.6`, to val when it is below 0.8, and to test otherwise.
    """
    validate_fractions(fractions)
    position = hash_unit_interval(prompt_id)
    train_fraction, val_fraction, _ = fractions
    if position < train_fraction:
        return "train"
    if position < train_fraction + val_fraction:
        return "val"
    return "test"
