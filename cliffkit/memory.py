"""Batch sizes that fit in the memory at hand, estimated from the model config.

Generation memory grows with batch size times sequence length: the KV cache keeps
keys and values of every layer for every token, and each forward pass keeps one
layer's activations. `pick_batch_size` divides the free memory by an estimate of
one sequence's share. The transformers backend also halves a batch that runs out
of GPU memory (`cliffkit.backends.HFBackend`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

GIB = 1024 ** 3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes that generation needs, split by what they scale with.

    kv_bytes_per_token: keys and values of all layers for one token.
    activation_bytes_per_token: one layer's transient activations for one token
        during a forward pass (layers run one after another, so one layer's worth).
    per_sequence_bytes: float32 logits and sampling probabilities over the
        vocabulary, held for each sequence at each decoding step.
    """

    kv_bytes_per_token: int
    activation_bytes_per_token: int
    per_sequence_bytes: int

    def bytes_for(self, batch_size: int, seq_len: int) -> int:
        """Return the estimated bytes for `batch_size` sequences of `seq_len` tokens each."""
        per_token = self.kv_bytes_per_token + self.activation_bytes_per_token
        return batch_size * (seq_len * per_token + self.per_sequence_bytes)


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    # Multimodal configs keep the language model's sizes in a sub-config.
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def head_dim(config: PretrainedConfig) -> int:
    """Return the per-head width: `head_dim` when the config sets it, else hidden_size / heads."""
    config = _text_config(config)
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def kv_cache_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Return 2 (keys and values) x layers x KV heads x head_dim x bytes per element.

    NOTE: sliding-window layers (Gemma 2/3, some Qwen2 configs) keep fewer tokens;
    this counts every layer at full length, so it overestimates their cache.
    """
    config = _text_config(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim(config) * element


def activation_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Estimate one decoder layer's activations per token, in bytes.

    The count is: the residual stream and its normed copy (2 x hidden); the query,
    key and value projections ((heads + 2 x KV heads) x head_dim); the attention
    output (hidden); and the MLP's gate, up and activated tensors (3 x intermediate).
    For a mixture of experts the MLP term is 3 x expert width x experts per token.
    Attention scores are not counted, because SDPA and flash attention do not
    materialize them.
    """
    config = _text_config(config)
    element = torch.empty((), dtype=dtype).element_size()
    hidden = config.hidden_size
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * kv_heads) * head_dim(config)
    return element * (2 * hidden + qkv + hidden + 3 * _mlp_width(config))


def _mlp_width(config: PretrainedConfig) -> int:
    experts_per_token = getattr(config, "num_experts_per_tok", None)
    expert_width = getattr(config, "moe_intermediate_size", None)
    if experts_per_token and expert_width:
        return int(experts_per_token) * int(expert_width)
    return int(config.intermediate_size)


def estimate_memory(config: PretrainedConfig, dtype: torch.dtype) -> MemoryEstimate:
    """Return the per-token and per-sequence byte counts of generation for this config and dtype."""
    vocab = _text_config(config).vocab_size
    # Logits and the softmax over them are float32 whatever the model dtype.
    per_sequence = 2 * vocab * 4
    return MemoryEstimate(
        kv_bytes_per_token=kv_cache_bytes_per_token(config, dtype),
        activation_bytes_per_token=activation_bytes_per_token(config, dtype),
        per_sequence_bytes=per_sequence,
    )


def free_memory_bytes(device: torch.device | str | list[torch.device]) -> int:
    """Return the free memory of a device, or the sum over a list of devices.

    For a CUDA device this is `torch.cuda.mem_get_info`; for the CPU, the available
    system memory (psutil when installed, else `os.sysconf`).
    """
    if isinstance(device, list):
        gpus = [torch.device(d) for d in device if torch.device(d).type == "cuda"]
        # A model split over GPUs keeps its KV cache on the GPUs; the CPU share is ignored.
        return sum(free_memory_bytes(d) for d in gpus) if gpus else free_memory_bytes("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return _available_system_memory()
    raise ValueError(f"Cannot measure free memory on device {str(device)!r}; pass free_bytes explicitly.")


def _available_system_memory() -> int:
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def pick_batch_size(config: PretrainedConfig, dtype: torch.dtype, seq_len: int, free_bytes: int,
                    headroom: float = 0.8, max_batch_size: int | None = None) -> int:
    """Return the largest batch size whose estimated memory fits in `headroom` x `free_bytes`.

    `seq_len` is the longest sequence generation reaches: prompt + think budget +
    answer budget. Measure `free_bytes` after the model is loaded, so the weights
    are already accounted for. Raises ValueError when not even one sequence fits.

    Example:
        >>> pick_batch_size(lm.model.config, lm.dtype, 2048 + 512, free_memory_bytes("cuda"))  # doctest: +SKIP
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}.")
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}.")
    one_sequence = estimate_memory(config, dtype).bytes_for(1, seq_len)
    budget = int(free_bytes * headroom)
    size = budget // one_sequence
    if size < 1:
        raise ValueError(
            f"One sequence of {seq_len} tokens needs about {one_sequence / GIB:.2f} GiB, but only "
            f"{budget / GIB:.2f} GiB of the {free_bytes / GIB:.2f} GiB free may be used. Lower the "
            "think or answer budget, use bfloat16, or shard the model over more GPUs."
        )
    if max_batch_size is not None:
        size = min(size, max_batch_size)
    return int(size)


def resolve_batch_size(value: int | str, config: PretrainedConfig, dtype: torch.dtype, seq_len: int,
                       devices: list[torch.device], out: str | Path | None = None,
                       max_batch_size: int = 64) -> int:
    """Turn a batch size setting (an int, or "auto") into a number.

    "auto" reuses the batch size recorded in the traces already in `out`, so that a
    resumed run keeps the same batches and seeds. Without such traces it is picked
    from the free memory of `devices`, at most `max_batch_size`.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"batch_size must be at least 1, got {value}.")
        return value
    if value != "auto":
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {value!r}.")
    recorded = _recorded_batch_size(out)
    if recorded is not None:
        logger.info("Reusing batch size %d recorded in %s", recorded, out)
        return recorded
    size = pick_batch_size(config, dtype, seq_len, free_memory_bytes(devices), max_batch_size=max_batch_size)
    logger.info("Picked batch size %d for sequences of %d tokens from the free memory", size, seq_len)
    return size


def _recorded_batch_size(out: str | Path | None) -> int | None:
    if out is None or not Path(out).exists():
        return None
    from cliffkit.traces import read_traces

    traces = read_traces(out)
    sizes: set[Any] = {trace.settings.get("batch_size") for trace in traces}
    sizes.discard(None)
    if len(sizes) > 1:
        raise ValueError(f"{out} contains traces generated with several batch sizes {sorted(sizes)}; "
                         "pass an explicit batch size.")
    return int(sizes.pop()) if sizes else None
