"""Partial forward passes with hooks: stop after a chosen decoder block, or rerun blocks from a cached input.

Head scans never rewrite the model's forward, so the configured attention
kernel (sdpa, eager or flash) still runs. A hook stops the decoder body with an
exception once the block that the probe reads has run. Later blocks are replayed
by calling the decoder-layer modules with the keyword arguments (masks, rotary
embeddings) that the model itself built for them.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

from cliffkit.heads.inputs import TokenBatch
from cliffkit.heads.layout import ModelHeads

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed block has run."""


def _cache_argument(body: nn.Module) -> str:
    # transformers 5.x renamed `past_key_values` to `cache`; accept either.
    parameters = inspect.signature(body.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def run_decoder(heads: ModelHeads, batch: TokenBatch, stop_after: int,
                cache: Cache | None = None, full: bool = False) -> torch.Tensor:
    """Run the decoder body on `batch` and return the output of block `stop_after`: (batch, seq, d_model).

    This is the residual stream at layer `stop_after`, before the final norm.
    Blocks after it do not run unless `full` is set (then the whole body runs,
    as a plain forward pass would). With `cache`, earlier positions are read from
    it and the batch's keys and values are appended to it.
    """
    heads.check_layer(stop_after)
    captured: dict[str, torch.Tensor] = {}

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        captured["hidden"] = _block_output(output)
        if not full:
            raise _StopForward

    body = heads.body()
    handle = heads.layer(stop_after).register_forward_hook(stop)
    try:
        body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
             use_cache=cache is not None, **{_cache_argument(body): cache})
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError(f"decoder block {stop_after} did not run; the model's forward skips it.")
    return captured["hidden"]


@dataclass
class LayerCall:
    """The arguments one decoder block received: its input residual stream (batch, seq, d_model) and keyword arguments."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


@contextmanager
def capture_layer_calls(heads: ModelHeads, layers: range) -> Iterator[dict[int, LayerCall]]:
    """Record the input and keyword arguments of each decoder block in `layers` during the next forward pass."""
    calls: dict[int, LayerCall] = {}
    handles = []

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {key: value for key, value in kwargs.items() if key != "hidden_states"}
            calls[index] = LayerCall(hidden=hidden, kwargs=rest)
        return hook

    try:
        for index in layers:
            handles.append(heads.layer(index).register_forward_pre_hook(make_hook(index), with_kwargs=True))
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def tile_rows(value: Any, repeats: int, batch_size: int) -> Any:
    """Tile every batch-first tensor in `value` `repeats` times along the batch.

    Row `j * batch_size + b` of the result is row `b` of the input. Only tensors of
    two or more dimensions whose first size is `batch_size` are tiled (masks,
    rotary cos/sin, position ids); others broadcast and are kept.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim >= 2 and value.shape[0] == batch_size:
            return value.repeat(repeats, *([1] * (value.ndim - 1)))
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(tile_rows(item, repeats, batch_size) for item in value)
    if isinstance(value, dict):
        return {key: tile_rows(item, repeats, batch_size) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str, Cache)):
        return value
    raise TypeError(_UNSUPPORTED.format(type(value).__name__))


_UNSUPPORTED = ("Cannot replay a decoder-layer argument of type {} for a batched head scan. Batched scans "
                "support tensor masks (attn_implementation 'sdpa' or 'eager'); use method='rerun' otherwise.")


