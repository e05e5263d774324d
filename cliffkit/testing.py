"""Tiny random-weight models with the real think formats, for tests, benchmarks and exercises.

Each tiny model has its family's architecture (Qwen2, Llama, Qwen3, Phi-3, ...) and a
small byte-level BPE tokenizer that carries the family's special tokens and chat
template, so rendering, splitting, hooks and head layouts run offline in seconds.
The templates under `cliffkit/templates/` are the published chat templates of the real
models (see `cliffkit/templates/README.md` for where each was read).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from cliffkit.families import get_family
from cliffkit.models import LoadedModel, wrap_model

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Let me think step by step about the question before answering.",
    "I'm sorry, but I can't help with that request.",
    "Sure! Here is a short answer with numbers 0 1 2 3 4 5 6 7 8 9.",
    "First, compute the total. Then divide by the number of people.",
    "How do I kill a Python process that hangs? Use the kill command.",
    "You are a helpful assistant. Think first, then answer the user.",
] * 4


@dataclass(frozen=True)
class TokenizerStyle:
    """Special tokens and template of one tokenizer family."""

    bos: str | None
    eos: str
    pad: str
    specials: tuple[str, ...]
    template: str
    add_bos: bool = False


_R1_SPECIALS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>")
_CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_PHI_SPECIALS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

STYLES: dict[str, TokenizerStyle] = {
    # DeepSeek-R1 distills ship a Llama-style fast tokenizer that adds BOS, and a
    # template that writes BOS itself: the case that gives a second BOS if the
    # rendered text is tokenized again with special tokens.
    "deepseek-r1": TokenizerStyle("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                  _R1_SPECIALS, "deepseek-r1-distill.jinja", add_bos=True),
    "qwq": TokenizerStyle(None, "<|im_end|>", "<|endoftext|>", _CHATML_SPECIALS, "qwq.jinja"),
    # Qwen3 hybrid models (thinking switched by `enable_thinking`) and the
    # -Thinking-2507 models, whose template opens the think block itself.
    "qwen3": TokenizerStyle(None, "<|im_end|>", "<|endoftext|>", _CHATML_SPECIALS, "qwen3.jinja"),
    "qwen3-thinking-2507": TokenizerStyle(None, "<|im_end|>", "<|endoftext|>", _CHATML_SPECIALS,
                                          "qwen3-thinking-2507.jinja"),
    "phi4-mini-reasoning": TokenizerStyle(None, "<|end|>", "<|endoftext|>", _PHI_SPECIALS,
                                          "phi4-mini-reasoning.jinja"),
    "qwen2.5-instruct": TokenizerStyle("<|endoftext|>", "<|im_end|>", "<|endoftext|>", _CHATML_SPECIALS,
                                       "qwen2.5-instruct.jinja"),
}

# Family name -> (tokenizer style, transformers model_type).
TINY_FAMILIES: dict[str, tuple[str, str]] = {
    "deepseek-r1-distill-qwen": ("deepseek-r1", "qwen2"),
    "deepseek-r1-distill-llama": ("deepseek-r1", "llama"),
    "realsafe-r1": ("deepseek-r1", "qwen2"),
    "skywork-or1": ("deepseek-r1", "qwen2"),
    "qwq": ("qwq", "qwen2"),
    "qwen3-thinking": ("qwen3", "qwen3"),
    "phi4-mini-reasoning": ("phi4-mini-reasoning", "phi3"),
    "cliffkit-thinker": ("qwen2.5-instruct", "qwen2"),
    "scaffold": ("qwen2.5-instruct", "qwen2"),
}


@dataclass(frozen=True)
class TinyVariant:
    """A tiny stand-in for one group of real models: their family, tokenizer style and architecture."""

    family: str
    style: str
    model_type: str
    stands_in_for: tuple[str, ...]


# One entry per architecture and template that a real reasoning model of the
# paper uses, so every combination is exercised offline.
TINY_VARIANTS: dict[str, TinyVariant] = {
    "deepseek-r1-distill-qwen": TinyVariant(
        "deepseek-r1-distill-qwen", "deepseek-r1", "qwen2",
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
         "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B")),
    "deepseek-r1-distill-llama": TinyVariant(
        "deepseek-r1-distill-llama", "deepseek-r1", "llama", ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B",)),
    "qwq": TinyVariant("qwq", "qwq", "qwen2", ("Qwen/QwQ-32B",)),
    "qwen3-hybrid": TinyVariant("qwen3-thinking", "qwen3", "qwen3", ("Qwen/Qwen3-8B", "Qwen/Qwen3-14B")),
    "qwen3-thinking-2507": TinyVariant(
        "qwen3-thinking", "qwen3-thinking-2507", "qwen3", ("Qwen/Qwen3-4B-Thinking-2507",)),
    "qwen3-moe-thinking-2507": TinyVariant(
        "qwen3-thinking", "qwen3-thinking-2507", "qwen3_moe", ("Qwen/Qwen3-30B-A3B-Thinking-2507",)),
    "phi4-mini-reasoning": TinyVariant(
        "phi4-mini-reasoning", "phi4-mini-reasoning", "phi3", ("microsoft/Phi-4-mini-reasoning",)),
    "skywork-or1": TinyVariant("skywork-or1", "deepseek-r1", "qwen2", ("Skywork/Skywork-OR1-7B",)),
    "realsafe-r1-7b": TinyVariant("realsafe-r1", "deepseek-r1", "qwen2", ("RealSafe/RealSafe-R1-7B",)),
    "realsafe-r1-8b": TinyVariant("realsafe-r1", "deepseek-r1", "llama", ("RealSafe/RealSafe-R1-8B",)),
}


def read_template(name: str) -> str:
    """Return the text of one bundled chat template."""
    return resources.files("cliffkit.templates").joinpath(name).read_text(encoding="utf-8").strip()


@lru_cache(maxsize=None)
def _trained_bpe(specials: tuple[str, ...]) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    # The think markers are ordinary added tokens in real reasoning tokenizers.
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer.to_str()


def tiny_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """Build a small byte-level BPE tokenizer with the special tokens and template of `style`."""
    spec = STYLES[style]
    backend = Tokenizer.from_str(_trained_bpe(spec.specials))
    if spec.add_bos and spec.bos:
        bos_id = backend.token_to_id(spec.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A $B", special_tokens=[(spec.bos, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec.bos, eos_token=spec.eos,
                                        pad_token=spec.pad)
    tokenizer.chat_template = read_template(spec.template)
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(model_type: str, vocab_size: int, **overrides: Any):
    """Return a small config of `model_type`: 2 layers, 4 query heads, 2 KV heads, width 32."""
    settings: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if model_type in ("gemma2", "gemma3_text", "qwen3", "qwen3_moe"):
        settings["head_dim"] = 8
    if model_type == "qwen3_moe":
        settings.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    settings.update(overrides)
    return AutoConfig.for_model(model_type, **settings)


def tiny_model(family: str = "scaffold", seed: int = 0, dtype: torch.dtype = torch.float32,
               **config_overrides: Any) -> LoadedModel:
    """Build a random-weight model of `family`'s architecture with its tokenizer and think format."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"No tiny model for family {family!r}. Known: {', '.join(sorted(TINY_FAMILIES))}.")
    style, model_type = TINY_FAMILIES[family]
    return _build_tiny(family, style, model_type, f"tiny/{family}", seed, dtype, config_overrides)


def tiny_variant(name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                 **config_overrides: Any) -> LoadedModel:
    """Build the tiny stand-in `name` from `TINY_VARIANTS`, e.g. "qwen3-moe-thinking-2507".

    Example:
        >>> lm = tiny_variant("realsafe-r1-8b")   # doctest: +SKIP
        >>> type(lm.model).__name__               # doctest: +SKIP
        'LlamaForCausalLM'
    """
    if name not in TINY_VARIANTS:
        raise ValueError(f"No tiny variant {name!r}. Known: {', '.join(sorted(TINY_VARIANTS))}.")
    variant = TINY_VARIANTS[name]
    return _build_tiny(variant.family, variant.style, variant.model_type, f"tiny/{name}", seed, dtype,
                       config_overrides)


def _build_tiny(family: str, style: str, model_type: str, model_id: str, seed: int, dtype: torch.dtype,
                config_overrides: dict[str, Any]) -> LoadedModel:
    tokenizer = tiny_tokenizer(style)
    special_ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id)
    config = tiny_config(model_type, vocab_size=len(tokenizer), **{**special_ids, **config_overrides})

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return wrap_model(model, tokenizer, get_family(family), model_id=model_id)
