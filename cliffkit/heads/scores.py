"""Probe scores read with hooks: the final score per trace, per-position trajectories, and a difference-of-means direction.

The score of a position is `direction · x + intercept`, where x is the residual
stream at `layer` (the output of decoder block `layer`, before the final norm).
Ablation contexts that are open while these run apply to them.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from tqdm.auto import tqdm

from cliffkit.heads.attribution import check_direction
from cliffkit.heads.forward import run_decoder
from cliffkit.heads.inputs import iter_batches, pad_token_id
from cliffkit.heads.layout import model_heads
from cliffkit.models import LoadedModel

logger = logging.getLogger(__name__)


@torch.no_grad()
def last_position_residuals(lm: LoadedModel, sequences: Sequence[torch.Tensor], layer: int,
                            batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Return the residual stream at `layer` at each sequence's last position: (n_sequences, d_model), float32."""
    heads = model_heads(lm.model)
    out = torch.zeros(len(sequences), heads.d_model)
    batches = list(iter_batches(sequences, pad_token_id(lm), batch_size))
    for indices, batch in tqdm(batches, desc=f"residual stream at layer {layer}", disable=not progress):
        hidden = run_decoder(heads, batch.to(lm.device), stop_after=layer)
        out[indices] = hidden[:, -1].float().cpu()
    return out


def probe_scores(lm: LoadedModel, sequences: Sequence[torch.Tensor], direction: torch.Tensor, layer: int,
                 intercept: float = 0.0, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Return each sequence's final probe score, at its last position: (n_sequences,) float64."""
    direction = check_direction(direction, model_heads(lm.model))
    residuals = last_position_residuals(lm, sequences, layer, batch_size, progress)
    return residuals.double() @ direction.double() + intercept


@torch.no_grad()
def score_trajectories(lm: LoadedModel, sequences: Sequence[torch.Tensor], direction: torch.Tensor, layer: int,
                       intercept: float = 0.0, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Return the probe score at every position, aligned at the end: (n_sequences, max_length) float64.

    Column j is j positions before the end (column 0 is the last position), so
    traces of different lengths line up at the closing think marker. Entries
    before a trace's first token are NaN, never zero, so that averages over
    traces skip them.
    """
    heads = model_heads(lm.model)
    direction = check_direction(direction, heads).to(lm.device)
    max_length = max(len(sequence) for sequence in sequences)
    out = torch.full((len(sequences), max_length), float("nan"), dtype=torch.float64)

    batches = list(iter_batches(sequences, pad_token_id(lm), batch_size))
    for indices, batch in tqdm(batches, desc=f"probe trajectories at layer {layer}", disable=not progress):
        batch = batch.to(lm.device)
        scores = (run_decoder(heads, batch, stop_after=layer).float() @ direction).double().cpu() + intercept
        scores[batch.attention_mask.cpu() == 0] = float("nan")
        out[indices, : batch.length] = scores.flip(-1)
    return out


def mean_difference_direction(positive: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Return (mean(positive) - mean(negative), intercept) from (n, d_model) residual-stream vectors.

    The intercept puts the midpoint of the two class means at score 0, so a
    positive score leans to the positive class (refused).
    """
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError(f"A difference of means needs vectors of both classes, got {len(positive)} positive "
                         f"and {len(negative)} negative.")
    # float64: the two means are close, and their difference is what matters.
    positive_mean = positive.double().mean(0)
    negative_mean = negative.double().mean(0)
    direction = positive_mean - negative_mean
    intercept = -float(direction @ (positive_mean + negative_mean) / 2)
    return direction.float(), intercept
