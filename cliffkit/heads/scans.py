"""Causal head scans: the change in the final probe score when each head is ablated.

One interface, `head_effects`, with three methods:

- "exact" with positions="last": ablate a head at the final position only. Only
  that position changes, so the prefix runs once with a KV cache and, per head,
  just the final token is recomputed from the ablated block onward. All heads
  run together as copies of that single token, so each block runs once.
- "exact" with positions="all": ablate a head at every position, as Yin et al.
  (2025, "Refusal Falls off a Cliff") do. The residual stream entering each block is cached from one clean pass,
  so only blocks from the ablated one onward rerun, several heads per pass.
- "patching": attribution patching, a first-order estimate of every head's
  effect from one forward and one backward pass. It is an approximation; compare
  its ranking with an exact scan (`rank_correlations`).

"rerun" is the reference approach, one full forward pass per head, kept to check
the fast scans and to time them against it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from cliffkit.heads.ablation import Ablation, ablate_head_per_slot, ablate_heads, normalize_heads
from cliffkit.heads.attribution import check_direction, scores_frame
from cliffkit.heads.forward import (cache_from, cached_keys_values, capture_layer_calls, fan_out_last_token,
                                    frozen_parameters, run_blocks, run_decoder, tile_rows)
from cliffkit.heads.inputs import TokenBatch, iter_batches, pad_token_id
from cliffkit.heads.layout import ModelHeads, model_heads
from cliffkit.models import LoadedModel

logger = logging.getLogger(__name__)

ScanMethod = Literal["exact", "patching", "rerun"]
ScanPositions = Literal["last", "all"]

# Token rows (heads x traces x positions) per pass of the all-position scan when
# `heads_per_pass` is not given; bounds the activations one pass holds.
DEFAULT_TOKENS_PER_PASS = 8192


@dataclass
class HeadEffects:
    """Change of the final probe score (ablated minus clean) per head.

    `per_trace` is (n_traces, layer + 1, n_heads), NaN for heads not scanned, and
    `clean_scores` (n_traces,) the unablated scores. A positive effect means that
    ablating the head raises the score: for a refusal probe, the head works
    against refusal.
    """

    method: ScanMethod
    positions: ScanPositions
    layer: int
    per_trace: torch.Tensor
    clean_scores: torch.Tensor

    @property
    def effects(self) -> torch.Tensor:
        """The mean over traces, (layer + 1, n_heads) in float64."""
        return self.per_trace.mean(dim=0)

    @property
    def name(self) -> str:
        return f"{self.method}_{self.positions}"

    def to_frame(self, column: str | None = None) -> pd.DataFrame:
        """Return one row per head: layer, head and the mean effect in `column` (default: `name`)."""
        return scores_frame(self.effects, column or self.name)


def head_effects(
    lm: LoadedModel,
    sequences: Sequence[torch.Tensor],
    direction: torch.Tensor,
    layer: int,
    *,
    method: ScanMethod = "exact",
    positions: ScanPositions = "last",
    intercept: float = 0.0,
    ablation: Ablation = Ablation(),
    heads: Iterable[Sequence[int]] | None = None,
    batch_size: int = 8,
    heads_per_pass: int | None = None,
    progress: bool = True,
) -> HeadEffects:
    """Measure how the final probe score changes when each head is ablated.

    The probe score of a trace is `direction · x + intercept`, where x is the
    residual stream at `layer` (output of decoder block `layer`, before the final
    norm) at the trace's last position.

    Args:
        sequences: token ids per trace, 1-D tensors, at least 2 tokens each.
        direction: (d_model,) probe weight or difference of means.
        layer: the block the probe reads. Heads of later blocks cannot change it.
        method: "exact", "patching" (first-order estimate) or "rerun" (one full
            forward pass per head; slow reference).
        positions: "last" ablates each trace's final position only, "all" every position.
        ablation: zero (default), scale or mean replacement.
        heads: (layer, head) pairs to scan; default every head of blocks 0..`layer`.
        heads_per_pass: heads per pass of the exact scans. The default puts every
            head in one pass for "last", and about 8192 token rows in each pass
            for "all".

    Returns:
        `HeadEffects` with `.effects` the (layer + 1, n_heads) mean over traces.
    """
    bound = model_heads(lm.model)
    bound.check_layer(layer)
    direction = check_direction(direction, bound).to(lm.device)
    ablation.check(bound)
    if method not in ("exact", "patching", "rerun"):
        raise ValueError(f"method must be 'exact', 'patching' or 'rerun', got {method!r}.")
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}.")
    candidates = _candidate_heads(bound, layer, heads)

    per_trace = torch.full((len(sequences), layer + 1, bound.n_heads), float("nan"), dtype=torch.float64)
    clean = torch.zeros(len(sequences), dtype=torch.float64)
    batches = list(iter_batches(sequences, pad_token_id(lm), batch_size, min_length=2))
    bar = tqdm(total=len(batches), desc=f"head scan ({method}, {positions})", disable=not progress)
    for indices, batch in batches:
        batch = batch.to(lm.device)
        if method == "patching":
            effects, scores = _patching(bound, batch, direction, layer, ablation, positions, candidates)
        elif method == "rerun":
            effects, scores = _rerun(bound, batch, direction, layer, ablation, positions, candidates)
        elif positions == "last":
            effects, scores = _exact_last(bound, batch, direction, layer, ablation, candidates, heads_per_pass)
        else:
            effects, scores = _exact_all(bound, batch, direction, layer, ablation, candidates, heads_per_pass)
        per_trace[indices] = effects.double().cpu()
        clean[indices] = scores.double().cpu() + intercept
        bar.update(1)
    bar.close()
    return HeadEffects(method=method, positions=positions, layer=layer, per_trace=per_trace, clean_scores=clean)


def _candidate_heads(bound: ModelHeads, layer: int, heads: Iterable[Sequence[int]] | None) -> dict[int, list[int]]:
    if heads is None:
        pairs = [(index, head) for index in range(layer + 1) for head in range(bound.n_heads)]
    else:
        pairs = list(normalize_heads(bound, heads))
        late = [pair for pair in pairs if pair[0] > layer]
        if late:
            raise ValueError(f"heads {late} sit after block {layer}, so they cannot change the residual stream "
                             "there; scan heads of blocks 0..layer only.")
    by_layer: dict[int, list[int]] = defaultdict(list)
    for index, head in pairs:
        by_layer[index].append(head)
    return dict(by_layer)


def _score(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    return hidden[:, -1].float() @ direction


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def _nan_effects(batch: TokenBatch, layer: int, n_heads: int, device: torch.device) -> torch.Tensor:
    return torch.full((batch.size, layer + 1, n_heads), float("nan"), device=device)


@torch.no_grad()
def _exact_last(bound: ModelHeads, batch: TokenBatch, direction: torch.Tensor, layer: int, ablation: Ablation,
                candidates: dict[int, list[int]], heads_per_pass: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    # 1. The prefix (all but the last token) runs once and fills a KV cache for blocks 0..layer.
    # A config-less DynamicCache keeps every position, also in sliding-window layers.
    prefix_cache = DynamicCache()
    run_decoder(bound, batch.columns(None, -1), stop_after=layer, cache=prefix_cache)
    stored = cached_keys_values(prefix_cache, range(layer + 1))
    del prefix_cache

    # 2. The clean last token runs on a copy of that cache; each block's input and
    # arguments (mask over all positions, rotary embeddings) are recorded.
    last = TokenBatch(batch.input_ids[:, -1:], batch.attention_mask, batch.position_ids[:, -1:])
    with capture_layer_calls(bound, range(layer + 1)) as calls:
        clean_hidden = run_decoder(bound, last, stop_after=layer, cache=cache_from(stored))
    clean = _score(clean_hidden, direction)

    # 3. One copy of the last token per candidate head, side by side as query
    # positions. The ablation changes only the last position from the ablated
    # block on, so the keys and values cached for earlier positions stay valid for
    # every copy. Each copy attends to them and to itself only. Blocks run once
    # each, from the first candidate's block on, and a head's copy joins at its
    # own block, starting from that block's clean input.
    implementation = bound.model.config._attn_implementation
    pairs = [(index, head) for index in sorted(candidates) for head in candidates[index]]
    effects = _nan_effects(batch, layer, bound.n_heads, clean.device)
    for group in _chunks(pairs, heads_per_pass or len(pairs)):
        start = group[0][0]
        cache = cache_from({block: stored[block] for block in range(start, layer + 1)})
        hidden = calls[start].hidden[:, :0]  # (batch, copies, d_model), no copies yet
        for block in range(start, layer + 1):
            joining = [head for index, head in group if index == block]
            hidden = torch.cat([hidden, calls[block].hidden.expand(-1, len(joining), -1)], dim=1)
            copies = hidden.shape[1]
            slot_heads = torch.full((1, copies), -1)
            slot_heads[0, copies - len(joining):] = torch.tensor(joining, dtype=torch.long)
            kwargs = fan_out_last_token(calls[block].kwargs, copies, cache, batch.length, implementation)
            with ablate_head_per_slot(bound, block, slot_heads, ablation):
                hidden = run_blocks(bound, hidden, block, block, {block: kwargs})
        scores = hidden.float() @ direction - clean[:, None]  # (batch, copies), copy j is group[j]
        for slot, (index, head) in enumerate(group):
            effects[:, index, head] = scores[:, slot]
    return effects, clean


@torch.no_grad()
def _exact_all(bound: ModelHeads, batch: TokenBatch, direction: torch.Tensor, layer: int, ablation: Ablation,
               candidates: dict[int, list[int]], heads_per_pass: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    size = batch.size
    with capture_layer_calls(bound, range(layer + 1)) as calls:
        clean = _score(run_decoder(bound, batch, stop_after=layer), direction)

    per_pass = heads_per_pass or max(1, DEFAULT_TOKENS_PER_PASS // (size * batch.length))
    effects = _nan_effects(batch, layer, bound.n_heads, clean.device)
    for index, layer_heads in candidates.items():
        for chunk in _chunks(layer_heads, per_pass):
            # The input of block `index` is the same with or without the ablation, so blocks
            # before it do not rerun. Rows j * size .. (j + 1) * size - 1 ablate head chunk[j].
            kwargs = {block: tile_rows(calls[block].kwargs, len(chunk), size) for block in range(index, layer + 1)}
            hidden = calls[index].hidden.repeat(len(chunk), 1, 1)
            row_heads = torch.tensor(chunk).repeat_interleave(size)[:, None]
            with ablate_head_per_slot(bound, index, row_heads, ablation):
                out = run_blocks(bound, hidden, index, layer, kwargs)
            effects[:, index, chunk] = (_score(out, direction).view(len(chunk), size) - clean).T
    return effects, clean


@torch.no_grad()
def _rerun(bound: ModelHeads, batch: TokenBatch, direction: torch.Tensor, layer: int, ablation: Ablation,
           positions: ScanPositions, candidates: dict[int, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    clean = _score(run_decoder(bound, batch, stop_after=layer, full=True), direction)
    effects = _nan_effects(batch, layer, bound.n_heads, clean.device)
    for index, layer_heads in candidates.items():
        for head in layer_heads:
            with ablate_heads(bound.model, [(index, head)], ablation.mode, factor=ablation.factor,
                              means=ablation.means, positions=1 if positions == "last" else None):
                hidden = run_decoder(bound, batch, stop_after=layer, full=True)
            effects[:, index, head] = _score(hidden, direction) - clean
    return effects, clean


def _patching(bound: ModelHeads, batch: TokenBatch, direction: torch.Tensor, layer: int, ablation: Ablation,
              positions: ScanPositions, candidates: dict[int, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            args[0].retain_grad()
            inputs[index] = args[0]
        return hook

    def start_graph(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # With the weights frozen, the embeddings are where the graph starts.
        return output.detach().requires_grad_(True)

    handles = [bound.model.get_input_embeddings().register_forward_hook(start_graph)]
    handles += [bound.o_proj(index).register_forward_pre_hook(make_hook(index)) for index in candidates]
    try:
        with torch.enable_grad(), frozen_parameters(bound.model):
            clean = _score(run_decoder(bound, batch, stop_after=layer), direction)
            # Rows do not interact, so the gradient of the sum gives each row its own gradient.
            clean.sum().backward()
    finally:
        for handle in handles:
            handle.remove()

    mask = batch.attention_mask.bool()
    if positions == "last":
        mask = torch.zeros_like(mask)
        mask[:, -1] = True
    effects = _nan_effects(batch, layer, bound.n_heads, clean.device)
    with torch.no_grad():
        for index, layer_heads in candidates.items():
            z = inputs[index].detach()
            z4 = z.view(*z.shape[:-1], bound.n_heads, bound.head_dim)
            grad4 = inputs[index].grad.view_as(z4)
            delta = ablation.apply(z4, torch.ones((), dtype=torch.bool, device=z.device), index) - z4
            estimate = (grad4.float() * delta.float()).sum(-1) * mask[..., None]  # (batch, seq, n_heads)
            effects[:, index, layer_heads] = estimate.sum(1)[:, layer_heads]
    return effects, clean.detach()
