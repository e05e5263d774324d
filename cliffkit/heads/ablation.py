"""Head ablation through a forward pre-hook on the attention output projection.

The hook replaces chosen heads' slices of the projection's input (zero, scaled,
or the head's mean output) and leaves every other head as it is: nothing is
rescaled afterwards. The reference code instead rescaled the whole attention
output back to its norm taken across the batch and all positions, which mixed
examples and inflated the other heads.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from cliffkit.heads.forward import run_decoder
from cliffkit.heads.inputs import iter_batches, pad_token_id
from cliffkit.heads.layout import ModelHeads, model_heads
from cliffkit.models import LoadedModel

logger = logging.getLogger(__name__)

AblationMode = Literal["zero", "scale", "mean"]
# None: every position; k: the last k positions of each forward call; a list of
# negative offsets from the end, e.g. [-1, -3].
Positions = int | Sequence[int] | None


@dataclass(frozen=True)
class Ablation:
    """The replacement for an ablated head's output (its slice of the output projection's input).

    "zero" writes zeros, "scale" multiplies by `factor`, and "mean" writes the
    head's mean output `means[layer, head]`, where `means` is (n_layers,
    n_heads, head_dim), for example from `head_means`.
    """

    mode: AblationMode = "zero"
    factor: float = 0.0
    means: torch.Tensor | None = None

    def check(self, heads: ModelHeads) -> None:
        if self.mode not in ("zero", "scale", "mean"):
            raise ValueError(f"Unknown ablation mode {self.mode!r}. Use 'zero', 'scale' or 'mean'.")
        if self.mode != "mean":
            return
        expected = (heads.n_layers, heads.n_heads, heads.head_dim)
        if self.means is None:
            raise ValueError("Mean ablation needs `means` of shape (n_layers, n_heads, head_dim); "
                             "compute them with cliffkit.heads.head_means(lm, sequences).")
        if tuple(self.means.shape) != expected:
            raise ValueError(f"means has shape {tuple(self.means.shape)}, expected {expected} "
                             "(n_layers, n_heads, head_dim) for this model.")

    def apply(self, z: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Return `z` (..., n_heads, head_dim) with the entries selected by the boolean `mask` replaced.

        `mask` broadcasts against `z` and is False for heads and positions to keep.
        """
        if self.mode == "zero":
            return torch.where(mask, torch.zeros((), dtype=z.dtype, device=z.device), z)
        if self.mode == "scale":
            return torch.where(mask, z * self.factor, z)
        mean = self.means[layer].to(device=z.device, dtype=z.dtype)
        return torch.where(mask, mean.expand_as(z), z)


def position_mask(length: int, positions: Positions, device: torch.device) -> torch.Tensor:
    """Return a boolean (length,) mask of the positions to ablate, counted from the end of the sequence."""
    if positions is None:
        return torch.ones(length, dtype=torch.bool, device=device)
    mask = torch.zeros(length, dtype=torch.bool, device=device)
    if isinstance(positions, int):
        if positions < 1:
            raise ValueError(f"positions={positions}: give k >= 1 to ablate the last k positions, or None for all.")
        mask[max(0, length - positions):] = True
        return mask
    offsets = list(positions)
    if any(offset >= 0 for offset in offsets):
        raise ValueError(f"positions={offsets}: give negative offsets from the end (-1 is the last position), "
                         "because left padding makes absolute indices differ between rows.")
    kept = [length + offset for offset in offsets if length + offset >= 0]
    mask[kept] = True
    return mask


def _check_projection_input(args: tuple, layer: int) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        raise RuntimeError(f"The output projection of layer {layer} was called without a positional input "
                           "tensor, so the ablation hook cannot see the per-head outputs.")
    return args[0]


def _split_heads(z: torch.Tensor, heads: ModelHeads) -> torch.Tensor:
    return z.view(*z.shape[:-1], heads.n_heads, heads.head_dim)


