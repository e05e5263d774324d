"""Direct attribution: how much each attention head writes along a direction, from one forward pass per batch.

A head's write to the residual stream is its slice of the output projection's
input times its slice of the projection weight. All heads of a layer are split
out with one einsum, and the projection onto the direction is taken inside the
same einsum, so the per-head d_model vectors are never materialised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from cliffkit.heads.forward import run_decoder
from cliffkit.heads.inputs import iter_batches, pad_token_id
from cliffkit.heads.layout import ModelHeads, model_heads, rms_norm_gain, rms_scale
from cliffkit.models import LoadedModel

logger = logging.getLogger(__name__)

Space = Literal["residual", "final_norm"]


def head_contributions(heads: ModelHeads, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Split the output projection of `layer` by head: (..., n_heads * head_dim) -> (..., n_heads, d_model).

    Head h's vector is z[..., h, :] @ W_O[:, h*head_dim:(h+1)*head_dim].T. The sum over
    heads plus the projection's bias is the projection's output.
    """
    z4 = z.view(*z.shape[:-1], heads.n_heads, heads.head_dim)
    return torch.einsum("...hk,dhk->...hd", z4, heads.w_o(layer).to(z.dtype))


@dataclass
class HeadAttribution:
    """Per-head projections onto a direction, at the last position and optionally along the trace.

    `per_trace` is (n_traces, layer + 1, n_heads) at each trace's last position.
    `trajectory` is (max_length, layer + 1, n_heads), indexed by distance from
    the end (0 is the last position) and averaged over the traces long enough to
    reach it. `trajectory_count` (max_length,) counts those traces. `bias` (layer + 1,)
    is the mean projection of each layer's output-projection bias (zero without
    a bias). Negative values write against the direction.
    """

    layer: int
    space: Space
    normalize: bool
    per_trace: torch.Tensor
    bias: torch.Tensor
    trajectory: torch.Tensor | None = None
    trajectory_count: torch.Tensor | None = None

    @property
    def scores(self) -> torch.Tensor:
        """The mean over traces, (layer + 1, n_heads) in float64."""
        return self.per_trace.mean(dim=0)

    def to_frame(self, column: str = "attribution") -> pd.DataFrame:
        """Return one row per head: layer, head and the mean projection in `column`."""
        return scores_frame(self.scores, column)


def scores_frame(scores: torch.Tensor, column: str) -> pd.DataFrame:
    """Flatten a (n_layers, n_heads) grid into rows of layer, head and `column`."""
    n_layers, n_heads = scores.shape
    return pd.DataFrame({
        "layer": [layer for layer in range(n_layers) for _ in range(n_heads)],
        "head": [head for _ in range(n_layers) for head in range(n_heads)],
        column: scores.reshape(-1).tolist(),
    })