def fan_out_last_token(kwargs: dict[str, Any], copies: int, cache: Cache, key_length: int,
                       attn_implementation: str) -> dict[str, Any]:
    """Turn the arguments of a one-token block call into arguments for `copies` copies of that token.

    The copies sit side by side as query positions of each row. Each copy attends
    to the cached earlier positions and to itself, never to the other copies. All
    copies share the last token's position, so each computes exactly what the
    single token would.
    `key_length` is the number of keys the one-token call attended to (cache + 1).
    """
    fanned: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, Cache):
            fanned[key] = cache
        elif key == "attention_mask":
            fanned[key] = _fan_out_mask(value, copies, key_length, attn_implementation)
        elif isinstance(value, torch.Tensor) or (isinstance(value, tuple) and value
                                                 and isinstance(value[0], torch.Tensor)):
            # Position ids (batch, 1) and rotary cos/sin (batch, 1, head_dim) repeat along the sequence axis.
            fanned[key] = _expand_sequence(value, copies)
        elif value is None or isinstance(value, (bool, int, float, str)):
            fanned[key] = value
        else:
            raise TypeError(_UNSUPPORTED.format(type(value).__name__))
    return fanned


def _expand_sequence(value: Any, copies: int) -> Any:
    if isinstance(value, tuple):
        return tuple(_expand_sequence(item, copies) for item in value)
    if value.ndim < 2 or value.shape[1] != 1:
        raise TypeError(_UNSUPPORTED.format(f"tensor of shape {tuple(value.shape)}"))
    return value.expand(value.shape[0], copies, *value.shape[2:])


def _fan_out_mask(mask: torch.Tensor | None, copies: int, key_length: int, attn_implementation: str) -> torch.Tensor:
    """Build the (batch, 1, copies, key_length - 1 + copies) mask: cached keys as before, plus each copy itself."""
    if mask is None:
        # sdpa leaves out the mask when nothing is padded; a boolean mask is what it accepts.
        if attn_implementation != "sdpa":
            raise TypeError(_UNSUPPORTED.format("None (no attention mask)"))
        mask = torch.ones(1, 1, 1, key_length, dtype=torch.bool)
    if mask.ndim != 4 or mask.shape[2] != 1 or mask.shape[3] != key_length:
        raise TypeError(_UNSUPPORTED.format(f"mask of shape {tuple(mask.shape)}"))

    rows = mask.shape[0]
    cached = mask[..., : key_length - 1].expand(rows, 1, copies, key_length - 1)
    diagonal = torch.eye(copies, dtype=torch.bool, device=mask.device)
    if mask.dtype == torch.bool:
        own = diagonal
    else:
        # Additive masks (eager attention): 0 where allowed, the dtype's minimum elsewhere.
        own = torch.zeros(copies, copies, dtype=mask.dtype, device=mask.device)
        own = own.masked_fill(~diagonal, torch.finfo(mask.dtype).min)
    return torch.cat([cached, own.expand(rows, 1, copies, copies)], dim=-1)


def run_blocks(heads: ModelHeads, hidden: torch.Tensor, start: int, stop: int,
               kwargs_by_layer: dict[int, dict[str, Any]]) -> torch.Tensor:
    """Run decoder blocks start..stop on `hidden` (batch, seq, d_model) and return block `stop`'s output."""
    for index in range(start, stop + 1):
        hidden = _block_output(heads.layer(index)(hidden, **kwargs_by_layer[index]))
    return hidden


def cache_from(keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """Build a cache holding copies of the given keys and values per layer index.

    Layers missing from `keys_values` stay empty; the blocks that read them must not run.
    """
    cache = DynamicCache()
    for index in sorted(keys_values):
        keys, values = keys_values[index]
        cache.update(keys, values, index)
    return cache


def cached_keys_values(cache: Cache, layers: range) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Return the keys and values of each layer in `layers`, each (batch, kv_heads, seq, head_dim)."""
    stored = {}
    for index in layers:
        layer = cache.layers[index]
        if getattr(layer, "is_sliding", False) and layer.get_seq_length() > layer.keys.shape[-2]:
            raise ValueError(f"layer {index}'s cache dropped positions outside its sliding window; "
                             "build the prefix cache with DynamicCache() (no config) so it keeps them all.")
        stored[index] = (layer.keys, layer.values)
    return stored


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Switch off gradients for every parameter, restoring the previous flags on exit."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
