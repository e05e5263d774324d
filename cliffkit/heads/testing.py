"""Tiny random-weight models of every architecture with a head layout, for tests and exercises."""

from __future__ import annotations

from typing import Any

import torch

from cliffkit.models import LoadedModel
from cliffkit.testing import _build_tiny


def tiny_head_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                    **config_overrides: Any) -> LoadedModel:
    """Build a random-weight model of `model_type` (2 layers, 4 query heads, 2 KV heads, width 32).

    It uses the ChatML test tokenizer and the prompted-scaffold family, whatever
    the architecture, so any model type in `cliffkit.heads.HEAD_LAYOUTS` runs
    through rendering, generation and head scans. Pass e.g. head_dim=16 for a
    head size other than d_model / n_heads.
    """
    return _build_tiny("scaffold", "qwen2.5-instruct", model_type, f"tiny/{model_type}", seed, dtype,
                       config_overrides)
