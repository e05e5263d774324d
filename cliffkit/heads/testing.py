"""Tiny random-weight models of every architecture with a head layout, for tests and exercises."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from cliffkit.models import LoadedModel, wrap_model
from cliffkit.testing import tiny_config, tiny_tokenizer


def tiny_head_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                    **config_overrides: Any) -> LoadedModel:
    """Build a random-weight model of `model_type` (2 layers, 4 query heads, 2 KV heads, width 32).

    It uses the ChatML test tokenizer and the prompted-scaffold family, whatever
    the architecture, so any model type in `cliffkit.heads.HEAD_LAYOUTS` runs
    through rendering, generation and head scans. Pass e.g. head_dim=16 for a
    head size other than d_model / n_heads.
    """
    tokenizer = tiny_tokenizer("qwen2.5-instruct")
    special_ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id)
    config = tiny_config(model_type, vocab_size=len(tokenizer), **{**special_ids, **config_overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return wrap_model(model, tokenizer, "scaffold", model_id=f"tiny/{model_type}")
