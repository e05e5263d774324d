"""Render prompts into exact model inputs, and split generated text into thinking and answer.

Every rendered prompt ends inside an open think block, so generation always starts
with the thinking. Token ids are built from the rendered text with
`add_special_tokens=False`, and a BOS token is added only when the template did not
write one: the reference code tokenized the rendered template again with special
tokens, which gave some models a second BOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from cliffkit.families import Family

# Segment labels for every position of a trace, used by activation capture.
PROMPT, THINKING, CLOSE, ANSWER = 0, 1, 2, 3
SEGMENT_NAMES: dict[int, str] = {PROMPT: "prompt", THINKING: "thinking", CLOSE: "close", ANSWER: "answer"}


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt rendered through the chat template, ending inside an open think block."""

    text: str
    input_ids: list[int]


@dataclass(frozen=True)
class SplitText:
    """Generated text split at the closing think marker.

    `closed` is False when the text has no closing marker: the thinking then holds
    all the text and the answer is empty, and the trace must be flagged unfinished.
    """

    thinking: str
    answer: str
    closed: bool


def _check_chat_template(tokenizer: PreTrainedTokenizerBase, family: Family) -> None:
    if getattr(tokenizer, "chat_template", None):
        return
    raise ValueError(
        f"The tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template, "
        f"so a prompt cannot be rendered for family {family.name!r}. Set "
        "tokenizer.chat_template (a Jinja string) or load a model whose tokenizer ships one."
    )


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    family: Family,
    user_text: str,
    system: str | None = None,
) -> RenderedPrompt:
    """Render one user turn into the model input, ending with the opening think marker.

    `system` overrides the family's default system prompt; pass "" for none.
    """
    _check_chat_template(tokenizer, family)

    messages = []
    system_text = family.default_system if system is None else system
    if system_text:
        messages.append({"role": "system", "content": system_text})
    messages.append({"role": "user", "content": user_text})

    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **dict(family.template_kwargs)
    )
    # Templates of DeepSeek-R1 distills, QwQ and Qwen3-Thinking-2507 already open the
    # block; for the others the opening marker is appended here.
    if not text.rstrip().endswith(family.think_open):
        text = text + family.think_open + "\n"

    return RenderedPrompt(text=text, input_ids=encode_prompt_text(tokenizer, text))


def encode_prompt_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Tokenize rendered template text, adding BOS only if the tokenizer wants one and the text lacks it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos_id = tokenizer.bos_token_id
    if bos_id is None or not _tokenizer_adds_bos(tokenizer):
        return list(ids)
    if ids and ids[0] == bos_id:
        return list(ids)
    return [bos_id, *ids]


def _tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == tokenizer.bos_token_id


def split_generation(text: str, family: Family) -> SplitText:
    """Split text generated after the rendered prompt into thinking and answer.

    A leading opening marker (written by a model whose template did not prefill
    it) is removed. Only the first closing marker counts.
    """
    body = text.lstrip()
    if body.startswith(family.think_open):
        body = body[len(family.think_open):]

    head, marker, tail = body.partition(family.think_close)
    if not marker:
        return SplitText(thinking=body.strip(), answer="", closed=False)
    return SplitText(thinking=head.strip(), answer=tail.strip(), closed=True)


@dataclass(frozen=True)
class TraceTokens:
    """Token ids of prompt + thinking + closing marker + answer, with a segment label per position."""

    input_ids: torch.Tensor  # (seq,) int64
    segments: torch.Tensor  # (seq,) int8, values PROMPT/THINKING/CLOSE/ANSWER

    def segment_bounds(self, segment: int) -> tuple[int, int]:
        """Return the [start, end) positions of one segment; (start, start) when it is empty."""
        positions = (self.segments == segment).nonzero().flatten()
        if positions.numel() == 0:
            return (0, 0)
        return (int(positions[0]), int(positions[-1]) + 1)


def tokenize_trace(
    tokenizer: PreTrainedTokenizerBase,
    family: Family,
    prompt_text: str,
    thinking: str,
    answer: str | None,
    until: Literal["close", "answer"] = "close",
) -> TraceTokens:
    """Tokenize a trace segment by segment, so that every position has an exact label.

    Each segment is tokenized on its own, so no BPE merge crosses a boundary.
    With `until="close"` the sequence ends with the closing marker, which is where
    the probe reads the model's final refusal intention; with "answer" the answer follows.
    """
    prompt_ids = encode_prompt_text(tokenizer, prompt_text)
    thinking_ids = tokenizer(thinking, add_special_tokens=False)["input_ids"] if thinking else []
    close_ids = tokenizer(family.forced_close, add_special_tokens=False)["input_ids"]
    answer_ids: list[int] = []
    if until == "answer" and answer:
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]

    parts = [(prompt_ids, PROMPT), (thinking_ids, THINKING), (close_ids, CLOSE), (answer_ids, ANSWER)]
    ids = [token for part, _ in parts for token in part]
    labels = [label for part, label in parts for _ in part]
    return TraceTokens(
        input_ids=torch.tensor(ids, dtype=torch.long),
        segments=torch.tensor(labels, dtype=torch.int8),
    )