class _LayerProjector:
    """Projects one layer's per-head outputs onto the direction as seen in the chosen space."""

    def __init__(self, heads: ModelHeads, layer: int, direction: torch.Tensor):
        self.heads = heads
        self.layer = layer
        o_proj = heads.o_proj(layer)
        self.post_norm = heads.post_attention_norm(layer)
        target = direction
        if self.post_norm is not None:
            gain, self.post_eps = rms_norm_gain(self.post_norm, heads.layout.norm_weight_offset)
            target = target * gain.to(target.device)
        # (n_heads, head_dim): each head's output dotted with this gives its projection.
        self.weights = torch.einsum("dhk,d->hk", heads.w_o(layer).float(), target)
        bias = o_proj.bias
        self.bias_value = float(bias.float() @ target) if bias is not None else 0.0

    def project(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (per-head projections (..., n_heads), bias projection (...)) for o_proj inputs z (..., H*dh)."""
        z4 = z.float().view(*z.shape[:-1], self.heads.n_heads, self.heads.head_dim)
        projections = torch.einsum("...hk,hk->...h", z4, self.weights)
        bias = torch.full(z.shape[:-1], self.bias_value, device=z.device)
        if self.post_norm is not None:
            # Gemma normalises the whole attention output before the residual add. With the RMS
            # of that output fixed, the norm is linear, so the heads' shares still add up exactly.
            o_proj = self.heads.o_proj(self.layer)
            # F.linear, not the module: calling it would run ablation hooks a second time.
            output = F.linear(z, o_proj.weight, o_proj.bias)
            scale = rms_scale(output, self.post_eps)[..., 0]
            projections = projections * scale[..., None]
            bias = bias * scale
        return projections, bias


@torch.no_grad()
def direct_attribution(
    lm: LoadedModel,
    sequences: Sequence[torch.Tensor],
    direction: torch.Tensor,
    layer: int,
    *,
    positions: Literal["last", "all"] = "last",
    normalize: bool = False,
    space: Space = "residual",
    batch_size: int = 8,
    progress: bool = True,
) -> HeadAttribution:
    """Project every head's direct write onto `direction`, for heads in layers 0..`layer`.

    Args:
        lm: the model.
        sequences: token ids per trace, 1-D tensors (for example `trace_token_ids`).
        direction: (d_model,). With space="residual" (the default) it lives in the
            raw residual stream at `layer` (the output of decoder block `layer`,
            before the final norm), where a cliffkit probe is fitted. Only heads of
            layers <= `layer` reach that point, and only their direct path counts
            here: what a head writes also changes later blocks, which this does
            not measure (the causal scans do).
        layer: the decoder block whose output the direction reads.
        positions: "last" reads each trace's last position; "all" also averages
            every position, aligned from each trace's end, into `trajectory`.
        normalize: False gives direction · head write, in the probe's units, so
            that zero-ablating a head removes exactly this much through the direct
            path. True divides by |direction| (the scalar projection onto the unit
            direction).
        space: "final_norm" is for a direction fitted after the final norm (such
            as HF `hidden_states[-1]`); `layer` must then be the last block. Each
            head's write is scaled by the norm's weight and divided by the RMS of
            the residual stream at that position. NOTE: this is a linearisation,
            because the RMS depends on every head's write. The shares add up to
            the normed score exactly, but removing a head changes the RMS too.
        batch_size: traces per forward pass.

    Returns:
        `HeadAttribution`; `.scores` is the (layer + 1, n_heads) mean over traces.
    """
    heads = model_heads(lm.model)
    heads.check_layer(layer)
    direction = check_direction(direction, heads).to(lm.device)
    if space not in ("residual", "final_norm"):
        raise ValueError(f"space must be 'residual' or 'final_norm', got {space!r}.")
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}.")

    target, final_eps = direction, None
    if space == "final_norm":
        if layer != heads.n_layers - 1:
            raise ValueError(f"space='final_norm' reads after the final norm, so layer must be the last block "
                             f"({heads.n_layers - 1}), got {layer}.")
        gain, final_eps = rms_norm_gain(heads.final_norm(), heads.layout.norm_weight_offset)
        target = direction * gain.to(lm.device)
    projectors = [_LayerProjector(heads, index, target) for index in range(layer + 1)]

    scale = float(direction.norm()) if normalize else 1.0
    per_trace = torch.zeros(len(sequences), layer + 1, heads.n_heads, dtype=torch.float64)
    bias = torch.zeros(layer + 1, dtype=torch.float64)
    max_length = max(len(sequence) for sequence in sequences)
    # float64 sums: a long trace adds thousands of terms per head.
    trajectory_sum = torch.zeros(max_length, layer + 1, heads.n_heads, dtype=torch.float64) if positions == "all" else None
    trajectory_count = torch.zeros(max_length, dtype=torch.float64) if positions == "all" else None

    batches = list(iter_batches(sequences, pad_token_id(lm), batch_size))
    for indices, batch in tqdm(batches, desc="direct attribution", disable=not progress):
        batch = batch.to(lm.device)
        captured = _capture_projection_inputs(heads, batch, layer, last_only=positions == "last")
        final_scale = 1.0
        if final_eps is not None:
            final_scale = rms_scale(captured.pop("final"), final_eps)[..., 0]  # (batch, seq or 1)

        for index, projector in enumerate(projectors):
            values, bias_values = projector.project(captured[index])
            values = (values * _unsqueeze(final_scale) / scale).double().cpu()  # (batch, seq, n_heads)
            bias_values = (bias_values * final_scale / scale).double().cpu()
            per_trace[indices, index] = values[:, -1]
            bias[index] += bias_values[:, -1].sum()
            if trajectory_sum is not None:
                _add_aligned(trajectory_sum[:, index], values, batch.attention_mask.cpu())

        if trajectory_count is not None:
            trajectory_count[: batch.length] += batch.attention_mask.cpu().flip(-1).sum(0).double()

    trajectory = None
    if trajectory_sum is not None:
        trajectory = trajectory_sum / trajectory_count.clamp(min=1)[:, None, None]
    return HeadAttribution(layer=layer, space=space, normalize=normalize, per_trace=per_trace,
                           bias=bias / len(sequences), trajectory=trajectory, trajectory_count=trajectory_count)


def _unsqueeze(value: torch.Tensor | float) -> torch.Tensor | float:
    return value[..., None] if isinstance(value, torch.Tensor) else value


def _add_aligned(target: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
    """Add (batch, seq, n_heads) values into target (max_length, n_heads) by distance from the end, skipping padding."""
    flipped = (values * mask[..., None]).flip(1).sum(0)  # (seq, n_heads), index 0 = last position
    target[: flipped.shape[0]] += flipped


def _capture_projection_inputs(heads: ModelHeads, batch, layer: int, last_only: bool) -> dict:
    """Run to block `layer` and return the o_proj input of each layer <= `layer` and the final residual stream."""
    captured: dict = {}

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            captured[index] = args[0][:, -1:] if last_only else args[0]
        return hook

    handles = [heads.o_proj(index).register_forward_pre_hook(make_hook(index)) for index in range(layer + 1)]
    try:
        hidden = run_decoder(heads, batch, stop_after=layer)
    finally:
        for handle in handles:
            handle.remove()
    captured["final"] = hidden[:, -1:] if last_only else hidden
    return captured


def check_direction(direction: torch.Tensor, heads: ModelHeads) -> torch.Tensor:
    """Return `direction` as a flat float32 tensor, or raise ValueError if it is the wrong size, zero or not finite."""
    direction = torch.as_tensor(direction).detach().float().reshape(-1)
    if direction.numel() != heads.d_model:
        raise ValueError(f"direction has {direction.numel()} entries, expected d_model={heads.d_model}.")
    if not torch.isfinite(direction).all() or float(direction.norm()) == 0.0:
        raise ValueError("direction must be finite and non-zero.")
    return direction
