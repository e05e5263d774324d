"""Rendering and splitting for every family, on tiny models with each family's real think format."""

import pytest

from cliffkit.families import FAMILIES, detect_family, get_family
from cliffkit.render import ANSWER, CLOSE, PROMPT, THINKING, render_prompt, split_generation, tokenize_trace
from cliffkit.testing import TINY_FAMILIES, tiny_model

# What each family's rendered prompt must end with: the opening think marker,
# written by the template (R1 distills, QwQ) or appended by cliffkit.
EXPECTED_ENDINGS = {
    "deepseek-r1-distill-qwen": "<｜User｜>Hi there<｜Assistant｜><think>\n",
    "deepseek-r1-distill-llama": "<｜User｜>Hi there<｜Assistant｜><think>\n",
    "realsafe-r1": "<｜User｜>Hi there<｜Assistant｜><think>\n",
    "skywork-or1": "<｜User｜>Hi there<｜Assistant｜><think>\n",
    "qwq": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "qwen3-thinking": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "phi4-mini-reasoning": "<|user|>Hi there<|end|><|assistant|><think>\n",
    "cliffkit-thinker": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "scaffold": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n",
}


def test_every_family_has_a_tiny_model():
    assert set(TINY_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_render_ends_with_open_think(family):
    lm = tiny_model(family)
    rendered = render_prompt(lm.tokenizer, lm.family, "Hi there")
    assert rendered.text.endswith(EXPECTED_ENDINGS[family])
    # Exactly one opening marker: a template that opens the block must not get a second one.
    assert rendered.text.split("Hi there")[-1].count("<think>") == 1


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_render_has_single_bos(family):
    lm = tiny_model(family)
    rendered = render_prompt(lm.tokenizer, lm.family, "Hi there")
    bos = lm.tokenizer.bos_token_id
    if bos is not None and lm.tokenizer.bos_token in rendered.text[:40]:
        assert rendered.input_ids[0] == bos
        assert rendered.input_ids[1] != bos
    assert rendered.input_ids.count(bos) <= 1 if bos is not None else True


def test_r1_tokenizer_would_double_bos_naively():
    # The bug this guards against: tokenizing the rendered text with special
    # tokens again adds a second BOS on R1-style tokenizers.
    lm = tiny_model("deepseek-r1-distill-qwen")
    rendered = render_prompt(lm.tokenizer, lm.family, "Hi there")
    naive = lm.tokenizer(rendered.text)["input_ids"]
    bos = lm.tokenizer.bos_token_id
    assert naive[:2] == [bos, bos]
    assert rendered.input_ids[:2] != [bos, bos]
    assert rendered.input_ids == naive[1:]


def test_scaffold_adds_system_prompt_and_override():
    lm = tiny_model("scaffold")
    default = render_prompt(lm.tokenizer, lm.family, "Hi")
    assert "think step by step inside <think>" in default.text
    custom = render_prompt(lm.tokenizer, lm.family, "Hi", system="Be brief.")
    assert "Be brief." in custom.text and "think step by step" not in custom.text
    none = render_prompt(lm.tokenizer, lm.family, "Hi", system="")
    assert "You are Qwen" in none.text  # the template's own default system turn


def test_qwen3_passes_enable_thinking():
    lm = tiny_model("qwen3-thinking")
    rendered = render_prompt(lm.tokenizer, lm.family, "Hi")
    # With enable_thinking=False the template would write an empty think block.
    assert "</think>" not in rendered.text


def test_missing_chat_template_error():
    lm = tiny_model("scaffold")
    lm.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(lm.tokenizer, lm.family, "Hi")


@pytest.mark.parametrize(
    "text, thinking, answer, closed",
    [
        ("I should refuse.</think>\n\nI can't help.", "I should refuse.", "I can't help.", True),
        ("<think>\nplan</think>answer", "plan", "answer", True),
        ("no close marker at all", "no close marker at all", "", False),
        ("a</think>b</think>c", "a", "b</think>c", True),
        ("</think>direct", "", "direct", True),
    ],
)
def test_split_generation(text, thinking, answer, closed):
    split = split_generation(text, get_family("deepseek-r1-distill-qwen"))
    assert (split.thinking, split.answer, split.closed) == (thinking, answer, closed)


@pytest.mark.parametrize(
    "model_id, expected",
    [
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-r1-distill-qwen"),
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "deepseek-r1-distill-llama"),
        ("Qwen/QwQ-32B", "qwq"),
        ("Qwen/Qwen3-4B-Thinking-2507", "qwen3-thinking"),
        ("microsoft/Phi-4-mini-reasoning", "phi4-mini-reasoning"),
        ("Skywork/Skywork-OR1-7B", "skywork-or1"),
        ("RealSafe/RealSafe-R1-7B", "realsafe-r1"),
        ("/cache/models--deepseek-ai--DeepSeek-R1-Distill-Qwen-1.5B/snapshots/abc", "deepseek-r1-distill-qwen"),
    ],
)
def test_detect_family(model_id, expected):
    assert detect_family(model_id).name == expected


def test_detect_family_falls_back_to_model_type():
    assert detect_family("my-org/some-instruct", "llama").name == "scaffold"
    with pytest.raises(ValueError, match="No model family matches"):
        detect_family("my-org/some-model", "mamba")


def test_unknown_family_lists_known():
    with pytest.raises(ValueError, match="deepseek-r1-distill-qwen"):
        get_family("nope")


def test_tokenize_trace_segments():
    lm = tiny_model("deepseek-r1-distill-qwen")
    rendered = render_prompt(lm.tokenizer, lm.family, "Hi")
    tokens = tokenize_trace(lm.tokenizer, lm.family, rendered.text, "think a bit", "Sure.", until="answer")
    labels = tokens.segments.tolist()
    assert labels == sorted(labels)  # prompt, thinking, close, answer in order
    assert tokens.input_ids[: len(rendered.input_ids)].tolist() == rendered.input_ids
    assert set(labels) == {PROMPT, THINKING, CLOSE, ANSWER}
    start, end = tokens.segment_bounds(CLOSE)
    decoded = lm.tokenizer.decode(tokens.input_ids[start:end].tolist())
    assert decoded == lm.family.forced_close
    short = tokenize_trace(lm.tokenizer, lm.family, rendered.text, "think a bit", "Sure.")
    assert short.segments[-1].item() == CLOSE
