"""Where cliffkit keeps converted models and run outputs."""

from __future__ import annotations

import os
from pathlib import Path


def cliffkit_home() -> Path:
    """Return the cache root: $CLIFFKIT_HOME, else $XDG_CACHE_HOME/cliffkit, else ~/.cache/cliffkit."""
    explicit = os.environ.get("CLIFFKIT_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cliffkit"


def models_dir() -> Path:
    """Return the folder of converted models, inside the cache root."""
    return cliffkit_home() / "models"
