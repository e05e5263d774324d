"""Attention heads and the refusal direction: direct attribution, causal scans and ablation."""

from cliffkit.heads.ablation import Ablation, ablate_heads, head_means, position_mask
from cliffkit.heads.attribution import HeadAttribution, direct_attribution, head_contributions
from cliffkit.heads.inputs import TokenBatch, iter_batches, pad_left, trace_token_ids
from cliffkit.heads.layout import HEAD_LAYOUTS, HeadLayout, ModelHeads, get_layout, model_heads, register_layout
from cliffkit.heads.scans import HeadEffects, head_effects

__all__ = [
    "HEAD_LAYOUTS",
    "Ablation",
    "HeadAttribution",
    "HeadEffects",
    "HeadLayout",
    "ModelHeads",
    "TokenBatch",
    "ablate_heads",
    "direct_attribution",
    "get_layout",
    "head_contributions",
    "head_effects",
    "head_means",
    "iter_batches",
    "model_heads",
    "pad_left",
    "position_mask",
    "register_layout",
    "trace_token_ids",
]
