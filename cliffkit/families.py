"""Model families: how each kind of model thinks.

A family bundles the think markers and how a prompt opens the think block. Where
the attention heads live depends on the architecture, not the family, and is in
`cliffkit.heads.layout`. Adding a model family means adding one `Family` entry
to `FAMILIES`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

logger = logging.getLogger(__name__)

# How the think block gets opened in the rendered prompt:
#   "template": the model's own chat template already ends the generation prompt
#               with the opening marker (DeepSeek-R1-Distill, QwQ).
#   "prefill":  the template does not, so cliffkit appends the opening marker
#               after the generation prompt (Qwen3 with enable_thinking, Phi-4-mini-
#               reasoning, and the prompted scaffold for instruct models).
ThinkOpen = Literal["template", "prefill"]

SCAFFOLD_SYSTEM_PROMPT = (
    "You are a helpful assistant. Before answering, think step by step inside "
    "<think> and </think>. After </think>, write your final answer for the user."
)


@dataclass(frozen=True)
class Family:
    """One model family's reasoning format."""

    name: str
    think_open: str = "<think>"
    think_close: str = "</think>"
    think_open_by: ThinkOpen = "prefill"
    # Extra keyword arguments for `tokenizer.apply_chat_template`, such as
    # {"enable_thinking": True} for Qwen3.
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # A system prompt that cliffkit adds when the caller gives none. Used by the
    # prompted scaffold to ask an instruct model to think first.
    default_system: str | None = None
    # Lower-case substrings of a Hugging Face id or folder name that select this family.
    id_patterns: tuple[str, ...] = ()
    # `config.model_type` values that fall back to this family when no id pattern matches.
    model_types: tuple[str, ...] = ()
    # Text put between the closing marker and the answer when the budget closes
    # the thinking (budget forcing).
    forced_close: str = "\n</think>\n\n"
    # False for a model that ignores a safety system prompt, so that its safe responses
    # for a repair pool must start from a written opening (`cliffkit.pool.ResponsePrefill`).
    follows_system_prompt: bool = True
    description: str = ""

    @property
    def is_native_reasoner(self) -> bool:
        return self.default_system is None


_R1 = dict(think_open_by="template", forced_close="\n</think>\n\n")

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in [
        Family(
            name="deepseek-r1-distill-qwen",
            id_patterns=("deepseek-r1-distill-qwen",),
            description="DeepSeek-R1-Distill-Qwen 1.5B/7B/14B/32B (Qwen2 architecture): the template "
            "writes BOS and ends with <｜Assistant｜><think>\\n.",
            **_R1,
        ),
        Family(
            name="deepseek-r1-distill-llama",
            id_patterns=("deepseek-r1-distill-llama",),
            description="DeepSeek-R1-Distill-Llama 8B/70B (Llama architecture): same template and "
            "special tokens as the Qwen distills.",
            **_R1,
        ),
        Family(
            name="realsafe-r1",
            id_patterns=("realsafe-r1", "realsafe"),
            description="RealSafe-R1 7B (Qwen2) and 8B (Llama): R1 distills fine-tuned for safety, "
            "the well-aligned contrast; same format as the distills.",
            **_R1,
        ),
        Family(
            name="skywork-or1",
            id_patterns=("skywork-or1",),
            description="Skywork-OR1 7B/32B: RL-trained from R1-Distill-Qwen (Qwen2), same format.",
            **_R1,
        ),
        Family(
            name="qwq",
            id_patterns=("qwq",),
            description="QwQ-32B (Qwen2 architecture): ChatML template that ends with "
            "<|im_start|>assistant\\n<think>\\n.",
            **_R1,
        ),
        Family(
            name="qwen3-thinking",
            id_patterns=("qwen3",),
            model_types=("qwen3", "qwen3_moe"),
            template_kwargs={"enable_thinking": True},
            description="Qwen3 hybrid models (thinking switched on by enable_thinking, cliffkit "
            "appends <think>) and -Thinking-2507 models (qwen3 or qwen3_moe; the template opens "
            "<think> itself and ignores enable_thinking).",
        ),
        Family(
            name="phi4-mini-reasoning",
            id_patterns=("phi-4-mini-reasoning", "phi4-mini-reasoning"),
            description="Phi-4-mini-reasoning (Phi-3 architecture): the template adds a fixed system "
            "line and does not open <think>; the model writes it, so cliffkit appends it.",
        ),
        Family(
            name="cliffkit-thinker",
            id_patterns=("cliffkit/qwen2.5-coder-0.5b-think",),
            # No default_system: the Qwen2.5 chat template then writes its own default
            # system line, in the distillation data as at inference.
            # Distilled without system prompts, it refused 4 of 48 harmful train prompts under
            # the safety system prompt in the ci book run, so its pool is prefilled.
            follows_system_prompt=False,
            description="The embedded Qwen2.5-Coder-0.5B-Instruct with the distilled think-format "
            "LoRA adapter merged in; the prompt is prefilled with <think>.",
        ),
        Family(
            name="scaffold",
            default_system=SCAFFOLD_SYSTEM_PROMPT,
            # Qwen3 -Instruct-2507 models have no think phase, unlike the other Qwen3 models.
            id_patterns=("instruct-2507",),
            model_types=("qwen2", "llama", "mistral", "gemma2", "gemma3_text", "phi3"),
            description="Any instruct model without a think phase: prompted to think, "
            "with budget forcing to close the block.",
        ),
    ]
}


def get_family(name: str) -> Family:
    """Return the registered family called `name`."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(
            f"Unknown model family {name!r}. Known families: {known}. "
            "Add a Family entry to cliffkit.families.FAMILIES to support another one."
        ) from None


def detect_family(model_id: str, model_type: str | None = None) -> Family:
    """Pick the family for a model from its id or folder name, then its config type.

    Id patterns are tried first, longest first, so "deepseek-r1-distill-qwen" wins
    over "qwen3" style fragments. Raises ValueError when neither matches.
    """
    lowered = model_id.lower()
    candidates = [(pattern, family) for family in FAMILIES.values() for pattern in family.id_patterns]
    for pattern, family in sorted(candidates, key=lambda item: -len(item[0])):
        if pattern in lowered:
            return family

    if model_type is not None:
        for family in FAMILIES.values():
            if model_type in family.model_types:
                logger.info("Model %s: no id pattern matched, using family %s from model_type %s",
                            model_id, family.name, model_type)
                return family

    known = ", ".join(sorted(FAMILIES))
    raise ValueError(
        f"No model family matches {model_id!r} (model_type={model_type!r}). "
        f"Pass family=... with one of: {known}, or register a new Family in cliffkit.families."
    )
