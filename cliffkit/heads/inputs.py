"""Token sequences of traces, batched with left padding for head scans.

Left padding puts every row's last real token at index -1, so "the last
position" and "k positions before the end" mean the same thing in every row.
Position ids count real tokens only, as `generate` does, so a padded row sees the
same rotary positions as the unpadded sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch

from cliffkit.models import LoadedModel
from cliffkit.render import tokenize_trace
from cliffkit.traces import Trace


@dataclass(frozen=True)
class TokenBatch:
    """A left-padded batch: `input_ids`, `attention_mask` and `position_ids`, each (batch, seq)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device))

    def columns(self, start: int | None, stop: int | None) -> "TokenBatch":
        """Return the batch cut to positions [start, stop), keeping the padding on the left."""
        return TokenBatch(self.input_ids[:, start:stop], self.attention_mask[:, start:stop],
                          self.position_ids[:, start:stop])


def trace_token_ids(lm: LoadedModel, traces: Sequence[Trace],
                    until: Literal["close", "answer"] = "close") -> list[torch.Tensor]:
    """Tokenize each trace as prompt + thinking + closing marker (and the answer with until="answer").

    With until="close" the last position is the closing think marker, where the
    final refusal score is read.
    """
    return [tokenize_trace(lm.tokenizer, lm.family, trace.rendered, trace.thinking, trace.answer, until=until).input_ids
            for trace in traces]


def pad_left(sequences: Sequence[torch.Tensor | Sequence[int]], pad_id: int) -> TokenBatch:
    """Stack token sequences into one left-padded batch."""
    rows = [torch.as_tensor(sequence, dtype=torch.long) for sequence in sequences]
    if not rows or any(row.ndim != 1 or row.numel() == 0 for row in rows):
        raise ValueError("pad_left needs at least one sequence, each a non-empty 1-D list of token ids.")

    length = max(row.numel() for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - row.numel():] = row
        attention_mask[index, length - row.numel():] = 1

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(input_ids, attention_mask, position_ids)


def iter_batches(sequences: Sequence[torch.Tensor], pad_id: int, batch_size: int,
                 min_length: int = 1) -> Iterator[tuple[list[int], TokenBatch]]:
    """Yield (indices into `sequences`, batch), grouping sequences of similar length to save padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    short = [index for index, sequence in enumerate(sequences) if len(sequence) < min_length]
    if short:
        raise ValueError(f"{len(short)} sequences are shorter than {min_length} tokens (first: index {short[0]}); "
                         "this scan needs at least that many.")

    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        yield indices, pad_left([sequences[index] for index in indices], pad_id)


def pad_token_id(lm: LoadedModel) -> int:
    pad = lm.tokenizer.pad_token_id
    return pad if pad is not None else lm.tokenizer.eos_token_id
