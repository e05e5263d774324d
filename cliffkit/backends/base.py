"""The interface every generation backend implements, so budget forcing is written once.

A backend turns lists of prompt token ids into generated rows. `cliffkit.generate`
calls it twice per batch (thinking, then answer) and builds the traces itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence, runtime_checkable

from transformers import PreTrainedTokenizerBase

from cliffkit.families import Family

if TYPE_CHECKING:
    from cliffkit.generate import GenerationSettings


@dataclass(frozen=True)
class GeneratedRow:
    """The new tokens of one prompt, cut before the first end-of-sequence or pad token.

    `hit_eos` is True when the model ended the sequence itself, False when the token
    budget or a stop string ended it.
    """

    ids: list[int]
    hit_eos: bool


@runtime_checkable
class GenerationBackend(Protocol):
    """A generation engine that `cliffkit.generate.generate_traces` can drive.

    Attributes:
        name: short engine name recorded on every trace ("hf", "vllm", ...).
        model_id: the id the traces are written under; resuming checks it.
        tokenizer: the model's tokenizer, used to render prompts and decode rows.
        family: the model family (think markers, template arguments).
        dtype_name: compute dtype as text, e.g. "bfloat16".
    """

    name: str
    model_id: str
    tokenizer: PreTrainedTokenizerBase
    family: Family
    dtype_name: str

    def generate_rows(self, token_id_lists: list[list[int]], max_new_tokens: int,
                      settings: "GenerationSettings", stop: Sequence[str]) -> list[GeneratedRow]:
        """Generate at most `max_new_tokens` new tokens for each prompt, in input order.

        Generation of a row ends at an end-of-sequence token, at the budget, or right
        after a stop string, which stays in the row. `settings.seed` is the seed of the
        current batch; sampling must be a deterministic function of it and the inputs.
        """
        ...


def end_token_ids(tokenizer: PreTrainedTokenizerBase, extra: int | Iterable[int] | None = None) -> set[int]:
    """Return the ids that end a sequence: EOS, pad, and any extra ids (a generation config's EOS list)."""
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(extra)
    return {token for token in ids if token is not None}


def cut_at_end(row: Sequence[int], ends: set[int]) -> GeneratedRow:
    """Cut a row of new tokens before its first end id; `hit_eos` is True when one was found."""
    for position, token in enumerate(row):
        if token in ends:
            return GeneratedRow(ids=list(row[:position]), hit_eos=True)
    return GeneratedRow(ids=list(row), hit_eos=False)