def normalize_heads(heads: ModelHeads, selected: Iterable[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """Check (layer, head) pairs against the model and return them sorted, without duplicates."""
    pairs = set()
    for item in selected:
        if len(item) != 2:
            raise ValueError(f"Each head must be a (layer, head) pair, got {item!r}.")
        layer, head = int(item[0]), int(item[1])
        heads.check_head(layer, head)
        pairs.add((layer, head))
    return tuple(sorted(pairs))


@contextmanager
def ablate_heads(model: nn.Module | LoadedModel, heads: Iterable[Sequence[int]], mode: AblationMode = "zero", *,
                 factor: float = 0.0, means: torch.Tensor | None = None,
                 positions: Positions = None) -> Iterator[tuple[tuple[int, int], ...]]:
    """Ablate (layer, head) pairs while the context is open, and yield them sorted.

    The hooks stay on during `model.generate`, so `generate_traces` inside the
    context generates with the heads ablated. Contexts nest: an inner context's
    hook runs after the outer one's on the already ablated input. All hooks are
    removed on exit, also after an exception.

    NOTE: `positions` counts from the end of each forward call's input. Inside
    `generate`, the prefill call covers the prompt and every later call contains
    one new token, so `positions=k` ablates the last k prompt positions and
    every generated token.

    Example:
        >>> with ablate_heads(lm, [(20, 3), (21, 7)]):        # doctest: +SKIP
        ...     traces = generate_traces(lm, prompts, settings)
    """
    bound = model_heads(model)
    ablation = Ablation(mode=mode, factor=factor, means=means)
    ablation.check(bound)
    pairs = normalize_heads(bound, heads)
    position_mask(4, positions, torch.device("cpu"))  # validates `positions` before any hook goes on

    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in pairs:
        by_layer[layer].append(head)

    handles = []
    try:
        for layer, layer_heads in by_layer.items():
            o_proj = bound.o_proj(layer)
            head_mask = torch.zeros(bound.n_heads, dtype=torch.bool, device=o_proj.weight.device)
            head_mask[layer_heads] = True
            handles.append(o_proj.register_forward_pre_hook(_make_hook(bound, ablation, layer, head_mask, positions)))
        yield pairs
    finally:
        for handle in handles:
            handle.remove()


def _make_hook(heads: ModelHeads, ablation: Ablation, layer: int, head_mask: torch.Tensor, positions: Positions):
    def hook(module: nn.Module, args: tuple) -> tuple:
        z = _check_projection_input(args, layer)
        z4 = _split_heads(z, heads)
        mask = head_mask.to(z.device)[:, None]  # (n_heads, 1)
        if z.ndim >= 3:
            # Broadcasts as (seq, n_heads, 1) against (..., seq, n_heads, head_dim).
            mask = position_mask(z.shape[-2], positions, z.device)[:, None, None] & mask
        return (ablation.apply(z4, mask, layer).reshape(z.shape), *args[1:])
    return hook


@contextmanager
def ablate_head_per_slot(heads: ModelHeads, layer: int, slot_heads: torch.Tensor,
                         ablation: Ablation) -> Iterator[None]:
    """Ablate a different head of `layer` in each slot of the batch, for batched scans.

    `slot_heads` is (rows, seq) and broadcasts against the (rows, seq) positions of
    the projection's input: entry [r, t] names the head ablated at row r, position
    t, and -1 ablates none. A (rows, 1) tensor gives each row one head at every
    position; a (1, seq) tensor gives each position one head in every row.
    """
    o_proj = heads.o_proj(layer)
    slot_heads = slot_heads.to(o_proj.weight.device)
    # (rows, seq, n_heads, 1): True where the slot's chosen head sits.
    chosen = (slot_heads[..., None] == torch.arange(heads.n_heads, device=slot_heads.device))[..., None]

    def hook(module: nn.Module, args: tuple) -> tuple:
        z = _check_projection_input(args, layer)
        try:
            torch.broadcast_shapes(chosen.shape[:2], z.shape[:2])
        except RuntimeError:
            raise RuntimeError(f"slot-wise ablation of shape {tuple(slot_heads.shape)} does not fit the input "
                               f"{tuple(z.shape[:2])} of layer {layer}'s output projection.") from None
        return (ablation.apply(_split_heads(z, heads), chosen, layer).reshape(z.shape), *args[1:])

    handle = o_proj.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def head_means(lm: LoadedModel, sequences: Sequence[torch.Tensor], batch_size: int = 8,
               progress: bool = True) -> torch.Tensor:
    """Average each head's output over every real (not padding) position of `sequences`.

    Returns (n_layers, n_heads, head_dim) in float32, the `means` for mean ablation.
    """
    bound = model_heads(lm.model)
    # float64 sums: thousands of positions of bfloat16 activations would lose digits in a low-precision sum.
    sums = torch.zeros(bound.n_layers, bound.n_heads, bound.head_dim, dtype=torch.float64)
    count = 0
    mask_holder: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            z = _split_heads(_check_projection_input(args, layer), bound).double()
            weights = mask_holder["mask"].to(z.device, torch.float64)[:, :, None, None]
            sums[layer] += (z * weights).sum(dim=(0, 1)).cpu()
        return hook

    handles = [bound.o_proj(layer).register_forward_pre_hook(make_hook(layer)) for layer in range(bound.n_layers)]
    try:
        batches = list(iter_batches(sequences, pad_token_id(lm), batch_size))
        for _, batch in tqdm(batches, desc="head means", disable=not progress):
            batch = batch.to(lm.device)
            mask_holder["mask"] = batch.attention_mask
            run_decoder(bound, batch, stop_after=bound.n_layers - 1)
            count += int(batch.attention_mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(count, 1)).float()

