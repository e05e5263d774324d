"""Capture residual-stream activations of traces at every position, one forward pass per batch.

The residual stream at layer L is the output of decoder block L, before the final
norm, read by a forward hook on that block. Batches are left-padded with attention
masks and explicit position ids, and positions are indexed by their offset from each
sequence's true end, so no padded row ever reads a pad token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from cliffkit.heads.layout import get_layout
from cliffkit.models import LoadedModel
from cliffkit.render import TraceTokens, tokenize_trace
from cliffkit.traces import Trace

logger = logging.getLogger(__name__)

Until = Literal["close", "answer"]
# Segment label written at padded positions. Real labels are PROMPT..ANSWER (0..3).
PAD_SEGMENT = -1
DEFAULT_BATCH_SIZE = 4


# --------------------------------------------------------------------------- inputs

def encode_traces(lm: LoadedModel, traces: Sequence[Trace], until: Until = "close") -> list[TraceTokens]:
    """Tokenize each trace segment by segment (prompt, thinking, closing marker, optional answer).

    NOTE: the thinking and answer are tokenized again from their stored text, which
    generation stripped of surrounding whitespace, so a few positions can differ from
    the tokens the model actually generated.
    """
    if until not in ("close", "answer"):
        raise ValueError(f"until must be 'close' or 'answer', got {until!r}.")
    return [tokenize_trace(lm.tokenizer, lm.family, prompt_text=trace.rendered, thinking=trace.thinking,
                           answer=trace.answer, until=until)
            for trace in traces]


def token_hash(tokens: TraceTokens) -> str:
    """Return the SHA-256 of a trace's token ids: the activations of one model depend on nothing else."""
    return hashlib.sha256(tokens.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()


def pad_left(sequences: Sequence[torch.Tensor], pad_id: int,
             segments: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Left-pad 1-D id tensors into (batch, seq) ids and mask, plus (batch, seq) segments when given.

    Left padding puts every row's last real token in the last column, so an offset
    from the end is the same column in every row. A row shorter than the offset has
    mask 0 there, so readers must check the mask (see `BatchActivations.at_offset`).
    """
    if not sequences:
        raise ValueError("pad_left needs at least one sequence.")
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = None if segments is None else torch.full((len(sequences), width), PAD_SEGMENT, dtype=torch.int8)
    for row, sequence in enumerate(sequences):
        length = len(sequence)
        if length == 0:
            raise ValueError(f"sequence {row} is empty. Every trace has at least its prompt tokens, so check the inputs.")
        ids[row, width - length:] = sequence
        mask[row, width - length:] = 1
        if labels is not None:
            labels[row, width - length:] = segments[row]
    return ids, mask, labels


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return (batch, seq) position ids that start at 0 on each row's first real token.

    Without them the model numbers positions from the first column, so a left-padded
    row is shifted. Rotary attention depends only on relative positions, so the shift
    changes nothing there, but absolute position embeddings and position-dependent
    rotary scaling (e.g. Phi-3's long-context factors) would see other positions than
    the sequence alone.
    """
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group indices into batches of similar length (longest first), to waste little compute on padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------- hooks

def _layers_path(lm: LoadedModel) -> str:
    """Return the dotted path to the decoder blocks, from the head layout of the model's architecture."""
    return get_layout(lm.model.config.get_text_config().model_type).layers_path


def decoder_layers(lm: LoadedModel) -> torch.nn.ModuleList:
    """Return the model's list of decoder blocks, found through the architecture's head layout."""
    return _resolve(lm.model, _layers_path(lm))


def num_layers(lm: LoadedModel) -> int:
    return len(decoder_layers(lm))


def _resolve(root: torch.nn.Module, dotted: str):
    module = root
    for name in dotted.split("."):
        if not hasattr(module, name):
            raise ValueError(f"{type(root).__name__} has no module at {dotted!r} (missing {name!r}). "
                             "Register a HeadLayout whose layers_path names where its decoder layers live "
                             "(cliffkit.heads.register_layout).")
        module = getattr(module, name)
    return module


def _decoder_body(lm: LoadedModel) -> torch.nn.Module:
    # The module that owns the layer list runs embeddings and blocks without the LM
    # head, so the (seq x vocab) logits are never computed.
    parent_path = _layers_path(lm).rpartition(".")[0]
    return _resolve(lm.model, parent_path) if parent_path else lm.model


def resolve_layers(lm: LoadedModel, layers: Sequence[int] | Literal["all"] | None) -> tuple[int, ...]:
    """Validate layer indices (negative ones count from the end) and return them sorted and unique."""
    total = num_layers(lm)
    if layers is None or layers == "all":
        return tuple(range(total))
    resolved = set()
    for layer in layers:
        index = int(layer) + total if int(layer) < 0 else int(layer)
        if not 0 <= index < total:
            raise ValueError(f"layer {layer} is out of range: the model has {total} decoder layers (0..{total - 1}).")
        resolved.add(index)
    if not resolved:
        raise ValueError("no layers selected. Pass layer indices or 'all'.")
    return tuple(sorted(resolved))


class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer, so later blocks are not computed."""


@contextmanager
def residual_hooks(lm: LoadedModel, layers: Sequence[int], sink: Callable[[int, torch.Tensor], None],
                   stop_after_last: bool = False):
    """Call `sink(layer, hidden)` with each block's output, hidden of shape (batch, seq, d_model).

    Hooks are removed in `finally`, also when the forward pass raises. With
    `stop_after_last`, the hook of the deepest layer raises `_StopForward`, and
    `forward_residual` catches it.
    """
    blocks = decoder_layers(lm)
    deepest = max(layers)
    handles = []

    def make_hook(layer: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            sink(layer, hidden)
            if stop_after_last and layer == deepest:
                raise _StopForward()
        return hook

    try:
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_residual(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     layers: Sequence[int], sink: Callable[[int, torch.Tensor], None],
                     stop_early: bool = True) -> None:
    """Run one forward pass over a left-padded batch and send each requested layer's output to `sink`.

    Args:
        input_ids: (batch, seq) left-padded token ids.
        attention_mask: (batch, seq), 1 on real tokens.
        layers: decoder block indices to read.
        sink: called as sink(layer, hidden) with hidden (batch, seq, d_model) on the model's device.
        stop_early: skip the blocks after the deepest requested layer.
    """
    device = lm.device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    position_ids = position_ids_from_mask(attention_mask)
    body = _decoder_body(lm)

    with torch.inference_mode(), residual_hooks(lm, layers, sink, stop_after_last=stop_early):
        try:
            body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        except _StopForward:
            pass


# --------------------------------------------------------------------------- batches of activations

@dataclass
class BatchActivations:
    """Residual-stream activations of one left-padded batch.

    Attributes:
        indices: position of each row's trace in the caller's trace list.
        layers: the decoder layers read, in the order of dimension 1 of `hidden`.
        hidden: (batch, n_layers, seq, d_model), left-padded; when only some offsets
            were kept, seq is the number of offsets, ordered as `offsets`.
        attention_mask: (batch, seq) over the same columns as `hidden`.
        segments: (batch, seq) int8 segment labels, PAD_SEGMENT at padding.
        lengths: (batch,) true sequence lengths.
        offsets: the offsets from the end kept, or None when every position was kept.
    """

    indices: list[int]
    layers: tuple[int, ...]
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    segments: torch.Tensor
    lengths: torch.Tensor
    offsets: tuple[int, ...] | None = None

    def at_offset(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (batch, n_layers, d_model) activations `offset` positions before each row's end, and a validity mask.

        Rows shorter than offset + 1 get False in the (batch,) mask and zeros in the values.
        """
        if self.offsets is None:
            column = self.hidden.shape[2] - 1 - offset
            if column < 0:
                valid = torch.zeros(len(self.indices), dtype=torch.bool)
                return torch.zeros_like(self.hidden[:, :, 0]), valid
            values = self.hidden[:, :, column]
        else:
            if offset not in self.offsets:
                raise ValueError(f"offset {offset} was not captured: this batch contains offsets {list(self.offsets)}. "
                                 "Capture it with positions=[..., offset] or positions='all'.")
            values = self.hidden[:, :, self.offsets.index(offset)]
        valid = self.lengths > offset
        return values * valid[:, None, None].to(values.dtype), valid

    def last(self) -> torch.Tensor:
        """Return (batch, n_layers, d_model) activations at each row's last real position."""
        values, _ = self.at_offset(0)
        return values

    def trace(self, row: int) -> torch.Tensor:
        """Return (n_layers, length, d_model) activations of one row, without padding."""
        if self.offsets is not None:
            raise ValueError("this batch kept only some offsets, so whole traces are missing. "
                             "Capture with positions='all' to read whole traces.")
        length = int(self.lengths[row])
        return self.hidden[row, :, self.hidden.shape[2] - length:]


def _offsets_tuple(positions: Literal["all", "last"] | Sequence[int]) -> tuple[int, ...] | None:
    if positions == "all":
        return None
    if positions == "last":
        return (0,)
    offsets = tuple(int(offset) for offset in positions)
    if not offsets or min(offsets) < 0:
        raise ValueError(f"positions must be 'all', 'last' or offsets from the end >= 0, got {positions!r}.")
    return offsets


def iter_activations(
    lm: LoadedModel,
    traces: Sequence[Trace] | Sequence[TraceTokens],
    layers: Sequence[int] | Literal["all"] | None = "all",
    *,
    positions: Literal["all", "last"] | Sequence[int] = "all",
    until: Until = "close",
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Iterator[BatchActivations]:
    """Yield the residual-stream activations of the traces, one batch at a time.

    Each batch costs one forward pass (stopped after the deepest requested layer), and
    only one batch is held in memory. Batches are formed from traces of similar length,
    so use `BatchActivations.indices` to map rows back to traces.

    Args:
        traces: `Trace` records (tokenized with `tokenize_trace(..., until=until)`) or
            already tokenized `TraceTokens`.
        layers: decoder block indices, or "all".
        positions: "all", "last", or a list of offsets from the end (0 = last position).
        dtype: storage dtype of the yielded activations (float32, float16 or bfloat16).

    Example:
        >>> for batch in iter_activations(lm, traces, [12], positions="last"):  # doctest: +SKIP
        ...     batch.last().shape            # (batch, 1, d_model)
    """
    encoded = _as_tokens(lm, traces, until)
    layer_tuple = resolve_layers(lm, layers)
    offsets = _offsets_tuple(positions)

    batches = length_sorted_batches([len(tokens.input_ids) for tokens in encoded], batch_size)
    for indices in tqdm(batches, desc="activations", unit="batch", disable=not progress or len(batches) <= 1):
        yield _capture_batch(lm, [encoded[index] for index in indices], indices, layer_tuple, offsets, dtype)


def _as_tokens(lm: LoadedModel, traces: Sequence[Trace] | Sequence[TraceTokens], until: Until) -> list[TraceTokens]:
    if len(traces) == 0:
        raise ValueError("no traces given.")
    if all(isinstance(item, TraceTokens) for item in traces):
        return list(traces)  # type: ignore[arg-type]
    return encode_traces(lm, traces, until)  # type: ignore[arg-type]


def _capture_batch(lm: LoadedModel, tokens: Sequence[TraceTokens], indices: list[int], layers: tuple[int, ...],
                   offsets: tuple[int, ...] | None, dtype: torch.dtype) -> BatchActivations:
    input_ids, mask, segments = pad_left([t.input_ids for t in tokens], lm.tokenizer.pad_token_id,
                                         [t.segments for t in tokens])
    width = input_ids.shape[1]
    columns = None if offsets is None else torch.tensor([width - 1 - offset for offset in offsets]).clamp(min=0)
    captured: dict[int, torch.Tensor] = {}

    def sink(layer: int, hidden: torch.Tensor) -> None:
        kept = hidden if columns is None else hidden[:, columns.to(hidden.device)]
        captured[layer] = kept.detach().to("cpu", dtype)

    forward_residual(lm, input_ids, mask, layers, sink)

    hidden = torch.stack([captured[layer] for layer in layers], dim=1)
    if columns is not None:
        mask, segments = mask[:, columns], segments[:, columns]
        lengths = torch.tensor([len(t.input_ids) for t in tokens])
        # A row shorter than an offset would read another column's token: zero it.
        valid = lengths[:, None] > torch.tensor(offsets)[None, :]
        hidden = hidden * valid[:, None, :, None].to(hidden.dtype)
        mask = mask * valid
        segments = torch.where(valid, segments, torch.tensor(PAD_SEGMENT, dtype=torch.int8))
    return BatchActivations(indices=list(indices), layers=layers, hidden=hidden, attention_mask=mask.cpu(),
                            segments=segments, lengths=torch.tensor([len(t.input_ids) for t in tokens]),
                            offsets=offsets)


# --------------------------------------------------------------------------- projections (scores without storage)

@dataclass
class BatchProjections:
    """Per-position projections of one batch onto one direction per layer.

    `scores` is (batch, n_layers, seq) float32, left-padded with NaN at padding;
    `trace_scores(row)` returns (n_layers, length) without padding.
    """

    indices: list[int]
    layers: tuple[int, ...]
    scores: torch.Tensor
    segments: torch.Tensor
    lengths: torch.Tensor

    def trace_scores(self, row: int) -> torch.Tensor:
        length = int(self.lengths[row])
        return self.scores[row, :, self.scores.shape[2] - length:]

    def trace_segments(self, row: int) -> torch.Tensor:
        length = int(self.lengths[row])
        return self.segments[row, self.segments.shape[1] - length:]


def iter_projections(
    lm: LoadedModel,
    traces: Sequence[Trace] | Sequence[TraceTokens],
    directions: Mapping[int, torch.Tensor],
    intercepts: Mapping[int, float] | None = None,
    *,
    until: Until = "close",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> Iterator[BatchProjections]:
    """Yield `hidden · direction + intercept` at every position and layer, keeping no activations.

    The projection runs inside the hook, in float32, so a batch holds only
    (batch, n_layers, seq) scores whatever the number of layers.

    Args:
        directions: layer -> (d_model,) direction in raw residual-stream space.
        intercepts: layer -> scalar added to the projection (0 when missing).
    """
    if not directions:
        raise ValueError("no directions given. Pass {layer: (d_model,) tensor}.")
    encoded = _as_tokens(lm, traces, until)
    by_layer = {resolve_layers(lm, [key])[0]: value for key, value in directions.items()}
    bias_by_layer = {resolve_layers(lm, [key])[0]: float(value) for key, value in (intercepts or {}).items()}
    layers = tuple(sorted(by_layer))
    weights = torch.stack([torch.as_tensor(by_layer[layer], dtype=torch.float32) for layer in layers])
    if weights.ndim != 2 or weights.shape[1] != lm.model.config.hidden_size:
        raise ValueError(f"directions must be vectors of length d_model={lm.model.config.hidden_size}, "
                         f"got shape {tuple(weights.shape[1:])}.")
    weights = weights.to(lm.device)
    bias = torch.tensor([bias_by_layer.get(layer, 0.0) for layer in layers], dtype=torch.float32)

    batches = length_sorted_batches([len(tokens.input_ids) for tokens in encoded], batch_size)
    for indices in tqdm(batches, desc="scoring", unit="batch", disable=not progress or len(batches) <= 1):
        tokens = [encoded[index] for index in indices]
        input_ids, mask, segments = pad_left([t.input_ids for t in tokens], lm.tokenizer.pad_token_id,
                                             [t.segments for t in tokens])
        per_layer: dict[int, torch.Tensor] = {}

        def sink(layer: int, hidden: torch.Tensor) -> None:
            row = layers.index(layer)
            per_layer[layer] = (hidden.float() @ weights[row]).cpu()

        forward_residual(lm, input_ids, mask, layers, sink)

        scores = torch.stack([per_layer[layer] for layer in layers], dim=1) + bias[None, :, None]
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("nan"))
        yield BatchProjections(indices=list(indices), layers=layers, scores=scores, segments=segments,
                               lengths=torch.tensor([len(t.input_ids) for t in tokens]))


# --------------------------------------------------------------------------- last positions, means

def last_position_activations(
    lm: LoadedModel,
    traces: Sequence[Trace],
    layers: Sequence[int] | Literal["all"] | None = "all",
    *,
    until: Until = "close",
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Return float32 activations at each trace's last position: (n_traces, n_layers, d_model), in trace order.

    With `cache_dir`, activations are read from and written to an `ActivationCache`
    keyed by model id, model dtype, token ids and layer, so only missing traces run.
    """
    encoded = encode_traces(lm, traces, until)
    layer_tuple = resolve_layers(lm, layers)
    d_model = lm.model.config.hidden_size
    result = np.zeros((len(encoded), len(layer_tuple), d_model), dtype=np.float32)

    cache = ActivationCache(cache_dir, lm, until) if cache_dir is not None else None
    missing = list(range(len(encoded)))
    if cache is not None:
        missing = []
        for index, tokens in enumerate(encoded):
            cached = cache.get(token_hash(tokens), layer_tuple)
            if cached is None:
                missing.append(index)
            else:
                result[index] = cached
        logger.info("activation cache: %d of %d traces found", len(encoded) - len(missing), len(encoded))

    if missing:
        subset = [encoded[index] for index in missing]
        for batch in iter_activations(lm, subset, layer_tuple, positions="last", batch_size=batch_size,
                                      dtype=torch.float32, progress=progress):
            values = batch.last().numpy()
            for row, sub_index in enumerate(batch.indices):
                index = missing[sub_index]
                result[index] = values[row]
                if cache is not None:
                    cache.put(token_hash(encoded[index]), layer_tuple, values[row])
    return result


class RunningMean:
    """A mean accumulated in float64.

    Summing thousands of bfloat16 or float32 activations in their own precision loses
    the low bits of each addend (bfloat16 keeps 8 mantissa bits). The rounding error
    biases difference-of-means directions, so the sum is kept in float64.
    """

    def __init__(self, shape: tuple[int, ...]):
        self.total = torch.zeros(shape, dtype=torch.float64)
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        """Add a batch of shape (n, *shape)."""
        self.total += values.to(torch.float64).sum(dim=0)
        self.count += values.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("mean of no values: no example of this class was seen.")
        return self.total / self.count


def class_means(
    lm: LoadedModel,
    traces: Sequence[Trace],
    labels: Sequence[int],
    layers: Sequence[int] | Literal["all"] | None = "all",
    *,
    offset: int = 0,
    until: Until = "close",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[int, torch.Tensor]:
    """Stream the traces and return, per class label, the float64 mean (n_layers, d_model) at `offset` from the end."""
    if len(labels) != len(traces):
        raise ValueError(f"got {len(labels)} labels for {len(traces)} traces.")
    layer_tuple = resolve_layers(lm, layers)
    shape = (len(layer_tuple), lm.model.config.hidden_size)
    means = {int(label): RunningMean(shape) for label in sorted(set(labels))}

    for batch in iter_activations(lm, traces, layer_tuple, positions=[offset], until=until, batch_size=batch_size):
        values, valid = batch.at_offset(offset)
        for row, index in enumerate(batch.indices):
            if valid[row]:
                means[int(labels[index])].add(values[row:row + 1])
    return {label: running.mean for label, running in means.items()}


# --------------------------------------------------------------------------- disk: cache and shards

class ActivationCache:
    """A disk cache of last-position activations, one safetensors file per trace and one tensor per layer.

    Layout: root/<model id>/<model dtype>/<until>-last/<hash[:2]>/<hash>.safetensors,
    where the hash is `token_hash` of the trace's token ids; tensors are named
    "layer_<L>" and stored in float32.
    """

    def __init__(self, root: str | Path, lm: LoadedModel, until: Until = "close"):
        model_slug = lm.model_id.replace("/", "--").replace(os.sep, "--")
        dtype_name = str(lm.dtype).removeprefix("torch.")
        self.folder = Path(root) / model_slug / dtype_name / f"{until}-last"

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str, layers: Sequence[int]) -> np.ndarray | None:
        """Return (n_layers, d_model) for the layers, or None unless every layer is cached."""
        path = self._path(key)
        if not path.exists():
            return None
        stored = load_file(str(path))
        names = [f"layer_{layer}" for layer in layers]
        if not all(name in stored for name in names):
            return None
        return np.stack([stored[name].numpy() for name in names])

    def put(self, key: str, layers: Sequence[int], values: np.ndarray) -> None:
        """Store (n_layers, d_model) values, merged with layers already cached for this trace."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = load_file(str(path)) if path.exists() else {}
        for layer, row in zip(layers, values):
            stored[f"layer_{layer}"] = torch.from_numpy(np.ascontiguousarray(row, dtype=np.float32))
        temporary = path.with_suffix(".tmp")
        save_file(stored, str(temporary))
        os.replace(temporary, path)


SHARD_INDEX = "index.json"


def write_activation_shards(
    lm: LoadedModel,
    traces: Sequence[Trace],
    out_dir: str | Path,
    layers: Sequence[int] | Literal["all"] | None = "all",
    *,
    positions: Literal["all", "last"] | Sequence[int] = "all",
    until: Until = "close",
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Stream activations to disk, one safetensors shard per batch plus a JSON index; resume after interruption.

    The index records the model, layers, dtype, positions and, per shard, the trace
    ids and token hashes. A rerun with the same settings skips shards already written;
    with other settings or traces it raises, so two runs never mix in one folder.
    Returns the path of the index.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoded = encode_traces(lm, traces, until)
    layer_tuple = resolve_layers(lm, layers)
    offsets = _offsets_tuple(positions)
    hashes = [token_hash(tokens) for tokens in encoded]
    batches = length_sorted_batches([len(t.input_ids) for t in encoded], batch_size)

    header = {"model_id": lm.model_id, "model_dtype": str(lm.dtype).removeprefix("torch."),
              "layers": list(layer_tuple), "dtype": str(dtype).removeprefix("torch."),
              "offsets": None if offsets is None else list(offsets), "until": until,
              "batches": [[hashes[index] for index in batch] for batch in batches]}
    index = _open_shard_index(out / SHARD_INDEX, header)

    done = {shard["file"] for shard in index["shards"]}
    for number, indices in enumerate(tqdm(batches, desc="activation shards", unit="shard")):
        name = f"shard_{number:05d}.safetensors"
        if name in done:
            continue
        batch = _capture_batch(lm, [encoded[i] for i in indices], indices, layer_tuple, offsets, dtype)
        save_file({"hidden": batch.hidden.contiguous(), "attention_mask": batch.attention_mask.contiguous(),
                   "segments": batch.segments.contiguous(), "lengths": batch.lengths.contiguous()},
                  str(out / name))
        index["shards"].append({"file": name, "trace_ids": [traces[i].prompt_id for i in indices],
                                "trace_indices": indices, "token_hashes": [hashes[i] for i in indices]})
        _write_json_atomic(out / SHARD_INDEX, index)
    return out / SHARD_INDEX


def _open_shard_index(path: Path, header: dict) -> dict:
    if not path.exists():
        return {**header, "shards": []}
    existing = json.loads(path.read_text(encoding="utf-8"))
    different = [key for key in header if existing.get(key) != header[key]]
    if different:
        raise ValueError(f"{path.parent} contains activation shards written with other settings "
                         f"({', '.join(different)} differ). Write to a new folder or delete this one.")
    return existing


def _write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(temporary, path)


def read_activation_shards(out_dir: str | Path) -> Iterator[BatchActivations]:
    """Yield the batches written by `write_activation_shards`, in the order they were written."""
    index_path = Path(out_dir) / SHARD_INDEX
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found. Write shards with write_activation_shards first.")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    offsets = None if index["offsets"] is None else tuple(index["offsets"])
    for shard in index["shards"]:
        tensors = load_file(str(Path(out_dir) / shard["file"]))
        yield BatchActivations(indices=list(shard["trace_indices"]), layers=tuple(index["layers"]),
                               hidden=tensors["hidden"], attention_mask=tensors["attention_mask"],
                               segments=tensors["segments"], lengths=tensors["lengths"], offsets=offsets)
