"""Access to the shipped data files and checks of their recorded SHA-256 digests."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from importlib.abc import Traversable
from typing import Any

PROVENANCE_FILE = "provenance.json"


def data_path(name: str) -> Traversable:
    """Return the path of a file in the package's `data/` folder."""
    return resources.files("cliffkit.datasets").joinpath("data", name)


def sha256_of(name: str) -> str:
    """Return the hex SHA-256 digest of a shipped data file."""
    return hashlib.sha256(data_path(name).read_bytes()).hexdigest()


def load_provenance() -> dict[str, Any]:
    """Read `data/provenance.json`, which maps each data file name to its source and digest."""
    return json.loads(data_path(PROVENANCE_FILE).read_text(encoding="utf-8"))


def find_checksum_mismatches() -> list[str]:
    """Return the names of data files whose SHA-256 differs from the one in provenance.json."""
    files = load_provenance()["files"]
    return [name for name, entry in files.items() if sha256_of(name) != entry["sha256"]]
